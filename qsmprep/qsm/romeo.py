"""ROMEO phase unwrapping: quality-guided region growing (Dymerska et al., MRM 2021).

Every edge between two face neighbours gets a quality weight in [0, 1], the product of

- phase coherence ``1 - |wrap(p_j - p_i)| / pi`` (echo 1);
- phase-gradient coherence across echoes
  ``max(0, 1 - |wrap(dp1) - wrap(dp2) * TE1/TE2|)`` (rad; echoes 1 and 2, multi-echo only);
- phase linearity ``max(0, 1 - |wrap(p_h - 2 p_i + p_j)|) * max(0, 1 - |wrap(p_i - 2 p_j
  + p_k)|)`` on the voxels ``h, i, j, k`` in a row along the edge (where they exist);
- magnitude coherence ``(m_min / m_max)^2 * (0.5 + 0.5 min(1, m_min / (0.5 m_ref)))``
  with ``m_ref`` the 99th percentile of the echo-1 magnitude inside the mask: edges
  between voxels of unequal or low signal are trusted less.

Weights are quantised into 255 bins (1 best, 255 worst; 0 marks an edge that leaves
the mask) and the phase is unwrapped by growing a region from the best voxel along the
best edge first, with a bucket priority queue. Voxels the first region cannot reach
(another component of the mask) start a new region at the best voxel left. Later
echoes are unwrapped temporally against the previous echo scaled by TE.

The voxel quality map is the mean weight of a voxel's six edges (edges out of the mask
count as 0): a good mask input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numba import njit

log = logging.getLogger("qsmprep")

#: Number of weight bins of the priority queue (bin 0 marks an invalid edge).
NBINS = 256

_TWO_PI = 2.0 * np.pi


@njit(cache=True, inline="always")
def _wrap(x):
    return x - _TWO_PI * np.floor((x + np.pi) / _TWO_PI)


@njit(cache=True, inline="always")
def _linearity(a, b, c):
    return max(0.0, 1.0 - abs(_wrap(a - 2.0 * b + c)))


@njit(cache=True)
def _edge_bins(p1, p2, use_p2, te_ratio, mag, use_mag, mag_ref, valid, bins):
    """Fill ``bins[i, j, k, d]`` for the edge from voxel ``(i, j, k)`` to its +1 neighbour
    along axis ``d``; ``p2`` / ``mag`` are read only where ``use_p2`` / ``use_mag``."""
    nx, ny, nz = p1.shape
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                if not valid[i, j, k]:
                    continue
                for d in range(3):
                    si = 1 if d == 0 else 0
                    sj = 1 if d == 1 else 0
                    sk = 1 if d == 2 else 0
                    i2, j2, k2 = i + si, j + sj, k + sk
                    if i2 >= nx or j2 >= ny or k2 >= nz or not valid[i2, j2, k2]:
                        continue
                    a = p1[i, j, k]
                    b = p1[i2, j2, k2]
                    dp = _wrap(b - a)
                    w = 1.0 - abs(dp) / np.pi
                    if use_p2:
                        dp2 = _wrap(p2[i2, j2, k2] - p2[i, j, k])
                        w *= max(0.0, 1.0 - abs(dp - dp2 * te_ratio))
                    i0, j0, k0 = i - si, j - sj, k - sk
                    if i0 >= 0 and j0 >= 0 and k0 >= 0:
                        w *= _linearity(p1[i0, j0, k0], a, b)
                    i3, j3, k3 = i2 + si, j2 + sj, k2 + sk
                    if i3 < nx and j3 < ny and k3 < nz:
                        w *= _linearity(a, b, p1[i3, j3, k3])
                    if use_mag:
                        m1 = mag[i, j, k]
                        m2 = mag[i2, j2, k2]
                        lo = min(m1, m2)
                        hi = max(m1, m2)
                        if hi > 0:
                            w *= (lo / hi) ** 2 * (0.5 + 0.5 * min(1.0, lo / (0.5 * mag_ref)))
                        else:
                            w = 0.0
                    q = int(np.round((1.0 - w) * (NBINS - 1)))
                    bins[i, j, k, d] = min(max(q, 1), NBINS - 1)


@njit(cache=True)
def _quality(bins):
    """Mean dequantised weight of each voxel's six edges."""
    nx, ny, nz, _ = bins.shape
    out = np.zeros((nx, ny, nz), dtype=np.float32)
    scale = 1.0 / (NBINS - 2)
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                s = 0.0
                for d in range(3):
                    b = bins[i, j, k, d]
                    if b > 0:
                        s += (NBINS - 1 - b) * scale
                if i > 0 and bins[i - 1, j, k, 0] > 0:
                    s += (NBINS - 1 - bins[i - 1, j, k, 0]) * scale
                if j > 0 and bins[i, j - 1, k, 1] > 0:
                    s += (NBINS - 1 - bins[i, j - 1, k, 1]) * scale
                if k > 0 and bins[i, j, k - 1, 2] > 0:
                    s += (NBINS - 1 - bins[i, j, k - 1, 2]) * scale
                out[i, j, k] = s / 6.0
    return out


