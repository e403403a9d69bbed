import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm import romeo
from qsmprep.qsm.phase import wrap


def _grid(shape):
    return np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")


def _field_phase(shape, scale=1.0):
    """Smooth phase (rad) with at most ~1.1 rad per voxel at ``scale=1``."""
    x, y, z = _grid(shape)
    return scale * (
        0.015 * x**2
        + 0.01 * y * z
        + 5 * np.sin(z / 6)
        + 0.5 * x
        + 15 * np.exp(-(x**2 + y**2) / 150)
    )


def _ellipsoid(shape, radii, centre=(0, 0, 0)):
    x, y, z = _grid(shape)
    return sum(((c - c0) / r) ** 2 for c, c0, r in zip((x, y, z), centre, radii, strict=True)) < 1


def _assert_exact_up_to_2pi_k(u, truth, mask, k=None):
    d = (u - truth)[mask]
    ks = np.round(d / (2 * np.pi))
    assert np.all(ks == ks[0]), f"{np.mean(ks != ks[0]):.4f} of voxels off by 2 pi"
    assert np.abs(d - 2 * np.pi * ks[0]).max() < 1e-4
    if k is not None:
        assert ks[0] == k


def test_edge_weights_constant_phase():
    shape = (6, 7, 8)
    mask = np.ones(shape, bool)
    mask[0, 0, 0] = False
    bins = romeo.edge_weights(np.full(shape, 0.3), mask=mask)
    assert bins.dtype == np.uint8 and bins.shape == shape + (3,)
    # perfect weights (bin 1) on every edge inside the mask, 0 on edges leaving it
    assert np.all(bins[-1, :, :, 0] == 0) and np.all(bins[:, -1, :, 1] == 0)
    assert np.all(bins[:, :, -1, 2] == 0)
    assert np.all(bins[0, 0, 0] == 0) and bins[1, 0, 0, 0] == 1
    assert bins[0, 0, 1, 2] == 1 and bins[2, 3, 4].tolist() == [1, 1, 1]
    q = romeo.voxel_quality(bins)
    assert q[2, 3, 4] == pytest.approx(1.0)  # six perfect edges
    assert q[5, 6, 7] == pytest.approx(0.5)  # corner: three edges
    assert q[0, 0, 0] == 0


def test_edge_weights_penalise_phase_jumps_and_magnitude():
    shape = (5, 4, 4)
    phase = np.zeros(shape)
    phase[2:] = 0.5  # a step of 0.5 rad between x = 1 and x = 2
    bins = romeo.edge_weights(phase)
    # phase coherence 1 - 0.5/pi, linearity (1 - 0.5) on either side
    assert bins[1, 1, 1, 0] == round((1 - (1 - 0.5 / np.pi) * 0.5 * 0.5) * 255)
    assert bins[0, 1, 1, 0] == round((1 - 0.5) * 255)  # linearity only
    assert bins[1, 1, 1, 1] == 1  # along y nothing changes
    phase2 = 2 * phase  # echo 2 at twice the TE agrees: gradient coherence 1
    assert np.array_equal(romeo.edge_weights(phase, phase2=phase2, te_ratio=0.5), bins)
    b2 = romeo.edge_weights(phase, phase2=phase, te_ratio=0.5)  # disagrees by 0.25 rad
    assert b2[1, 1, 1, 0] == round((1 - (1 - 0.5 / np.pi) * 0.25 * 0.75) * 255)
    mag = np.ones(shape)
    mag[:, 2:] = 0.5
    bins = romeo.edge_weights(np.zeros(shape), mag=mag)
    # magnitude coherence (0.5 / 1)^2 * low-signal term (0.5 + 0.5 * min(1, 0.5 / 0.5))
    assert bins[1, 1, 1, 1] == round((1 - 0.25) * 255)
    assert bins[1, 0, 1, 1] == 1


def test_single_echo_exact_with_noise():
    rng = np.random.default_rng(0)
    shape = (48, 52, 40)
    mask = _ellipsoid(shape, (21, 23, 18))
    truth = _field_phase(shape) + 0.15 * rng.standard_normal(shape)
    assert np.ptp(truth[mask]) > 8 * np.pi
    wrapped = np.where(mask, wrap(truth), rng.uniform(-np.pi, np.pi, shape))
    mag = np.where(mask, 1.0, 0.1) * rng.rayleigh(1, shape) ** 0.1
    u, q = romeo.romeo_unwrap(wrapped, mag=mag, mask=mask)
    assert u.dtype == np.float32 and u.shape == shape and q.shape == shape
    _assert_exact_up_to_2pi_k(u, truth, mask)
    assert np.all(u[~mask] == 0)


