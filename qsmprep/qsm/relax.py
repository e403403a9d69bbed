"""R2* and T2* from multi-echo magnitude: weighted log-linear fit and ARLO.

The magnitude decays mono-exponentially, ``S(TE) = S0 exp(-R2* TE)``. Magnitude is
``(X, Y, Z, E)`` with the echo last, echo times are in seconds, R2* comes back in 1/s
and T2* in s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Longest plausible echo time (s); larger values are taken for milliseconds.
MAX_ECHO_TIME_S = 1.0

#: Default longest T2* (s) reported by :func:`t2star_from_r2star`.
DEFAULT_MAX_T2STAR_S = 0.5

#: Relative tolerance on the echo spacing for ARLO.
ARLO_SPACING_RTOL = 1e-2

#: Voxels per chunk of the vectorised fits (bounds the float64 temporaries).
_CHUNK = 1 << 20


def _validate(
    mag: np.ndarray, echo_times: Sequence[float], mask: np.ndarray | None, min_echoes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the masked magnitude ``(N, E)``, the echo times and the bool mask."""
    mag = np.asarray(mag)
    if mag.ndim != 4:
        raise ValueError(f"magnitude must be (X, Y, Z, E) with echoes last, got {mag.shape}")
    te = np.asarray(echo_times, dtype=np.float64).ravel()
    if te.size != mag.shape[3]:
        raise ValueError(f"{te.size} echo times for {mag.shape[3]} echoes")
    if te.size < min_echoes:
        raise ValueError(f"need at least {min_echoes} echoes, got {te.size}")
    if not np.all(np.isfinite(te)) or te.min() < 0 or np.any(np.diff(te) <= 0):
        raise ValueError(f"echo times must be finite, >= 0 and increasing, got {te.tolist()}")
    if te.max() > MAX_ECHO_TIME_S:
        raise ValueError(f"echo times must be in seconds, got {te.tolist()} (milliseconds?)")
    if mask is None:
        m = np.ones(mag.shape[:3], dtype=bool)
    else:
        m = np.asarray(mask).astype(bool, copy=False)
        if m.shape != mag.shape[:3]:
            raise ValueError(f"mask shape {m.shape} does not match magnitude {mag.shape[:3]}")
    return mag[m], te, m


def _chunked(fit, s: np.ndarray, te: np.ndarray) -> np.ndarray:
    """Apply ``fit`` (``(n, E)`` float64 -> ``(n,)``) to ``s`` in chunks of voxels."""
    out = np.empty(s.shape[0], dtype=np.float32)
    for start in range(0, s.shape[0], _CHUNK):
        part = s[start : start + _CHUNK].astype(np.float64)
        out[start : start + _CHUNK] = fit(part, te)
    return out


def _unmask(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=np.float32)
    out[mask] = values
    return out


def r2star_loglinear(
    mag: np.ndarray, echo_times: Sequence[float], mask: np.ndarray | None = None
) -> np.ndarray:
    """R2* (1/s) by a weighted least-squares line through ``log(S)`` against TE.

    The weights are ``S^2``, the inverse variance of ``log(S)`` under Gaussian noise, so
    late, noisy echoes count less. Echoes with ``S <= 0`` (or non-finite) are left out;
    voxels with fewer than two usable echoes, and voxels outside ``mask``, get 0.
    Exact for noise-free mono-exponential decay; not clipped (noise can make R2*
    slightly negative where the signal hardly decays, e.g. in CSF).

    Parameters
    ----------
    mag
        Magnitude ``(X, Y, Z, E)``, echo last, any positive scale.
    echo_times
        ``E`` echo times in seconds, increasing.
    mask
        Optional bool ``(X, Y, Z)``: fit only there.
    """
    s, te, m = _validate(mag, echo_times, mask, min_echoes=2)
    return _unmask(_chunked(_loglinear, s, te), m)


