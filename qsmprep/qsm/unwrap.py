"""Phase unwrapping of multi-echo phase: Laplacian (Poisson) and ROMEO.

:func:`unwrap_echoes` is the stage's dispatcher; ``METHODS`` lists its methods.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from .phase import echo_arrays, wrap
from .romeo import romeo_unwrap
from .sideinfo import check_voxel_size

_TWO_PI = np.float32(2 * np.pi)


def laplacian_unwrap(phase: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Unwrap a 3D phase (rad) by a Poisson solve of its wrap-consistent Laplacian.

    The Laplacian is the divergence of the wrapped finite differences,
    ``sum_axes [wrap(p[n+1] - p[n]) - wrap(p[n] - p[n-1])] / voxel_size^2`` (1/mm^2, zero
    difference across the volume's faces), and is inverted with a DCT-II, which
    diagonalises this Neumann Laplacian (the unweighted least-squares unwrapping of
    Ghiglia & Romero 1994). Where every wrapped difference equals the true one the result
    is the true phase plus a constant; where the phase is noisy or wraps faster than
    once per voxel the error is spread smoothly (a harmonic error inside the brain, which
    background-field removal takes away). Float32 rad, mean zero over the volume.
    """
    p = np.asarray(phase, dtype=np.float32)
    if p.ndim != 3:
        raise ValueError(f"phase must be 3D, got shape {p.shape}")
    vs = check_voxel_size(voxel_size)
    if not np.all(np.isfinite(p)):
        raise ValueError("phase contains non-finite values")
    # Edge-replicated padding to fast DCT lengths keeps the solution on the box unchanged.
    fast = tuple(sfft.next_fast_len(n, real=True) for n in p.shape)
    padded = np.pad(p, [(0, f - n) for f, n in zip(fast, p.shape, strict=True)], mode="edge")
    lap = np.zeros(fast, dtype=np.float32)
    for axis, v in enumerate(vs):
        g = wrap(np.diff(padded, axis=axis)) / np.float32(v * v)
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis] = slice(1, None)
        lo[axis] = slice(0, -1)
        lap[tuple(lo)] += g
        lap[tuple(hi)] -= g
    del padded, g
    spec = sfft.dctn(lap, type=2)
    eig = np.zeros(fast, dtype=np.float32)
    for axis, (n, v) in enumerate(zip(fast, vs, strict=True)):
        shape = [1, 1, 1]
        shape[axis] = n
        lam = (2 * np.cos(np.pi * np.arange(n) / n) - 2) / (v * v)
        eig = eig + lam.astype(np.float32).reshape(shape)
    eig[0, 0, 0] = 1
    spec /= eig
    spec[0, 0, 0] = 0
    out = sfft.idctn(spec, type=2)[tuple(slice(0, n) for n in p.shape)]
    return np.ascontiguousarray(out - out.mean(), dtype=np.float32)


@dataclass(frozen=True)
class UnwrapResult:
    """Unwrapped phase ``(X, Y, Z, E)`` in rad and an optional quality map in [0, 1]."""

    unwrapped: np.ndarray
    quality: np.ndarray | None = None


def _unwrap_laplacian(
    phase: np.ndarray,
    mag: np.ndarray | None,
    tes: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
) -> UnwrapResult:
    """Laplacian-unwrap each echo, then make the echoes consistent.

    Each echo's solution has an arbitrary constant: it is first set so that the solution
    agrees with the wrapped data modulo 2 pi (magnitude-weighted circular mean inside the
    mask), then each later echo is shifted by the 2 pi multiple (median inside the mask)
    that matches the wrapped echo-to-echo difference, and finally all echoes together by
    the 2 pi multiple that puts the median intercept of phase vs TE nearest zero
    (single echo: the median phase).
    """
    ne = phase.shape[-1]
    if not np.isfinite(phase).all():
        phase = np.where(np.isfinite(phase), phase, np.float32(0))
    out = np.empty(phase.shape, dtype=np.float32)
    for e in range(ne):
        u = laplacian_unwrap(phase[..., e], voxel_size)
        resid = np.exp(1j * (phase[..., e][mask] - u[mask]))
        weight = 1.0 if mag is None else mag[..., e][mask]
        out[..., e] = u + np.float32(np.angle(np.sum(weight * resid)))
    for e in range(1, ne):
        step = wrap(phase[..., e][mask] - phase[..., e - 1][mask])
        diff = out[..., e][mask] - out[..., e - 1][mask] - step
        out[..., e] -= _TWO_PI * np.float32(np.round(np.median(diff) / _TWO_PI))
    inside = out[mask]
    if ne > 1:
        t = tes - tes.mean()
        slope = inside @ t.astype(np.float32) / np.float32(t @ t)
        level = inside.mean(axis=1) - slope * np.float32(tes.mean())
    else:
        level = inside[:, 0]
    out -= _TWO_PI * np.float32(np.round(np.median(level) / _TWO_PI))
    out[~mask] = 0
    return UnwrapResult(out, None)


def _unwrap_romeo(
    phase: np.ndarray,
    mag: np.ndarray | None,
    tes: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
) -> UnwrapResult:
    """ROMEO (:func:`qsmprep.qsm.romeo.romeo_unwrap`); the voxel size is not needed."""
    unwrapped, quality = romeo_unwrap(phase, tes, mag, mask)
    return UnwrapResult(unwrapped, quality)


#: Unwrapping methods: name -> function(phase, mag, echo_times, mask, voxel_size).
METHODS: dict[str, Callable[..., UnwrapResult]] = {
    "laplacian": _unwrap_laplacian,
    "romeo": _unwrap_romeo,
}


def unwrap_echoes(
    phase: np.ndarray,
    mag: np.ndarray | None,
    echo_times: Sequence[float],
    mask: np.ndarray | None,
    voxel_size: Sequence[float],
    method: str = "romeo",
    **params,
) -> UnwrapResult:
    """Unwrap multi-echo phase with ``method`` (a key of :data:`METHODS`).

    ``phase`` ``(X, Y, Z, E)`` (or ``(X, Y, Z)``) in rad, ``mag`` the same shape or None,
    ``echo_times`` E values in s, ``mask`` bool ``(X, Y, Z)`` or None for the whole
    volume, ``voxel_size`` in mm. Returns :class:`UnwrapResult` with the unwrapped phase
    ``(X, Y, Z, E)`` float32 rad (0 outside the mask) and, for ROMEO, the voxel quality
    ``(X, Y, Z)`` in [0, 1]. For quality-based masking run ROMEO with ``mask=None`` first.
    ``params`` go to the method (the built-in methods take none).
    """
    if method not in METHODS:
        raise ValueError(f"unknown unwrapping method {method!r}; choose from {sorted(METHODS)}")
    ph, mg, tes = echo_arrays(phase, mag, echo_times)
    if mask is None:
        m = np.ones(ph.shape[:3], dtype=bool)
    else:
        m = np.asarray(mask, dtype=bool)
        if m.shape != ph.shape[:3]:
            raise ValueError(f"mask shape {m.shape} does not match phase {ph.shape[:3]}")
    if not m.any():
        raise ValueError("mask is empty")
    check_voxel_size(voxel_size)
    func = METHODS[method]
    try:
        inspect.signature(func).bind(ph, mg, tes, m, voxel_size, **params)
    except TypeError as err:
        raise ValueError(f"unwrapping method {method!r}: {err}") from None
    return func(ph, mg, tes, m, voxel_size, **params)
