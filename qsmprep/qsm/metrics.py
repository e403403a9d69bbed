"""Accuracy metrics of a susceptibility map against a ground truth.

Definitions follow the QSM reconstruction challenge 2.0 and QSM-CI: every metric is
computed inside a mask with both maps demeaned over that mask, so the arbitrary offset
of an unreferenced map does not count.

- :func:`nrmse`: ``100 ||x - t|| / ||t||`` (percent).
- :func:`hfen`: NRMSE after a Laplacian-of-Gaussian filter, sigma 1.5 voxels (percent).
- :func:`xsim`: SSIM on ppm values with ``L = 1``, ``K = (0.01, 0.001)`` and a
  Gaussian window of sigma 1.5 voxels, averaged over the mask (Milovic et al. 2024).
- :func:`dgm_linearity`: ``|1 - slope|`` of the regression of ROI means on the truth's.
- :func:`calc_streak`: standard deviation of the error in a rim around a calcification
  over the calcification's mean susceptibility magnitude.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

#: LoG filter of the HFEN: sigma in voxels and support radius (a 15^3 kernel).
HFEN_SIGMA = 1.5
HFEN_RADIUS = 7


def _demeaned(
    chi: np.ndarray, truth: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    chi = np.asarray(chi, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    mask = np.asarray(mask)
    if chi.shape != truth.shape or mask.shape != truth.shape:
        raise ValueError(f"shapes differ: chi {chi.shape}, truth {truth.shape}, mask {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("mask is empty")
    x = np.where(mask, chi - chi[mask].mean(), 0.0)
    t = np.where(mask, truth - truth[mask].mean(), 0.0)
    return x, t, mask


def _relative_error(x: np.ndarray, t: np.ndarray) -> float:
    norm = np.linalg.norm(t)
    if norm == 0:
        raise ValueError("the truth is constant inside the mask: relative error undefined")
    return float(100.0 * np.linalg.norm(x - t) / norm)


def nrmse(chi: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Normalised root-mean-square error (percent) of ``chi`` against ``truth`` (ppm)
    inside ``mask``, both demeaned over the mask."""
    x, t, m = _demeaned(chi, truth, mask)
    return _relative_error(x[m], t[m])


def hfen(chi: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """High-frequency error norm (percent): NRMSE inside ``mask`` after a
    Laplacian-of-Gaussian filter (sigma 1.5 voxels, 15^3 support) of both demeaned maps,
    which are zero outside the mask."""
    x, t, m = _demeaned(chi, truth, mask)
    kw = {"sigma": HFEN_SIGMA, "truncate": HFEN_RADIUS / HFEN_SIGMA, "mode": "constant"}
    return _relative_error(
        ndimage.gaussian_laplace(x, **kw)[m], ndimage.gaussian_laplace(t, **kw)[m]
    )


def xsim(chi: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """XSIM: SSIM of the demeaned maps in ppm without rescaling (``L = 1``,
    ``K1 = 0.01``, ``K2 = 0.001``, Gaussian window sigma 1.5 voxels), averaged over
    ``mask``. 1 for identical maps."""
    x, t, m = _demeaned(chi, truth, mask)
    if min(x.shape) < 11:
        raise ValueError(f"xsim needs at least 11 voxels per axis, got shape {x.shape}")
    _, smap = structural_similarity(
        t,
        x,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        K1=0.01,
        K2=0.001,
        full=True,
    )
    return float(smap[m].mean())


def dgm_linearity(chi: np.ndarray, truth: np.ndarray, roi_labels: np.ndarray) -> float:
    """Deep-grey-matter linearity ``|1 - slope|``: least-squares slope of the mean of
    ``chi`` against the mean of ``truth`` (ppm) over each ROI (labels > 0 in
    ``roi_labels``). 0 for a map that is exact up to an offset."""
    chi = np.asarray(chi, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    labels = np.asarray(roi_labels)
    if chi.shape != truth.shape or labels.shape != truth.shape:
        raise ValueError(
            f"shapes differ: chi {chi.shape}, truth {truth.shape}, labels {labels.shape}"
        )
    ids = np.unique(labels[labels > 0])
    if ids.size < 2:
        raise ValueError(f"dgm_linearity needs at least 2 ROIs, got {ids.size}")
    mc = ndimage.mean(chi, labels, ids)
    mt = ndimage.mean(truth, labels, ids)
    if np.ptp(mt) == 0:
        raise ValueError("all ROIs have the same true mean: slope undefined")
    slope = np.polyfit(mt, mc, 1)[0]
    return float(abs(1.0 - slope))


def calc_streak(
    chi: np.ndarray,
    truth: np.ndarray,
    calc_mask: np.ndarray,
    mask: np.ndarray,
    rim_width: int = 5,
) -> float:
    """Calcification streaking: standard deviation of ``chi - truth`` (both demeaned over
    ``mask``) in a rim of ``rim_width`` voxels around ``calc_mask`` (inside ``mask``),
    divided by ``|mean truth|`` in the calcification (demeaned). Unitless; 0 for an
    exact map."""
    x, t, m = _demeaned(chi, truth, mask)
    calc = np.asarray(calc_mask).astype(bool)
    if calc.shape != m.shape:
        raise ValueError(f"calc_mask shape {calc.shape} does not match mask {m.shape}")
    if not calc.any():
        raise ValueError("calc_mask is empty")
    if rim_width < 1:
        raise ValueError(f"rim_width must be >= 1 voxel, got {rim_width}")
    ball = ndimage.generate_binary_structure(3, 1)
    rim = ndimage.binary_dilation(calc, ball, iterations=rim_width) & ~calc & m
    if not rim.any():
        raise ValueError("the rim around the calcification lies outside the mask")
    scale = abs(t[calc].mean())
    if scale == 0:
        raise ValueError("the calcification's mean susceptibility is 0")
    return float((x[rim] - t[rim]).std() / scale)