def _loglinear(s: np.ndarray, te: np.ndarray) -> np.ndarray:
    usable = np.isfinite(s) & (s > 0)
    w = np.where(usable, s * s, 0.0)
    y = np.log(np.where(usable, s, 1.0))
    t = te[None, :]
    sw = w.sum(axis=1)
    swt = (w * t).sum(axis=1)
    swtt = (w * t * t).sum(axis=1)
    swy = (w * y).sum(axis=1)
    swty = (w * t * y).sum(axis=1)
    den = sw * swtt - swt * swt
    ok = (usable.sum(axis=1) >= 2) & (den > 1e-12 * sw * swtt)
    slope = np.where(ok, (sw * swty - swt * swy) / np.where(ok, den, 1.0), 0.0)
    return -slope


def r2star_arlo(
    mag: np.ndarray, echo_times: Sequence[float], mask: np.ndarray | None = None
) -> np.ndarray:
    """R2* (1/s) by auto-regression on linear operations (ARLO; Pei et al., MRM 2015).

    With the echo spacing ``dt``, Simpson's rule on each triple of echoes gives the
    decay integral ``s_i = dt/3 (S_{i-2} + 4 S_{i-1} + S_i)``, and the mono-exponential
    model ``S_{i-2} - S_i = R2* s_i``. Written as a prediction of ``S_i`` from the two
    echoes before, its least-squares fit has the closed form
    ``R2* = (sum s d + c sum d^2) / (sum s^2 + c sum s d)``, ``d_i = S_{i-2} - S_i``,
    ``c = dt/3``. No logarithm and no iteration; needs at least 3 equally spaced echoes
    (spacing within :data:`ARLO_SPACING_RTOL`). Simpson's rule makes it slightly biased
    for long spacings (about ``(R2* dt)^4 / 180``). Voxels outside ``mask`` and voxels
    with no decay signal get 0.

    Parameters
    ----------
    mag
        Magnitude ``(X, Y, Z, E)``, echo last, any positive scale.
    echo_times
        ``E >= 3`` equally spaced echo times in seconds.
    mask
        Optional bool ``(X, Y, Z)``: fit only there.
    """
    s, te, m = _validate(mag, echo_times, mask, min_echoes=3)
    spacing = np.diff(te)
    if not np.allclose(spacing, spacing[0], rtol=ARLO_SPACING_RTOL, atol=0):
        raise ValueError(f"ARLO needs equally spaced echoes, got spacings {spacing.tolist()}")
    return _unmask(_chunked(_arlo, s, te), m)


def _arlo(s: np.ndarray, te: np.ndarray) -> np.ndarray:
    c = (te[-1] - te[0]) / (te.size - 1) / 3
    s = np.where(np.isfinite(s), s, 0.0)
    simpson = c * (s[:, :-2] + 4 * s[:, 1:-1] + s[:, 2:])
    d = s[:, :-2] - s[:, 2:]
    sd = (simpson * d).sum(axis=1)
    num = sd + c * (d * d).sum(axis=1)
    den = (simpson * simpson).sum(axis=1) + c * sd
    ok = den > 0
    return np.where(ok, num / np.where(ok, den, 1.0), 0.0)


def t2star_from_r2star(
    r2s: np.ndarray, max_t2s: float = DEFAULT_MAX_T2STAR_S, mask: np.ndarray | None = None
) -> np.ndarray:
    """T2* (s) as ``1 / R2*`` (R2* in 1/s), clipped to ``[0, max_t2s]``.

    Voxels whose R2* is at most ``1 / max_t2s`` (slow or no measurable decay, including
    noise-driven negative R2*) get ``max_t2s``; non-finite R2* and voxels outside
    ``mask`` get 0.
    """
    if not max_t2s > 0:
        raise ValueError(f"max_t2s must be positive (s), got {max_t2s}")
    r = np.asarray(r2s, dtype=np.float64)
    finite = np.isfinite(r)
    fast = finite & (r > 1.0 / max_t2s)
    t2s = np.where(fast, 1.0 / np.where(fast, r, 1.0), max_t2s)
    t2s = np.where(finite, t2s, 0.0)
    if mask is not None:
        m = np.asarray(mask).astype(bool, copy=False)
        if m.shape != r.shape:
            raise ValueError(f"mask shape {m.shape} does not match R2* shape {r.shape}")
        t2s = np.where(m, t2s, 0.0)
    return t2s.astype(np.float32)
