"""The per-participant workflow: BIDS inputs, :func:`init_qsm_wf` per run, derivatives sinks."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nipype.pipeline import engine as pe

from ..bids import MEGRERun, bids_uri, field_strength
from ..interfaces.bids import DerivativesSink
from .qsm import init_qsm_wf

#: Registry module of each stage.
STAGE_MODULES = {
    "unwrapping": "qsmprep.qsm.unwrap",
    "masking": "qsmprep.qsm.masking",
    "bf_removal": "qsmprep.qsm.bgremove",
    "inversion": "qsmprep.qsm.inversion",
}

#: Arguments of the stage functions that are data, not parameters.
_DATA_ARGS = {
    "phase", "mag", "echo_times", "mask", "voxel_size", "b0_dir", "field", "local",
    "local_ppm", "quality", "method", "progress", "reliable_mask", "filled_mask", "unwrapped",
}  # fmt: skip


def estimate_mem_gb(shape: Sequence[int], n_echoes: int) -> float:
    """Rough peak memory (GB) of the heaviest node for a run of ``shape`` with ``n_echoes``.

    Counts the stacked float32 echoes a few times over and the zero-padded (1.5x per axis)
    complex arrays of the FFT-based solvers.
    """
    nvox = float(np.prod(shape))
    return round(max(0.5, nvox * (24 * n_echoes + 256) / 1e9), 2)


def method_record(stage: str, method: str) -> dict[str, Any]:
    """``{"Method": name, "Parameters": {...}}`` with the defaults the method runs with."""
    if stage == "inversion" and method == "adaptive-unet":
        return {"Method": method}
    module = importlib.import_module(STAGE_MODULES[stage])
    fn = module.METHODS[method]
    params = {}
    for pname, p in inspect.signature(fn).parameters.items():
        if pname in _DATA_ARGS or p.default is inspect.Parameter.empty:
            continue
        if _json_scalar(p.default):
            params[pname] = list(p.default) if isinstance(p.default, tuple) else p.default
    return {"Method": method, "Parameters": params}


def _json_scalar(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_json_scalar(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _node_name(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_")


def init_participant_wf(
    subject: str,
    runs: Sequence[MEGRERun],
    *,
    bids_dir: Path,
    output_dir: Path,
    unwrapping: str,
    bf_removal: str,
    inversion: str,
    masking: str,
    mcpc3ds: bool = False,
    device: str = "auto",
    model: Path | None = None,
    fallback_field_strength: float | None = None,
    omp_nthreads: int = 1,
    max_mem_gb: float | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """One participant: a :func:`init_qsm_wf` per run, feeding the derivatives sinks.

    ``fallback_field_strength`` (T) is used for runs whose sidecars lack
    ``MagneticFieldStrength``; without it such a run raises
    :class:`~qsmprep.bids.BIDSError` here, before anything runs. ``max_mem_gb`` caps
    each node's memory estimate (nipype's scheduler would refuse a larger one).
    """
    if not runs:
        raise ValueError(f"no multi-echo GRE run for sub-{subject}")
    wf = pe.Workflow(name=name or f"sub_{_node_name(subject)}_wf")
    methods = {
        "unwrapping": unwrapping,
        "masking": masking,
        "bf_removal": bf_removal,
        "inversion": inversion,
    }
    records = {stage: method_record(stage, m) for stage, m in methods.items()}
    if inversion == "adaptive-unet":
        records["inversion"]["Model"] = str(model) if model else "bundled"
    for run in runs:
        b0 = field_strength(run, fallback_field_strength)
        mem_gb = estimate_mem_gb(run.shape, len(run.echo_times))
        if max_mem_gb is not None:
            mem_gb = min(mem_gb, max_mem_gb)
        qsm_wf = init_qsm_wf(
            unwrapping=unwrapping,
            bf_removal=bf_removal,
            inversion=inversion,
            masking=masking,
            mcpc3ds=mcpc3ds,
            device=device,
            model=str(model) if model else None,
            omp_nthreads=omp_nthreads,
            mem_gb=mem_gb,
            name=f"qsm_{_node_name(run.prefix)}_wf",
        )
        inputs = qsm_wf.get_node("inputnode").inputs
        inputs.mag_files = list(run.mag_files)
        inputs.phase_files = list(run.phase_files)
        inputs.echo_times = list(run.echo_times)
        inputs.field_strength = b0
        inputs.phase_units = run.phase_units

        for field, out_name, meta, with_side in _outputs(run, bids_dir, b0, records, mcpc3ds):
            sink = pe.Node(
                DerivativesSink(
                    base_directory=str(output_dir),
                    out_path=f"{run.anat_dir}/{out_name}",
                    metadata=meta,
                ),
                name=f"ds_{_node_name(run.prefix)}_{field}",
                run_without_submitting=True,
                overwrite=True,  # always write: the output folder may have been cleaned
            )
            wf.connect(qsm_wf, f"outputnode.{field}", sink, "in_file")
            if with_side:
                wf.connect(qsm_wf, "outputnode.side_info", sink, "side_info")
    return wf


def _outputs(run: MEGRERun, bids_dir: Path, b0: float, records: dict, mcpc3ds: bool):
    """(outputnode field, file name, sidecar, add SideInformation) for each output of a run."""
    sources = [bids_uri(f, bids_dir) for pair in zip(run.mag_files, run.phase_files, strict=True)
               for f in pair]  # fmt: skip
    reference = bids_uri(run.mag_files[0], bids_dir)
    common = {"Sources": sources, "SkullStripped": True}
    field_model: dict[str, Any] = {"Unwrapping": records["unwrapping"]}
    if mcpc3ds:
        field_model["PhaseOffsetRemoval"] = "MCPC-3D-S"
    fit = "through the origin" if mcpc3ds or len(run.echo_times) == 1 else "with a phase offset"
    field_model.update(
        EchoCombination=f"magnitude-weighted least-squares fit of phase over echo time, {fit}",
        MagneticFieldStrength=b0,
        EchoTime=list(run.echo_times),
    )
    chi_meta = {
        "Description": "Magnetic susceptibility relative to the mean in the brain mask",
        "Units": "ppm",
        **common,
        **field_model,
        "Masking": records["masking"],
        "BackgroundFieldRemoval": records["bf_removal"],
        "DipoleInversion": records["inversion"],
        "Referencing": "mean within the brain mask",
    }
    mask_meta = {
        "Description": "Brain mask in which the local field and the susceptibility are valid",
        "Type": "Brain",
        "Sources": sources,
        "SpatialReference": reference,
        "Masking": records["masking"],
        "BackgroundFieldRemoval": records["bf_removal"],
    }
    total_meta = {
        "Description": "Total field: frequency offset from the echo fit of the unwrapped phase",
        "Units": "Hz",
        "Sources": sources,
        **field_model,
    }
    local_meta = {
        "Description": "Local field (background field removed), in ppm of B0",
        "Units": "ppm",
        **common,
        "MagneticFieldStrength": b0,
        "BackgroundFieldRemoval": records["bf_removal"],
    }
    p = run.prefix
    return [
        ("chi_map", f"{p}_Chimap.nii.gz", chi_meta, True),
        ("mask", f"{p}_desc-brain_mask.nii.gz", mask_meta, False),
        ("total_field", f"{p}_totalfield.nii.gz", total_meta, False),
        ("local_field", f"{p}_localfield.nii.gz", local_meta, True),
    ]
