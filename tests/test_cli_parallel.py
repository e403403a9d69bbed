"""Participants in parallel within --nprocs/--mem, end to end on the 4 mm phantom.

sub-01 and sub-03 are fine; sub-02's phase is neither radians nor integers, so its first
step fails. Concurrency is proven by the participants' own logs: their time spans overlap.
"""

import datetime
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import alive, spoil_phase

from qsmprep.cli.parallel import ParticipantPool, Plan, plan
from qsmprep.workflows.base import STAGE_DIRNAME


def test_plan_shares_processes_threads_and_memory():
    # two participants, two processes: one each, one thread each, half the memory
    assert plan(2, 2, 2, 8.0, 0.5) == Plan(2, 1, 1, 4.0)
    # more participants than processes: as many at once as processes
    assert plan(5, 4, 4, 8.0, 0.5) == Plan(4, 1, 1, 2.0)
    # processes to spare: each participant's graph gets its share, threads at most that
    assert plan(3, 8, 8, 12.0, 0.5) == Plan(3, 2, 2, 4.0)
    assert plan(2, 8, 1, 12.0, 0.5) == Plan(2, 4, 1, 6.0)
    # memory for two of the heaviest participants at once, not three
    assert plan(3, 8, 2, 5.0, 2.0) == Plan(2, 4, 2, 2.5)
    # one at a time (with every resource): one participant, one process, too little
    # memory, or parallelism not allowed (a nipype plugin file, the U-Net on a GPU)
    assert plan(1, 8, 8, 8.0, 0.5) == Plan(1, 8, 8, 8.0)
    assert plan(3, 1, 1, None, 0.5) == Plan(1, 1, 1, None)
    assert plan(3, 8, 8, 3.0, 2.0) == Plan(1, 8, 8, 3.0)
    assert plan(3, 8, 8, None, 0.5, allowed=False) == Plan(1, 8, 8, None)
    # without --mem: the machine's memory is the limit
    auto = plan(2, 2, 2, None, 0.5)
    assert auto.parallel == 2 and auto.mem_gb is not None and auto.mem_gb > 0.25


def _fake(subject: str) -> list[str]:
    """A participant's work: fine, failing, or its process killed."""
    if subject.startswith("killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    return ["it failed"] if subject.startswith("fails") else []


def test_pool_collects_each_result_and_a_dying_process_fails_only_its_participant():
    results, rest = ParticipantPool(_fake, 2).run(["ok", "killed", "fails", "ok2"])
    assert rest == []
    assert results["ok"] == results["ok2"] == [] and results["fails"] == ["it failed"]
    (line,) = results["killed"]
    assert line.startswith("its process was killed by SIGKILL (out of memory?)")


def test_pool_starts_nothing_after_a_failure_when_asked():
    results, rest = ParticipantPool(_fake, 1).run(["ok", "fails", "ok2", "killed"], True)
    assert list(results) == ["ok", "fails"] and rest == ["ok2", "killed"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_participants_end_when_the_main_process_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import os, time
        from qsmprep.cli.parallel import ParticipantPool

        def work(subject):
            open(os.path.join({str(tmp_path)!r}, subject), "w").write(str(os.getpid()))
            time.sleep(60)
            return []

        ParticipantPool(work, 2).run(["a", "b"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / s).is_file() and (tmp_path / s).read_text() for s in "ab"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pids = [int((tmp_path / s).read_text()) for s in "ab"]
        proc.kill()  # SIGKILL: no cleanup in the main process
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, pids)), "orphaned participants"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def study(small_phantom, tmp_path_factory, copy_participant):
    root = tmp_path_factory.mktemp("parallel") / "bids"
    shutil.copytree(small_phantom.root, root)
    for sub in ("02", "03"):
        copy_participant(root, "01", sub)
    spoil_phase(root / "sub-02" / "anat" / "sub-02_echo-2_part-phase_MEGRE.nii.gz")
    return root


def _run(run_cli, root, base, *options):
    return run_cli(
        [root, base / "out", "participant", "-w", base / "work", "--nprocs", "2",
         "--skip-bids-validation", "--inversion", "tkd", *options]
    )  # fmt: skip


def _log(out, sub):
    (log,) = (out / f"sub-{sub}" / "log").glob("*/qsmprep.log")
    return log.read_text()


def _span(text):
    """First and last time stamp of a participant's log."""
    stamps = [ln[:23] for ln in text.splitlines() if ln[:4].isdigit()]
    return tuple(
        datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1])
    )


def test_participants_run_at_once_and_a_failure_stays_with_its_participant(
    study, tmp_path, run_cli
):
    out = tmp_path / "out"
    code, err = _run(run_cli, study, tmp_path)
    assert code == 1 and "Traceback" not in err
    assert "2 of 3 participants at a time" in err
    (line,) = [ln for ln in err.splitlines() if "failed:" in ln]
    assert line.startswith("qsmprep: sub-02 failed: ") and "prepare_echoes" in line
    assert "outputs of 2 participant(s)" in err
    for sub in ("01", "03"):
        assert (out / f"sub-{sub}" / "anat" / f"sub-{sub}_Chimap.nii.gz").is_file()
        assert (out / f"sub-{sub}.html").is_file()
    assert not (out / "sub-02" / "anat").exists()
    assert not (out / STAGE_DIRNAME).exists()
    logs = {sub: _log(out, sub) for sub in ("01", "02", "03")}
    assert "prepare_echoes" in next((out / "sub-02" / "log").glob("*/errors.txt")).read_text()
    for sub, text in logs.items():  # each log holds its own participant's messages only
        others = [s for s in logs if s != sub]
        assert not any(f"sub-{o}" in text or f"sub_{o}" in text for o in others), sub
        assert f"sub-{sub}: report " in text
    # sub-01 and sub-02 started together: their logs' time spans overlap
    (start1, end1), (start2, end2) = _span(logs["01"]), _span(logs["02"])
    assert start1 < end2 and start2 < end1, (start1, end1, start2, end2)
    # sub-03 took the free place once sub-02 had failed
    assert _span(logs["03"])[0] >= end2 - datetime.timedelta(seconds=1)
    # each log records the settings as given, and the participant's share of them
    (toml,) = (out / "sub-01" / "log").glob("*/qsmprep.toml")
    assert "nprocs = 2\n" in toml.read_text()
    assert (
        "sub-01: beside other participants, with 1 nipype process(es), 1 thread(s)" in logs["01"]
    )


@pytest.mark.slow
def test_stop_on_first_crash_in_parallel_starts_no_further_participant(study, tmp_path, run_cli):
    out = tmp_path / "out"
    code, err = _run(run_cli, study, tmp_path, "--stop-on-first-crash")
    assert code == 1
    assert "sub-02 failed: " in err and "prepare_echoes" in err
    # sub-01 was running beside sub-02: it finished; sub-03 never started
    assert (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").is_file()
    assert not (out / "sub-03").exists()
    assert "already running finished); not processed: sub-03" in err
    assert err.count("sub-03") == 1
