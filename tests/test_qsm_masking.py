import numpy as np
import pytest

from qsmprep.qsm import masking


def _dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def _head(shape=(60, 64, 56), radii=(22, 26, 20)):
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    obj = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 < 1
    void = (x - 5) ** 2 + (y + 4) ** 2 + z**2 < 5**2  # a signal void inside the object
    return obj, void, (x, y, z)


def _rician(rng, signal, sigma):
    noise = sigma * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    return np.abs(signal + noise).astype(np.float32)


@pytest.mark.parametrize("snr", [10, 40])
def test_threshold_mask_of_noisy_ellipsoid(snr):
    rng = np.random.default_rng(0)
    obj, void, (x, _, _) = _head()
    signal = np.where(obj, 0.6 + 0.4 * (x > 0), 0.0)  # two tissue contrasts
    mag = _rician(rng, signal, 1.0 / snr)
    mask = masking.robust_threshold_mask(mag, erode=0)
    assert mask.dtype == bool and mask.shape == obj.shape
    assert _dice(mask, obj) > 0.97
    eroded = masking.robust_threshold_mask(mag)  # default: one voxel of erosion
    assert eroded.sum() < mask.sum() and np.mean(obj[eroded]) > 0.999


def test_threshold_mask_holes_filled_or_kept():
    rng = np.random.default_rng(1)
    obj, void, _ = _head()
    signal = np.where(obj & ~void, 1.0, 0.0)[..., None] * np.exp(-np.array([5, 10, 15]) / 40)
    mag = _rician(rng, signal, 0.03)  # (X, Y, Z, E): combined by root sum of squares
    filled = masking.make_mask(mag, "threshold", erode=0)
    assert _dice(filled, obj) > 0.97 and filled[void].all()
    reliable = masking.make_mask(mag, "threshold", erode=0, fill_holes=False)
    assert _dice(reliable, obj & ~void) > 0.97 and not reliable[void].any()
    first = masking.robust_threshold_mask(mag, combine="first", erode=0)
    assert _dice(first, obj) > 0.97


def test_threshold_mask_without_background_keeps_tissue():
    """No background voxel at all: the signal cap keeps the tissue."""
    rng = np.random.default_rng(2)
    mag = rng.uniform(0.5, 1.0, (20, 20, 20)).astype(np.float32)
    assert masking.robust_threshold_mask(mag, erode=0, fill_holes=False).mean() > 0.99


def test_quality_mask_otsu():
    rng = np.random.default_rng(3)
    obj, void, _ = _head()
    quality = np.where(obj, 0.85, 0.15) + 0.08 * rng.standard_normal(obj.shape)
    quality[void] = 0.2 + 0.05 * rng.standard_normal(void.sum())
    quality = np.clip(quality, 0, 1)
    filled = masking.make_mask(None, "quality", quality=quality, erode=0)
    assert _dice(filled, obj) > 0.97 and filled[void].all()
    reliable = masking.quality_mask(quality, fill_holes=False, erode=0)
    assert _dice(reliable, obj & ~void) > 0.97 and not reliable[void].any()
    strict = masking.quality_mask(quality, threshold=0.95, erode=0, fill_holes=False)
    assert strict.sum() < 0.2 * reliable.sum()


def test_masking_rejects_bad_input():
    mag = np.ones((8, 8, 8))
    with pytest.raises(ValueError, match="unknown masking method"):
        masking.make_mask(mag, "otsu")
    with pytest.raises(ValueError, match="quality map"):
        masking.make_mask(mag, "quality")
    with pytest.raises(ValueError, match="flat"):
        masking.quality_mask(np.full((8, 8, 8), 0.5))
    with pytest.raises(ValueError, match="combine"):
        masking.robust_threshold_mask(np.ones((4, 4, 4, 2)), combine="mean")
    with pytest.raises(ValueError, match="no positive"):
        masking.robust_threshold_mask(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="erode"):
        masking.robust_threshold_mask(mag, erode=-1)


def test_fill_holes_matches_scipy():
    from scipy import ndimage

    from qsmprep.qsm.masking import _fill_holes

    rng = np.random.default_rng(0)
    for p in (0.4, 0.6, 0.75):
        m = ndimage.binary_opening(rng.random((30, 40, 35)) < p)
        np.testing.assert_array_equal(_fill_holes(m), ndimage.binary_fill_holes(m))
    x, y, z = np.indices((40, 40, 40)) - 20
    shell = (x * x + y * y + z * z < 300) & ~(x * x + y * y + z * z < 30)
    assert (_fill_holes(shell) & ~shell).sum() > 0  # the inner ball is a hole
    np.testing.assert_array_equal(_fill_holes(shell), ndimage.binary_fill_holes(shell))
