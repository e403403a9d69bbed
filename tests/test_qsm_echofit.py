import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm import phase as ph
from qsmprep.qsm.unwrap import unwrap_echoes

TES = np.array([0.004, 0.0085, 0.013, 0.0175])  # s
VS = (1.0, 1.0, 1.5)  # mm


def _case(rng, tes=TES, shape=(44, 48, 32), noise=0.02, offset_scale=0.0, background=0.0):
    g = np.meshgrid(
        *[(np.arange(n) - n / 2) * v for n, v in zip(shape, VS, strict=True)], indexing="ij"
    )
    x, y, z = g
    mask = (x / 19) ** 2 + (y / 21) ** 2 + (z / 21) ** 2 < 1
    field = (
        120 * np.exp(-((x - 4) ** 2 + y**2 + z**2) / 80)
        - 40 * np.exp(-((x + 6) ** 2 + (y - 5) ** 2 + (z - 3) ** 2) / 50)
        + 0.8 * y
    )  # Hz
    # a smooth, echo-independent phase offset (coil / transmit phase), rad
    offset = offset_scale * (np.sin(x / 20) + 0.8 * np.cos(y / 16 + z / 24))
    truth = 2 * np.pi * field[..., None] * tes
    mag = np.where(mask, 1.0, background)[..., None] * np.exp(-tes / 0.04)
    cplx = mag * np.exp(1j * (truth + offset[..., None]))
    cplx = cplx + noise * (rng.standard_normal(cplx.shape) + 1j * rng.standard_normal(cplx.shape))
    return (
        np.angle(cplx).astype(np.float32),
        np.abs(cplx).astype(np.float32),
        mask,
        field,
        truth,
        offset,
    )


def test_fit_exact_phase_recovers_field():
    rng = np.random.default_rng(0)
    _, mag, mask, field, truth, _ = _case(rng, noise=0.0)
    f = ph.fit_field(truth, mag, TES, mask)
    assert f.dtype == np.float32 and f.shape == mask.shape
    np.testing.assert_allclose(f[mask], field[mask], atol=1e-3)
    assert np.all(f[~mask] == 0)


def test_fit_noise_matches_weighted_least_squares_bound():
    """Phase noise sigma/mag per echo: the fit's error is the weighted-LS standard error
    sigma / (2 pi sqrt(sum mag^2 TE^2)); equal weights do measurably worse."""
    rng = np.random.default_rng(1)
    sigma = 0.05
    m = np.exp(-TES / 0.01)  # fast decay: later echoes much noisier
    mag = np.broadcast_to(m, (24, 24, 24, 4)).astype(np.float32)
    phase = 2 * np.pi * 30.0 * TES + sigma / mag * rng.standard_normal(mag.shape)
    f = ph.fit_field(phase, mag, TES)
    weighted = sigma / (2 * np.pi * np.sqrt(np.sum(m**2 * TES**2)))
    assert abs(f.mean() - 30.0) < 4 * weighted / np.sqrt(f.size)
    assert f.std() == pytest.approx(weighted, rel=0.05)
    equal = sigma * np.sqrt(np.sum(TES**2 / m**2)) / (2 * np.pi * np.sum(TES**2))
    assert equal > 1.3 * weighted
    assert ph.fit_field(phase, None, TES).std() == pytest.approx(equal, rel=0.05)


def test_fit_with_offset_term():
    rng = np.random.default_rng(2)
    _, mag, mask, field, truth, offset = _case(rng, noise=0.0, offset_scale=2.0)
    with_offset = truth + offset[..., None]
    f = ph.fit_field(with_offset, mag, TES, mask, with_offset=True)
    np.testing.assert_allclose(f[mask], field[mask], atol=1e-2)
    through_origin = ph.fit_field(with_offset, mag, TES, mask)
    assert np.abs(through_origin - field)[mask].max() > 10  # the offset biases it


