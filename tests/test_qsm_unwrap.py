import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm import unwrap
from qsmprep.qsm.phase import wrap


def _grid(shape, vs):
    return np.meshgrid(
        *[(np.arange(n) - n / 2) * v for n, v in zip(shape, vs, strict=True)], indexing="ij"
    )


def _smooth_phase(shape, vs):
    """A smooth phase (rad) with up to ~1.5 rad per voxel, so wrapped many times."""
    x, y, z = _grid(shape, vs)
    return (
        0.02 * x**2
        + 0.015 * y * z
        + 6 * np.sin(z / 7)
        + 0.8 * x
        + 20 * np.exp(-(x**2 + y**2) / 200)
    )


def _discrete_laplacian(u, vs):
    out = np.zeros_like(u)
    for a, v in enumerate(vs):
        out += (np.roll(u, -1, a) - 2 * u + np.roll(u, 1, a)) / v**2
    return out


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.8, 1.0, 2.0)])
def test_laplacian_unwrap_smooth_field_exact(vs):
    shape = (44, 50, 30)  # 50 -> padded to a fast DCT length
    truth = _smooth_phase(shape, vs)
    wrapped = wrap(truth)
    assert np.ptp(truth) > 16 * np.pi  # many wraps
    u = unwrap.laplacian_unwrap(wrapped, vs)
    assert u.dtype == np.float32 and u.shape == shape
    d = u - truth
    assert np.ptp(d) < 1e-3
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(
        _discrete_laplacian(u.astype(float), vs)[inner],
        _discrete_laplacian(truth, vs)[inner],
        atol=2e-3,
    )


def test_laplacian_unwrap_noise_outside_mask():
    """Noise outside the object adds only a harmonic error inside it (the Poisson solve
    cannot know the truth's Laplacian out there): inside, the Laplacian is the truth's and
    the error is smooth, with no 2 pi jumps."""
    rng = np.random.default_rng(3)
    vs = (1.0, 1.0, 1.5)
    shape = (48, 52, 40)
    x, y, z = _grid(shape, vs)
    mask = (x / 20) ** 2 + (y / 22) ** 2 + (z / 26) ** 2 < 1
    truth = _smooth_phase(shape, vs)
    wrapped = np.where(mask, wrap(truth), rng.uniform(-np.pi, np.pi, shape))
    u = unwrap.laplacian_unwrap(wrapped, vs)
    deep = ndimage.binary_erosion(mask, iterations=3)
    lap_err = (_discrete_laplacian(u.astype(float), vs) - _discrete_laplacian(truth, vs))[deep]
    assert np.abs(lap_err).max() < 1e-2
    err = u - truth
    for axis in range(3):
        jump = np.abs(np.diff(err, axis=axis))[np.delete(deep, 0, axis=axis)]
        assert jump.max() < np.pi  # a wrap left behind would jump by 2 pi


def test_laplacian_unwrap_rejects_bad_input():
    with pytest.raises(ValueError, match="3D"):
        unwrap.laplacian_unwrap(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size"):
        unwrap.laplacian_unwrap(np.zeros((4, 4, 4)), (1, 0, 1))
    with pytest.raises(ValueError, match="non-finite"):
        unwrap.laplacian_unwrap(np.full((4, 4, 4), np.nan), (1, 1, 1))


def _multi_echo(rng, shape=(40, 44, 36), vs=(1.0, 1.0, 1.5), tes=(0.004, 0.008, 0.012, 0.016)):
    x, y, z = _grid(shape, vs)
    mask = (x / 17) ** 2 + (y / 19) ** 2 + (z / 24) ** 2 < 1
    field = 150 * np.exp(-((x - 5) ** 2 + y**2 + (z + 4) ** 2) / 150) + 0.5 * x - 0.3 * z  # Hz
    tes = np.asarray(tes)
    truth = 2 * np.pi * field[..., None] * tes
    mag = np.where(mask, 1.0, 0.0)[..., None] * np.exp(-tes / 0.05)
    mag = np.abs(mag + 0.02 * rng.standard_normal(truth.shape))
    phase = wrap(truth).astype(np.float32)
    return phase, mag.astype(np.float32), tes, mask, vs, truth, field


@pytest.mark.parametrize("method", sorted(unwrap.METHODS))
def test_unwrap_echoes_consistent_echoes(method):
    phase, mag, tes, mask, vs, truth, _ = _multi_echo(np.random.default_rng(0))
    assert np.ptp(truth[..., -1][mask]) > 4 * np.pi
    res = unwrap.unwrap_echoes(phase, mag, tes, mask, vs, method)
    assert res.unwrapped.shape == phase.shape and res.unwrapped.dtype == np.float32
    err = (res.unwrapped - truth)[mask]
    # the echoes agree with each other and with the truth, not only up to 2 pi per echo
    assert np.abs(err).max() < 1e-3
    assert np.all(res.unwrapped[~mask] == 0)
    if method == "romeo":
        assert res.quality.shape == mask.shape
        assert 0 <= res.quality.min() and res.quality.max() <= 1
    else:
        assert res.quality is None


def test_unwrap_echoes_single_echo_3d_input():
    phase, mag, tes, mask, vs, truth, _ = _multi_echo(np.random.default_rng(1))
    for method in unwrap.METHODS:
        res = unwrap.unwrap_echoes(phase[..., 1], mag[..., 1], tes[1:2], mask, vs, method)
        assert res.unwrapped.shape == mask.shape + (1,)
        d = (res.unwrapped[..., 0] - truth[..., 1])[mask]
        k = np.round(d / (2 * np.pi))
        assert np.all(k == k[0])
        assert np.abs(d - 2 * np.pi * k[0]).max() < 1e-3


def test_unwrap_echoes_rejects_bad_input():
    phase = np.zeros((4, 4, 4, 2), np.float32)
    mask = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="unknown unwrapping method"):
        unwrap.unwrap_echoes(phase, None, [0.01, 0.02], mask, (1, 1, 1), "nope")
    with pytest.raises(ValueError, match="echo times"):
        unwrap.unwrap_echoes(phase, None, [0.01], mask, (1, 1, 1), "laplacian")
    with pytest.raises(ValueError, match="distinct"):
        unwrap.unwrap_echoes(phase, None, [0.01, 0.01], mask, (1, 1, 1), "laplacian")
    with pytest.raises(ValueError, match="mag shape"):
        unwrap.unwrap_echoes(phase, np.ones((4, 4, 4)), [0.01, 0.02], mask, (1, 1, 1), "romeo")
    with pytest.raises(ValueError, match="unexpected keyword argument 'nbins'"):
        unwrap.unwrap_echoes(phase, None, [0.01, 0.02], mask, (1, 1, 1), "romeo", nbins=64)
    with pytest.raises(ValueError, match="mask is empty"):
        unwrap.unwrap_echoes(phase, None, [0.01, 0.02], ~mask, (1, 1, 1), "romeo")
