import warnings

import numpy as np
import pytest

from qsmprep.qsm import phase as ph
from qsmprep.qsm.sideinfo import SideInformation, b0_direction, check_voxel_size, voxel_size


def _rot_x(deg):
    t = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def test_axial_isotropic():
    si = SideInformation.from_affine(np.diag([1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(si.as_vector(), [1, 1, 1, 0, 0, 1])
    assert si.b0_angle_deg == pytest.approx(0)


def test_las_flip_keeps_direction_axis():
    aff = np.diag([-0.9, 0.9, 2.0, 1.0])
    np.testing.assert_allclose(voxel_size(aff), [0.9, 0.9, 2.0])
    np.testing.assert_allclose(b0_direction(aff), [0, 0, 1], atol=1e-12)


def test_oblique_anisotropic():
    # voxel axes rotated 25 degrees about x, voxels 1 x 1 x 2 mm
    aff = np.eye(4)
    aff[:3, :3] = _rot_x(25) @ np.diag([1.0, 1.0, 2.0])
    si = SideInformation.from_affine(aff)
    np.testing.assert_allclose(si.voxel_size, [1, 1, 2])
    # b = R^T z = (0, sin 25, cos 25)
    np.testing.assert_allclose(
        si.b0_direction, [0, np.sin(np.radians(25)), np.cos(np.radians(25))], atol=1e-12
    )
    assert si.b0_angle_deg == pytest.approx(25)
    again = SideInformation.from_dict(si.to_dict(decimals=12))
    np.testing.assert_allclose(again.as_vector(), si.as_vector())


def test_paper_example_vector():
    # The paper's example (1,1,2, 0.2,-0.7,0.6): any orthonormal R with R^T z = b gives it.
    b = np.array([0.2, -0.7, 0.6])
    b /= np.linalg.norm(b)
    # build R whose third row is b (so R^T z = b)
    u = np.cross(b, [1, 0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(b, u)
    rot = np.vstack([u, v, b])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1, 1, 2])
    np.testing.assert_allclose(
        SideInformation.from_affine(aff).as_vector(), np.r_[1, 1, 2, b], atol=1e-6
    )


def test_sheared_affine_rejected():
    aff = np.eye(4)
    aff[0, 1] = 0.3
    with pytest.raises(ValueError, match="sheared"):
        b0_direction(aff)


def test_check_voxel_size():
    assert check_voxel_size(np.array([1, 2, 3])) == (1.0, 2.0, 3.0)
    for bad in [(1, 1), (1, 1, 1, 1), (1, 0, 1), (1, -2, 1), (1, np.inf, 1), (1, np.nan, 1)]:
        with pytest.raises(ValueError, match="voxel_size must be 3 positive numbers"):
            check_voxel_size(bad)


def test_phase_radians_pass_through():
    x = np.linspace(-np.pi, np.pi - 1e-3, 100).astype(np.float32)
    out, how = ph.scale_phase(x, "rad")
    np.testing.assert_allclose(out, x, atol=1e-6)
    assert "radians" in how


def test_phase_siemens_integer_range():
    truth = np.linspace(-np.pi, np.pi - 1e-3, 1000)
    stored = np.round(truth * 4096 / np.pi).astype(np.int16)
    out, how = ph.scale_phase(stored, "arbitrary")
    assert "4096" in how
    np.testing.assert_allclose(out, truth, atol=2 * np.pi / 4096)


def test_phase_integer_range_not_min_max_rescaled():
    # data that do not reach the ends of a known range are not guessed: neither rescaled
    # by their min/max nor given the nearest power of two; --phase-scale says how
    truth = np.linspace(-2.0, 2.5, 500)
    stored = np.round(truth * 4096 / np.pi).astype(np.float32)
    with pytest.raises(ph.PhaseScalingError, match=r"-2608\.\.3259, which is not one .*"
                       r"--phase-scale"):  # fmt: skip
        ph.scale_phase(stored)
    out, how = ph.scale_phase(stored, scale=np.pi / 4096)
    np.testing.assert_allclose(out, truth, atol=2 * np.pi / 4096)
    assert "--phase-scale" in how


def _wrapped(n=2000, seed=0):
    """Wrapped phase as from a head with noise around it: it fills [-pi, pi)."""
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, n)


@pytest.mark.parametrize(
    "low, high, per_unit",
    [(-3142, 3142, 1e-3), (-4096, 4095, np.pi / 4096), (-2048, 2047, np.pi / 2048),
     (0, 4095, 2 * np.pi / 4096), (-32768, 32767, np.pi / 32768)],
)  # fmt: skip
def test_phase_known_integer_ranges(low, high, per_unit):
    truth = _wrapped()
    if low == 0:
        stored = np.round(np.mod(truth, 2 * np.pi) / per_unit).clip(low, high)
    else:
        stored = np.round(truth / per_unit).clip(low, high)
    out, how = ph.scale_phase(stored.astype(np.int32), "arbitrary")
    assert f"{low}..{high}" in how
    np.testing.assert_allclose(np.exp(1j * out), np.exp(1j * truth), atol=2 * per_unit)


def test_phase_ranges_that_are_no_known_range_fail():
    # +-500 was scaled by pi/512, +-3142 milliradians by pi/4096: both silently wrong
    truth = _wrapped()
    with pytest.raises(ph.PhaseScalingError, match="not one of the known ranges"):
        ph.scale_phase(np.round(truth / np.pi * 500))
    out, _ = ph.scale_phase(np.round(truth / np.pi * 500), scale=np.pi / 500)
    np.testing.assert_allclose(np.exp(1j * out), np.exp(1j * truth), atol=2 * np.pi / 500)


def test_phase_units_and_non_finite_values():
    truth = _wrapped()
    for units, per_unit in (("mrad", 1e-3), ("deg", np.pi / 180)):
        out, how = ph.scale_phase(truth / per_unit, units)
        np.testing.assert_allclose(out, ph.wrap(truth), atol=1e-5)
        assert units in how
    stored = np.round(truth * 1000)
    stored[:3] = (np.nan, np.inf, -np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning
        out, _ = ph.scale_phase(stored)
    assert np.isnan(out[:3]).all() and np.isfinite(out[3:]).all()
    with pytest.raises(ph.PhaseScalingError, match="positive"):
        ph.scale_phase(stored, scale=0.0)


def test_phase_unsigned_range():
    truth = np.linspace(0, 2 * np.pi - 1e-3, 500)
    stored = np.round(truth * 4096 / (2 * np.pi)).astype(np.uint16)
    out, _ = ph.scale_phase(stored)
    np.testing.assert_allclose(np.exp(1j * out), np.exp(1j * truth), atol=2e-3)


def test_phase_bad_values():
    with pytest.raises(ph.PhaseScalingError):
        ph.scale_phase(np.array([0.5, 10.3, 200.7]))
    with pytest.raises(ph.PhaseScalingError, match="radians"):
        ph.scale_phase(np.array([0, 100, 4000.0]), "rad")


def test_units():
    assert ph.hz_to_ppm(42.577478 * 3, 3.0) == pytest.approx(1.0)
    assert ph.ppm_to_hz(1.0, 7.0) == pytest.approx(42.577478 * 7)
    assert ph.rad_to_hz(2 * np.pi * 0.01 * 50, 0.01) == pytest.approx(50)


def test_fill_non_finite_takes_the_neighbours_and_leaves_bad_regions_empty():
    x = np.arange(12, dtype=np.float32)[:, None, None] * np.ones((12, 12, 12), np.float32)
    phase = np.stack([0.1 * x, 0.2 * x], axis=-1) - 1.0  # smooth, no wraps
    mag = np.ones_like(phase)
    phase[5, 5, 5, 0] = np.nan  # one bad echo of one voxel
    mag[2, 8, 3, 1] = np.inf
    phase[8:12, 8:12, 8:12, :] = np.nan  # a bad corner region
    out_ph, out_mag, bad, filled = ph.fill_non_finite(phase, mag)
    assert bad.sum() == 2 + 64 and np.all(np.isfinite(out_ph)) and np.all(np.isfinite(out_mag))
    assert filled[5, 5, 5] and filled[2, 8, 3] and not filled[10, 10, 10]
    # the mean of a linear phase over a symmetric neighbourhood is its centre value
    np.testing.assert_allclose(out_ph[5, 5, 5], [0.1 * 5 - 1, 0.2 * 5 - 1], atol=1e-5)
    np.testing.assert_allclose(out_mag[2, 8, 3], 1.0, atol=1e-6)
    assert np.all(out_mag[9:, 9:, 9:] == 0)  # deep inside the region: no signal
    assert not bad[0, 0, 0] and out_ph[0, 0, 0, 1] == phase[0, 0, 0, 1]


def test_fill_from_neighbours_interpolates_a_smooth_field():
    x, y, z = np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij")
    field = (3 * x - 2 * y + z).astype(np.float32)
    known = np.ones(field.shape, bool)
    known[4, 4, 4] = known[4, 5, 4] = False  # two neighbouring holes
    broken = np.where(known, field, np.float32(1e6))
    out = ph.fill_from_neighbours(broken, known)
    np.testing.assert_allclose(out[~known], field[~known], atol=0.5)
    np.testing.assert_array_equal(out[known], field[known])


def _reference_smooth(angle, amp, sigma):
    from scipy import ndimage

    re = ndimage.gaussian_filter(amp * np.cos(angle), sigma, mode="nearest", truncate=3.0)
    im = ndimage.gaussian_filter(amp * np.sin(angle), sigma, mode="nearest", truncate=3.0)
    return np.arctan2(im, re)


def test_smooth_angle_keeps_a_linear_phase_and_matches_the_full_filter():
    """A wrapped linear ramp (a phase offset's typical shape) of uniform amplitude comes
    back as itself, through the coarse grid (sigma 4 voxels: blocks of 2) and the plain
    filter (sigma 1.5); with a varying amplitude, away from the volume's edges, the coarse
    grid gives the full filter's angle."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (41, 37, 30)), indexing="ij")
    angle = ph.wrap(0.3 * x - 0.2 * y + 0.25 * z)  # rad, wraps about 5 times
    amp = (1 + 0.3 * np.sin(x / 7) * np.cos(z / 5)).astype(np.float32)
    inner = (slice(12, -12),) * 3  # 3 sigma from the edges, where "nearest" bends the ramp
    for sigma in ((4.0, 4.0, 4.0), (4.0, 4.0, 1.3), (1.5, 1.5, 1.5)):
        flat = ph.smooth_angle(angle, np.ones_like(amp), sigma)
        assert np.abs(ph.wrap(flat - angle)[inner]).max() < 0.01
        out = ph.smooth_angle(angle, amp, sigma)
        assert out.shape == angle.shape and out.dtype == np.float32
        ref = _reference_smooth(angle, amp, sigma)
        assert np.abs(ph.wrap(out - ref)[inner]).max() < 0.03  # measured 0.018 rad
    np.testing.assert_array_equal(out, ref.astype(np.float32))  # sigma < 2: the plain filter


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [("int16", np.pi / 4096), ("uint16", 2 * np.pi / 4096), ("float32", 1.0),
     ("float64", 1.0), ("float32", 1e-3)],
)  # fmt: skip
def test_parallel_scaling_and_wrap_match_numpy(dtype, scale):
    """Large arrays take a parallel pass with the same float steps: the same bits."""
    rng = np.random.default_rng(0)
    x = (rng.random((40, 40, 21, 2)) * 8000 - 4000).astype(dtype)
    if x.dtype.kind == "f":
        x.flat[:5] = [np.nan, np.inf, -np.inf, np.pi, -np.pi]
    with np.errstate(invalid="ignore"):
        v = (x.astype(np.float64) * scale).astype(np.float32)
        two_pi = np.float32(2 * np.pi)
        expected = v - two_pi * np.floor((v + two_pi / 2) / two_pi)
        assert x.size >= 1 << 16
        np.testing.assert_array_equal(ph._wrap_scaled(x, scale), expected)
        np.testing.assert_array_equal(ph.wrap(v), expected)


def test_finite_in_every_echo():
    x = np.ones((5, 6, 7, 3), np.float32)
    x[1, 2, 3, 2] = np.nan
    x[4, 0, 0, 0] = -np.inf
    np.testing.assert_array_equal(ph._finite_in_every_echo(x), np.isfinite(x).all(axis=-1))
