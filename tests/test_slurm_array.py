"""workflows/slurm_array.sh with fake SLURM variables and stub apptainer/sbatch commands
that record their arguments (no scheduler, no container)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "workflows" / "slurm_array.sh"

STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_DIR/$(basename "$0").args"
{stdout}
exit ${{STUB_RC:-0}}
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def stubs(tmp_path):
    """A PATH with stub ``apptainer`` and ``sbatch``; ``stubs.args(name)`` reads what a stub
    was called with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, stdout in (("apptainer", ""), ("sbatch", "echo 'Submitted batch job 42'")):
        (bin_dir / name).write_text(STUB.format(stdout=stdout))
        (bin_dir / name).chmod(0o755)

    class Stubs:
        dir = tmp_path

        @staticmethod
        def args(name):
            path = tmp_path / f"{name}.args"
            return path.read_text().splitlines() if path.exists() else None

    return Stubs


def _bids(root, subjects=("01", "02", "03"), tsv=None):
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    for sub in subjects:
        (root / f"sub-{sub}" / "anat").mkdir(parents=True)
    if tsv is not None:
        (root / "participants.tsv").write_text(tsv)
    return root


def _run(stubs, *args, cwd=None, **env):
    base = {"PATH": f"{stubs.dir / 'bin'}:{os.environ['PATH']}", "STUB_DIR": str(stubs.dir),
            "TMPDIR": str(stubs.dir / "tmp"), "HOME": str(stubs.dir)}  # fmt: skip
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        env={**base, **{k: str(v) for k, v in env.items()}},
        capture_output=True,
        text=True,
        cwd=cwd or stubs.dir,
        timeout=60,
    )


def _option(args, name):
    return args[args.index(name) + 1] if name in args else None


def test_participants_tsv_without_final_newline(tmp_path, stubs):
    bids = _bids(tmp_path / "bids", tsv="participant_id\tage\nsub-01\t30\nsub-02\t31")
    assert _run(stubs, "count", bids).stdout.strip() == "2"  # wc -l said 1
    proc = _run(stubs, bids, tmp_path / "out", "--inversion", "rts", SLURM_ARRAY_TASK_ID=2)
    assert proc.returncode == 0, proc.stderr
    args = stubs.args("apptainer")
    assert args[:2] == ["run", "--cleanenv"]
    assert f"{bids}:/bids:ro" in args and f"{tmp_path / 'out'}:/out" in args
    assert _option(args, "--participant-label") == "02"
    assert args[-2:] == ["--inversion", "rts"]  # the user's options come last


def test_participant_id_column_crlf_and_blank_lines(tmp_path, stubs):
    tsv = "age\tparticipant_id\r\n30\tsub-b\r\n\r\n31\tsub-a\r\n\r\n"
    bids = _bids(tmp_path / "bids", subjects=("a", "b"), tsv=tsv)
    assert _run(stubs, "count", bids).stdout.strip() == "2"
    _run(stubs, bids, tmp_path / "out", SLURM_ARRAY_TASK_ID=1)
    assert _option(stubs.args("apptainer"), "--participant-label") == "b"  # the file's order


def test_without_participants_tsv_the_sub_folders_are_listed(tmp_path, stubs):
    bids = _bids(tmp_path / "bids", subjects=("10", "02", "03"))
    (bids / "sub-99.txt").write_text("not a folder")
    assert _run(stubs, "count", bids).stdout.strip() == "3"
    labels = []
    for task in (1, 2, 3):
        proc = _run(stubs, bids, tmp_path / "out", SLURM_ARRAY_TASK_ID=task)
        assert proc.returncode == 0, proc.stderr
        labels.append(_option(stubs.args("apptainer"), "--participant-label"))
    assert labels == ["02", "03", "10"]
    proc = _run(stubs, bids, tmp_path / "out", SLURM_ARRAY_TASK_ID=4)
    assert proc.returncode == 18 and "no participant number 4" in proc.stderr


