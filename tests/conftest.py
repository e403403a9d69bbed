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