@njit(cache=True)
def _seed_order(quality, valid):
    """Flat indices of the valid voxels, best quality first (counting sort, 256 levels)."""
    q = quality.ravel()
    v = valid.ravel()
    counts = np.zeros(NBINS + 1, dtype=np.int64)
    level = np.empty(q.size, dtype=np.int64)
    for n in range(q.size):
        if v[n]:
            lv = NBINS - 1 - int(q[n] * (NBINS - 1))
            level[n] = lv
            counts[lv + 1] += 1
    for b in range(NBINS):
        counts[b + 1] += counts[b]
    order = np.empty(counts[NBINS], dtype=np.int64)
    for n in range(q.size):
        if v[n]:
            order[counts[level[n]]] = n
            counts[level[n]] += 1
    return order


@njit(cache=True, inline="always")
def _push(e, b, head, nxt, state):
    nxt[e] = head[b]
    head[b] = e
    state[1] += 1
    if b < state[0]:
        state[0] = b


@njit(cache=True, inline="always")
def _push_edges(v, strides, bins, region, head, nxt, state):
    """Queue the edges from visited voxel ``v`` to its unvisited neighbours. The volume
    has a border of invalid voxels (bins 0), so no neighbour index leaves the array."""
    for d in range(3):
        st = strides[d]
        e = 3 * v + d
        if bins[e] > 0 and region[v + st] == 0:
            _push(e, bins[e], head, nxt, state)
        e = 3 * (v - st) + d
        if bins[e] > 0 and region[v - st] == 0:
            _push(e, bins[e], head, nxt, state)


@njit(cache=True)
def _grow(phase, p2, te_ratio, bins, strides, order, region, nxt):
    """Unwrap ``phase`` (flat, in place) by region growing; label regions in ``region``.

    Each edge enters the queue at most once, so a singly linked list per bin through
    ``nxt`` (one slot per edge) is the whole priority queue. Returns the number of regions.
    """
    head = np.full(NBINS, -1, dtype=nxt.dtype)
    state = np.zeros(2, dtype=np.int64)  # [lowest possibly non-empty bin, queue size]
    use_p2 = p2.size == phase.size
    nregions = 0
    for seed in order:
        if region[seed] != 0:
            continue
        nregions += 1
        region[seed] = nregions
        if use_p2:
            # the 2 pi multiple of the seed that best agrees with echo 2 scaled by TE
            best = np.inf
            shift = 0
            for a in range(-2, 3):
                for b in range(-1, 2):
                    cost = abs(phase[seed] + _TWO_PI * a - (p2[seed] + _TWO_PI * b) * te_ratio)
                    cost += 0.01 * (abs(a) + abs(b))
                    if cost < best:
                        best = cost
                        shift = a
            phase[seed] += _TWO_PI * shift
        state[0] = NBINS
        _push_edges(seed, strides, bins, region, head, nxt, state)
        while state[1] > 0:
            while head[state[0]] < 0:
                state[0] += 1
            e = head[state[0]]
            head[state[0]] = nxt[e]
            state[1] -= 1
            v = e // 3
            n = v + strides[e % 3]
            if region[v] == 0:
                new, old = v, n
            elif region[n] == 0:
                new, old = n, v
            else:
                continue
            phase[new] -= _TWO_PI * np.round((phase[new] - phase[old]) / _TWO_PI)
            region[new] = nregions
            _push_edges(new, strides, bins, region, head, nxt, state)
    return nregions


