"""Thin nipype interfaces around :mod:`qsmprep.qsm`: load NIfTI, call one function, save NIfTI.

Every numerical step lives in :mod:`qsmprep.qsm` (or :mod:`qsmprep.nn` for the U-Net);
these classes only move data between files and those functions. Units on disk follow
the package conventions: phase rad, echo times s, total field Hz, local field and chi ppm.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..qsm.phase import PhaseScalingError, fill_non_finite, scale_phase, wrap
from ..qsm.sideinfo import SideInformation
from ._io import (
    has_signal,
    load,
    load_many,
    load_mask,
    read_side_info,
    save_like,
    scanner_affine,
    stage,
    thread_limits,
)

logger = logging.getLogger("qsmprep")

#: Affine agreement (mm) required between the echoes and parts of one run.
AFFINE_TOL_MM = 1e-3


class _PrepareEchoesInputSpec(BaseInterfaceInputSpec):
    mag_files = InputMultiObject(File(exists=True), mandatory=True, desc="magnitude, by echo")
    phase_files = InputMultiObject(File(exists=True), mandatory=True, desc="phase, by echo")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    phase_units = traits.Either(
        None, traits.Str, default=None, usedefault=True, desc="phase sidecar Units"
    )
    wrapped = traits.Bool(
        True, usedefault=True, desc="False: the phase is already unwrapped (rad), kept as is"
    )
    phase_sign = traits.Enum(1, -1, usedefault=True, desc="factor applied to the phase")
    phase_scale = traits.Either(
        None, traits.Float, default=None, usedefault=True, desc="radians per stored unit"
    )
    omp_nthreads = traits.Int(1, usedefault=True, desc="images read at a time")


class _PrepareEchoesOutputSpec(TraitedSpec):
    out_mag = File(exists=True, desc="magnitude (X, Y, Z, E), float32")
    out_phase = File(exists=True, desc="phase (X, Y, Z, E) in rad, [-pi, pi)")
    side_info = File(exists=True, desc="JSON: VoxelSize (mm), B0Direction (voxel axes)")
    phase_scaling = traits.Str(desc="how the stored phase was converted to radians")
    conventions = File(exists=True, desc="JSON: how the inputs were read, for the sidecars")
    out_valid = File(exists=True, desc="mask of the voxels with finite phase and magnitude")


class PrepareEchoes(SimpleInterface):
    """Stack the echoes, scale the phase to radians, and compute the side information.

    Checks that every magnitude and phase image shares one 3D grid (shape and affine)
    and that there is one echo time per echo. With ``wrapped=False`` the phase is
    pre-unwrapped radians and passes through unscaled. The phase is multiplied by
    ``phase_sign`` (-1 for GE's left-handed phase). Voxels whose phase or magnitude is NaN
    or Inf in some echo take their finite neighbours' data
    (:func:`~qsmprep.qsm.phase.fill_non_finite`; :class:`FillField` later interpolates
    the field there), or zero magnitude (no signal, out of every mask) inside larger bad
    regions; they are left out of ``out_valid`` (the two-pass reliable mask) and their
    count is logged. The B0 direction comes from the scanner
    qform (:func:`~qsmprep.interfaces._io.scanner_affine`). ``conventions`` records the
    scaling, the sign, the non-finite voxels and the B0 source.
    """

    input_spec = _PrepareEchoesInputSpec
    output_spec = _PrepareEchoesOutputSpec

    def _run_interface(self, runtime):
        mags, phases = list(self.inputs.mag_files), list(self.inputs.phase_files)
        tes = [float(t) for t in self.inputs.echo_times]
        if not (len(mags) == len(phases) == len(tes)):
            raise ValueError(
                f"{len(mags)} magnitude, {len(phases)} phase images and {len(tes)} echo times: "
                "need one of each per echo"
            )
        if any(t <= 0 for t in tes):
            raise ValueError(f"echo times must be positive seconds, got {tes}")
        threads = self.inputs.omp_nthreads
        mag, ref_img = _load_on_grid(mags, threads=threads)
        stored = _load_on_grid(phases, ref_img, mags[0], dtype=None, threads=threads)[0]
        name = os.path.basename(phases[0])
        scale = self.inputs.phase_scale
        if self.inputs.wrapped:
            # one scaling for the whole run: a vendor range is detected on all echoes together
            try:
                phase, how = scale_phase(stored, self.inputs.phase_units, scale)
            except PhaseScalingError as e:
                raise PhaseScalingError(f"run of {name}: {e}") from None
        else:
            units = self.inputs.phase_units
            if scale is not None:
                phase, how = stored * np.float32(scale), f"unwrapped, scaled by {scale:.6g}"
            elif units is None or units.lower() in ("rad", "radian", "radians"):
                phase, how = stored.astype(np.float32), "unwrapped radians"
            else:
                raise ValueError(
                    f"unwrapped phase of {name} must be in rad, not {units!r} "
                    "(or pass --phase-scale)"
                )
        sign = int(self.inputs.phase_sign)
        if sign == -1:
            phase = wrap(-phase) if self.inputs.wrapped else -phase
        phase, mag, bad, filled = fill_non_finite(phase, mag, wrapped=self.inputs.wrapped)
        _report_non_finite(bad, filled, f"run of {name}", "phase or magnitude")
        cwd = runtime.cwd
        self._results["out_valid"] = save_like(
            ~bad, ref_img, os.path.join(cwd, "valid.nii"), dtype=np.uint8
        )
        self._results["out_mag"] = save_like(mag, ref_img, os.path.join(cwd, "mag.nii"))
        self._results["out_phase"] = save_like(phase, ref_img, os.path.join(cwd, "phase.nii"))
        self._results["side_info"], b0_source = _write_side_info(ref_img, cwd, name)
        self._results["phase_scaling"] = how
        self._results["conventions"] = _write_conventions(
            cwd,
            PhaseScaling=how,
            PhaseSign=sign,
            NonFiniteVoxels=int(bad.sum()),
            B0DirectionSource=b0_source,
        )
        return runtime


def _report_non_finite(bad: np.ndarray, filled: np.ndarray, what: str, where: str) -> None:
    """One line: how many voxels were NaN/Inf and what became of them."""
    if not bad.any():
        return
    lost = int((bad & ~filled).sum())
    logger.warning(
        "%s: %d voxel(s) with NaN or Inf %s: the field there is interpolated from the "
        "neighbours, and they are left out of the reliable mask%s",
        what,
        int(bad.sum()),
        where,
        f"; {lost} in larger bad regions are left out of the masks" if lost else "",
    )


def _write_conventions(cwd: str, **record) -> str:
    path = os.path.join(cwd, "conventions.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def _write_side_info(img, cwd: str, name: str) -> tuple[str, str]:
    """Side information from the scanner affine of ``img``; its file and the affine used."""
    affine, source = scanner_affine(img, name)
    side = SideInformation.from_affine(affine).to_dict()
    path = os.path.join(cwd, "side_info.json")
    with open(path, "w") as f:
        json.dump(side, f, indent=2)
    return path, source


class _PrepareFieldMapInputSpec(BaseInterfaceInputSpec):
    mag_files = InputMultiObject(File(exists=True), mandatory=True, desc="magnitude image(s)")
    fieldmap = File(exists=True, mandatory=True, desc="total field map")
    units = traits.Enum("Hz", "rad/s", usedefault=True, desc="the field map's Units")


class _PrepareFieldMapOutputSpec(TraitedSpec):
    out_mag = File(exists=True, desc="magnitude (X, Y, Z, E), float32")
    total_field = File(exists=True, desc="total field (Hz)")
    side_info = File(exists=True, desc="JSON: VoxelSize (mm), B0Direction (voxel axes)")
    conventions = File(exists=True, desc="JSON: how the inputs were read, for the sidecars")
    out_valid = File(exists=True, desc="mask of the voxels with finite field and magnitude")


class PrepareFieldMap(SimpleInterface):
    """Start from a total field map (Hz or rad/s) and its magnitude image(s), on one grid.

    As in :class:`PrepareEchoes`, NaN/Inf voxels take their finite neighbours' field and
    magnitude, or none (out of the masks) in larger bad regions, and B0 comes from the
    scanner qform.
    """

    input_spec = _PrepareFieldMapInputSpec
    output_spec = _PrepareFieldMapOutputSpec

    def _run_interface(self, runtime):
        mags = list(self.inputs.mag_files)
        mag, ref_img = _load_on_grid(mags)
        field, img = load(self.inputs.fieldmap)
        _check_same_grid(field, img, self.inputs.fieldmap, ref_img, mags[0])
        field = field.reshape(field.shape[:3])
        name = os.path.basename(self.inputs.fieldmap)
        fields = np.repeat(field[..., None], mag.shape[-1], axis=-1)
        fields, mag, bad, filled = fill_non_finite(fields, mag, wrapped=False)
        field = fields[..., 0]
        _report_non_finite(bad, filled, name, "field or magnitude")
        if self.inputs.units == "rad/s":
            field = field / np.float32(2 * np.pi)
        cwd = runtime.cwd
        self._results["out_mag"] = save_like(mag, ref_img, os.path.join(cwd, "mag.nii"))
        self._results["total_field"] = save_like(
            field, ref_img, os.path.join(cwd, "total_field_hz.nii")
        )
        self._results["side_info"], b0_source = _write_side_info(ref_img, cwd, name)
        self._results["out_valid"] = save_like(
            ~bad, ref_img, os.path.join(cwd, "valid.nii"), dtype=np.uint8
        )
        self._results["conventions"] = _write_conventions(
            cwd, NonFiniteVoxels=int(bad.sum()), B0DirectionSource=b0_source
        )
        return runtime


def _load_on_grid(paths, ref_img=None, ref_path=None, dtype=np.float32, threads=1):
    """Load 3D images that share one grid, the first's or ``ref_img``'s (from ``ref_path``),
    ``threads`` at a time; return them stacked along a last axis ``(X, Y, Z, E)`` and the
    reference image."""
    ref_path = paths[0] if ref_path is None else ref_path
    stack = []
    for path, (data, img) in zip(paths, load_many(paths, dtype, threads), strict=True):
        ref_img = img if ref_img is None else ref_img
        _check_same_grid(data, img, path, ref_img, ref_path)
        stack.append(data.reshape(data.shape[:3]))
    return np.stack(stack, axis=-1), ref_img


def _check_same_grid(arr, img, path, ref_img, ref_path) -> None:
    shape = arr.shape[:3] if arr.ndim == 4 and arr.shape[3] == 1 else arr.shape
    ref_shape = ref_img.shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{os.path.basename(path)} is not a 3D image (shape {arr.shape})")
    if tuple(shape) != tuple(ref_shape):
        raise ValueError(
            f"{os.path.basename(path)} has shape {tuple(shape)} but "
            f"{os.path.basename(ref_path)} has {tuple(ref_shape)}"
        )
    if not np.allclose(img.affine, ref_img.affine, atol=AFFINE_TOL_MM):
        raise ValueError(
            f"{os.path.basename(path)} and {os.path.basename(ref_path)} have different affines"
        )


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_mag = File(exists=True, mandatory=True, desc="magnitude (X, Y, Z, E)")
    method = traits.Str(mandatory=True, desc="a name in qsmprep.qsm.masking.METHODS")
    quality = File(exists=True, desc="voxel quality in [0, 1] (for quality-based masking)")
    valid = File(exists=True, desc="voxels with measured data; the others are left out")
    params = traits.Dict(traits.Str, traits.Any, usedefault=True, desc="method parameters")


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8)")


class BrainMask(SimpleInterface):
    """Brain mask from the magnitude (and optionally a voxel-quality map), without the
    voxels whose magnitude is zero in every echo (no data there: see PrepareEchoes)."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.masking import make_mask

        mag, img = load(self.inputs.in_mag)
        quality = load(self.inputs.quality)[0] if isdefined(self.inputs.quality) else None
        with stage(f"masking ({self.inputs.method})", runtime.cwd):
            mask = make_mask(mag, self.inputs.method, quality=quality, **self.inputs.params)
        mask &= has_signal(mag)
        if isdefined(self.inputs.valid):
            mask &= load_mask(self.inputs.valid)
        if not mask.any():
            raise ValueError(f"the {self.inputs.method} brain mask is empty")
        self._results["out_mask"] = save_like(
            mask, img, os.path.join(runtime.cwd, "mask.nii"), dtype=np.uint8
        )
        return runtime


class _UserMaskInputSpec(BaseInterfaceInputSpec):
    in_mask = File(exists=True, mandatory=True, desc="the user's mask (non-zero: inside)")
    reference = File(exists=True, mandatory=True, desc="an image on the run's grid")


class _UserMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8)")


