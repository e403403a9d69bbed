"""R2*/T2* fits on synthetic mono-exponential decay."""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep.qsm import relax

SHAPE = (24, 24, 12)


def _decay(te, seed=0):
    rng = np.random.default_rng(seed)
    r2s = rng.uniform(5.0, 100.0, SHAPE)
    s0 = rng.uniform(200.0, 1000.0, SHAPE)
    return s0, r2s, s0[..., None] * np.exp(-r2s[..., None] * np.asarray(te))


def _crlb_std(s0, r2s, te, sigma):
    """Cramér-Rao bound on the std of R2* for (S0, R2*) under Gaussian noise ``sigma``."""
    e = np.exp(-r2s[..., None] * te)
    j0, j1 = e, -s0[..., None] * te * e
    a, b, c = (j0 * j0).sum(-1), (j0 * j1).sum(-1), (j1 * j1).sum(-1)
    return sigma * np.sqrt(a / (a * c - b * b))


TE4 = np.arange(1, 5) * 0.006
TE8 = np.arange(1, 9) * 0.004


@pytest.mark.parametrize("te", [TE4, TE8, np.array([0.003, 0.01, 0.021, 0.04])])
def test_loglinear_exact_without_noise(te):
    _, r2s, mag = _decay(te)
    est = relax.r2star_loglinear(mag, te)
    assert est.dtype == np.float32 and est.shape == SHAPE
    np.testing.assert_allclose(est, r2s, rtol=1e-5)


@pytest.mark.parametrize("te", [TE4, TE8, np.arange(1, 4) * 0.01])
def test_arlo_without_noise_within_simpson_bias(te):
    _, r2s, mag = _decay(te)
    est = relax.r2star_arlo(mag, te)
    dt = te[1] - te[0]
    # Simpson's rule on exp(-R t) over 2 dt is off by ~(R dt)^4 / 180, relative
    bias = (r2s * dt) ** 4 / 180
    assert np.all(np.abs(est / r2s - 1) <= 1.1 * bias + 1e-6)


@pytest.mark.parametrize("te", [TE4, TE8])
@pytest.mark.parametrize("fit", [relax.r2star_loglinear, relax.r2star_arlo])
def test_noise_error_near_cramer_rao(te, fit):
    s0, r2s, mag = _decay(te, seed=1)
    r2s = np.clip(r2s, 10, 60)  # decay well sampled by the echoes
    mag = s0[..., None] * np.exp(-r2s[..., None] * te)
    sigma = 10.0  # SNR 20..100 at TE = 0
    rng = np.random.default_rng(2)
    noisy = np.abs(
        mag + sigma * (rng.standard_normal(mag.shape) + 1j * rng.standard_normal(mag.shape))
    )
    err = fit(noisy, te) - r2s
    bound = np.sqrt(np.mean(_crlb_std(s0, r2s, te, sigma) ** 2))
    assert np.sqrt(np.mean(err**2)) < 1.25 * bound
    assert abs(err.mean()) < 0.25 * bound


def test_mask_and_unusable_voxels():
    _, r2s, mag = _decay(TE4)
    mask = np.zeros(SHAPE, bool)
    mask[4:20, 4:20, 2:10] = True
    mag[5, 5, 5] = 0.0  # no signal at all
    mag[6, 6, 6, 1:] = 0.0  # one usable echo
    mag[7, 7, 7, 2:] = 0.0  # two usable echoes
    est = relax.r2star_loglinear(mag, TE4, mask)
    assert not est[~mask].any()
    assert est[5, 5, 5] == 0 and est[6, 6, 6] == 0
    assert est[7, 7, 7] == pytest.approx(r2s[7, 7, 7], rel=1e-4)
    ok = mask.copy()
    ok[5, 5, 5] = ok[6, 6, 6] = ok[7, 7, 7] = False
    np.testing.assert_allclose(est[ok], r2s[ok], rtol=1e-5)
    arlo = relax.r2star_arlo(mag, TE4, mask)
    assert not arlo[~mask].any() and arlo[5, 5, 5] == 0


def test_t2star_inverse_and_clipping():
    r2s = np.array([[[50.0, 20.0, 1.0, 0.0, -3.0, np.nan, np.inf]]])
    t2s = relax.t2star_from_r2star(r2s, max_t2s=0.2)
    assert t2s.dtype == np.float32
    np.testing.assert_allclose(t2s[0, 0], [0.02, 0.05, 0.2, 0.2, 0.2, 0.0, 0.0], rtol=1e-6)
    mask = np.array([[[True, False, True, True, True, True, True]]])
    assert relax.t2star_from_r2star(r2s, mask=mask)[0, 0, 1] == 0
    default = relax.t2star_from_r2star(np.zeros((1, 1, 1)))
    assert default[0, 0, 0] == pytest.approx(relax.DEFAULT_MAX_T2STAR_S)


def test_bad_input():
    _, _, mag = _decay(TE4)
    with pytest.raises(ValueError, match="at least 2 echoes"):
        relax.r2star_loglinear(mag[..., :1], TE4[:1])
    with pytest.raises(ValueError, match="at least 3 echoes"):
        relax.r2star_arlo(mag[..., :2], TE4[:2])
    with pytest.raises(ValueError, match="equally spaced"):
        relax.r2star_arlo(mag, [0.005, 0.01, 0.02, 0.03])
    with pytest.raises(ValueError, match="milliseconds"):
        relax.r2star_loglinear(mag, TE4 * 1000)
    with pytest.raises(ValueError, match="4 echo times for 3 echoes"):
        relax.r2star_loglinear(mag[..., :3], TE4)
    with pytest.raises(ValueError, match="increasing"):
        relax.r2star_loglinear(mag, TE4[::-1])
    with pytest.raises(ValueError, match=r"\(X, Y, Z, E\)"):
        relax.r2star_loglinear(mag[..., 0], TE4)
    with pytest.raises(ValueError, match="mask shape"):
        relax.r2star_arlo(mag, TE4, np.ones((2, 2, 2), bool))
    with pytest.raises(ValueError, match="max_t2s"):
        relax.t2star_from_r2star(np.ones(3), max_t2s=0)
