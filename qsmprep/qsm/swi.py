"""Susceptibility-weighted imaging (SWI) and minimum-intensity projection.

SWI (Haacke et al., MRM 2004) multiplies the magnitude by a phase mask built from the
high-pass filtered phase, so that veins, whose deoxyhaemoglobin shifts the phase, turn
dark. Phase is in radians at one echo time; voxel sizes in mm.

Sign convention: in qsmprep ``phase = +2 pi f TE`` and a paramagnetic source
(chi > 0) raises the field inside a vessel parallel to B0, so veins have *positive*
phase (``paramagnetic_sign=+1``). Haacke's "negative phase mask" is the same mask for
data of the opposite handedness, where veins have negative phase
(``paramagnetic_sign=-1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .sideinfo import check_voxel_size

#: Default width (Gaussian sigma, mm) of the low-pass that the high-pass removes.
DEFAULT_SIGMA_MM = 4.0
#: Default power of the phase mask.
DEFAULT_POWER = 4
#: Default slab thickness (mm) of the minimum-intensity projection.
DEFAULT_SLAB_MM = 8.0


def _sigma_voxels(sigma_mm: float, voxel_size: Sequence[float]) -> tuple[float, float, float]:
    vs = check_voxel_size(voxel_size)
    if not sigma_mm > 0:
        raise ValueError(f"sigma_mm must be positive, got {sigma_mm}")
    return tuple(sigma_mm / v for v in vs)


def highpass_phase(
    phase: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    sigma_mm: float = DEFAULT_SIGMA_MM,
    mag: np.ndarray | None = None,
    unwrapped: bool = False,
) -> np.ndarray:
    """High-pass filtered phase (rad), zero outside ``mask``.

    - wrapped phase (``unwrapped=False``, homodyne): the phase of ``z / lowpass(z)``
      with ``z = mag * exp(i phase)`` and a Gaussian low-pass of ``sigma_mm``. Needs no
      unwrapping; the result lies in ``(-pi, pi]``.
    - unwrapped phase (``unwrapped=True``): ``phase`` minus its Gaussian-smoothed
      version, normalised inside ``mask`` so that the brain edge is not biased.

    A linear phase ramp is removed exactly by both; smooth curvature leaves about
    ``curvature * sigma^2``.
    """
    phase = np.asarray(phase, dtype=np.float32)
    m = np.asarray(mask).astype(bool, copy=False)
    if phase.ndim != 3 or m.shape != phase.shape:
        raise ValueError(f"phase {phase.shape} and mask {m.shape} must be the same 3D shape")
    sigma = _sigma_voxels(sigma_mm, voxel_size)
    if unwrapped:
        weight = ndimage.gaussian_filter(m.astype(np.float32), sigma)
        smooth = ndimage.gaussian_filter(np.where(m, phase, np.float32(0)), sigma)
        with np.errstate(divide="ignore", invalid="ignore"):
            hp = phase - smooth / weight
    else:
        amp = np.ones_like(phase) if mag is None else np.asarray(mag, dtype=np.float32)
        if amp.shape != phase.shape:
            raise ValueError(f"magnitude {amp.shape} does not match phase {phase.shape}")
        z = amp * np.exp(1j * phase).astype(np.complex64)
        low = ndimage.gaussian_filter(z.real, sigma) + 1j * ndimage.gaussian_filter(z.imag, sigma)
        hp = np.angle(z * np.conj(low))
    return np.where(m, hp, 0).astype(np.float32)


def phase_mask(
    hp_phase: np.ndarray, power: float = DEFAULT_POWER, paramagnetic_sign: int = 1
) -> np.ndarray:
    """SWI phase mask ``((pi - p) / pi) ** power`` for ``p = sign * phase in (0, pi)``.

    1 where the high-pass phase has the diamagnetic sign (``sign * phase <= 0``), falling
    linearly to 0 at ``sign * phase = pi``, then raised to ``power``.
    """
    if paramagnetic_sign not in (1, -1):
        raise ValueError(f"paramagnetic_sign must be +1 or -1, got {paramagnetic_sign}")
    if not power > 0:
        raise ValueError(f"power must be positive, got {power}")
    p = paramagnetic_sign * np.asarray(hp_phase, dtype=np.float32)
    base = np.clip(1 - p / np.float32(np.pi), 0, 1)
    return (base**power).astype(np.float32)


def swi(
    mag: np.ndarray,
    phase: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    sigma_mm: float = DEFAULT_SIGMA_MM,
    power: float = DEFAULT_POWER,
    paramagnetic_sign: int = 1,
    unwrapped: bool = False,
) -> np.ndarray:
    """Susceptibility-weighted image: ``mag * phase_mask(highpass(phase)) ** power``.

    Parameters
    ----------
    mag
        Magnitude ``(X, Y, Z)`` at one echo (any scale); the SWI has the same scale.
    phase
        Phase ``(X, Y, Z)`` in rad at the same echo: wrapped (homodyne high-pass) or,
        with ``unwrapped=True``, unwrapped (e.g. ``2 pi f_Hz TE`` from the total field).
    mask
        Brain mask ``(X, Y, Z)``: the phase mask acts only there; outside, the SWI is
        the magnitude.
    voxel_size
        Voxel size in mm.
    sigma_mm
        Gaussian sigma (mm) of the low-pass removed from the phase.
    power
        Power of the phase mask (4 is the usual choice; higher darkens veins more).
    paramagnetic_sign
        Sign of the phase of paramagnetic veins: +1 in qsmprep's convention, -1 for data
        of the opposite handedness (Haacke's negative phase mask).
    unwrapped
        Whether ``phase`` is unwrapped.
    """
    amp = np.asarray(mag, dtype=np.float32)
    hp = highpass_phase(phase, mask, voxel_size, sigma_mm, mag=amp, unwrapped=unwrapped)
    weight = phase_mask(hp, power, paramagnetic_sign)
    return np.where(np.asarray(mask, dtype=bool), amp * weight, amp).astype(np.float32)


def minip(
    image: np.ndarray, voxel_size: Sequence[float], slab_mm: float = DEFAULT_SLAB_MM, axis: int = 2
) -> np.ndarray:
    """Sliding minimum-intensity projection over slabs of ``slab_mm`` along ``axis``.

    Each output slice is the minimum over the ``n = round(slab_mm / voxel_size[axis])``
    (at least 1) slices around it (for even ``n``, one more before than after), with
    the edge slices repeated at the ends; the output has the input's shape.
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {img.shape}")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    vs = check_voxel_size(voxel_size)
    if not slab_mm > 0:
        raise ValueError(f"slab_mm must be positive, got {slab_mm}")
    n = max(1, int(round(slab_mm / vs[axis])))
    return ndimage.minimum_filter1d(img, size=n, axis=axis, mode="nearest")