class UserMask(SimpleInterface):
    """Take the user's own mask, after checking that it lies on the run's grid; voxels
    whose magnitude is zero in every echo (no data) are left out."""

    input_spec = _UserMaskInputSpec
    output_spec = _UserMaskOutputSpec

    def _run_interface(self, runtime):
        data, img = load(self.inputs.in_mask)
        ref_data, ref = load(self.inputs.reference)
        _check_same_grid(data, img, self.inputs.in_mask, ref, self.inputs.reference)
        mask = (data.reshape(data.shape[:3]) > 0) & has_signal(ref_data)
        if not mask.any():
            raise ValueError(f"mask {os.path.basename(self.inputs.in_mask)} is empty")
        self._results["out_mask"] = save_like(
            mask, ref, os.path.join(runtime.cwd, "mask.nii"), dtype=np.uint8
        )
        return runtime


class _FieldMapInputSpec(BaseInterfaceInputSpec):
    in_mag = File(exists=True, mandatory=True, desc="magnitude (X, Y, Z, E)")
    in_phase = File(exists=True, mandatory=True, desc="phase (X, Y, Z, E), rad")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    side_info = File(exists=True, mandatory=True, desc="side information JSON")
    mask = File(exists=True, desc="brain mask; without it the methods use the whole volume")
    method = traits.Either(
        None, traits.Str, mandatory=True, desc="qsmprep.qsm.unwrap.METHODS name; None: unwrapped"
    )
    mcpc3ds = traits.Bool(False, usedefault=True, desc="remove the phase offset (MCPC-3D-S)")
    params = traits.Dict(traits.Str, traits.Any, usedefault=True, desc="unwrapping parameters")
    omp_nthreads = traits.Int(1, usedefault=True, desc="threads")


