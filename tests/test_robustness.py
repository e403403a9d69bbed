"""Messy inputs end to end on the small (4 mm) head phantom: broken files in one
participant, runs that fail late or are re-run, and interruptions. No traceback may reach
the terminal, and no run's outputs may land half-written or mixed with another's."""

import json
import shutil

import pytest

from qsmprep.interfaces.bids import commit_files
from qsmprep.sim import SubjectSpec, write_bids_dataset
from qsmprep.workflows.base import RUN_OUTPUT_TAILS, STAGE_DIRNAME

TKD = ["--nprocs", "1", "--skip-bids-validation", "--inversion", "tkd"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust") / "bids"
    return write_bids_dataset(root, [SubjectSpec("01", seed=0)], preset="small")


def copy_participant(root, src: str, dst: str):
    """Copy ``sub-<src>`` of ``root`` to ``sub-<dst>``, renaming its files."""
    shutil.copytree(root / f"sub-{src}", root / f"sub-{dst}")
    for path in sorted((root / f"sub-{dst}").rglob(f"sub-{src}_*")):
        path.rename(path.with_name(path.name.replace(f"sub-{src}_", f"sub-{dst}_")))
    return root / f"sub-{dst}" / "anat"


def _clone(dataset, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(dataset.root, root)
    return root


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


#: participant -> (what is broken in it, what its one-line error must say)
BROKEN = {
    "02": ("echo-2_part-phase_MEGRE.json", "{bad", "phase_MEGRE.json is not valid JSON"),
    "03": ("echo-1_part-mag_MEGRE.json", "[0.004]", "must hold a JSON object, not a list"),
    "04": ("echo-3_part-phase_MEGRE.json", '{"EchoTime": [0.004, 0.008]}', "is a list"),
    "05": ("echo-2_part-mag_MEGRE.json", '{"EchoTime": "4 ms"}', 'not "4 ms"'),
    "06": ("echo-4_part-phase_MEGRE.nii.gz", "", "phase_MEGRE.nii.gz cannot be read as a NIfTI"),
    "07": ("echo-3_part-mag_MEGRE.nii.gz", None, "mag_MEGRE.nii.gz cannot be read; the file is"),
}


def test_broken_files_fail_only_their_participant(dataset, tmp_path, run_cli):
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
        assert not (out / f"sub-{sub}").exists()
    assert "crash file: " in line  # the truncated file fails in a node: see its crash file
    assert (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").is_file()
    assert not (out / STAGE_DIRNAME).exists()


def test_a_failed_rerun_leaves_the_complete_outputs_untouched(dataset, tmp_path, run_cli):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [dataset.root, out, "participant", "-w", work, *TKD]
    code, err = run_cli(argv)
    assert code == 0, err
    before = _snapshot(out)
    assert "sub-01/anat/sub-01_desc-romeo_quality.nii.gz" in before
    # a late failure (the inversion cannot load its model) after new fields were computed
    model = tmp_path / "corrupt.pt"
    model.write_bytes(b"not a model")
    code, err = run_cli(argv + ["--bf-removal", "vsharp", "--inversion", "adaptive-unet",
                                "--model", model, "--device", "cpu"])  # fmt: skip
    assert code == 1 and "dipole_inversion (run of sub-01_echo-1_part-phase" in err
    assert _snapshot(out) == before  # nothing of the failed run landed
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
