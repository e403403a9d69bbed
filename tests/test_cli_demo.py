"""qsmprep-demo on the small phantom: it writes the dataset, runs qsmprep and reports."""

import pytest

from qsmprep.cli.demo import main


@pytest.mark.slow
def test_demo_small(tmp_path, capsys):
    assert main(["--demo-dir", str(tmp_path / "demo"), "--nprocs", "1", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    chimaps = sorted((tmp_path / "demo" / "out" / "sub-01" / "anat").glob("*_Chimap.nii.gz"))
    assert [p.name for p in chimaps] == ["sub-01_acq-axial_Chimap.nii.gz",
                                         "sub-01_acq-oblique_Chimap.nii.gz"]  # fmt: skip
    scores = [float(line.split(":")[1].split("%")[0]) for line in out.splitlines()
              if "NRMSE" in line]  # fmt: skip
    assert len(scores) == 2 and all(s < 90 for s in scores), out
    # a second call reuses the dataset
    assert main(["--demo-dir", str(tmp_path / "demo"), "--nprocs", "1", "--preset", "small"]) == 0
    assert "reusing the dataset" in capsys.readouterr().out


def test_without_the_simulator_one_line_error(tmp_path, capsys, monkeypatch):
    """The runtime image has no nilearn (the simulator extra): a message, no traceback."""
    import importlib.util

    from qsmprep.sim import phantom

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "nilearn" else find_spec(name, *a),
    )
    for cached in ("_anatomy", "_native_phantom"):  # no maps cached by earlier tests
        monkeypatch.setattr(phantom, cached, getattr(phantom, cached).__wrapped__)
    argv = ["--demo-dir", str(tmp_path / "demo"), "--preset", "small", "--nprocs", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("qsmprep-demo: nilearn is not installed") and "qsmprep[sim]" in err