class _FieldMapOutputSpec(TraitedSpec):
    total_field = File(exists=True, desc="total field (Hz)")
    quality = File(desc="voxel quality in [0, 1], when the method gives one")
    unwrapped_last = File(
        exists=True, desc="unwrapped phase of the last echo (rad), for the report"
    )


class FieldMap(SimpleInterface):
    """Unwrap the phase of every echo and fit the total field (Hz) over echo time.

    With ``mcpc3ds`` the echo-independent phase offset is removed first (MCPC-3D-S, two
    echoes or more).
    The fit is a magnitude-weighted line with a phase-offset term (two echoes or more;
    one echo: ``phase / (2 pi TE)``): whatever offset MCPC-3D-S leaves, or all of it
    without MCPC-3D-S, does not bias the field (on heads simulated with qsm-forward the
    fit through the origin left 0.012 ppm rms in the deep brain).
    ``method=None`` takes the phase as already unwrapped.
    """

    input_spec = _FieldMapInputSpec
    output_spec = _FieldMapOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.phase import fit_field, mcpc3ds
        from ..qsm.unwrap import unwrap_echoes

        mag, img = load(self.inputs.in_mag)
        phase = load(self.inputs.in_phase)[0]
        mag, phase = _as_4d(mag), _as_4d(phase)
        tes = np.asarray(self.inputs.echo_times, dtype=float)
        side = read_side_info(self.inputs.side_info)
        mask = load_mask(self.inputs.mask) if isdefined(self.inputs.mask) else None
        with thread_limits(self.inputs.omp_nthreads):
            if self.inputs.mcpc3ds and len(tes) > 1:
                with stage("phase-offset removal (MCPC-3D-S)", runtime.cwd):
                    phase = mcpc3ds(phase, mag, tes, side.voxel_size)
            if self.inputs.method is None:
                unwrapped, quality = phase, None
            else:
                with stage(
                    f"phase unwrapping ({self.inputs.method}, {len(tes)} echoes)", runtime.cwd
                ):
                    result = unwrap_echoes(
                        phase,
                        mag,
                        tes,
                        mask,
                        side.voxel_size,
                        self.inputs.method,
                        **self.inputs.params,
                    )
                unwrapped, quality = result.unwrapped, result.quality
            with stage("echo fit", runtime.cwd):
                field_hz = fit_field(unwrapped, mag, tes, mask=mask, with_offset=len(tes) > 1)
        self._results["total_field"] = save_like(
            field_hz, img, os.path.join(runtime.cwd, "total_field_hz.nii")
        )
        self._results["unwrapped_last"] = save_like(
            unwrapped[..., -1], img, os.path.join(runtime.cwd, "unwrapped_last_echo.nii")
        )
        if quality is not None:
            self._results["quality"] = save_like(
                quality, img, os.path.join(runtime.cwd, "quality.nii")
            )
        return runtime


