"""``--use-plugin workflows/nipype_slurm.yml`` end to end, with stub ``sbatch``, ``squeue``
and ``apptainer`` commands: sbatch runs each job script at once, apptainer runs the
command it was given on the host. LOGNAME is unset, as in a container."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from qsmprep.sim import SubjectSpec, write_bids_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "workflows" / "nipype_slurm.yml"

SBATCH = """#!/usr/bin/env bash
# sbatch [options] SCRIPT: run SCRIPT now, with its output where -o says
out=/dev/null
while (($# > 1)); do
    case $1 in -o) out=$2; shift 2 ;; *) echo "$1" >> "$STUB_DIR/sbatch.args"; shift ;; esac
done
bash "$1" > "$out" 2>&1
n=$(( $(ls "$STUB_DIR" | grep -c '^job-') + 1 )); cp "$1" "$STUB_DIR/job-$n.sh"
echo "Submitted batch job $n"
"""
SQUEUE = """#!/usr/bin/env bash
echo "JOBID PARTITION NAME USER ST TIME NODES NODELIST(REASON)"
"""
APPTAINER = """#!/usr/bin/env bash
# apptainer exec [options] IMAGE COMMAND...: run COMMAND here
echo "$*" >> "$STUB_DIR/apptainer.args"
shift
while [[ $1 == -* ]]; do case $1 in -B|--bind) shift 2 ;; *) shift ;; esac; done
shift
exec "$@"
"""


@pytest.fixture
def stub_path(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("squeue", SQUEUE), ("apptainer", APPTAINER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_DIR", str(tmp_path))
    monkeypatch.delenv("LOGNAME", raising=False)
    return tmp_path


def test_example_plugin_file():
    plugin = yaml.safe_load(EXAMPLE.read_text())
    assert plugin["plugin"] == "SLURM"
    template = plugin["plugin_args"]["template"]
    assert template.startswith("#!/bin/bash\n")
    # nipype appends "<python> <script>" on the next line: the backslash continues into it
    assert template.rstrip("\n").endswith("qsmprep.sif \\")
    assert "apptainer exec --cleanenv" in template


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_plugin_runs_every_step_as_a_job(tmp_path, stub_path, run_cli):
    root = tmp_path / "bids"
    write_bids_dataset(root, [SubjectSpec("01", seed=0)], preset="small")
    code, err = run_cli(
        [root, tmp_path / "out", "participant", "-w", tmp_path / "work",
         "--skip-bids-validation", "--use-plugin", EXAMPLE]
    )  # fmt: skip
    assert code == 0, err  # was KeyError: 'LOGNAME'
    assert (tmp_path / "out/sub-01/anat/sub-01_Chimap.nii.gz").is_file()
    jobs = sorted(stub_path.glob("job-*.sh"))
    assert len(jobs) >= 5  # each step was a job
    script = jobs[0].read_text()
    assert "apptainer exec --cleanenv -B /data qsmprep.sif \\\n" in script
    sbatch = (stub_path / "sbatch.args").read_text().split()
    assert "--time=00:30:00" in sbatch and "-J" in sbatch
    assert os.environ["LOGNAME"]  # set for nipype's job names


def test_batch_plugins_get_a_logname(tmp_path, monkeypatch):
    from qsmprep.cli.run import _plugin, parse_args

    monkeypatch.delenv("LOGNAME", raising=False)
    base = [str(tmp_path), str(tmp_path / "o"), "participant"]
    _plugin(parse_args(base + ["--nprocs", "2"]))
    assert "LOGNAME" not in os.environ  # MultiProc does not need it
    name, args = _plugin(parse_args(base + ["--use-plugin", str(EXAMPLE)]))
    assert name == "SLURM" and args["sbatch_args"].startswith("--time")
    assert os.environ["LOGNAME"]
    # a UID without a passwd entry, as with docker run --user 1234:1234
    monkeypatch.delenv("LOGNAME")
    for var in ("USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    _plugin(parse_args(base + ["--use-plugin", str(EXAMPLE)]))
    assert os.environ["LOGNAME"] == f"uid{os.getuid()}"
