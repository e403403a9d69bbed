"""Phase scaling and unit conversion (radians, Hz, ppm), phase-offset removal (MCPC-3D-S)
and the multi-echo field fit."""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
from scipy import ndimage

from .dipole import GAMMA_BAR_MHZ_PER_T
from .masking import robust_threshold_mask
from .romeo import romeo_unwrap
from .sideinfo import check_voxel_size

#: Default Gaussian width (mm) of the MCPC-3D-S phase-offset smoothing.
MCPC_SIGMA_MM = 4.0
#: Default rounds of MCPC-3D-S's correction of the echo-1-to-2 evolution's 2 pi multiples.
MCPC_CORRECTIONS = 4
#: The correction stops when it would change fewer than this share of the voxels.
MCPC_SETTLED = 1e-4

#: Slack on the radian range check (float rounding of stored +-pi).
_RAD_TOL = 1e-2


class PhaseScalingError(ValueError):
    """The phase values fit no known unit or vendor range."""


def wrap(phase: np.ndarray) -> np.ndarray:
    """Wrap angles (rad) into ``[-pi, pi)``."""
    x = np.asarray(phase)
    if x.dtype == np.float32 and x.size >= 1 << 16:  # one parallel pass, same float32 steps
        out = np.empty(x.shape, np.float32)
        _wrap32(np.ascontiguousarray(x).reshape(-1), out.reshape(-1))
        return out
    two_pi = x.dtype.type(2 * np.pi) if x.dtype.kind == "f" else 2 * np.pi
    return x - two_pi * np.floor((x + two_pi / 2) / two_pi)  # floor: faster than a modulo


@numba.njit(parallel=True, cache=True)
def _wrap32(x, out):  # pragma: no cover - numba
    two_pi = np.float32(2 * np.pi)
    half = two_pi / np.float32(2)
    for i in numba.prange(x.size):
        v = x[i]
        out[i] = v - two_pi * np.floor((v + half) / two_pi)


#: Integer ranges that scanners store phase in: (lowest, highest value, radians per unit,
#: name). Data are recognised as one of them only when they reach near both of its ends.
INTEGER_PHASE_RANGES = (
    (-4096, 4095, np.pi / 4096, "-4096..4095 (Siemens) scaled by pi/4096"),
    (0, 4095, 2 * np.pi / 4096, "0..4095 (12-bit) scaled by 2pi/4096"),
    (-2048, 2047, np.pi / 2048, "-2048..2047 (12-bit signed) scaled by pi/2048"),
    (-3142, 3142, 1e-3, "-3142..3142 (milliradians) scaled by 1/1000"),
    (0, 6283, 1e-3, "0..6283 (milliradians) scaled by 1/1000"),
    (-32768, 32767, np.pi / 32768, "-32768..32767 (16-bit) scaled by pi/32768"),
    (0, 65535, 2 * np.pi / 65536, "0..65535 (16-bit) scaled by 2pi/65536"),
)

#: How close (fraction of the range) the data must come to both ends of a range.
RANGE_END_FRACTION = 0.05

#: Sidecar ``Units`` that say how to read the phase: radians per stored unit.
PHASE_UNITS = {
    "rad": 1.0,
    "radian": 1.0,
    "radians": 1.0,
    "mrad": 1e-3,
    "milliradian": 1e-3,
    "milliradians": 1e-3,
    "deg": np.pi / 180,
    "degree": np.pi / 180,
    "degrees": np.pi / 180,
}