def _as_4d(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


class _FillFieldInputSpec(BaseInterfaceInputSpec):
    total_field = File(exists=True, mandatory=True, desc="total field (Hz)")
    valid = File(exists=True, mandatory=True, desc="voxels whose inputs were finite")


class _FillFieldOutputSpec(TraitedSpec):
    total_field = File(exists=True, desc="total field (Hz), interpolated where not valid")


class FillField(SimpleInterface):
    """Interpolate the total field (Hz) where the inputs were NaN or Inf.

    The echo fit there rests on phase borrowed from the neighbours, which is poor where the
    field changes fast; the field itself is smooth, so the mean of its valid neighbours
    (:func:`~qsmprep.qsm.phase.fill_from_neighbours`) is far closer. Without such voxels
    the field passes through unchanged.
    """

    input_spec = _FillFieldInputSpec
    output_spec = _FillFieldOutputSpec

    def _run_interface(self, runtime):
        valid = load_mask(self.inputs.valid)
        if valid.all():
            self._results["total_field"] = self.inputs.total_field
            return runtime
        from ..qsm.phase import fill_from_neighbours

        field_hz, img = load(self.inputs.total_field)
        filled = fill_from_neighbours(field_hz, valid)
        self._results["total_field"] = save_like(
            filled, img, os.path.join(runtime.cwd, "total_field_hz.nii")
        )
        return runtime


class _FieldReliabilityInputSpec(BaseInterfaceInputSpec):
    total_field = File(exists=True, mandatory=True, desc="total field (Hz)")
    in_mag = File(exists=True, mandatory=True, desc="magnitude (X, Y, Z, E)")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    side_info = File(exists=True, mandatory=True, desc="side information JSON")
    valid = File(exists=True, desc="voxels whose inputs were finite (the others get 0)")


class _FieldReliabilityOutputSpec(TraitedSpec):
    reliability = File(exists=True, desc="data weights of the total field in [0, 1]")
    out_mask = File(exists=True, desc="the mask without its zero-weight border voxels")


class FieldReliability(SimpleInterface):
    """Data weights of the total field (:func:`qsmprep.qsm.phase.field_reliability`), and
    the mask without the unreliable voxels on its border (:func:`~qsmprep.qsm.masking.
    peel_unreliable`). Voxels whose phase or magnitude was NaN or Inf (``valid``) carry an
    interpolated field: weight 0."""

    input_spec = _FieldReliabilityInputSpec
    output_spec = _FieldReliabilityOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.masking import peel_unreliable
        from ..qsm.phase import field_reliability

        field_hz, img = load(self.inputs.total_field)
        mag = _as_4d(load(self.inputs.in_mag)[0])
        mask = load_mask(self.inputs.mask)
        side = read_side_info(self.inputs.side_info)
        with stage("field reliability", runtime.cwd):
            weight = field_reliability(
                field_hz, mag, self.inputs.echo_times, mask, side.voxel_size
            )
            if isdefined(self.inputs.valid):
                weight[~load_mask(self.inputs.valid)] = 0
            mask = peel_unreliable(mask, weight)
        if not mask.any():
            raise ValueError("no reliable voxel in the brain mask")
        cwd = runtime.cwd
        self._results["reliability"] = save_like(
            np.where(mask, weight, 0), img, os.path.join(cwd, "reliability.nii")
        )
        self._results["out_mask"] = save_like(
            mask, img, os.path.join(cwd, "mask_reliable.nii"), dtype=np.uint8
        )
        return runtime


class _BackgroundRemovalInputSpec(BaseInterfaceInputSpec):
    total_field = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    side_info = File(exists=True, mandatory=True, desc="side information JSON")
    field_strength = traits.Float(mandatory=True, desc="B0 (T)")
    method = traits.Str(mandatory=True, desc="a name in qsmprep.qsm.bgremove.METHODS")
    weight = File(exists=True, desc="data weights of the field (methods in bgremove.WEIGHTED)")
    params = traits.Dict(traits.Str, traits.Any, usedefault=True, desc="method parameters")
    omp_nthreads = traits.Int(1, usedefault=True, desc="threads")


class _BackgroundRemovalOutputSpec(TraitedSpec):
    local_field = File(exists=True, desc="local field (ppm)")
    out_mask = File(exists=True, desc="mask in which the local field is valid")


class BackgroundRemoval(SimpleInterface):
    """Convert the total field to ppm and remove the background field.

    ``weight`` goes to the methods that weigh the field's voxels (``bgremove.WEIGHTED``).
    """

    input_spec = _BackgroundRemovalInputSpec
    output_spec = _BackgroundRemovalOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.bgremove import WEIGHTED, remove_background
        from ..qsm.phase import hz_to_ppm

        field_hz, img = load(self.inputs.total_field)
        mask = load_mask(self.inputs.mask)
        side = read_side_info(self.inputs.side_info)
        field_ppm = hz_to_ppm(field_hz, self.inputs.field_strength).astype(np.float32)
        params = dict(self.inputs.params)
        if isdefined(self.inputs.weight) and self.inputs.method in WEIGHTED:
            params["weight"] = load(self.inputs.weight)[0]
        with (
            thread_limits(self.inputs.omp_nthreads),
            stage(f"background field removal ({self.inputs.method})", runtime.cwd),
        ):
            local, mask_used = remove_background(
                field_ppm,
                mask,
                side.voxel_size,
                self.inputs.method,
                b0_dir=side.b0_direction,
                **params,
            )
        if not np.any(mask_used):
            raise ValueError(f"no voxel left in the mask after {self.inputs.method}")
        cwd = runtime.cwd
        self._results["local_field"] = save_like(
            np.where(mask_used, local, 0), img, os.path.join(cwd, "local_field_ppm.nii")
        )
        self._results["out_mask"] = save_like(
            mask_used, img, os.path.join(cwd, "mask_local.nii"), dtype=np.uint8
        )
        return runtime


class _DipoleInversionInputSpec(BaseInterfaceInputSpec):
    local_field = File(exists=True, mandatory=True, desc="local field (ppm)")
    mask = File(exists=True, mandatory=True, desc="mask of valid local field")
    brain_mask = File(
        exists=True, desc="weighted methods (inversion.WEIGHTED): where chi is wanted"
    )
    weight = File(exists=True, desc="weighted methods: data weights of the local field")
    reliable_mask = File(exists=True, desc="two-pass: the reliable (unfilled) mask")
    side_info = File(exists=True, mandatory=True, desc="side information JSON")
    method = traits.Str(
        mandatory=True, desc="a name in qsmprep.qsm.inversion.METHODS, or adaptive-unet"
    )
    params = traits.Dict(traits.Str, traits.Any, usedefault=True, desc="method parameters")
    omp_nthreads = traits.Int(1, usedefault=True, desc="threads")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, desc="adaptive-unet device")
    model = File(exists=True, desc="adaptive-unet weights (default: the bundled model)")
    mem_gb = traits.Float(desc="memory budget (GB) for adaptive-unet tiling")
    refine = traits.Enum(
        "none", "finetune", "dip", usedefault=True, desc="adaptive-unet: per-subject refinement"
    )
    refine_steps = traits.Int(desc="refinement: largest number of steps (default: the method's)")
    echo_times = traits.List(traits.Float, desc="refinement: echo times (s); phase at their mean")
    field_strength = traits.Float(desc="refinement: B0 (T)")
    magnitude = File(exists=True, desc="refinement: data weight when no weight is given")


