"""Messy inputs end to end on the small (4 mm) head phantom: broken files in one
participant, runs that fail late or are re-run, and interruptions. No traceback may reach
the terminal, and no run's outputs may land half-written or mixed with another's."""

import html
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import alive, children, descendants

from qsmprep.interfaces.bids import commit_files
from qsmprep.workflows.base import RUN_OUTPUT_TAILS, STAGE_DIRNAME

TKD = ["--nprocs", "1", "--skip-bids-validation", "--inversion", "tkd"]


@pytest.fixture
def dataset(small_phantom):
    return small_phantom


def _clone(dataset, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(dataset.root, root)
    return root


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _is_report_file(rel: str) -> bool:
    """The files that every invocation rewrites for its participants, successful or not:
    log folders, reports, the figures the report draws from the outputs, citations."""
    parts = rel.split("/")
    return (
        "log" in parts
        or parts[0] == "logs"
        or rel.endswith(".html")
        or ("figures" in parts and "_desc-phase_qc." not in rel)  # phase: staged with the run
    )


def _outputs(folder):
    """:func:`_snapshot` of the run outputs (the phase figure, staged with them, included)."""
    return {k: v for k, v in _snapshot(folder).items() if not _is_report_file(k)}


def _errors(out, sub):
    """The errors.txt of the participant's newest log folder (the report's error list)."""
    (latest, *_) = sorted((out / f"sub-{sub}" / "log").iterdir(), reverse=True)
    return (latest / "errors.txt").read_text()


#: participant -> (what is broken in it, what its one-line error must say)
BROKEN = {
    "02": ("echo-2_part-phase_MEGRE.json", "{bad", "phase_MEGRE.json is not valid JSON"),
    "03": ("echo-1_part-mag_MEGRE.json", "[0.004]", "must hold a JSON object, not a list"),
    "04": ("echo-3_part-phase_MEGRE.json", '{"EchoTime": [0.004, 0.008]}', "is a list"),
    "05": ("echo-2_part-mag_MEGRE.json", '{"EchoTime": "4 ms"}', 'not "4 ms"'),
    "06": ("echo-4_part-phase_MEGRE.nii.gz", "", "phase_MEGRE.nii.gz cannot be read as a NIfTI"),
    "07": ("echo-3_part-mag_MEGRE.nii.gz", None, "mag_MEGRE.nii.gz cannot be read; the file is"),
}


def test_broken_files_fail_only_their_participant(dataset, tmp_path, run_cli, copy_participant):
    root = _clone(dataset, tmp_path)
    for sub, (name, content, _) in BROKEN.items():
        path = copy_participant(root, "01", sub) / f"sub-{sub}_{name}"
        if content is None:  # a truncated .nii.gz: its header reads, its data do not
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_text(content)
    out = tmp_path / "out"
    code, err = run_cli([root, out, "participant", "-w", tmp_path / "work", *TKD])
    assert code == 1
    assert "Traceback" not in err
    for sub, (name, _, message) in BROKEN.items():
        (line,) = [ln for ln in err.splitlines() if f"sub-{sub} failed:" in ln]
        assert f"sub-{sub}_{name.split('.')[0]}" in line and message in line, line
        assert not (out / f"sub-{sub}" / "anat").exists()  # only its log and report
        assert message in _errors(out, sub)
        assert message in html.unescape((out / f"sub-{sub}.html").read_text())
    assert "crash file: " in line  # the truncated file fails in a node: see its crash file
    assert (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").is_file()
    assert not (out / STAGE_DIRNAME).exists()


def test_a_failed_rerun_leaves_the_complete_outputs_untouched(dataset, tmp_path, run_cli):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [dataset.root, out, "participant", "-w", work, *TKD]
    code, err = run_cli(argv)
    assert code == 0, err
    before = _outputs(out)
    assert "sub-01/anat/sub-01_desc-romeo_quality.nii.gz" in before
    assert "sub-01/figures/sub-01_desc-phase_qc.png" in before
    # a late failure (the inversion cannot load its model) after new fields were computed
    model = tmp_path / "corrupt.pt"
    model.write_bytes(b"not a model")
    code, err = run_cli(argv + ["--bf-removal", "vsharp", "--inversion", "adaptive-unet",
                                "--model", model, "--device", "cpu"])  # fmt: skip
    assert code == 1 and "dipole_inversion (run of sub-01_echo-1_part-phase" in err
    assert _outputs(out) == before  # nothing of the failed run landed
    assert "dipole_inversion" in _errors(out, "01")  # its report says why
    # a successful re-run replaces the whole set, including files it no longer makes
    code, err = run_cli(argv + ["--bf-removal", "vsharp", "--unwrapping", "laplacian"])
    assert code == 0, err
    anat = out / "sub-01" / "anat"
    assert not (anat / "sub-01_desc-romeo_quality.nii.gz").exists()
    for name in ("Chimap", "localfield"):
        meta = json.loads((anat / f"sub-01_{name}.json").read_text())
        assert meta["BackgroundFieldRemoval"]["Method"] == "vsharp"
    assert not (out / STAGE_DIRNAME).exists()


def test_commit_replaces_only_the_runs_own_files(tmp_path):
    stage, out = tmp_path / "stage", tmp_path / "out"
    anat = "sub-01/anat"
    for folder, names in (
        (stage, ["sub-01_Chimap.nii.gz", "sub-01_Chimap.json"]),
        (out, ["sub-01_Chimap.nii.gz", "sub-01_swi.nii.gz", "sub-01_desc-romeo_quality.json",
               "sub-01_run-2_swi.nii.gz", "sub-01_notes.txt"]),
    ):  # fmt: skip
        (folder / anat).mkdir(parents=True)
        for name in names:
            (folder / anat / name).write_text(f"{folder.name} {name}")
    staged = sorted(str(p) for p in (stage / anat).iterdir())
    replaces = f"{anat}/sub-01_".replace("-", r"\-") + RUN_OUTPUT_TAILS
    new = commit_files(staged, stage, out, replaces)
    assert sorted(p.name for p in (out / anat).iterdir()) == [
        "sub-01_Chimap.json", "sub-01_Chimap.nii.gz", "sub-01_notes.txt",
        "sub-01_run-2_swi.nii.gz",
    ]  # fmt: skip
    assert (out / anat / "sub-01_Chimap.nii.gz").read_text() == "stage sub-01_Chimap.nii.gz"
    assert sorted(new) == [str(out / anat / "sub-01_Chimap.json"),
                           str(out / anat / "sub-01_Chimap.nii.gz")]  # fmt: skip
    assert not list((stage / anat).iterdir())


def test_commit_keeps_runs_whose_names_extend_the_prefix(tmp_path):
    """Outputs keep every entity: sub-01 (T1w), sub-01_inv-1 (MP2RAGE) and sub-01_task-rest
    are three runs, and committing one replaces none of the others' files."""
    from qsmprep.workflows.base import run_outputs_pattern

    stage, out = tmp_path / "stage", tmp_path / "out"
    anat = "sub-01/anat"
    prefixes = ("sub-01", "sub-01_inv-1", "sub-01_task-rest", "sub-01_task-rest_run-2")
    (out / anat).mkdir(parents=True)
    for prefix in prefixes:
        for tail in ("Chimap.nii.gz", "Chimap.json", "desc-romeo_quality.nii.gz"):
            (out / anat / f"{prefix}_{tail}").write_text("old")
    for prefix in prefixes:
        (stage / anat).mkdir(parents=True, exist_ok=True)
        (stage / anat / f"{prefix}_Chimap.nii.gz").write_text("new")
        staged = [str(stage / anat / f"{prefix}_Chimap.nii.gz")]
        commit_files(staged, stage, out, run_outputs_pattern(anat, prefix))
        left = {p.name: p.read_text() for p in (out / anat).iterdir()}
        assert left[f"{prefix}_Chimap.nii.gz"] == "new"
        assert f"{prefix}_Chimap.json" not in left  # its earlier set is replaced
        for other in prefixes[prefixes.index(prefix) + 1 :]:  # not committed yet: untouched
            assert left[f"{other}_Chimap.json"] == "old"
            assert left[f"{other}_desc-romeo_quality.nii.gz"] == "old"


def test_run_output_tails_cover_every_output_the_reports_read():
    """A new set of a run's outputs must replace each kind that the reports know."""
    import re

    from qsmprep.reports.outputs import OUTPUT_SUFFIXES, QUALITY_SUFFIX

    names = [
        f"{suffix}.{ext}" for suffix in OUTPUT_SUFFIXES.values() for ext in ("nii.gz", "json")
    ]
    names += [f"desc-romeo_{QUALITY_SUFFIX}.nii.gz", f"desc-romeo_{QUALITY_SUFFIX}.json"]
    assert [n for n in names if not re.fullmatch(RUN_OUTPUT_TAILS, n)] == []


def _start_until(args: list, tmp_path: Path, ready) -> tuple[subprocess.Popen, Path]:
    """Start ``qsmprep ARGS`` in its own session (one thread per worker, output to a file)
    and return once ``ready(proc)`` holds (within 180 s): the process and its output file."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stream:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qsmprep.cli.run", *map(str, args)],
            stdout=stream, stderr=stream, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not ready(proc):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run did not reach the inversion"
            time.sleep(0.05)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc, log


def _interrupt(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    """Send ``sig`` as a user or a scheduler would (SIGINT: Ctrl-C, to the whole process
    group; SIGTERM: to the main process, e.g. at a time limit); return the exit code."""
    try:
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_all_end(pids: list[int], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "orphaned processes"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize(
    "sig, resume",
    [(signal.SIGTERM, False), pytest.param(signal.SIGINT, True, marks=pytest.mark.slow)],
)
def test_interruption_stops_workers_and_cleans_up_and_the_run_resumes(
    dataset, tmp_path, run_cli, sig, resume
):
    out, work = tmp_path / "out", tmp_path / "work"
    # the bundled U-Net on one thread: an inversion that lasts seconds, in a worker
    args = [dataset.root, out, "participant", "-w", work, "--skip-bids-validation",
            "--inversion", "adaptive-unet", "--device", "cpu", "--omp-nthreads", "1"]  # fmt: skip
    inverting = work / "sub_01_wf" / "qsm_sub_01_wf" / "dipole_inversion"
    proc, log = _start_until(
        [*args, "--nprocs", "2"],
        tmp_path,
        lambda proc: (
            inverting.is_dir()
            and any(out.glob(f"{STAGE_DIRNAME}/**/sub-01_localfield.nii.gz"))
            and bool(descendants(proc.pid))
        ),
    )
    workers = descendants(proc.pid)
    code = _interrupt(proc, sig, timeout=60)
    err = log.read_text()
    assert code == 128 + sig, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.splitlines()[-1].startswith(f"qsmprep: interrupted by {sig.name}: stopped")
    _assert_all_end(workers)
    assert not (out / STAGE_DIRNAME).exists() and not (out / "sub-01" / "anat").exists()
    assert f"interrupted by {sig.name}" in _errors(out, "01")  # its log and report say so
    assert f"interrupted by {sig.name}" in (out / "sub-01.html").read_text()
    if not resume:
        return
    # The same command resumes from the work directory: only the inversion runs again, and
    # the outputs are those of an uninterrupted run.
    mask_result = next(work.glob("sub_01_wf/*/background_removal/result_*.pklz"))
    stamp = mask_result.stat().st_mtime_ns
    code, err = run_cli([*args, "--nprocs", "1"])
    assert code == 0, err
    assert mask_result.stat().st_mtime_ns == stamp
    ref = tmp_path / "ref"
    code, err = run_cli([*args[:1], ref, "participant", "-w", tmp_path / "ref_work",
                         *args[5:], "--nprocs", "1"])  # fmt: skip
    assert code == 0, err
    assert _outputs(out / "sub-01") == _outputs(ref / "sub-01")


def test_a_second_signal_is_ignored_during_cleanup_except_where_it_may_abort(monkeypatch):
    import logging

    from qsmprep.cli import interrupt
    from qsmprep.cli.interrupt import Interrupted, handle_signals, next_signal_aborts

    monkeypatch.setattr(interrupt, "_pool_broken", [])  # this process's state stays as it was
    monkeypatch.setattr(logging.getLogger("concurrent.futures"), "filters", [])
    with handle_signals():
        with pytest.raises(Interrupted) as first:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises here
        assert first.value.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # ignored: the cleanup must finish
        time.sleep(0.05)
        with pytest.raises(Interrupted) as second, next_signal_aborts():
            os.kill(os.getpid(), signal.SIGINT)  # cuts the optional part short
            time.sleep(1)
        assert second.value.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # ignored again after the block
        time.sleep(0.05)


def _two_participants_at_the_inversion(dataset, tmp_path, copy_participant):
    """Start qsmprep on two participants at once, each with two nipype processes (the
    U-Net inverts in a worker of each participant's process), and return once both reach
    the inversion: the process, the output folder and the stderr file."""
    root = _clone(dataset, tmp_path)
    copy_participant(root, "01", "02")
    out, work = tmp_path / "out", tmp_path / "work"
    args = [root, out, "participant", "-w", work, "--skip-bids-validation", "--nprocs", "4",
            "--inversion", "adaptive-unet", "--device", "cpu", "--omp-nthreads", "1"]  # fmt: skip
    proc, log = _start_until(
        args,
        tmp_path,
        lambda proc: (
            len(list(work.glob("sub_0[12]_wf/qsm_*/dipole_inversion"))) == 2
            and len(descendants(proc.pid)) >= 4
        ),
    )
    return proc, out, log


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_interrupting_participants_in_parallel_stops_every_process(
    dataset, tmp_path, copy_participant, sig
):
    proc, out, log = _two_participants_at_the_inversion(dataset, tmp_path, copy_participant)
    processes = descendants(proc.pid)
    # either way the main process passes the signal on: the participants lead their own groups
    code = _interrupt(proc, sig, timeout=90)
    err = log.read_text()
    assert code == 128 + sig, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"qsmprep: interrupted by {sig.name}: stopped 2 worker"), last
    assert last.endswith("the logs and reports of sub-01, sub-02 say so"), last
    _assert_all_end(processes)
    assert not (out / STAGE_DIRNAME).exists()
    for sub in ("01", "02"):
        assert not (out / f"sub-{sub}" / "anat").exists()
        assert f"interrupted by {sig.name}" in _errors(out, sub)
        assert f"interrupted by {sig.name}" in (out / f"sub-{sub}.html").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_a_participant_killed_in_parallel_fails_alone_and_leaves_no_process(
    dataset, tmp_path, copy_participant
):
    proc, out, log = _two_participants_at_the_inversion(dataset, tmp_path, copy_participant)
    try:
        victim = min(children(proc.pid))  # the first participant's process
        workers = descendants(victim)
        assert workers  # its nipype workers, which the kill leaves without their parent
        os.kill(victim, signal.SIGKILL)  # e.g. the kernel's out-of-memory killer
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = log.read_text()
    assert code == 1 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if " failed: " in ln]
    assert line.startswith("qsmprep: sub-01 failed: its process was killed by SIGKILL"), line
    assert (out / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").is_file()  # the other one
    assert not (out / "sub-01" / "anat").exists() and not (out / STAGE_DIRNAME).exists()
    assert "killed by SIGKILL" in _errors(out, "01")  # its log and report say so
    assert "killed by SIGKILL" in (out / "sub-01.html").read_text()
    assert not any(alive(pid) for pid in workers), "orphaned worker processes"
