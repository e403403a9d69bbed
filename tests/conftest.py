import contextlib
import io
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
    import shutil

    def copy(root, src: str, dst: str):
        shutil.copytree(root / f"sub-{src}", root / f"sub-{dst}")
        for path in sorted((root / f"sub-{dst}").rglob(f"sub-{src}_*")):
            path.rename(path.with_name(path.name.replace(f"sub-{src}_", f"sub-{dst}_")))
        return root / f"sub-{dst}" / "anat"

    return copy
