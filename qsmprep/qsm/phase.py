"""Phase scaling and unit conversion (radians, Hz, ppm)."""

from __future__ import annotations

import numpy as np

from .dipole import GAMMA_BAR_MHZ_PER_T

#: Slack on the radian range check (float rounding of stored +-pi).
_RAD_TOL = 1e-2


class PhaseScalingError(ValueError):
    """The phase values fit no known unit or vendor range."""


def wrap(phase: np.ndarray) -> np.ndarray:
    """Wrap angles (rad) into ``[-pi, pi)``."""
    return (phase + np.pi) % (2 * np.pi) - np.pi


def scale_phase(data: np.ndarray, units: str | None = None) -> tuple[np.ndarray, str]:
    """Convert stored phase to radians in ``[-pi, pi)``; return it with how it was scaled.

    - values already within ``[-pi, pi]`` or ``[0, 2 pi]`` are radians and pass through;
    - integer-valued data (vendor ranges such as Siemens' -4096..4095) are scaled by
      ``pi / 2^n`` (signed) or ``2 pi / 2^n`` (unsigned), with ``2^n`` the smallest power
      of two that holds the largest magnitude. The range is never min/max-rescaled;
    - anything else raises :class:`PhaseScalingError`.

    ``units`` is the sidecar's ``Units`` ("rad", "arbitrary", ...). ``"rad"`` with values
    beyond 2 pi is an error rather than a guess.
    """
    x = np.asarray(data)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise PhaseScalingError("phase image has no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= -np.pi - _RAD_TOL and hi <= np.pi + _RAD_TOL:
        return wrap(x.astype(np.float32)), "radians [-pi, pi]"
    if lo >= -_RAD_TOL and hi <= 2 * np.pi + _RAD_TOL:
        return wrap(x.astype(np.float32)), "radians [0, 2pi]"
    if units is not None and units.lower() in ("rad", "radian", "radians"):
        raise PhaseScalingError(
            f"phase is labelled in radians but spans {lo:g}..{hi:g}, beyond 2*pi"
        )
    integer_valued = np.issubdtype(x.dtype, np.integer) or bool(
        np.all(np.abs(finite - np.round(finite)) < 1e-3)
    )
    if not integer_valued:
        raise PhaseScalingError(
            f"phase spans {lo:g}..{hi:g}: neither radians nor an integer vendor range"
        )
    if lo < 0:
        n = int(np.ceil(np.log2(max(-lo, hi + 1))))
        scale = np.pi / 2**n
        how = f"integer range -{2**n}..{2**n - 1} scaled by pi/{2**n}"
    else:
        n = int(np.ceil(np.log2(hi + 1)))
        scale = 2 * np.pi / 2**n
        how = f"integer range 0..{2**n - 1} scaled by 2pi/{2**n}"
    return wrap((x.astype(np.float64) * scale).astype(np.float32)), how


def rad_to_hz(phase: np.ndarray, te: float) -> np.ndarray:
    """Phase (rad) accrued at echo time ``te`` (s) to frequency (Hz)."""
    return phase / (2 * np.pi * te)


def hz_to_ppm(field_hz: np.ndarray, b0_tesla: float) -> np.ndarray:
    """Frequency offset (Hz) to field in ppm of B0 at ``b0_tesla`` (T)."""
    return field_hz / (GAMMA_BAR_MHZ_PER_T * b0_tesla)


def ppm_to_hz(field_ppm: np.ndarray, b0_tesla: float) -> np.ndarray:
    """Field in ppm of B0 at ``b0_tesla`` (T) to frequency offset (Hz)."""
    return field_ppm * (GAMMA_BAR_MHZ_PER_T * b0_tesla)