class _DipoleInversionOutputSpec(TraitedSpec):
    chi_map = File(exists=True, desc="susceptibility (ppm), mean zero in out_mask")
    out_mask = File(exists=True, desc="the mask in which chi is defined")
    record = File(exists=True, desc="JSON merged into the chi sidecar (the refinement's record)")


class DipoleInversion(SimpleInterface):
    """Dipole inversion of the local field, then referencing to the mean within the mask.

    Methods that weigh the data (``inversion.WEIGHTED``) solve for chi on ``brain_mask``
    (default ``mask``) and trust the field where ``mask`` holds it, weighted by
    ``weight``: the rim a background removal peeled off keeps its susceptibility. The
    others invert on ``mask``. With ``reliable_mask``, two-pass inversion: the reliable
    voxels (inside ``mask``) from a first pass on them alone, the others from a second
    pass on ``mask``.

    ``adaptive-unet`` with ``refine`` (``finetune`` or ``dip``, :mod:`qsmprep.nn.refine`)
    is weighted the same way: chi on ``brain_mask``, the data term where ``mask`` holds
    the field, weighted by ``weight`` (else by ``magnitude``). Its settings, steps and
    losses go to ``record`` as ``{"DipoleInversion": {"Refinement": ...}}``.
    """

    input_spec = _DipoleInversionInputSpec
    output_spec = _DipoleInversionOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.inversion import WEIGHTED, invert, invert_two_pass, reference

        local, img = load(self.inputs.local_field)
        mask = load_mask(self.inputs.mask)
        side = read_side_info(self.inputs.side_info)
        method = self.inputs.method
        params = dict(self.inputs.params)
        refine = method == "adaptive-unet" and self.inputs.refine != "none"
        weighted = (method in WEIGHTED or refine) and not isdefined(self.inputs.reliable_mask)
        if weighted:
            weight = mask.astype(np.float32)
            if isdefined(self.inputs.weight):
                weight *= load(self.inputs.weight)[0]
            params["weight"] = weight
            if isdefined(self.inputs.brain_mask):
                mask = load_mask(self.inputs.brain_mask) | mask
        with (
            thread_limits(self.inputs.omp_nthreads),
            stage(f"dipole inversion ({method})", runtime.cwd),
        ):
            if refine:
                chi, record = self._refine(local, mask, side, params.pop("weight"))
            elif method == "adaptive-unet":
                from ..nn.inference import invert_adaptive_unet

                chi = invert_adaptive_unet(
                    local,
                    mask,
                    side,
                    model=self.inputs.model if isdefined(self.inputs.model) else None,
                    device=self.inputs.device,
                    mem_gb=self.inputs.mem_gb if isdefined(self.inputs.mem_gb) else None,
                    nthreads=self.inputs.omp_nthreads,
                    **self.inputs.params,
                )
            elif isdefined(self.inputs.reliable_mask):
                reliable = load_mask(self.inputs.reliable_mask) & mask
                if not reliable.any():
                    raise ValueError("the reliable mask does not overlap the local-field mask")
                chi = invert_two_pass(
                    local,
                    reliable,
                    mask,
                    side.voxel_size,
                    side.b0_direction,
                    method,
                    **params,
                )
            else:
                chi = invert(local, mask, side.voxel_size, side.b0_direction, method, **params)
            chi = reference(chi, mask)
        cwd = runtime.cwd
        self._results["chi_map"] = save_like(chi, img, os.path.join(cwd, "chi_ppm.nii"))
        self._results["out_mask"] = save_like(
            mask, img, os.path.join(cwd, "mask_chi.nii"), dtype=np.uint8
        )
        self._results["record"] = os.path.join(cwd, "inversion_record.json")
        with open(self._results["record"], "w") as f:
            json.dump({"DipoleInversion": {"Refinement": record}} if refine else {}, f, indent=2)
        return runtime

    def _refine(self, local, mask, side, weight) -> tuple[np.ndarray, dict]:
        """Chi and record of the per-subject refinement (:func:`qsmprep.nn.refine.refine`)."""
        from ..nn.refine import DEFAULT_B0_T, DEFAULT_TE_S, data_weight, refine

        inputs = self.inputs
        kwargs = dict(inputs.params)
        if inputs.refine == "finetune" and isdefined(inputs.model):
            kwargs["model"] = inputs.model
        if isdefined(inputs.refine_steps):
            kwargs["steps"] = inputs.refine_steps
        if isdefined(inputs.magnitude) and not isdefined(inputs.weight):
            # no reliability map (e.g. a field-map input): the magnitude where the field is
            weight = weight * data_weight(mask, magnitude=load(inputs.magnitude)[0])
        kwargs["weight"] = weight
        if inputs.refine == "finetune":
            tes = inputs.echo_times if isdefined(inputs.echo_times) else []
            kwargs["te_s"] = float(np.mean(tes)) if tes else DEFAULT_TE_S
            kwargs["b0_t"] = (
                inputs.field_strength if isdefined(inputs.field_strength) else (DEFAULT_B0_T)
            )
        result = refine(
            inputs.refine,
            local,
            mask,
            side,
            device=inputs.device,
            nthreads=inputs.omp_nthreads,
            **kwargs,
        )
        return result.chi, result.record


