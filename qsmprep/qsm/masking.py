"""Brain/object masks from the magnitude or from the ROMEO voxel quality.

:func:`make_mask` is the stage's dispatcher; ``METHODS`` lists its methods. Both
methods threshold, keep the largest 6-connected component, optionally fill holes and
erode. With ``fill_holes=False`` the result keeps the holes at unreliable voxels (veins,
calcifications, signal voids): the *reliable* mask of the first pass of two-pass
inversion; the filled mask is the second pass's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

#: Default percentile (of the non-zero magnitude) taken as the noise level.
NOISE_PERCENTILE = 10.0
#: Default threshold, in multiples of the noise level.
NOISE_FACTOR = 8.0
#: The threshold never exceeds this fraction of the 99th-percentile (signal) level.
SIGNAL_FRACTION = 0.25
#: Default erosion of the magnitude-threshold mask, in voxels.
ERODE = 1
#: Default erosion of the quality mask, in voxels. None: the field's unreliable voxels at
#: the brain's edge are kept in the mask and weighted down in the data terms instead
#: (:func:`qsmprep.qsm.phase.field_reliability`); on the external heads of
#: ``benchmarks/bench_external.py`` the mask then keeps 96-98 % of the brain instead of
#: 89-92 %, with 1 % of it outside the brain.
QUALITY_ERODE = 0


def combine_magnitude(mag: np.ndarray, combine: str = "rss") -> np.ndarray:
    """Single magnitude image from ``(X, Y, Z)`` or ``(X, Y, Z, E)``: root sum of squares
    over echoes (``"rss"``) or the first echo (``"first"``); float32, same unit as ``mag``."""
    m = np.asarray(mag, dtype=np.float32)
    if m.ndim == 3:
        return m
    if m.ndim != 4:
        raise ValueError(f"magnitude must be 3D or 4D, got shape {m.shape}")
    if combine == "rss":
        return np.sqrt(np.sum(m * m, axis=-1))
    if combine == "first":
        return m[..., 0]
    raise ValueError(f"combine must be 'rss' or 'first', got {combine!r}")


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes``: the background components (6-connected) that do
    not reach the array's border join the mask; labelling them takes half the time of
    scipy's dilation from the border."""
    labels, _ = ndimage.label(~mask)
    border = np.zeros(labels.max() + 1, bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            border[np.take(labels, end, axis=axis)] = True
    return mask | ~border[labels]


def _finish(mask: np.ndarray, fill_holes: bool, erode: int) -> np.ndarray:
    """Largest 6-connected component, optional hole filling, erosion by ``erode`` voxels."""
    if erode < 0:
        raise ValueError(f"erode must be >= 0 voxels, got {erode}")
    labels, n = ndimage.label(mask)
    if n == 0:
        raise ValueError("the threshold leaves no voxel in the mask")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = labels == int(sizes.argmax())
    if fill_holes:
        out = _fill_holes(out)
    if erode:
        ball = ndimage.generate_binary_structure(3, 1)
        out = ndimage.binary_erosion(out, structure=ball, iterations=erode)
    return out


def robust_threshold_mask(
    mag: np.ndarray,
    *,
    combine: str = "rss",
    noise_percentile: float = NOISE_PERCENTILE,
    factor: float = NOISE_FACTOR,
    signal_fraction: float = SIGNAL_FRACTION,
    fill_holes: bool = True,
    erode: int = ERODE,
) -> np.ndarray:
    """Mask of the voxels with signal, from the magnitude (any unit).

    The noise level is the ``noise_percentile``-th percentile of the non-zero finite
    magnitude (the lowest voxels are background noise when at least about a third of the
    field of view is background); the threshold is ``factor`` times that level, capped at
    ``signal_fraction`` of the 99th percentile so that low-SNR data keep their tissue.
    With the defaults (10th percentile, 8x, 0.25) the threshold lies 3.7 to 7 Rayleigh
    noise widths above zero for a background of 100 down to 30 % of the voxels. Then the
    largest component is kept, holes filled (``fill_holes``) and the mask eroded by
    ``erode`` voxels. ``mag`` is ``(X, Y, Z)`` or ``(X, Y, Z, E)`` (combined by
    ``combine``: ``"rss"`` or ``"first"``).
    """
    m = combine_magnitude(mag, combine)
    if not 0 < noise_percentile < 100:
        raise ValueError(f"noise_percentile must be in (0, 100), got {noise_percentile}")
    if factor <= 0 or signal_fraction <= 0:
        raise ValueError("factor and signal_fraction must be positive")
    values = m[np.isfinite(m) & (m > 0)]
    if values.size == 0:
        raise ValueError("magnitude has no positive finite voxel")
    noise, signal = np.percentile(values, [noise_percentile, 99.0])
    threshold = min(factor * noise, signal_fraction * signal)
    return _finish(np.nan_to_num(m) > threshold, fill_holes, erode)


def quality_mask(
    quality: np.ndarray,
    *,
    threshold: float | None = None,
    fill_holes: bool = True,
    erode: int = QUALITY_ERODE,
) -> np.ndarray:
    """Mask from a voxel quality map in [0, 1] (ROMEO): Otsu threshold of the non-zero
    quality unless ``threshold`` is given, largest component, holes filled
    (``fill_holes``), eroded by ``erode`` voxels."""
    q = np.asarray(quality, dtype=np.float32)
    if q.ndim != 3:
        raise ValueError(f"quality must be 3D, got shape {q.shape}")
    if threshold is None:
        values = q[np.isfinite(q) & (q > 0)]
        if values.size == 0 or values.min() == values.max():
            raise ValueError("quality map is flat: no Otsu threshold")
        threshold = float(threshold_otsu(values))
    elif not 0 <= threshold < 1:
        raise ValueError(f"quality threshold must be in [0, 1), got {threshold}")
    return _finish(np.nan_to_num(q) > threshold, fill_holes, erode)


def peel_unreliable(mask: np.ndarray, weight: np.ndarray, rounds: int = 3) -> np.ndarray:
    """``mask`` without the voxels of zero ``weight`` on its border, layer by layer.

    A voxel on the mask's outer layer (6-connected) whose data weight is 0 (e.g. a field
    outlier, :func:`qsmprep.qsm.phase.field_reliability`) is removed; the new border is
    checked again, at most ``rounds`` times. Zero-weight voxels inside the mask stay: the
    data terms ignore them and the inversion fills them in. Returns a bool mask.
    """
    out = np.asarray(mask).astype(bool)
    w = np.asarray(weight)
    if w.shape != out.shape:
        raise ValueError(f"weight shape {w.shape} does not match mask {out.shape}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    ball = ndimage.generate_binary_structure(3, 1)
    for _ in range(rounds):
        drop = out & ~ndimage.binary_erosion(out, ball) & ~(w > 0)
        if not drop.any():
            break
        out &= ~drop
    return out


#: Masking methods: name -> function(input, **params) -> bool mask; the input is the
#: magnitude for "threshold" and the ROMEO voxel quality for "quality".
METHODS: dict[str, Callable[..., np.ndarray]] = {
    "threshold": robust_threshold_mask,
    "quality": quality_mask,
}


def make_mask(
    mag: np.ndarray, method: str, quality: np.ndarray | None = None, **params
) -> np.ndarray:
    """Bool mask ``(X, Y, Z)`` by ``method`` (a key of :data:`METHODS`).

    ``"threshold"``: :func:`robust_threshold_mask` of ``mag`` ``(X, Y, Z[, E])``;
    ``"quality"``: :func:`quality_mask` of ``quality`` (ROMEO voxel quality in [0, 1]).
    ``params`` go to that function (e.g. ``fill_holes=False``, ``erode=0``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown masking method {method!r}; choose from {sorted(METHODS)}")
    if method == "quality":
        if quality is None:
            raise ValueError("masking method 'quality' needs the ROMEO quality map")
        return quality_mask(quality, **params)
    return METHODS[method](mag, **params)
