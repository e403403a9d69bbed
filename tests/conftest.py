import contextlib
import io
import json
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def run_cli():
    """The qsmprep command in this process: ``run_cli(argv) -> (exit code, stderr text)``;
    ``argv`` items may be paths."""
    from qsmprep.cli.run import main

    def run(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, err.getvalue()

    return run


def _copy_files(root, src: str, dst: str):
    """Copy ``sub-<src>`` of the dataset at ``root`` to ``sub-<dst>``, renaming its files;
    return the new participant's ``anat`` folder."""
    import shutil

    shutil.copytree(root / f"sub-{src}", root / f"sub-{dst}")
    for path in sorted((root / f"sub-{dst}").rglob(f"sub-{src}_*")):
        path.rename(path.with_name(path.name.replace(f"sub-{src}_", f"sub-{dst}_")))
    return root / f"sub-{dst}" / "anat"


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory):
    """One participant (sub-01) of the small (4 mm) head phantom as a BIDS dataset, shared
    read-only by the end-to-end tests (copy it before changing anything)."""
    from qsmprep.sim import SubjectSpec, write_bids_dataset

    root = tmp_path_factory.mktemp("small_phantom") / "bids"
    return write_bids_dataset(root, [SubjectSpec("01", seed=0)], preset="small")


@pytest.fixture(scope="session")
def copy_participant():
    """``copy_participant(root, src, dst)``: copy ``sub-<src>`` of the dataset at ``root``
    to ``sub-<dst>``, renaming its files; return the new participant's ``anat`` folder."""
    return _copy_files


def _copy_subject(root, src, dst, transform):
    """Copy participant ``src`` of the BIDS dataset ``root`` to ``dst``, applying
    ``transform`` to its phase images."""
    import nibabel as nb
    import numpy as np

    for phase in sorted(_copy_files(root, src, dst).glob("*part-phase*.nii.gz")):
        img = nb.load(phase)
        nb.save(nb.Nifti1Image(transform(img.get_fdata(dtype=np.float32)), img.affine), phase)
    with (root / "participants.tsv").open("a") as f:
        f.write(f"sub-{dst}\t0\n")


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory, run_cli):
    """A small (4 mm) phantom study processed once with the defaults (the input checked by
    the BIDS validator), shared read-only by the end-to-end, report and group-level tests:

    - sub-01, sub-02, sub-03: three heads (phantom seeds 0, 1, 2) with B0 axial, tilted
      (20, 10) and (0, 15) degrees;
    - sub-04: sub-01 with its phase sign inverted (as GE stores it);
    - sub-05: sub-01 with a phase that is neither radians nor integers (fails in a node);
    - sub-06: sub-01 without MagneticFieldStrength in its sidecars (fails until
      --field-strength is given).

    Returns a dict: ``info`` (the dataset), ``root``, ``out``, ``work``, ``code`` and
    ``err`` of the participant run.
    """
    from qsmprep.sim import SubjectSpec, write_bids_dataset

    base = tmp_path_factory.mktemp("study")
    root = base / "bids"
    info = write_bids_dataset(
        root,
        [
            SubjectSpec("01", seed=0),
            SubjectSpec("02", b0_tilt_deg=(20.0, 10.0), seed=1),
            SubjectSpec("03", b0_tilt_deg=(0.0, 15.0), seed=2),
        ],
        preset="small",
    )
    _copy_subject(root, "01", "04", lambda p: -p)
    _copy_subject(root, "01", "05", lambda p: p * 10.5)
    _copy_subject(root, "01", "06", lambda p: p)
    for sidecar in sorted((root / "sub-06" / "anat").glob("*.json")):
        meta = json.loads(sidecar.read_text())
        del meta["MagneticFieldStrength"]
        sidecar.write_text(json.dumps(meta))
    out, work = base / "out", base / "work"
    code, err = run_cli([root, out, "participant", "-w", work, "--nprocs", "1"])
    return {"info": info, "root": root, "out": out, "work": work, "code": code, "err": err,
            "base": base}  # fmt: skip
