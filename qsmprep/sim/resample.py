"""Box averaging from a fine grid onto a coarser one (partial-volume downsampling).

A coarse voxel ``j`` of size ``v`` along an axis covers the fine-grid interval
``[j * v, (j + 1) * v)`` (mm from the edge of fine voxel 0); its value is the
overlap-weighted mean of the fine voxels. Integer and non-integer size ratios work the
same way. The coarse grid keeps only voxels that lie wholly inside the fine field of view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

_TOL = 1e-6


def _ratios(src_voxel: Sequence[float], dst_voxel: Sequence[float]) -> np.ndarray:
    src = np.asarray(src_voxel, float)
    dst = np.asarray(dst_voxel, float)
    if src.shape != (3,) or dst.shape != (3,):
        raise ValueError("voxel sizes must be 3 values (mm)")
    if np.any(src <= 0) or np.any(dst <= 0):
        raise ValueError(f"voxel sizes must be positive, got {tuple(src)} and {tuple(dst)}")
    ratio = dst / src
    if np.any(ratio < 1 - _TOL):
        raise ValueError(f"cannot box-average {tuple(src)} mm onto finer voxels {tuple(dst)} mm")
    return ratio


def resampled_shape(
    shape: Sequence[int], src_voxel: Sequence[float], dst_voxel: Sequence[float]
) -> tuple[int, int, int]:
    """Shape of the coarse grid: whole coarse voxels inside the fine field of view."""
    ratio = _ratios(src_voxel, dst_voxel)
    out = tuple(int(np.floor(n / r + _TOL)) for n, r in zip(shape, ratio, strict=True))
    if min(out) < 1:
        raise ValueError(f"voxel size {tuple(dst_voxel)} mm is larger than the field of view")
    return out


def resampled_affine(
    affine: np.ndarray, src_voxel: Sequence[float], dst_voxel: Sequence[float]
) -> np.ndarray:
    """Affine of the coarse grid (same orientation; voxel 0 starts where fine voxel 0 starts)."""
    ratio = _ratios(src_voxel, dst_voxel)
    scale = np.diag([*ratio, 1.0])
    scale[:3, 3] = 0.5 * ratio - 0.5
    return np.asarray(affine, float) @ scale


def _axis_matrix(n_src: int, ratio: float) -> sparse.csr_array:
    """Sparse ``(n_dst, n_src)`` overlap-weight matrix along one axis (rows sum to 1)."""
    n_dst = int(np.floor(n_src / ratio + _TOL))
    rows, cols, vals = [], [], []
    for j in range(n_dst):
        a, b = j * ratio, (j + 1) * ratio
        for i in range(int(np.floor(a + _TOL)), min(int(np.ceil(b - _TOL)), n_src)):
            w = min(b, i + 1) - max(a, i)
            if w > _TOL:
                rows.append(j)
                cols.append(i)
                vals.append(w / ratio)
    return sparse.csr_array(
        (np.asarray(vals, np.float32), (rows, cols)), shape=(n_dst, n_src), dtype=np.float32
    )


def box_average(
    x: np.ndarray, src_voxel: Sequence[float], dst_voxel: Sequence[float]
) -> np.ndarray:
    """Overlap-weighted mean of ``x`` (first three axes spatial) on the coarser grid.

    Real input gives float32, complex input complex64; extra trailing axes are kept.
    """
    ratio = _ratios(src_voxel, dst_voxel)
    dtype = np.complex64 if np.iscomplexobj(x) else np.float32
    y = np.asarray(x, dtype=dtype)
    if np.all(np.abs(ratio - 1) < _TOL):
        return y.copy()
    for axis, r in enumerate(ratio):
        if abs(r - 1) < _TOL:
            continue
        m = _axis_matrix(y.shape[axis], float(r))
        moved = np.moveaxis(y, axis, 0)
        rest = moved.shape[1:]
        flat = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
        y = np.moveaxis((m @ flat).astype(dtype, copy=False).reshape(m.shape[0], *rest), 0, axis)
    return np.ascontiguousarray(y)


def box_mode(
    labels: np.ndarray, src_voxel: Sequence[float], dst_voxel: Sequence[float]
) -> np.ndarray:
    """Label covering the largest share of each coarse voxel (ties: the lower label).

    ``labels`` must be non-negative integers.
    """
    ratio = _ratios(src_voxel, dst_voxel)
    if np.all(np.abs(ratio - 1) < _TOL):
        return labels.copy()
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be non-negative integers")
    n = resampled_shape(labels.shape, src_voxel, dst_voxel)
    whole = np.round(ratio)
    if np.all(np.abs(ratio - whole) < _TOL):
        # integer ratios: histogram of labels per block (one bincount)
        r = whole.astype(np.int64)
        nl = int(labels.max()) + 1
        cut = labels[: n[0] * r[0], : n[1] * r[1], : n[2] * r[2]].astype(np.int64)
        block = [
            (np.arange(n[ax] * r[ax]) // r[ax]).reshape([-1 if i == ax else 1 for i in range(3)])
            for ax in range(3)
        ]
        index = ((block[0] * n[1] + block[1]) * n[2] + block[2]) * nl + cut
        counts = np.bincount(index.ravel(), minlength=int(np.prod(n)) * nl)
        return np.argmax(counts.reshape(*n, nl), axis=-1).astype(labels.dtype)
    values = np.unique(labels)
    best = np.full(n, values[0], labels.dtype)
    best_share = box_average(labels == values[0], src_voxel, dst_voxel)
    for v in values[1:]:
        frac = box_average(labels == v, src_voxel, dst_voxel)
        better = frac > best_share + _TOL
        best[better] = v
        best_share = np.where(better, frac, best_share)
    return best