#: R2* fits by name (:mod:`qsmprep.qsm.relax`).
R2STAR_METHODS = ("loglinear", "arlo")


class _RelaxometryInputSpec(BaseInterfaceInputSpec):
    in_mag = File(exists=True, mandatory=True, desc="magnitude (X, Y, Z, E)")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    method = traits.Enum(*R2STAR_METHODS, mandatory=True, desc="R2* fit")


class _RelaxometryOutputSpec(TraitedSpec):
    r2star = File(exists=True, desc="R2* (1/s)")
    t2star = File(exists=True, desc="T2* (s)")


class Relaxometry(SimpleInterface):
    """R2* (1/s) and T2* (s) maps from the magnitude decay over echo time, in the mask."""

    input_spec = _RelaxometryInputSpec
    output_spec = _RelaxometryOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.relax import r2star_arlo, r2star_loglinear, t2star_from_r2star

        mag, img = load(self.inputs.in_mag)
        mask = load_mask(self.inputs.mask)
        fit = r2star_loglinear if self.inputs.method == "loglinear" else r2star_arlo
        with stage(f"R2* fit ({self.inputs.method})", runtime.cwd):
            r2s = fit(_as_4d(mag), self.inputs.echo_times, mask)
        cwd = runtime.cwd
        self._results["r2star"] = save_like(r2s, img, os.path.join(cwd, "r2star.nii"))
        self._results["t2star"] = save_like(
            t2star_from_r2star(r2s, mask=mask), img, os.path.join(cwd, "t2star.nii")
        )
        return runtime