@pytest.mark.parametrize(
    ("env", "mem"),
    [
        ({"SLURM_MEM_PER_NODE": 16384}, "16384"),
        ({"SLURM_MEM_PER_CPU": 2000, "SLURM_CPUS_PER_TASK": 4}, "8000"),
        ({"SLURM_MEM_PER_GPU": 10000, "SLURM_GPUS_ON_NODE": 2}, "20000"),
        ({"SLURM_MEM_PER_NODE": 512}, "512"),  # was --mem-gb 0
        ({}, None),  # no memory from SLURM: qsmprep's default
        ({"SLURM_MEM_PER_NODE": 0}, None),  # never --mem 0
    ],
)
def test_memory_from_any_slurm_variable(tmp_path, stubs, env, mem):
    bids = _bids(tmp_path / "bids")
    proc = _run(stubs, bids, tmp_path / "out", SLURM_ARRAY_TASK_ID=1, **env)
    assert proc.returncode == 0, proc.stderr
    args = stubs.args("apptainer")
    assert _option(args, "--mem") == mem
    assert "--mem-gb" not in args
    threads = str(env.get("SLURM_CPUS_PER_TASK", 1))
    assert _option(args, "--nprocs") == _option(args, "--omp-nthreads") == threads


@pytest.mark.parametrize(
    ("keep", "rc", "kept"),
    [(None, 0, False), (None, 1, True), ("always", 0, True), ("never", 1, False)],
)
def test_work_dir_is_cleaned_or_kept_on_purpose(tmp_path, stubs, keep, rc, kept):
    bids = _bids(tmp_path / "bids")
    env = {"SLURM_ARRAY_TASK_ID": 2, "QSMPREP_WORK": tmp_path / "scratch", "STUB_RC": rc}
    if keep:
        env["QSMPREP_KEEP_WORK"] = keep
    proc = _run(stubs, bids, tmp_path / "out", **env)
    assert proc.returncode == rc  # qsmprep's exit code is the task's
    work = tmp_path / "scratch" / "sub-02"
    assert f"{work}:/work" in stubs.args("apptainer")
    assert work.is_dir() == kept
    assert ("work directory kept" in proc.stderr) == kept


def test_default_work_root_is_tmpdir_and_options_come_from_the_environment(tmp_path, stubs):
    bids = _bids(tmp_path / "bids")
    proc = _run(stubs, bids, tmp_path / "out", SLURM_ARRAY_TASK_ID=1, QSMPREP_NV="--nv",
                QSMPREP_SIF="/images/q.sif", QSMPREP_BIND="/scratch/plugins",
                QSMPREP_KEEP_WORK="always")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    args = stubs.args("apptainer")
    assert args[:3] == ["run", "--cleanenv", "--nv"]
    assert f"{stubs.dir / 'tmp' / 'qsmprep-work' / 'sub-01'}:/work" in args
    assert "/scratch/plugins" in args and "/images/q.sif" in args
    assert _run(stubs, bids, tmp_path / "o", SLURM_ARRAY_TASK_ID=1,
                QSMPREP_KEEP_WORK="sometimes").returncode == 64  # fmt: skip


def test_submit_creates_the_log_folder_and_sizes_the_array(tmp_path, stubs):
    bids = _bids(tmp_path / "bids", tsv="participant_id\nsub-01\nsub-02\nsub-03\n")
    env = {"QSMPREP_LOGS": tmp_path / "slurm-logs", "QSMPREP_SBATCH_ARGS": "--time=02:00:00"}
    proc = _run(stubs, "submit", bids, tmp_path / "out", "--inversion", "tkd", **env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "slurm-logs").is_dir()
    args = stubs.args("sbatch")
    assert args[:3] == ["--array=1-3", f"--output={tmp_path / 'slurm-logs'}/qsmprep-%A_%a.out",
                        "--time=02:00:00"]  # fmt: skip
    assert args[4:] == [str(bids), str(tmp_path / "out"), "--inversion", "tkd"]
    assert Path(args[3]).name == "slurm_array.sh"


def test_submit_refuses_a_dataset_without_participants(tmp_path, stubs):
    bids = _bids(tmp_path / "bids", subjects=())
    proc = _run(stubs, "submit", bids, tmp_path / "out")
    assert proc.returncode == 18 and "no participants" in proc.stderr
    assert stubs.args("sbatch") is None
    bids2 = _bids(tmp_path / "bids2", tsv="participant\nsub-01\n")
    proc = _run(stubs, "count", bids2)
    assert proc.returncode != 0 and "no participant_id column" in proc.stderr


def test_without_array_task_it_says_how_to_submit(tmp_path, stubs):
    proc = _run(stubs, _bids(tmp_path / "bids"), tmp_path / "out")
    assert proc.returncode != 0 and "sbatch --array" in proc.stderr
    assert _run(stubs).returncode == 64
