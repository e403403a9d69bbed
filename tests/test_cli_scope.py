"""Input checks cover the selection only: a broken participant (or run) that was not
selected never blocks the others, while selecting it still fails with a clear message.

The BIDS validator runs here (bids-validator-deno is a dependency): its errors about files
outside the selection are ignored, those about the selection or the dataset as a whole
still stop the run (exit 16)."""

import json
import shutil

import pytest

from qsmprep.bids import SelectionScope, collect_runs, load_layout
from qsmprep.cli.run import validate_bids
from qsmprep.sim import SubjectSpec, write_bids_dataset

TKD = ["--nprocs", "1", "--inversion", "tkd"]

BROKEN_SIDECAR = "sub-02_echo-2_part-phase_MEGRE.json"


@pytest.fixture(scope="module")
def broken_02(small_phantom, tmp_path_factory, copy_participant):
    """The small phantom's sub-01, and sub-02 (its copy) with a sidecar that is not JSON."""
    root = tmp_path_factory.mktemp("scope") / "bids"
    shutil.copytree(small_phantom.root, root)
    anat = copy_participant(root, "01", "02")
    with (root / "participants.tsv").open("a") as f:
        f.write("sub-02\t0\n")
    (anat / BROKEN_SIDECAR).write_text("{bad")
    return root


def test_a_broken_participant_that_is_not_selected_does_not_block(broken_02, tmp_path, run_cli):
    argv = [broken_02, tmp_path / "out", "participant", "-w", tmp_path / "work", *TKD]
    code, err = run_cli([*argv, "--participant-label", "01"])
    assert code == 0, err
    assert (tmp_path / "out/sub-01/anat/sub-01_Chimap.nii.gz").is_file()
    assert not (tmp_path / "out/sub-02").exists()
    # selecting it: the validator names its file...
    code, err = run_cli([*argv, "--participant-label", "02"])
    assert code == 16
    assert f"JSON_INVALID: /sub-02/anat/{BROKEN_SIDECAR}" in err and "sub-01" not in err
    # ... and without the validator, qsmprep's own check fails it with one line
    code, err = run_cli([*argv, "--participant-label", "02", "--skip-bids-validation"])
    assert code == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "sub-02 failed:" in ln]
    assert f"sub-02/anat/{BROKEN_SIDECAR} is not valid JSON" in line


def test_validator_errors_are_kept_for_the_selected_runs_only(tmp_path):
    root = tmp_path / "bids"
    specs = [SubjectSpec("01", acq="a", seed=0), SubjectSpec("01", acq="b", seed=0)]
    write_bids_dataset(root, specs, preset="small")
    broken = root / "sub-01" / "anat" / "sub-01_acq-a_echo-3_part-mag_MEGRE.json"
    broken.write_text("[1]")
    everything = validate_bids(root)
    assert any("sub-01_acq-a_echo-3_part-mag_MEGRE.json" in e for e in everything)
    layout = load_layout(root)
    run_b = collect_runs(layout, "01", filters={"acquisition": "b"})
    assert validate_bids(root, SelectionScope.of(root, run_b)) == []
    # the broken run selected: its error counts; a participant whose runs could not be
    # listed counts as a whole
    scope_a = SelectionScope.of(root, [], whole=["01"])
    assert validate_bids(root, scope_a) == everything
    # an error of the dataset as a whole is never outside the selection
    (root / "stray.txt").write_text("x")
    assert any("NOT_INCLUDED: /stray.txt" in e for e in validate_bids(root, scope_a))


def test_scope_by_participant_session_and_run_files():
    scope = SelectionScope(
        subjects=frozenset({"01", "03"}),
        files=frozenset({"sub-01/ses-1/anat/sub-01_ses-1_echo-1_part-mag_MEGRE.nii.gz"}),
        sessions=frozenset({"1"}),
        whole=frozenset({"03"}),
    )
    inside = [
        "",
        "/participants.tsv",
        "/dataset_description.json",
        "/MEGRE.json",
        "/sub-01/sub-01_sessions.tsv",
        "/sub-01/ses-1/sub-01_ses-1_scans.tsv",
        "/sub-01/ses-1/anat/sub-01_ses-1_echo-1_part-mag_MEGRE.nii.gz",
        "/sub-03/anat/sub-03_T1w.nii.gz",
    ]
    outside = [
        "/sub-02/anat/sub-02_echo-1_part-mag_MEGRE.json",
        "/sub-02/sub-02_sessions.tsv",
        "/sub-01/ses-2/anat/sub-01_ses-2_echo-1_part-mag_MEGRE.nii.gz",
        "/sub-01/ses-2/sub-01_ses-2_scans.tsv",
        "/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "/sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz",
    ]
    assert [p for p in inside if p not in scope] == []
    assert [p for p in outside if p in scope] == []


def test_sidecars_that_apply_to_a_selected_run_are_in_its_scope(tmp_path):
    root = tmp_path / "bids"
    write_bids_dataset(root, [SubjectSpec("01", seed=0)], preset="small")
    inherited = root / "sub-01" / "anat" / "sub-01_part-phase_MEGRE.json"
    inherited.write_text(json.dumps({"Units": "rad"}))
    runs = collect_runs(load_layout(root), "01")
    scope = SelectionScope.of(root, runs)
    assert "/sub-01/anat/sub-01_part-phase_MEGRE.json" in scope
    assert "/sub-01/anat/sub-01_echo-4_part-phase_MEGRE.json" in scope
    assert "/sub-01/anat/sub-01_T1w.json" not in scope  # not a file of the selected run