class _SWIInputSpec(BaseInterfaceInputSpec):
    in_mag = File(exists=True, mandatory=True, desc="magnitude (X, Y, Z, E)")
    total_field = File(exists=True, mandatory=True, desc="total field (Hz)")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    side_info = File(exists=True, mandatory=True, desc="side information JSON")
    params = traits.Dict(traits.Str, traits.Any, usedefault=True, desc="qsm.swi.swi parameters")


class _SWIOutputSpec(TraitedSpec):
    swi = File(exists=True, desc="susceptibility-weighted image")
    minip = File(exists=True, desc="its minimum-intensity projection (slabs along k)")


class SWI(SimpleInterface):
    """Susceptibility-weighted image and its minIP.

    The phase is the unwrapped total field at the last echo time, ``2 pi f TE_last``
    (echo-combined, so less noisy than one echo's phase); the magnitude is the root sum
    of squares over echoes. The minIP slides along the third voxel axis.
    """

    input_spec = _SWIInputSpec
    output_spec = _SWIOutputSpec

    def _run_interface(self, runtime):
        from ..qsm.masking import combine_magnitude
        from ..qsm.swi import minip, swi

        mag, img = load(self.inputs.in_mag)
        field_hz = load(self.inputs.total_field)[0]
        mask = load_mask(self.inputs.mask)
        side = read_side_info(self.inputs.side_info)
        phase = np.float32(2 * np.pi * max(self.inputs.echo_times)) * field_hz
        with stage("SWI and minIP", runtime.cwd):
            image = swi(
                combine_magnitude(mag),
                phase,
                mask,
                side.voxel_size,
                unwrapped=True,
                **self.inputs.params,
            )
            projection = minip(image, side.voxel_size)
        cwd = runtime.cwd
        self._results["swi"] = save_like(image, img, os.path.join(cwd, "swi.nii"))
        self._results["minip"] = save_like(projection, img, os.path.join(cwd, "minip.nii"))
        return runtime