def scale_phase(
    data: np.ndarray, units: str | None = None, scale: float | None = None
) -> tuple[np.ndarray, str]:
    """Convert stored phase to radians in ``[-pi, pi)``; return it with how it was scaled.

    - ``scale`` (radians per stored unit, e.g. ``pi / 4096``), when given, is used as is;
    - values within ``[-pi, pi]`` or ``[0, 2 pi]`` are radians and pass through;
    - ``units`` (the sidecar's ``Units``) ``"mrad"`` or ``"deg"`` give the scaling;
    - integer-valued data must span one of :data:`INTEGER_PHASE_RANGES` (reach within 5 %
      of both its ends, as wrapped phase does): Siemens' -4096..4095, milliradians
      -3142..3142, ... The range is never min/max-rescaled;
    - anything else raises :class:`PhaseScalingError`, which suggests ``--phase-scale``.

    Non-finite values are ignored when the range is detected and stay non-finite.
    ``"rad"`` with values beyond 2 pi is an error rather than a guess.
    """
    x = np.asarray(data)
    is_finite = np.isfinite(x)
    if not is_finite.any():
        raise PhaseScalingError("phase image has no finite values")
    if scale is not None:
        if not (np.isfinite(scale) and scale > 0):
            raise PhaseScalingError(f"phase scale must be a positive number, not {scale}")
        return _wrap_scaled(x, scale), f"scaled by {scale:.6g} rad per unit (--phase-scale)"
    if x.dtype.kind == "f":  # the range of the finite values, without copying them
        lo = float(x.min(where=is_finite, initial=np.inf))
        hi = float(x.max(where=is_finite, initial=-np.inf))
    else:
        lo, hi = float(x.min()), float(x.max())
    if lo >= -np.pi - _RAD_TOL and hi <= np.pi + _RAD_TOL:
        return _wrap_scaled(x, 1.0), "radians [-pi, pi]"
    if lo >= -_RAD_TOL and hi <= 2 * np.pi + _RAD_TOL:
        return _wrap_scaled(x, 1.0), "radians [0, 2pi]"
    unit = PHASE_UNITS.get((units or "").strip().lower())
    if unit == 1.0:
        raise PhaseScalingError(
            f"phase is labelled in radians but spans {lo:g}..{hi:g}, beyond 2*pi; "
            "pass --phase-scale (radians per stored unit) if the label is wrong"
        )
    if unit is not None:
        return _wrap_scaled(x, unit), f"Units {units!r}: scaled by {unit:.6g}"
    integer_valued = np.issubdtype(x.dtype, np.integer) or bool(
        np.all(np.abs(x[is_finite] - np.round(x[is_finite])) < 1e-3)
    )
    hint = (
        "set the sidecar's Units (rad, mrad, deg) or pass --phase-scale with the radians per "
        "stored unit (e.g. pi/4096)"
    )
    if not integer_valued:
        raise PhaseScalingError(
            f"phase spans {lo:g}..{hi:g}: neither radians nor an integer vendor range; {hint}"
        )
    matches = [
        (scale_, how)
        for low, high, scale_, how in INTEGER_PHASE_RANGES
        if low - 1 <= lo <= low + RANGE_END_FRACTION * (high - low)
        and high - RANGE_END_FRACTION * (high - low) <= hi <= high + 1
    ]
    if len(matches) != 1:
        known = ", ".join(f"{low}..{high}" for low, high, _, _ in INTEGER_PHASE_RANGES)
        raise PhaseScalingError(
            f"integer phase spans {lo:g}..{hi:g}, which is not one of the known ranges "
            f"({known}) reached at both ends; {hint}"
        )
    scale_, how = matches[0]
    return _wrap_scaled(x, scale_), f"integer range {how}"


def _wrap_scaled(x: np.ndarray, scale: float) -> np.ndarray:
    """``wrap(x * scale)`` as float32 (the product in float64, then rounded to float32);
    non-finite values stay non-finite, silently."""
    x = np.asarray(x)
    if x.dtype.kind in "iuf" and x.size >= 1 << 16:  # one parallel pass, the same steps
        out = np.empty(x.shape, np.float32)
        _scale_wrap32(np.ascontiguousarray(x).reshape(-1), float(scale), out.reshape(-1))
        return out
    with np.errstate(invalid="ignore"):
        return wrap((np.asarray(x, dtype=np.float64) * scale).astype(np.float32))


@numba.njit(parallel=True, cache=True)
def _scale_wrap32(x, scale, out):  # pragma: no cover - numba
    two_pi = np.float32(2 * np.pi)
    half = two_pi / np.float32(2)
    for i in numba.prange(x.size):
        v = np.float32(np.float64(x[i]) * scale)
        out[i] = v - two_pi * np.floor((v + half) / two_pi)


