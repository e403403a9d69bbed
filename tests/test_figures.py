"""Report figures are drawn with matplotlib alone: the runtime image has no nilearn (it is
the simulator's extra), and the participant workflow draws the phase figure itself."""

import ast
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1] / "qsmprep"


def _nilearn_uses(path: Path) -> int:
    """Imports of nilearn in ``path``, also through ``importlib`` (``find_spec("nilearn")``)."""
    found = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += any(a.name.split(".")[0] == "nilearn" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += node.module.split(".")[0] == "nilearn"
        elif isinstance(node, ast.Call):
            found += any(
                isinstance(a, ast.Constant) and str(a.value).split(".")[0] == "nilearn"
                for a in node.args
            )
    return found


def test_only_the_simulator_imports_nilearn():
    users = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if _nilearn_uses(p))
    assert "sim/phantom.py" in users  # the check sees the simulator's use
    assert [u for u in users if not u.startswith("sim/")] == []


@pytest.fixture
def oblique(tmp_path):
    """A 4D magnitude, its mask, fields and chi on a grid tilted by 20 degrees and stored
    with a flipped x axis (LAS)."""
    shape = (24, 28, 20)
    i, j, k = np.indices(shape)
    r = np.sqrt(((i - 12) / 9) ** 2 + ((j - 14) / 11) ** 2 + ((k - 10) / 8) ** 2)
    tilt = np.deg2rad(20)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]]
    affine = rot @ np.diag([-2.0, 2.0, 3.0, 1.0])
    mask = (r < 1).astype(np.uint8)
    field = ((i - 12) * 0.6 + (k - 10) ** 2 * 0.05).astype(np.float32)
    chi = (0.1 * (r < 0.4) - 0.05 * ((r > 0.8) & (r < 1))).astype(np.float32)
    mag = np.stack([np.exp(-r) * (r < 1.3) * s for s in (1000, 600)], axis=-1)

    def img(data):
        return nb.Nifti1Image(np.asarray(data, dtype=np.float32), affine)

    labels = np.zeros(shape, np.int16)
    labels[r < 0.3] = 4
    labels[(r >= 0.3) & (r < 0.5) & (i > 12)] = 5
    return {"mag": img(mag), "mask": img(mask), "field": img(field), "chi": img(chi * mask),
            "labels": img(labels), "out": tmp_path}  # fmt: skip


def _outline_pixels(png: Path) -> int:
    """Pixels of the outline colour (figures.CONTOUR_COLOR) in a PNG."""
    from matplotlib.image import imread

    from qsmprep.reports.figures import CONTOUR_COLOR

    rgb = imread(png)[..., :3]
    target = np.array([int(CONTOUR_COLOR[n : n + 2], 16) / 255 for n in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=-1) < 0.08).sum())


def test_every_figure_without_nilearn(oblique, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # "import nilearn" raises ImportError
    from qsmprep.reports import figures

    o, out = oblique, oblique["out"]
    wrapped = nb.Nifti1Image(
        np.angle(np.exp(1j * o["field"].get_fdata())).astype(np.float32), o["field"].affine
    )
    paths = [
        figures.plot_mask(o["mag"], o["mask"], out / "mask.png"),
        figures.plot_phase(wrapped, o["field"], o["mask"], out / "phase.png", title="echo 2"),
        figures.plot_fields(o["field"], o["field"], o["mask"], out / "fields.png"),
        figures.plot_fields(None, o["field"], o["mask"], out / "local.png"),
        figures.plot_chimap(o["chi"], out / "chimap.png"),
        figures.plot_rois(o["chi"], o["labels"], out / "rois.png", labels=[4, 5, 6]),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # the outlines are drawn where there are masks, and only there
    assert _outline_pixels(out / "mask.png") > 200
    assert _outline_pixels(out / "rois.png") > 50
    assert _outline_pixels(out / "chimap.png") == 0
    with pytest.raises(ValueError, match="differ"):  # a mask on another grid
        figures.plot_mask(o["mag"], nb.Nifti1Image(np.ones((3, 3, 3)), np.eye(4)), out / "x.png")


def test_planes_are_shown_in_neurological_convention():
    """A voxel on the subject's right (world +x) lands on the right of an axial plane and
    a coronal one, whatever the storage order of the x axis."""
    from qsmprep.reports.figures import _View

    for sign in (1.0, -1.0):
        data = np.zeros((10, 6, 4), np.float32)
        right = 9 if sign > 0 else 0  # the voxel with the largest world x
        data[right, 2, 1] = 1
        view = _View(nb.Nifti1Image(data, np.diag([sign * 2, 2, 3, 1])))
        axial = view.plane(view.data, 2, 1)  # rows: y (anterior up), columns: x
        coronal = view.plane(view.data, 1, 2)  # rows: z, columns: x
        assert axial.shape == (6, 10) and np.argwhere(axial).tolist() == [[2, 9]]
        assert np.argwhere(coronal).tolist() == [[1, 9]]
        assert view.extent(2) == (0.0, 20.0, 0.0, 12.0)  # mm: square pixels on screen
