"""fMRIPrep's execution options end to end on the 4 mm phantom: --stop-on-first-crash,
--write-graph, --resource-monitor and --clean-workdir.

sub-01 has two runs: acq-a, whose phase is neither radians nor integers (its first
step fails), and acq-b, which is fine; sub-02 is fine.
"""

import json

import pytest
from helpers import spoil_phase

from qsmprep.sim import SubjectSpec, write_bids_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("exec") / "bids"
    specs = [SubjectSpec("01", acq="a", seed=0), SubjectSpec("01", acq="b", seed=0),
             SubjectSpec("02", seed=0)]  # fmt: skip
    write_bids_dataset(root, specs, preset="small")
    spoil_phase(root / "sub-01" / "anat" / "sub-01_acq-a_echo-2_part-phase_MEGRE.nii.gz")
    return root


def _run(run_cli, dataset, base, *options):
    return run_cli(
        [dataset, base / "out", "participant", "-w", base / "work", "--nprocs", "1",
         "--skip-bids-validation", *options]
    )  # fmt: skip


def test_without_stop_on_first_crash_the_rest_is_processed(dataset, tmp_path, run_cli):
    code, err = _run(run_cli, dataset, tmp_path)
    assert code == 1
    assert "sub-01 failed: " in err and "prepare_echoes" in err
    assert (tmp_path / "out/sub-01/anat/sub-01_acq-b_Chimap.nii.gz").is_file()
    assert (tmp_path / "out/sub-02/anat/sub-02_Chimap.nii.gz").is_file()


def test_stop_on_first_crash(dataset, tmp_path, run_cli):
    code, err = _run(run_cli, dataset, tmp_path, "--stop-on-first-crash")
    assert code == 1
    assert "sub-01 failed: " in err and "prepare_echoes" in err
    # nothing runs after the first failing step: not sub-01's other run, not sub-02
    assert not (tmp_path / "out/sub-01/anat/sub-01_acq-b_Chimap.nii.gz").exists()
    assert not (tmp_path / "out/sub-02").exists()
    # sub-02 is named once, as not processed (and is not counted among those written)
    assert err.count("sub-02") == 1 and "not processed: sub-02" in err
    assert "outputs of" not in err
    # the failed participant still gets its log folder and report
    assert (tmp_path / "out/sub-01.html").is_file()
    assert list((tmp_path / "out/sub-01/log").glob("*/errors.txt"))


def test_write_graph_resource_monitor_and_clean_workdir(dataset, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    code, err = _run(run_cli, dataset, tmp_path, "--participant-label", "02",
                     "--write-graph", "--resource-monitor")  # fmt: skip
    assert code == 0, err
    graph = (work / "sub_02_wf" / "graph.dot").read_text()
    assert graph.startswith("digraph sub_02_wf") and "dipole_inversion" in graph
    records = [json.loads(line) for line in (work / "resource_monitor/sub-02.jsonl").open()]
    names = {r["name"] for r in records}
    assert {"prepare_echoes", "background_removal", "dipole_inversion"} <= names
    assert all(r["duration"] > 0 for r in records)
    assert max(r["runtime_memory_gb"] for r in records) > 0.01  # measured, not estimated
    # nipype's raw samples stay in the work dir, not in the current directory
    assert list((work / "resource_monitor/sub-02").glob(".proc-*"))
    assert not list(tmp_path.glob(".proc-*"))

    from nipype import config as ncfg

    assert ncfg.resource_monitor is False  # switched off again for whatever runs next

    # without --clean-workdir the second run resumes (the inversion is not run again) ...
    result = next(work.glob("sub_02_wf/*/dipole_inversion/result_dipole_inversion.pklz"))
    stamp = result.stat().st_mtime_ns
    code, err = _run(run_cli, dataset, tmp_path, "--participant-label", "02")
    assert code == 0, err
    assert result.stat().st_mtime_ns == stamp
    # ... with it, the participant's earlier work is gone and everything runs again
    (work / "keep.txt").write_text("not qsmprep's")
    (work / "sub_01_wf").mkdir()
    code, err = _run(run_cli, dataset, tmp_path, "--participant-label", "02", "--clean-workdir")
    assert code == 0, err
    assert result.stat().st_mtime_ns != stamp
    assert not (work / "sub_02_wf" / "graph.dot").exists()
    assert (work / "keep.txt").is_file() and (work / "sub_01_wf").is_dir()  # left alone