def test_single_echo_is_phase_over_two_pi_te():
    phase = np.linspace(-20, 20, 60, dtype=np.float32).reshape(3, 4, 5)
    f = ph.fit_field(phase, np.zeros_like(phase), [0.01])
    np.testing.assert_allclose(f, phase / (2 * np.pi * 0.01), rtol=1e-6)
    with pytest.raises(ValueError, match="two echoes"):
        ph.fit_field(phase, None, [0.01], with_offset=True)


def test_zero_magnitude_voxels_fall_back_to_equal_weights():
    phase = 2 * np.pi * 25.0 * TES * np.ones((2, 2, 2, 4))
    mag = np.ones_like(phase)
    mag[0] = 0
    np.testing.assert_allclose(ph.fit_field(phase, mag, TES), 25.0, rtol=1e-5)


@pytest.mark.parametrize("method", ["romeo", "laplacian"])
@pytest.mark.parametrize("tes", [TES, np.array([0.005, 0.012, 0.019])])
def test_mcpc3ds_then_unwrap_then_fit(method, tes):
    """Wrapped multi-echo phase with an offset spanning 3.7 rad: MCPC-3D-S, unwrapping and
    the fit through the origin recover the field; without MCPC-3D-S the fit is biased.

    For the Laplacian the object fills the volume (weaker signal outside the mask): with
    pure noise around it each echo gets its own harmonic error (test_qsm_unwrap)."""
    rng = np.random.default_rng(3)
    background = 0.3 if method == "laplacian" else 0.0
    phase, mag, mask, field, truth, offset = _case(
        rng, tes=tes, offset_scale=2.0, background=background
    )
    assert np.ptp(offset[mask]) > 3.5
    corrected = ph.mcpc3ds(phase, mag, tes, VS)
    assert corrected.shape == phase.shape and corrected.dtype == np.float32
    assert corrected.min() >= -np.pi and corrected.max() < np.pi
    deep = ndimage.binary_erosion(mask, iterations=2)
    resid = ph.wrap(corrected - truth)[deep]
    assert np.abs(resid).max() < 0.25  # offset gone, up to noise and smoothing bias
    assert np.abs(resid).mean() < 0.05
    unwrapped = unwrap_echoes(corrected, mag, tes, mask, VS, method).unwrapped
    err = np.abs(ph.fit_field(unwrapped, mag, tes, mask) - field)[deep]
    # 0.1 rad of offset left at TE ~ 12 ms is 1.3 Hz; the noise adds ~0.2 Hz rms
    assert err.max() < 3.0 and err.mean() < 0.5  # Hz
    raw = unwrap_echoes(phase, mag, tes, mask, VS, method).unwrapped
    assert np.abs(ph.fit_field(raw, mag, tes, mask) - field)[deep].mean() > 10


def test_mcpc3ds_rejects_bad_input():
    with pytest.raises(ValueError, match="two echoes"):
        ph.mcpc3ds(np.zeros((4, 4, 4, 1)), None, [0.01], VS)
    with pytest.raises(ValueError, match="voxel_size"):
        ph.mcpc3ds(np.zeros((4, 4, 4, 2)), None, [0.01, 0.02], (1, 1))
    with pytest.raises(ValueError, match="sigma_mm"):
        ph.mcpc3ds(np.zeros((4, 4, 4, 2)), None, [0.01, 0.02], VS, sigma_mm=0)


def test_mcpc3ds_tolerates_non_finite_voxels():
    rng = np.random.default_rng(5)
    phase, mag, mask, _, truth, _ = _case(rng, offset_scale=2.0)
    phase[3, 4, 5, 0] = np.nan
    mag[30, 30, 10, 1] = np.nan
    corrected = ph.mcpc3ds(phase, mag, TES, VS)
    deep = ndimage.binary_erosion(mask, iterations=2)
    deep[3, 4, 5] = deep[30, 30, 10] = False
    assert np.isfinite(corrected[deep]).all()
    assert np.abs(ph.wrap(corrected - truth)[deep]).mean() < 0.05
