"""Output names of the GRE layouts of the BIDS examples, end to end on the 4 mm phantom.

The phantom's MEGRE runs are renamed into the layouts qsmprep meets in the wild:
- sub-01: two ``T2starw`` runs that differ only by ``task-`` (rest, nback);
- sub-02: ``MP2RAGE`` with ``inv-1`` and ``inv-2`` (as bids-examples qmri_mp2rageme);
- sub-03: ``T1w`` magnitude and phase (as bids-examples qmri_qsm).
Every output keeps the run's entities, no two runs share a name, and the derivatives
pass the BIDS validator.
"""

import json

import pytest

from qsmprep.cli.run import validate_bids
from qsmprep.sim import SubjectSpec, write_bids_dataset

#: (subject, simulated acq label) -> (entities of the new name, suffix)
LAYOUTS = {
    ("01", "a"): ("task-rest", "T2starw"),
    ("01", "b"): ("task-nback", "T2starw"),
    ("02", "a"): ("inv-1", "MP2RAGE"),
    ("02", "b"): ("inv-2", "MP2RAGE"),
    ("03", "a"): ("", "T1w"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts") / "bids"
    specs = [SubjectSpec(sub, acq=acq, seed=0) for sub, acq in LAYOUTS]
    write_bids_dataset(root, specs, preset="small")
    for (sub, acq), (entities, suffix) in LAYOUTS.items():
        old = f"sub-{sub}_acq-{acq}_"
        new = f"sub-{sub}_{entities}_" if entities else f"sub-{sub}_"
        for path in sorted((root / f"sub-{sub}" / "anat").glob(old + "*")):
            name = path.name.replace(old, new).replace("_MEGRE.", f"_{suffix}.")
            path.rename(path.with_name(name))
    return root


@pytest.fixture(scope="module")
def outputs(dataset, tmp_path_factory, run_cli):
    base = tmp_path_factory.mktemp("layouts_run")
    out = base / "out"
    code, err = run_cli(
        [dataset, out, "participant", "-w", base / "work", "--nprocs", "1",
         "--skip-bids-validation", "--megre-suffix", "T2starw", "MP2RAGE", "T1w"]
    )  # fmt: skip
    assert code == 0, err
    return out


PREFIXES = [
    ("01", ["sub-01_task-nback", "sub-01_task-rest"]),
    ("02", ["sub-02_inv-1", "sub-02_inv-2"]),
    ("03", ["sub-03"]),
]


@pytest.mark.parametrize(("sub", "prefixes"), PREFIXES)
def test_each_run_has_its_own_outputs(outputs, dataset, sub, prefixes):
    anat = outputs / f"sub-{sub}" / "anat"
    assert sorted(p.name[: -len("_Chimap.nii.gz")] for p in anat.glob("*_Chimap.nii.gz")) == (
        prefixes
    )
    for prefix in prefixes:
        meta = json.loads((anat / f"{prefix}_Chimap.json").read_text())
        # the sidecar cites the run's own inputs
        assert meta["Sources"] and all(f"anat/{prefix}_" in s for s in meta["Sources"])
        assert (anat / f"{prefix}_desc-brain_mask.nii.gz").is_file()


@pytest.mark.parametrize(("sub", "prefixes"), PREFIXES)
def test_reports_and_logs_follow_the_run_names(outputs, sub, prefixes):
    """The report finds each run by its Chimap, draws its figures (the phase figure comes
    staged with the run's outputs) and shows its node timings, which the log keys by the
    run's prefix."""
    from qsmprep.reports.outputs import latest_log_dir
    from qsmprep.workflows.base import STAGE_DIRNAME

    page = (outputs / f"sub-{sub}.html").read_text()
    timings = json.loads((latest_log_dir(outputs, sub) / "timings.json").read_text())
    assert sorted(timings) == prefixes
    assert page.count("wall time per stage") == len(prefixes)
    for prefix in prefixes:
        assert f"<h2>{prefix}</h2>" in page
        for name in ("mask", "phase", "fields", "chimap", "histogram"):
            assert (outputs / f"sub-{sub}" / "figures" / f"{prefix}_desc-{name}_qc.png").is_file()
    assert not (outputs / STAGE_DIRNAME).exists()


def test_outputs_pass_the_bids_validator(outputs):
    assert validate_bids(outputs) == []
    ignored = (outputs / ".bidsignore").read_text().split()
    assert "*_inv-*" in ignored  # inv- is kept in the names but not allowed on Chimap
    assert "*_task-*" not in ignored


def test_default_suffixes_point_to_the_option(dataset, tmp_path, run_cli):
    code, err = run_cli(
        [dataset, tmp_path / "out", "participant", "-w", tmp_path / "work",
         "--skip-bids-validation", "--participant-label", "02", "03"]
    )  # fmt: skip
    assert code == 18
    assert "no run matches the selection (anat/*_part-{mag,phase}_{MEGRE,T2starw})" in err
    assert "with suffix T1w, MP2RAGE" in err and "--megre-suffix T1w MP2RAGE" in err
