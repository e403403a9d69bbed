"""Accuracy metrics against hand-computed cases."""

import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm import metrics


def _maps(seed=0, shape=(24, 24, 24)):
    rng = np.random.default_rng(seed)
    truth = ndimage.gaussian_filter(rng.standard_normal(shape), 2) * 0.3
    mask = np.zeros(shape, bool)
    mask[4:-4, 4:-4, 4:-4] = True
    return truth, mask


def test_identical_maps():
    t, m = _maps()
    assert metrics.nrmse(t, t, m) == 0
    assert metrics.hfen(t, t, m) == 0
    assert metrics.xsim(t, t, m) == pytest.approx(1.0)
    labels = np.zeros(t.shape, int)
    labels[6:10, 6:10, 6:10], labels[12:16, 6:10, 6:10] = 1, 2
    t2 = t + 0.2 * (labels == 2)
    assert metrics.dgm_linearity(t2, t2, labels) == pytest.approx(0, abs=1e-12)


def test_offset_does_not_count():
    t, m = _maps()
    x = t + 0.05 * np.random.default_rng(1).standard_normal(t.shape)
    for fn in (metrics.nrmse, metrics.hfen, metrics.xsim):
        assert fn(x + 0.7, t, m) == pytest.approx(fn(x, t, m), rel=1e-9)


def test_nrmse_by_hand():
    t = np.zeros((2, 2, 2))
    x = np.zeros((2, 2, 2))
    m = np.zeros((2, 2, 2), bool)
    m[0] = True
    t[0] = [[1, 3], [5, 7]]  # demeaned: -3 -1 1 3, norm sqrt(20)
    x[0] = [[1, 3], [5, 9]]  # demeaned: -3.5 -1.5 0.5 4.5, error norm sqrt(3)
    x[1] = 100  # outside the mask: ignored
    assert metrics.nrmse(x, t, m) == pytest.approx(100 * np.sqrt(3 / 20))


@pytest.mark.parametrize("scale", [0.5, 1.3])
def test_scaled_maps(scale):
    t, m = _maps()
    t = np.where(m, t - t[m].mean(), 0)
    assert metrics.nrmse(scale * t, t, m) == pytest.approx(100 * abs(scale - 1))
    # the LoG is linear, so HFEN of a scaled map is the same relative error
    assert metrics.hfen(scale * t, t, m) == pytest.approx(100 * abs(scale - 1))


def test_xsim_matches_the_ssim_formula():
    """XSIM = mean over the mask of SSIM with L = 1, K = (0.01, 0.001) and Gaussian
    (sigma 1.5, population) statistics of the demeaned maps."""
    t, m = _maps(2, (32, 32, 32))
    x = 0.6 * t + 0.02 * np.random.default_rng(3).standard_normal(t.shape)
    m = np.zeros_like(m)
    m[8:-8, 8:-8, 8:-8] = True  # away from the volume border, where filter modes differ
    xd = np.where(m, x - x[m].mean(), 0)
    td = np.where(m, t - t[m].mean(), 0)

    def g(a):
        return ndimage.gaussian_filter(a, 1.5, truncate=3.5, mode="reflect")

    mx, mt = g(xd), g(td)
    vx, vt, cxt = g(xd * xd) - mx**2, g(td * td) - mt**2, g(xd * td) - mx * mt
    c1, c2 = 0.01**2, 0.001**2
    ssim = (2 * mx * mt + c1) * (2 * cxt + c2) / ((mx**2 + mt**2 + c1) * (vx + vt + c2))
    value = metrics.xsim(x, t, m)
    assert value == pytest.approx(ssim[m].mean(), rel=1e-6)
    assert 0 < value < 1
    # a map with no structure scores far below a scaled copy
    assert metrics.xsim(np.zeros_like(t), t, m) < 0.2 < metrics.xsim(0.8 * t, t, m)


def test_dgm_linearity():
    labels = np.zeros((10, 10, 10), int)
    truth = np.zeros((10, 10, 10))
    for i, value in enumerate([0.05, 0.1, 0.2], start=1):
        labels[3 * (i - 1) : 3 * i, 2:5, 2:5] = i
        truth[labels == i] = value
    assert metrics.dgm_linearity(0.8 * truth + 0.1, truth, labels) == pytest.approx(0.2)
    assert metrics.dgm_linearity(1.25 * truth, truth, labels) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least 2 ROIs"):
        metrics.dgm_linearity(truth, truth, (labels == 1).astype(int))


def test_calc_streak():
    shape = (30, 30, 30)
    mask = np.ones(shape, bool)
    calc = np.zeros(shape, bool)
    calc[13:17, 13:17, 13:17] = True
    truth = np.where(calc, -1.5, 0.0)
    assert metrics.calc_streak(truth + 0.3, truth, calc, mask) == pytest.approx(0, abs=1e-12)
    rim = ndimage.binary_dilation(calc, iterations=5) & ~calc
    signs = np.where((np.indices(shape).sum(0) % 2) == 0, 1.0, -1.0)
    chi = truth + np.where(rim, 0.03 * signs, 0)
    err = chi - truth
    expect = (err[rim] - err.mean()).std() / abs(-1.5 - truth.mean())
    assert metrics.calc_streak(chi, truth, calc, mask) == pytest.approx(expect)
    assert expect == pytest.approx(0.03 / (1.5 - 1.5 * calc.mean()), rel=0.01)


def test_bad_input():
    t, m = _maps()
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.nrmse(t[:-1], t, m)
    with pytest.raises(ValueError, match="empty"):
        metrics.nrmse(t, t, np.zeros_like(m))
    with pytest.raises(ValueError, match="constant"):
        metrics.nrmse(t, np.ones_like(t), m)