@njit(cache=True)
def _temporal(phase, first, ratios, valid, out):
    """Unwrap echoes 2.. of ``phase`` (X, Y, Z, E) against the previous echo scaled by
    ``ratios[e] = TE_e / TE_(e-1)``, from the unwrapped echo 1 ``first`` (padded by one
    voxel); 0 outside ``valid``."""
    nx, ny, nz, ne = phase.shape
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                if not valid[i, j, k]:
                    out[i, j, k, :] = 0
                    continue
                u = first[i + 1, j + 1, k + 1]
                out[i, j, k, 0] = u
                for e in range(1, ne):
                    w = phase[i, j, k, e]
                    u = w - _TWO_PI * np.round((w - u * ratios[e]) / _TWO_PI)
                    out[i, j, k, e] = u


def _valid_mask(phase: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    valid = np.all(np.isfinite(phase), axis=-1) if phase.ndim == 4 else np.isfinite(phase)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != valid.shape:
            raise ValueError(f"mask shape {mask.shape} does not match phase {valid.shape}")
        valid &= mask
    return np.ascontiguousarray(valid)


def edge_weights(
    phase: np.ndarray,
    mag: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    phase2: np.ndarray | None = None,
    te_ratio: float = 0.5,
) -> np.ndarray:
    """Quantised ROMEO edge weights, ``uint8`` of shape ``(X, Y, Z, 3)``.

    ``[i, j, k, d]`` is the edge from voxel ``(i, j, k)`` to its +1 neighbour along axis
    ``d``: 1 best .. 255 worst, 0 for an edge that leaves the volume or the mask.
    ``phase`` / ``phase2`` wrapped (rad, echo 1 and 2), ``te_ratio = TE1 / TE2``,
    ``mag`` the echo-1 magnitude (any unit).
    """
    p1 = np.ascontiguousarray(phase, dtype=np.float32)
    if p1.ndim != 3:
        raise ValueError(f"phase must be 3D, got shape {p1.shape}")
    valid = _valid_mask(p1, mask)
    empty = np.zeros((1, 1, 1), dtype=np.float32)
    if phase2 is None:
        p2 = empty
    else:
        p2 = np.ascontiguousarray(phase2, dtype=np.float32)
        if p2.shape != p1.shape:
            raise ValueError(f"phase2 shape {p2.shape} does not match phase {p1.shape}")
        valid &= np.isfinite(p2)
    mag_ref = 1.0
    if mag is None:
        m = empty
    else:
        m = np.ascontiguousarray(mag, dtype=np.float32)
        if m.shape != p1.shape:
            raise ValueError(f"mag shape {m.shape} does not match phase {p1.shape}")
        finite = np.isfinite(m)
        valid &= finite
        inside = m[valid]
        mag_ref = float(np.percentile(inside, 99)) if inside.size else 0.0
        if mag_ref <= 0:
            mag_ref = 1.0
    bins = np.zeros(p1.shape + (3,), dtype=np.uint8)
    _edge_bins(
        p1, p2, phase2 is not None, float(te_ratio), m, mag is not None, mag_ref, valid, bins
    )
    return bins


def voxel_quality(bins: np.ndarray) -> np.ndarray:
    """Mean weight in [0, 1] of each voxel's six edges, from :func:`edge_weights`."""
    return _quality(np.ascontiguousarray(bins, dtype=np.uint8))


def romeo_unwrap(
    phase: np.ndarray,
    echo_times: Sequence[float] | None = None,
    mag: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unwrap phase (rad) with ROMEO; return ``(unwrapped, quality)``.

    ``phase`` is ``(X, Y, Z)`` or ``(X, Y, Z, E)`` in rad (wrapped or not), ``echo_times``
    the E echo times in s (needed for E > 1), ``mag`` the magnitude of the same shape,
    ``mask`` a bool ``(X, Y, Z)`` to unwrap in (default: every finite voxel).

    Echo 1 is unwrapped spatially, using echo 2 for the phase-gradient coherence, and
    each later echo temporally against the previous one scaled by TE (remove a large
    phase offset with MCPC-3D-S first, or the scaled prediction is off). The seed of each
    region keeps its wrapped value (single echo) or takes the 2 pi multiple, within
    +-2, most consistent with echo 2 scaled by TE. Returns float32 unwrapped phase (rad,
    shape of ``phase``, 0 outside the mask) and the voxel quality ``(X, Y, Z)`` in [0, 1].
    """
    ph = np.asarray(phase, dtype=np.float32)
    single = ph.ndim == 3
    if single:
        ph = ph[..., None]
    if ph.ndim != 4:
        raise ValueError(f"phase must be 3D or 4D, got shape {np.shape(phase)}")
    ne = ph.shape[-1]
    if echo_times is None:
        if ne > 1:
            raise ValueError("echo_times are needed to unwrap several echoes")
        tes = np.ones(1)
    else:
        tes = np.asarray(echo_times, dtype=float).ravel()
        if tes.size != ne:
            raise ValueError(f"{tes.size} echo times for {ne} echoes")
        if np.any(tes <= 0) or len(np.unique(tes)) != ne:
            raise ValueError(f"echo times must be positive and distinct, got {tes.tolist()}")
    mg = None
    if mag is not None:
        mg = np.asarray(mag, dtype=np.float32)
        if single and mg.ndim == 3:
            mg = mg[..., None]
        if mg.shape != ph.shape:
            raise ValueError(f"mag shape {np.shape(mag)} does not match phase {np.shape(phase)}")
    valid = _valid_mask(ph, mask)
    # a border of invalid voxels spares the region growing every bounds check
    border = ((1, 1),) * 3
    inner = (slice(1, -1),) * 3
    valid_p = np.pad(valid, border)
    p1 = np.pad(_wrap_np(ph[..., 0]), border)
    p2 = np.pad(_wrap_np(ph[..., 1]), border) if ne > 1 else None
    te_ratio = float(tes[0] / tes[1]) if ne > 1 else 1.0
    bins = edge_weights(
        p1, None if mg is None else np.pad(mg[..., 0], border), valid_p, p2, te_ratio
    )
    quality = voxel_quality(bins)
    region = np.zeros(p1.size, dtype=np.int32)
    flat = p1.ravel()
    nregions = _grow(
        flat,
        np.zeros(0, np.float32) if p2 is None else p2.ravel(),
        te_ratio,
        bins.ravel(),
        np.array([p1.shape[1] * p1.shape[2], p1.shape[2], 1], dtype=np.int64),
        _seed_order(quality, valid_p),
        region,
        np.empty(bins.size, dtype=np.int32 if bins.size < 2**31 else np.int64),
    )
    log.debug("ROMEO grew %d region(s)", nregions)
    del bins, region, p2
    out = np.empty(ph.shape, dtype=np.float32)
    ratios = np.ones(ne, dtype=np.float32)
    ratios[1:] = tes[1:] / tes[:-1]
    _temporal(np.ascontiguousarray(ph), p1, ratios, valid, out)
    return (out[..., 0] if single else out), np.ascontiguousarray(quality[inner])


def _wrap_np(x: np.ndarray) -> np.ndarray:
    """Wrap to [-pi, pi] (float32); faster than a floating-point modulo."""
    x = np.asarray(x, dtype=np.float32)
    two_pi = np.float32(2 * np.pi)
    return x - two_pi * np.rint(x / two_pi)