def _brain_like_field(shape):
    """Field (Hz) of up to +-240 Hz: within +-1.5 pi at TE = 3 ms, wrapped 5 times at 20 ms."""
    x, y, z = _grid(shape)
    return (
        230 * np.exp(-((x - 6) ** 2 + (y - 4) ** 2 + z**2) / 60)
        - 120 * np.exp(-((x + 8) ** 2 + y**2 + (z - 5) ** 2) / 40)
        + 2 * x
    )


def test_multi_echo_exact():
    rng = np.random.default_rng(1)
    shape = (44, 48, 36)
    tes = np.array([0.003, 0.0075, 0.012, 0.02])
    mask = _ellipsoid(shape, (19, 21, 16))
    truth = 2 * np.pi * _brain_like_field(shape)[..., None] * tes
    assert np.abs(truth[..., 0]).max() < 1.5 * np.pi and np.ptp(truth[..., -1]) > 10 * np.pi
    truth += 0.05 * rng.standard_normal(truth.shape)
    wrapped = wrap(truth)
    mag = np.repeat(mask[..., None].astype(float), 4, axis=-1) + 0.01
    u, q = romeo.romeo_unwrap(wrapped, tes, mag, mask)
    assert u.shape == truth.shape
    for e in range(4):  # the right 2 pi multiple, not only a consistent one
        _assert_exact_up_to_2pi_k(u[..., e], truth[..., e], mask, k=0)


def test_disconnected_regions():
    rng = np.random.default_rng(2)
    shape = (40, 40, 30)
    tes = np.array([0.003, 0.006])
    mask = _ellipsoid(shape, (8, 8, 8), (-10, 0, 0)) | _ellipsoid(shape, (7, 9, 8), (11, 0, 0))
    truth = 2 * np.pi * _brain_like_field(shape)[..., None] * tes
    truth += 0.05 * rng.standard_normal(truth.shape)
    wrapped = np.where(mask[..., None], wrap(truth), rng.uniform(-np.pi, np.pi, truth.shape))
    # single echo: each region unwrapped exactly up to its own 2 pi k
    u, _ = romeo.romeo_unwrap(wrapped[..., 0], mask=mask)
    x = _grid(shape)[0]
    for part in (mask & (x < 0), mask & (x > 0)):
        _assert_exact_up_to_2pi_k(u, truth[..., 0], part)
    # two echoes: the seed correction puts both regions on the right multiple
    u, _ = romeo.romeo_unwrap(wrapped, tes, mask=mask)
    for part in (mask & (x < 0), mask & (x > 0)):
        for e in range(2):
            _assert_exact_up_to_2pi_k(u[..., e], truth[..., e], part, k=0)


def test_quality_low_where_noise_high():
    rng = np.random.default_rng(4)
    shape = (40, 40, 40)
    x = _grid(shape)[0]
    obj = _ellipsoid(shape, (17, 17, 17))
    inner = ndimage.binary_erosion(obj, iterations=2)
    sigma = np.where(x > 0, 0.6, 0.05)  # phase noise (rad): high in one half
    noisy = wrap(0.5 * _field_phase(shape) + sigma * rng.standard_normal(shape))
    wrapped = np.where(obj, noisy, rng.uniform(-np.pi, np.pi, shape))
    _, q = romeo.romeo_unwrap(wrapped)
    clean_q = q[inner & (x < -4)].mean()
    assert clean_q > 0.6
    assert q[inner & (x > 4)].mean() < 0.25 * clean_q
    assert q[~obj].mean() < 0.1 * clean_q


def test_romeo_rejects_bad_input():
    with pytest.raises(ValueError, match="echo_times"):
        romeo.romeo_unwrap(np.zeros((4, 4, 4, 2)))
    with pytest.raises(ValueError, match="distinct"):
        romeo.romeo_unwrap(np.zeros((4, 4, 4, 2)), [0.01, 0.01])
    with pytest.raises(ValueError, match="mask shape"):
        romeo.romeo_unwrap(np.zeros((4, 4, 4)), mask=np.ones((4, 4, 5), bool))
    with pytest.raises(ValueError, match="3D"):
        romeo.edge_weights(np.zeros((4, 4)))
