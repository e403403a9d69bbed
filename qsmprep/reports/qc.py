"""Quality-control numbers of a run, computed from its outputs, and their flags.

The numbers (:data:`QC_COLUMNS`):

- ``mask_volume_ml``: the brain mask's volume (mL);
- ``mask_head_share``: the share of the head's interior inside the brain mask. The head
  is the magnitude's signal region (:func:`qsmprep.qsm.masking.robust_threshold_mask`,
  not eroded); its interior is the part more than :data:`HEAD_DEPTH_MM` from its surface,
  i.e. without scalp and skull: roughly the intracranial volume. A mask that misses
  brain covers less of it;
- ``residual``: the data-consistency residual ``||D * chi - f|| / ||f||`` in the mask,
  with ``f`` the local field and ``D *`` the dipole convolution
  (:func:`qsmprep.qsm.dipole.forward_field`), both demeaned in the mask;
- ``low_reliability_share``: the share of mask voxels whose field reliability (the
  data weight of ``_desc-field_reliability``) or, without it, whose unwrapping voxel
  quality is below :data:`LOW_QUALITY`;
- ``chi_mean_ppm``, ``chi_std_ppm``: chi in the mask;
- ``sign_index``: ``(p99.5 + p0.5) / (p99.5 - p0.5)`` of chi in the mask, in [-1, 1]:
  the strongest sources in a brain are paramagnetic (veins, iron-rich nuclei), so it is
  positive; an inverted phase sign negates chi and the index.

:data:`QC_RULES` says when a number is out of its usual range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nb
import numpy as np
from scipy import ndimage

from .outputs import RunOutputs, load_image

#: Depth (mm) below the head's surface where its interior starts (scalp + skull + CSF).
HEAD_DEPTH_MM = 12.0

#: Voxel quality below which a voxel counts as unreliable.
LOW_QUALITY = 0.5

#: Percentiles of chi whose sum gives the sign index.
SIGN_PERCENTILES = (0.5, 99.5)

#: The QC numbers, in table order.
QC_COLUMNS = (
    "mask_volume_ml",
    "mask_head_share",
    "residual",
    "low_reliability_share",
    "chi_mean_ppm",
    "chi_std_ppm",
    "sign_index",
)


@dataclass(frozen=True)
class Rule:
    """A number out of its usual range: ``column`` compared with ``limit``."""

    column: str
    above: bool  # True: flag values above the limit; False: below
    limit: float
    message: str

    def flags(self, value: float | None) -> bool:
        if value is None or not np.isfinite(value):
            return False
        return value > self.limit if self.above else value < self.limit


#: When a QC number is out of its usual range (thresholds measured on the project's
#: phantoms: docs/outputs.md gives the figures).
QC_RULES = (
    Rule("mask_head_share", False, 0.6, "the mask covers less than 60 % of the head's "
         "interior: it may miss brain"),
    Rule("residual", True, 0.5, "data-consistency residual above 0.5: chi does not explain "
         "the local field"),
    Rule("chi_std_ppm", True, 0.1, "chi std above 0.1 ppm: noise, streaks or residual "
         "background field"),
    Rule("low_reliability_share", True, 0.1, "more than 10 % of the mask has low unwrapping "
         "quality"),
    Rule("sign_index", False, 0.0, "the strongest chi values are negative: the phase sign "
         "may be inverted (veins and iron-rich nuclei are paramagnetic); check the phase "
         "sign in the summary, and --phase-sign"),
)  # fmt: skip


def flags(numbers: Mapping[str, Any]) -> list[Rule]:
    """The rules that ``numbers`` break."""
    return [rule for rule in QC_RULES if rule.flags(numbers.get(rule.column))]


def head_interior(
    mag: np.ndarray, voxel_size: tuple[float, float, float], depth_mm: float = HEAD_DEPTH_MM
) -> np.ndarray:
    """Voxels of the magnitude's signal region deeper than ``depth_mm`` below its surface,
    found on a grid of about 2 mm (every ``n``-th voxel of a finer one, repeated back)."""
    from ..qsm.masking import robust_threshold_mask

    step = [max(1, int(2.0 // v)) for v in voxel_size]
    coarse = mag[tuple(slice(None, None, n) for n in step)]
    head = robust_threshold_mask(coarse, erode=0)
    spacing = [v * n for v, n in zip(voxel_size, step, strict=True)]
    inner = ndimage.distance_transform_edt(head, sampling=spacing) > depth_mm
    for axis, n in enumerate(step):
        inner = np.repeat(inner, n, axis=axis)
    return inner[tuple(slice(0, n) for n in mag.shape[:3])]


def data_consistency_residual(
    chi: np.ndarray,
    local: np.ndarray,
    mask: np.ndarray,
    voxel_size: tuple[float, float, float],
    b0_dir: tuple[float, float, float],
) -> float:
    """``||D * chi - f|| / ||f||`` in ``mask`` (chi and the local field ``f`` in ppm; both
    fields demeaned in the mask, since the dipole kernel has no DC term)."""
    from ..qsm.dipole import forward_field

    predicted = forward_field(np.where(mask, chi, 0).astype(np.float32), voxel_size, b0_dir)
    p = predicted[mask].astype(np.float64)
    f = local[mask].astype(np.float64)
    p -= p.mean()
    f -= f.mean()
    norm = np.linalg.norm(f)
    return float(np.linalg.norm(p - f) / norm) if norm > 0 else float("nan")


def sign_index(chi: np.ndarray) -> float:
    """``(p99.5 + p0.5) / (p99.5 - p0.5)`` of the values ``chi`` (0 when they are flat)."""
    lo, hi = np.percentile(np.asarray(chi, dtype=np.float64), SIGN_PERCENTILES)
    return float((hi + lo) / (hi - lo)) if hi > lo else 0.0


def _load(path, dtype=np.float32) -> tuple[np.ndarray, nb.Nifti1Image]:
    img = load_image(path)
    return np.asarray(img.dataobj, dtype=dtype), img


def _voxel_size(img: nb.Nifti1Image) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))


def run_qc(run: RunOutputs, magnitude: Callable[[], np.ndarray | None] | None = None) -> dict:
    """The QC numbers of ``run`` (``None`` where an input is missing), ``flags`` (the
    messages of the rules it breaks) and ``flagged`` (their columns).

    The magnitude comes from ``magnitude()`` if given, else from the input dataset
    (:meth:`RunOutputs.magnitude`); without it ``mask_head_share`` is ``None``.
    """
    chi, chi_img = _load(run.path("chi_map"))
    mask = np.asarray(load_image(run.path("mask")).dataobj) > 0
    values = chi[mask]
    voxel_size = _voxel_size(chi_img)
    out: dict[str, Any] = dict.fromkeys(QC_COLUMNS)
    out["mask_volume_ml"] = float(mask.sum() * np.prod(voxel_size) / 1000.0)
    out["chi_mean_ppm"] = float(values.mean())
    out["chi_std_ppm"] = float(values.std())
    out["sign_index"] = sign_index(values)
    local_path = run.path("local_field")
    side = run.sidecar("chi_map").get("SideInformation") or run.sidecar("local_field").get(
        "SideInformation"
    )
    if local_path is not None and side:
        local = _load(local_path)[0]
        out["residual"] = data_consistency_residual(
            chi, local, mask, tuple(side["VoxelSize"]), tuple(side["B0Direction"])
        )
    quality_path = run.path("reliability") or run.quality()
    if quality_path is not None:
        quality = _load(quality_path)[0]
        out["low_reliability_share"] = float(np.mean(quality[mask] < LOW_QUALITY))
    mag = magnitude() if magnitude is not None else _input_magnitude(run)
    if mag is not None and mag.shape[:3] == mask.shape:
        interior = head_interior(mag, voxel_size)
        if interior.any():
            out["mask_head_share"] = float((mask & interior).sum() / interior.sum())
    broken = flags(out)
    out["flags"] = [rule.message for rule in broken]
    out["flagged"] = [rule.column for rule in broken]
    return out


def _input_magnitude(run: RunOutputs) -> np.ndarray | None:
    path = run.magnitude()
    if path is None:
        return None
    data = np.asarray(load_image(path).dataobj, dtype=np.float32)
    return data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data


#: Fewest runs for which robust z-scores are computed (the MAD of fewer is meaningless).
MIN_RUNS_FOR_Z = 5


def robust_z(values: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)`` of each value (NaN kept; all zeros when the MAD is
    zero or fewer than :data:`MIN_RUNS_FOR_Z` values are finite)."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    z = np.zeros_like(x)
    z[~finite] = np.nan
    if finite.sum() < MIN_RUNS_FOR_Z:
        return z
    med = np.median(x[finite])
    mad = 1.4826 * np.median(np.abs(x[finite] - med))
    if mad > 0:
        z[finite] = (x[finite] - med) / mad
    return z