def rad_to_hz(phase: np.ndarray, te: float) -> np.ndarray:
    """Phase (rad) accrued at echo time ``te`` (s) to frequency (Hz)."""
    return phase / (2 * np.pi * te)


def hz_to_ppm(field_hz: np.ndarray, b0_tesla: float) -> np.ndarray:
    """Frequency offset (Hz) to field in ppm of B0 at ``b0_tesla`` (T)."""
    return field_hz / (GAMMA_BAR_MHZ_PER_T * b0_tesla)


def ppm_to_hz(field_ppm: np.ndarray, b0_tesla: float) -> np.ndarray:
    """Field in ppm of B0 at ``b0_tesla`` (T) to frequency offset (Hz)."""
    return field_ppm * (GAMMA_BAR_MHZ_PER_T * b0_tesla)


def echo_arrays(
    phase: np.ndarray, mag: np.ndarray | None, echo_times: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate multi-echo inputs; return phase, magnitude as float32 ``(X, Y, Z, E)`` and TEs.

    A 3D ``phase`` / ``mag`` is one echo. ``echo_times`` (s) must match the echo count and
    be finite, positive and distinct, and ``mag`` (or None) the phase's shape; anything
    else is a ValueError. TEs come back as a float64 1D array.
    """
    ph = np.asarray(phase, dtype=np.float32)
    if ph.ndim == 3:
        ph = ph[..., None]
    if ph.ndim != 4:
        raise ValueError(f"phase must be (X, Y, Z) or (X, Y, Z, E), got shape {ph.shape}")
    tes = np.asarray(echo_times, dtype=float).ravel()
    if tes.size != ph.shape[-1]:
        raise ValueError(f"{tes.size} echo times for {ph.shape[-1]} echoes")
    if np.any(~np.isfinite(tes)) or np.any(tes <= 0) or len(np.unique(tes)) != tes.size:
        raise ValueError(f"echo times must be positive and distinct (s), got {tes.tolist()}")
    mg = None
    if mag is not None:
        mg = np.asarray(mag, dtype=np.float32)
        if mg.ndim == 3:
            mg = mg[..., None]
        if mg.shape != ph.shape:
            raise ValueError(f"mag shape {np.shape(mag)} does not match phase {ph.shape}")
    return ph, mg, tes


def _slope_terms(
    ph: np.ndarray, w: np.ndarray, t: np.ndarray, with_offset: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator of the weighted LS slope of ``ph`` vs ``t`` (last axis)."""
    wp = w * ph
    num, den = wp @ t, w @ (t * t)
    if not with_offset:
        return num, den
    s0, st, su = w.sum(axis=-1), w @ t, wp.sum(axis=-1)
    return s0 * num - st * su, s0 * den - st * st


def fit_field(
    unwrapped: np.ndarray,
    mag: np.ndarray | None,
    echo_times: Sequence[float],
    mask: np.ndarray | None = None,
    *,
    with_offset: bool = False,
) -> np.ndarray:
    """Total field (Hz) from unwrapped multi-echo phase (rad) by weighted least squares.

    Minimises ``sum_e mag_e^2 (phase_e - 2 pi f TE_e)^2`` per voxel: a line through the
    origin, for phase whose echo-independent offset has been removed (MCPC-3D-S),
    which weighs each echo's frequency ``phase_e / (2 pi TE_e)`` by ``(mag_e TE_e)^2``.
    ``with_offset=True`` fits ``phase_e = phi0 + 2 pi f TE_e`` instead (two echoes or
    more). A single echo gives ``phase / (2 pi TE)``. ``unwrapped`` and ``mag`` are
    ``(X, Y, Z, E)`` (or 3D for one echo), ``echo_times`` in s; ``mag=None`` weighs echoes
    equally, as do voxels whose magnitude is zero in every echo. Returns float32 Hz
    ``(X, Y, Z)``, 0 outside ``mask``.
    """
    ph, mg, tes = echo_arrays(unwrapped, mag, echo_times)
    if with_offset and tes.size < 2:
        raise ValueError("fitting a phase offset needs at least two echoes")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ph.shape[:3]:
            raise ValueError(f"mask shape {mask.shape} does not match phase {ph.shape[:3]}")
    t = tes.astype(np.float32)
    num, den = _slope_terms(ph, np.ones_like(ph) if mg is None else mg * mg, t, with_offset)
    bad = ~(den > 0)
    if bad.any():
        num[bad], den[bad] = _slope_terms(ph[bad], np.ones_like(ph[bad]), t, with_offset)
    field = (num / (np.float32(2 * np.pi) * den)).astype(np.float32)
    if mask is not None:
        field[~mask] = 0
    return field


def mcpc3ds(
    phase: np.ndarray,
    mag: np.ndarray | None,
    echo_times: Sequence[float],
    voxel_size: Sequence[float],
    sigma_mm: float = MCPC_SIGMA_MM,
    corrections: int = MCPC_CORRECTIONS,
) -> np.ndarray:
    """Remove the echo-independent phase offset (MCPC-3D-S, Eckstein et al. MRM 2018).

    The phase evolution between echoes 1 and 2 is the angle of the Hermitian inner
    product ``conj(z1) z2``, unwrapped with ROMEO (weight ``sqrt(m1 m2)``, inside a
    magnitude threshold mask, its 2 pi multiple set so that the median lies in
    [-pi, pi)); scaled by ``TE1 / (TE2 - TE1)`` it is the field's phase at TE1, and echo 1
    minus it is the offset. The offset is smoothed as the complex ``sqrt(m1 m2)
    exp(i offset)`` with a Gaussian of ``sigma_mm`` (mm), plus the same smoothing of the
    residual (twicing, against the bias of curved offsets and at the mask's edge), and
    subtracted from every echo.

    Where ROMEO leaves a region of the evolution off by ``2 pi k`` (near strong sources
    and at the brain's edge), that region's offset is off by ``2 pi k TE1 / (TE2 - TE1)``
    and every later step inherits it (on heads simulated with qsm-forward, islands of
    6-34 voxels with a total field wrong by ``1 / (TE2 - TE1)``). The offset is smooth, so
    ``corrections`` times each voxel's evolution takes the 2 pi multiple (``|k| <= 2``)
    that brings its offset nearest the smoothed one, and the offset is smoothed again.
    ``phase`` ``(X, Y, Z, E)`` rad with E >= 2, ``mag`` the same shape (None: uniform),
    ``echo_times`` in s, ``voxel_size`` in mm. Returns wrapped float32 phase (rad) in
    [-pi, pi) of the same shape.
    """
    ph, mg, tes = echo_arrays(phase, mag, echo_times)
    if ph.shape[-1] < 2:
        raise ValueError("MCPC-3D-S needs at least two echoes")
    vs = np.asarray(check_voxel_size(voxel_size))
    if not sigma_mm > 0:
        raise ValueError(f"sigma_mm must be positive, got {sigma_mm}")
    if corrections < 0:
        raise ValueError(f"corrections must be >= 0, got {corrections}")
    hip = wrap(ph[..., 1] - ph[..., 0])
    weight = np.ones(ph.shape[:3], np.float32) if mg is None else np.sqrt(mg[..., 0] * mg[..., 1])
    mask = (
        np.ones(ph.shape[:3], dtype=bool) if mg is None else robust_threshold_mask(weight, erode=0)
    )
    evolution, _ = romeo_unwrap(hip, mag=weight, mask=mask)
    evolution = np.ascontiguousarray(evolution)  # corrected in place through ravel()
    evolution -= np.float32(2 * np.pi) * np.round(np.median(evolution[mask]) / (2 * np.pi))
    ratio = np.float32(tes[0] / (tes[1] - tes[0]))
    first_echo = np.ascontiguousarray(ph[..., 0])
    good = mask & np.isfinite(first_echo) & np.isfinite(weight)
    amp = np.where(good, weight, np.float32(0))
    sigma = sigma_mm / vs

    def offset_of(evolution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw offset and its smoothed version (with twicing)."""
        raw = np.where(good, first_echo - evolution * ratio, np.float32(0))
        first = smooth_angle(raw, amp, sigma)
        # a second pass on the residual ("twicing") removes most of the smoothing bias
        # where the offset curves and at the mask's edge, where the kernel sees one side
        return raw, first + smooth_angle(wrap(raw - first), amp, sigma)

    raw, smoothed = offset_of(evolution)
    steps = np.arange(-2, 3, dtype=np.float32)
    # k moves the offset by s = wrap(2 pi k ratio); as |wrap(r - s)| >= |s| - |r|, only a
    # voxel whose residual r exceeds half the smallest such move can take k != 0
    shifts = np.abs(wrap(np.float32(2 * np.pi) * steps[steps != 0] * ratio))
    reach = 0.5 * float(shifts.min()) - 1e-3
    for _ in range(corrections):
        residual = wrap(raw - smoothed)
        idx = np.flatnonzero(good & (np.abs(residual) > reach))
        r = residual.ravel()[idx]
        misfit = np.stack([np.abs(wrap(r - np.float32(2 * np.pi) * k * ratio)) for k in steps])
        misfit += np.float32(1e-3) * np.abs(steps)[:, None]  # ties: smallest |k|
        k = steps[np.argmin(misfit, axis=0)]
        del misfit, residual
        if np.count_nonzero(k) <= MCPC_SETTLED * np.count_nonzero(good):
            break  # what is left flips with the noise
        evolution.ravel()[idx] += np.float32(2 * np.pi) * k
        raw, smoothed = offset_of(evolution)
    return wrap(ph - smoothed[..., None])


def smooth_angle(angle: np.ndarray, amp: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """The angle (rad) of ``amp * exp(i angle)`` smoothed with a Gaussian of ``sigma``
    voxels per axis (cut at 3 sigma, not scipy's 4: under 1 % of its weight).

    Where sigma spans at least two voxels, the complex signal is averaged over blocks of
    ``f = floor(sigma / 2)`` voxels per axis, smoothed there with the sigma left after the
    block average's own width (variance ``(f^2 - 1) / 12``), and brought back by
    trilinear interpolation before the angle is taken: at 1 mm with a 4 mm sigma, 1/8 of
    the voxels and half the taps. Returns float32 in ``[-pi, pi]`` of ``angle``'s shape.
    """
    sig = np.asarray(sigma, dtype=float)
    f = np.maximum(1, np.floor(sig / 2)).astype(np.int64)
    if np.all(f == 1):

        def smooth(x: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(x, sig, mode="nearest", truncate=3.0)

    else:
        pad = [(0, -n % k) for n, k in zip(angle.shape, f, strict=True)]
        rest = np.sqrt(np.maximum(sig**2 - (f**2 - 1) / 12, 0.25)) / f

        def smooth(x: np.ndarray) -> np.ndarray:
            x = np.pad(x, pad, mode="edge")
            blocks = np.zeros([n // k for n, k in zip(x.shape, f, strict=True)], np.float32)
            for offset in np.ndindex(*f):
                blocks += x[tuple(slice(o, None, k) for o, k in zip(offset, f, strict=True))]
            blocks /= np.float32(np.prod(f))
            blocks = ndimage.gaussian_filter(blocks, rest, mode="nearest", truncate=3.0)
            return _upsample_linear(blocks, angle.shape, f)

    im, re = smooth(amp * np.sin(angle)), smooth(amp * np.cos(angle))
    return np.arctan2(im, re).astype(np.float32, copy=False)


def _upsample_linear(a: np.ndarray, shape: Sequence[int], f: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``a`` from blocks of ``f`` voxels (per axis) to
    ``shape`` (block ``j``'s centre at voxel ``(j + 0.5) f - 0.5``; the edges are held)."""
    axes = []
    for n, k, m in zip(shape, f, a.shape, strict=True):
        pos = (np.arange(n) + 0.5) / k - 0.5
        lo = np.clip(np.floor(pos), 0, m - 1).astype(np.int64)
        axes += [lo, np.minimum(lo + 1, m - 1), np.clip(pos - lo, 0, 1).astype(np.float32)]
    return _trilinear(np.ascontiguousarray(a, np.float32), *axes)


@numba.njit(parallel=True, cache=True)
def _trilinear(a, xl, xh, xt, yl, yh, yt, zl, zh, zt):  # pragma: no cover - numba
    out = np.empty((xl.size, yl.size, zl.size), np.float32)
    for i in numba.prange(xl.size):
        for j in range(yl.size):
            for k in range(zl.size):
                y0, y1, ty, z0, z1, tz = yl[j], yh[j], yt[j], zl[k], zh[k], zt[k]
                lo = a[xl[i], y0, z0] + tz * (a[xl[i], y0, z1] - a[xl[i], y0, z0])
                hi = a[xl[i], y1, z0] + tz * (a[xl[i], y1, z1] - a[xl[i], y1, z0])
                v0 = lo + ty * (hi - lo)
                lo = a[xh[i], y0, z0] + tz * (a[xh[i], y0, z1] - a[xh[i], y0, z0])
                hi = a[xh[i], y1, z0] + tz * (a[xh[i], y1, z1] - a[xh[i], y1, z0])
                v1 = lo + ty * (hi - lo)
                out[i, j, k] = v0 + xt[i] * (v1 - v0)
    return out


def fill_non_finite(
    phase: np.ndarray, mag: np.ndarray, min_fraction: float = 0.5, wrapped: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Replace the voxels where multi-echo phase or magnitude is NaN or Inf.

    A voxel that is non-finite in any echo of either image takes, in every echo, the mean
    of its finite 3x3x3 neighbours (complex mean for wrapped phase, so wraps do not bias
    it; plain mean with ``wrapped=False``) when at least ``min_fraction`` of the 26
    neighbours are finite: scattered bad voxels
    then carry their surroundings' data, not a spurious 0 rad. The others (bad regions)
    get zero magnitude and phase: no signal.

    ``phase`` (rad) and ``mag`` are ``(X, Y, Z)`` or ``(X, Y, Z, E)``. Returns float32 phase
    and magnitude of that shape, the mask of the voxels that were non-finite, and the mask
    of those that were filled.
    """
    ph = np.asarray(phase, dtype=np.float32)
    mg = np.asarray(mag, dtype=np.float32)
    if ph.shape != mg.shape:
        raise ValueError(f"phase shape {ph.shape} does not match magnitude {mg.shape}")
    shape = ph.shape
    ph, mg = ph.reshape(*shape[:3], -1), mg.reshape(*shape[:3], -1)
    bad = ~(_finite_in_every_echo(ph) & _finite_in_every_echo(mg))
    if not bad.any():
        return ph.reshape(shape), mg.reshape(shape), bad, np.zeros_like(bad)
    good = ~bad
    valid = ndimage.uniform_filter(good.astype(np.float32), 3, mode="constant") * 27
    filled = bad & (valid >= min_fraction * 26)
    ph, mg = ph.copy(), mg.copy()
    ph[bad], mg[bad] = 0, 0
    for e in range(ph.shape[-1]):
        if wrapped:
            z = mg[..., e] * np.exp(1j * ph[..., e])
            re = ndimage.uniform_filter(z.real.astype(np.float32), 3, mode="constant")
            im = ndimage.uniform_filter(z.imag.astype(np.float32), 3, mode="constant")
            ph[..., e][filled] = np.arctan2(im[filled], re[filled])
        else:
            total = ndimage.uniform_filter(ph[..., e], 3, mode="constant") * 27
            ph[..., e][filled] = total[filled] / valid[filled]
        mean_mag = ndimage.uniform_filter(mg[..., e], 3, mode="constant") * 27
        mg[..., e][filled] = mean_mag[filled] / valid[filled]
    return ph.reshape(shape), mg.reshape(shape), bad, filled


def _finite_in_every_echo(x: np.ndarray) -> np.ndarray:
    """``np.isfinite(x).all(axis=-1)`` for ``(X, Y, Z, E)``, one echo at a time (numpy's
    reduction over a short last axis is five times slower)."""
    out = np.isfinite(x[..., 0])
    for e in range(1, x.shape[-1]):
        out &= np.isfinite(x[..., e])
    return out


def fill_from_neighbours(values: np.ndarray, known: np.ndarray, passes: int = 3) -> np.ndarray:
    """``values`` (3D) with its voxels outside ``known`` replaced by the mean of their known
    3x3x3 neighbours, in up to ``passes`` growing passes (voxels still out of reach keep
    their value). For smooth maps such as the total field (Hz), where an interpolation is
    far closer than any value the missing data gave."""
    out = np.array(values, dtype=np.float32)
    known = np.asarray(known, dtype=bool).copy()
    for _ in range(passes):
        todo = ~known
        if not todo.any():
            break
        weight = ndimage.uniform_filter(known.astype(np.float32), 3, mode="constant")
        reach = todo & (weight > 0)
        if not reach.any():
            break
        total = ndimage.uniform_filter(np.where(known, out, np.float32(0)), 3, mode="constant")
        out[reach] = total[reach] / weight[reach]
        known |= reach
    return out


#: Field-map outliers: a voxel whose total field is further than this share of the 2 pi
#: error quantum ``1 / TE1`` (Hz) from its neighbourhood's median is unreliable.
OUTLIER_FRACTION = 1 / 3
#: Width (mm) of the neighbourhood of the outlier test.
OUTLIER_WINDOW_MM = 10.0


def field_reliability(
    field_hz: np.ndarray,
    mag: np.ndarray | None,
    echo_times: Sequence[float],
    mask: np.ndarray,
    voxel_size: Sequence[float],
    outlier_fraction: float = OUTLIER_FRACTION,
    window_mm: float = OUTLIER_WINDOW_MM,
) -> np.ndarray:
    """Data weights in [0, 1] of a total field map: where its value can be trusted.

    The product of two terms, zero outside ``mask``:

    - noise: the field's standard deviation from the echo fit with a phase offset is
      proportional to ``1 / sqrt(sum_e m_e^2 (TE_e - TE_w)^2)`` (``TE_w`` the
      ``m^2``-weighted mean echo time); the weight is the median of that over the mask
      divided by the voxel's, capped at 1, so voxels of low or fast-decaying signal
      (brain edge, veins, calcifications) count less;
    - outliers: a voxel whose field lies more than ``outlier_fraction / TE1`` (Hz, a
      third of the field error that one 2 pi slip of echo 1 causes) from the median of
      its ``window_mm`` neighbourhood (values outside the mask are taken from the
      nearest voxel one layer inside it) gets 0.

    ``field_hz`` ``(X, Y, Z)`` in Hz, ``mag`` ``(X, Y, Z, E)`` (None: no noise term),
    ``echo_times`` in s, ``voxel_size`` in mm. Returns float32 weights.
    """
    f = np.asarray(field_hz, dtype=np.float32)
    m = np.asarray(mask).astype(bool, copy=False)
    if f.ndim != 3 or m.shape != f.shape:
        raise ValueError(f"field {f.shape} and mask {m.shape} must be one 3D grid")
    if not m.any():
        raise ValueError("mask is empty")
    tes = np.asarray(echo_times, dtype=float).ravel()
    if tes.size == 0 or np.any(tes <= 0):
        raise ValueError(f"echo times must be positive (s), got {tes.tolist()}")
    vs = check_voxel_size(voxel_size)
    if not 0 < outlier_fraction <= 1 or window_mm <= 0:
        raise ValueError("outlier_fraction must be in (0, 1] and window_mm positive")
    weight = np.ones(f.shape, np.float32)
    if mag is not None and tes.size > 1:
        mg = np.asarray(mag)
        mg = mg[..., None] if mg.ndim == 3 else mg
        if mg.shape != (*f.shape, tes.size):
            raise ValueError(f"mag shape {mg.shape} does not match {tes.size} echoes of {f.shape}")
        sd = _fit_sd(mg, tes)
        weight = np.minimum(np.median(sd[m]) / sd, np.float32(1))
    # values off the mask come from the nearest voxel one layer in, so that a wrong voxel
    # on the mask's border is not copied all around itself; only the samples that reach
    # the mask's medians are needed: the mask's box grown by a window and a block
    inner = ndimage.binary_erosion(m)
    source = inner if inner.any() else m
    grow = [int(window_mm // v) + 4 for v in vs]
    box = tuple(
        slice(max(0, s.start - g), s.stop + g)
        for s, g in zip(ndimage.find_objects(m.astype(np.uint8))[0], grow, strict=True)
    )
    nearest = ndimage.distance_transform_edt(
        ~source[box], return_distances=False, return_indices=True
    )
    filled = np.zeros_like(f)
    filled[box] = f[box][tuple(nearest)]
    local = _coarse_median(filled, vs, window_mm, m)
    outlier = np.abs(f - local) > outlier_fraction / tes[0]
    return np.where(m & ~outlier, weight, np.float32(0)).astype(np.float32)


@numba.njit(parallel=True, cache=True)
def _fit_sd(mag, tes):  # pragma: no cover - numba
    """``1 / sqrt(sum_e m_e^2 (TE_e - TE_w)^2)`` per voxel (float32; ``TE_w`` the
    ``m^2``-weighted mean echo time), the echo fit's field noise up to a constant."""
    nx, ny, nz, ne = mag.shape
    out = np.empty((nx, ny, nz), np.float32)
    for i in numba.prange(nx):
        for j in range(ny):
            for k in range(nz):
                s0 = st = stt = 0.0
                for e in range(ne):
                    w = float(mag[i, j, k, e]) ** 2
                    s0 += w
                    st += w * tes[e]
                    stt += w * tes[e] * tes[e]
                info = stt - st * st / max(s0, 1e-30)
                out[i, j, k] = 1.0 / np.sqrt(max(info, 1e-30))
    return out


def _coarse_median(
    x: np.ndarray, voxel_size: Sequence[float], window_mm: float, where: np.ndarray
) -> np.ndarray:
    """Median over ``window_mm`` neighbourhoods, taken on a grid of about 2 mm (every
    ``n``-th voxel of a finer grid) and repeated back: the cost of a median of
    11^3 voxels at 1 mm (minutes) is not needed for a test against a smooth field.
    Computed only for the samples whose block holds a voxel of ``where`` (0 elsewhere);
    the same values as ``ndimage.median_filter(..., mode="nearest")`` there."""
    step = [max(1, int(2.0 // v)) for v in voxel_size]
    coarse = np.ascontiguousarray(x[tuple(slice(None, None, s) for s in step)])
    half = [
        max(3, int(round(window_mm / (v * s))) // 2 * 2 + 1) // 2
        for v, s in zip(voxel_size, step, strict=True)
    ]
    need = np.zeros(coarse.shape, bool)
    for offset in np.ndindex(*step):  # a sample's block: the voxels it is repeated to
        part = where[tuple(slice(o, None, s) for o, s in zip(offset, step, strict=True))]
        need[tuple(slice(0, n) for n in part.shape)] |= part
    med = _window_median(coarse, need, *half)
    for axis, s in enumerate(step):  # back to the fine grid: each sample fills its block
        med = np.repeat(med, s, axis=axis)
    return med[: x.shape[0], : x.shape[1], : x.shape[2]]


@numba.njit(cache=True)
def _select(a, n, k):  # pragma: no cover - numba
    """The ``k``-th smallest of ``a[:n]`` (Hoare's selection; reorders ``a``)."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@numba.njit(parallel=True, cache=True)
def _window_median(x, need, hx, hy, hz):  # pragma: no cover - numba
    """Median of the ``(2 hx + 1, 2 hy + 1, 2 hz + 1)`` box around each voxel of ``need``
    (indices clamped at the edges), 0 elsewhere."""
    nx, ny, nz = x.shape
    n = (2 * hx + 1) * (2 * hy + 1) * (2 * hz + 1)
    out = np.zeros_like(x)
    for i in numba.prange(nx):
        buf = np.empty(n, x.dtype)
        for j in range(ny):
            for k in range(nz):
                if not need[i, j, k]:
                    continue
                c = 0
                for a in range(i - hx, i + hx + 1):
                    ia = min(max(a, 0), nx - 1)
                    for b in range(j - hy, j + hy + 1):
                        ib = min(max(b, 0), ny - 1)
                        for d in range(k - hz, k + hz + 1):
                            buf[c] = x[ia, ib, min(max(d, 0), nz - 1)]
                            c += 1
                out[i, j, k] = _select(buf, n, n // 2)
    return out
