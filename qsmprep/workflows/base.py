"""The per-participant workflow: BIDS inputs, :func:`init_qsm_wf` per run, derivatives sinks."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import MEGRERun, bids_uri
from ..conventions import phase_sign as run_phase_sign
from ..conventions import ppm_field_strength
from ..interfaces.bids import CommitRun, DerivativesSink
from .boilerplate import REPORT_POSTDESC, LiterateWorkflow, participant_desc
from .qsm import QUALITY_UNWRAPPING, init_qsm_wf

logger = logging.getLogger("qsmprep")

#: Registry module of each stage.
STAGE_MODULES = {
    "unwrapping": "qsmprep.qsm.unwrap",
    "masking": "qsmprep.qsm.masking",
    "bf_removal": "qsmprep.qsm.bgremove",
    "inversion": "qsmprep.qsm.inversion",
}

#: Folder of OUTPUT_DIR under which runs stage their outputs until all are written.
STAGE_DIRNAME = ".qsmprep-staging"

#: What follows ``<prefix>_`` in the name of every file a run may write: a new set of a
#: run's outputs replaces all of its earlier files that match.
RUN_OUTPUT_TAILS = (
    r"(Chimap|desc-brain_mask|totalfield|localfield|desc-[A-Za-z0-9]+_quality"
    r"|desc-[A-Za-z0-9]+_reliability"
    r"|R2starmap|T2starmap|swi|minIP)\.(nii\.gz|json)"
)


def run_outputs_pattern(anat_dir: str, prefix: str) -> str:
    """Regular expression (for ``re.fullmatch``) of the paths, relative to OUTPUT_DIR, of
    every file the run ``prefix`` may have written in ``anat_dir``: those its next set
    replaces. Another run's files never match, even when its prefix extends this one
    (``sub-01`` and ``sub-01_inv-1``): a tail follows the prefix directly."""
    return re.escape(f"{anat_dir}/{prefix}_") + RUN_OUTPUT_TAILS


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


def qsm_workflow_name(prefix: str) -> str:
    """Name of the :func:`init_qsm_wf` of the run ``prefix`` inside the participant workflow."""
    return f"qsm_{_node_name(prefix)}_wf"


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
    input_type: str = "phase",
    mcpc3ds: bool = False,
    two_pass: bool = False,
    masks: Mapping[str, str] | None = None,
    r2star: str | None = None,
    swi: bool = False,
    device: str = "auto",
    model: Path | None = None,
    refine: str = "none",
    refine_steps: int | None = None,
    fallback_field_strength: float | None = None,
    phase_sign: str = "auto",
    phase_scale: float | None = None,
    omp_nthreads: int = 1,
    max_mem_gb: float | None = None,
    stage_dir: Path | None = None,
    reportlets: bool = True,
    name: str | None = None,
) -> pe.Workflow:
    """One participant: a :func:`init_qsm_wf` per run, feeding the derivatives sinks.

    Each run's outputs are written to ``stage_dir`` (default: a new folder under
    ``output_dir/.qsmprep-staging``) and moved into ``output_dir`` together, replacing the
    run's earlier outputs, only once all of them are written (:class:`CommitRun`): a run
    that fails leaves ``output_dir`` as it was. The caller removes ``stage_dir`` afterwards.

    ``runs`` come from :func:`qsmprep.bids.collect_runs` (or ``collect_fieldmap_runs``
    for ``input_type="fieldmap"``). ``masks`` maps each run's prefix to the user's mask
    file (``None``: masks are computed). ``r2star`` (a fit name) adds R2*/T2* maps to
    the runs with two echoes or more; ``swi`` adds SWI and minIP. ``refine`` and
    ``refine_steps`` (``adaptive-unet`` only) go to :func:`init_qsm_wf`; the refinement's
    record joins the chi map's sidecar.
    ``fallback_field_strength`` (T) is used for runs whose sidecars lack
    ``MagneticFieldStrength``; without it such a run raises
    :class:`~qsmprep.bids.BIDSError` here, before anything runs. ppm are relative to the
    sidecar's ``ImagingFrequency`` when it has one
    (:func:`~qsmprep.conventions.ppm_field_strength`). ``phase_sign`` (``auto``, ``+1``,
    ``-1``; :func:`~qsmprep.conventions.phase_sign`) and ``phase_scale`` (radians per stored
    unit, ``None``: detected) say how to read the phase. The sign, the scaling and the
    field strength used are recorded in the sidecars. ``max_mem_gb`` caps
    each node's memory estimate (nipype's scheduler would refuse a larger one).
    ``reportlets`` adds, per run, the report's phase figure (it needs intermediates), which
    is staged and committed with the run's outputs into ``output_dir/sub-X/figures/``.
    """
    if not runs:
        raise ValueError(f"no multi-echo GRE run for sub-{subject}")
    wf = LiterateWorkflow(name=name or f"sub_{_node_name(subject)}_wf")
    wf.__desc__ = participant_desc()
    wf.__postdesc__ = REPORT_POSTDESC
    records = {
        "unwrapping": method_record("unwrapping", unwrapping),
        "masking": method_record("masking", masking),
        "bf_removal": method_record("bf_removal", bf_removal),
        "inversion": method_record("inversion", inversion),
    }
    if input_type == "unwrapped":
        records["unwrapping"] = {"Method": "none: the input phase was unwrapped"}
    if masks is not None:
        records["masking"] = {"Method": "user mask"}
    if two_pass:
        records["inversion"]["TwoPass"] = (
            "pass 1 on the reliable mask (masking without hole filling), pass 2 on the "
            "filled mask for the remaining voxels"
        )
    if inversion == "adaptive-unet":
        from ..nn.weights import ModelLoadError, load_card

        records["inversion"]["Model"] = str(model) if model else "bundled"
        try:  # the file is checked against this sha256 when the node loads it
            records["inversion"]["ModelSHA256"] = load_card(model).get("sha256")
        except ModelLoadError:
            pass  # the inversion node fails with the reason
    with_quality = input_type == "phase" and unwrapping in QUALITY_UNWRAPPING
    if stage_dir is None:
        stage_dir = Path(output_dir) / STAGE_DIRNAME / f"sub-{subject}-{uuid.uuid4().hex[:8]}"
    for run in runs:
        b0, ppm_record = ppm_field_strength(run, fallback_field_strength)
        nominal = run.field_strength or fallback_field_strength or b0
        run_r2star = r2star if len(run.echo_times) > 1 else None
        if r2star and run_r2star is None:
            logger.warning("%s: one echo, no R2*/T2* map", run.prefix)
        if run_r2star == "arlo":
            check_arlo(run)
        mem_gb = estimate_mem_gb(run.shape, max(1, len(run.echo_times)))
        if max_mem_gb is not None:
            mem_gb = min(mem_gb, max_mem_gb)
        qsm_wf = init_qsm_wf(
            unwrapping=unwrapping,
            bf_removal=bf_removal,
            inversion=inversion,
            masking=masking,
            input_type=input_type,
            mcpc3ds=mcpc3ds,
            two_pass=two_pass,
            user_mask=masks is not None,
            r2star=run_r2star,
            swi=swi,
            device=device,
            model=str(model) if model else None,
            refine=refine,
            refine_steps=refine_steps,
            omp_nthreads=omp_nthreads,
            mem_gb=mem_gb,
            name=qsm_workflow_name(run.prefix),
        )
        inputs = qsm_wf.get_node("inputnode").inputs
        inputs.mag_files = list(run.mag_files)
        inputs.field_strength = b0
        if run.fieldmap_file is not None:
            inputs.fieldmap_file = run.fieldmap_file
            inputs.fieldmap_units = run.fieldmap_units
        else:
            inputs.phase_files = list(run.phase_files)
            inputs.echo_times = list(run.echo_times)
            inputs.phase_units = run.phase_units
            sign, sign_source = run_phase_sign(run, phase_sign)
            inputs.phase_sign = sign
            inputs.phase_scale = phase_scale
            phase_record = {"PhaseSign": sign, "PhaseSignSource": sign_source}
            if input_type == "phase" and len(run.echo_times) == 1:
                logger.warning(
                    "%s: one echo: its phase offset cannot be separated from the field, so "
                    "chi is wrong unless the phase has no offset; give offset-free phase "
                    "with --input-type unwrapped, or acquire a second echo",
                    run.prefix,
                )
        if masks is not None:
            inputs.mask_file = masks[run.prefix]

        applied = mcpc3ds and input_type == "phase" and len(run.echo_times) > 1
        outputs = _outputs(run, bids_dir, nominal, records, applied)
        for _, _, meta, _ in outputs:
            if meta.get("Units") == "ppm":
                meta["PpmConversion"] = ppm_record
            if run.fieldmap_file is None and "Unwrapping" in meta:
                meta.update(phase_record)
        if with_quality:
            outputs.append(_quality_output(run, bids_dir, unwrapping))
        if run_r2star:
            outputs += _relaxometry_outputs(run, bids_dir, run_r2star)
        if swi:
            outputs += _swi_outputs(run, bids_dir)
        node = _node_name(run.prefix)
        with_reportlet = reportlets and run.fieldmap_file is None
        merge = pe.Node(
            niu.Merge(2 * len(outputs) + 2 * with_reportlet),
            name=f"ds_{node}_files",
            run_without_submitting=True,
        )
        commit = pe.Node(
            CommitRun(
                stage_dir=str(stage_dir),
                output_dir=str(output_dir),
                replaces=run_outputs_pattern(run.anat_dir, run.prefix),
            ),
            name=f"ds_{node}_commit",
            run_without_submitting=True,
            overwrite=True,
        )
        wf.connect(merge, "out", commit, "in_files")
        for i, (field, out_name, meta, with_side) in enumerate(outputs):
            sink = pe.Node(
                DerivativesSink(
                    base_directory=str(stage_dir),
                    out_path=f"{run.anat_dir}/{out_name}",
                    metadata=meta,
                ),
                name=f"ds_{node}_{field}",
                # in a worker, not in nipype's main loop: gzip of a 1 mm image takes a
                # second, which would hold back the next processing step
                overwrite=True,  # always write: the output folder may have been cleaned
            )
            wf.connect(qsm_wf, f"outputnode.{field}", sink, "in_file")
            if field == "chi_map":
                wf.connect(qsm_wf, "outputnode.inversion_record", sink, "metadata_file")
            if with_side:
                wf.connect(qsm_wf, "outputnode.side_info", sink, "side_info")
            if field in ("chi_map", "total_field", "local_field"):
                wf.connect(qsm_wf, "outputnode.conventions", sink, "extra_meta")
            wf.connect([(sink, merge, [("out_file", f"in{2 * i + 1}"),
                                       ("out_meta", f"in{2 * i + 2}")])])  # fmt: skip
        if with_reportlet:
            reportlet = _phase_reportlet(wf, qsm_wf, run, stage_dir, outputs, applied)
            n = 2 * len(outputs)
            wf.connect([(reportlet, merge, [("out_file", f"in{n + 1}"),
                                            ("out_json", f"in{n + 2}")])])  # fmt: skip
    return wf


def _phase_reportlet(wf, qsm_wf, run: MEGRERun, stage_dir: Path, outputs, mcpc3ds: bool):
    """The report's figure of the last echo's phase before and after unwrapping, staged in
    ``stage_dir`` like the run's outputs (it lands in ``sub-X/figures/`` with them)."""
    from ..reports.outputs import OUTPUT_SUFFIXES, figure_path
    from ..reports.reportlets import PhaseReportlet

    chi_name = next(out_name for field, out_name, *_ in outputs if field == "chi_map")
    stem = chi_name.removesuffix(f"_{OUTPUT_SUFFIXES['chi_map']}.nii.gz")
    node = pe.Node(
        PhaseReportlet(
            echo_index=-1,
            echo_times=list(run.echo_times),
            offset_removed=mcpc3ds,
            out_file=str(figure_path(stage_dir, run.subject, stem, "phase")),
        ),
        name=f"report_{_node_name(run.prefix)}_phase",
        mem_gb=0.5,
    )
    wf.connect([(qsm_wf, node, [("outputnode.phase", "in_phase"),
                                ("outputnode.unwrapped_last", "unwrapped"),
                                ("outputnode.mask", "mask"),
                                ("outputnode.phase_scaling", "phase_scaling")])])  # fmt: skip
    return node


def check_arlo(run: MEGRERun) -> None:
    """ARLO needs three echoes or more, equally spaced (raise ``ValueError`` otherwise)."""
    from ..qsm.relax import ARLO_SPACING_RTOL

    spacing = np.diff(run.echo_times)
    if len(run.echo_times) < 3 or not np.allclose(spacing, spacing[0], rtol=ARLO_SPACING_RTOL):
        raise ValueError(
            f"{run.prefix}: ARLO needs 3+ equally spaced echoes, the run has echo times "
            f"{list(run.echo_times)}; use --r2star loglinear"
        )


def _relaxometry_outputs(run: MEGRERun, bids_dir: Path, method: str) -> list:
    sources = [bids_uri(f, bids_dir) for f in run.mag_files]
    fit = {
        "loglinear": "weighted least-squares line through log(magnitude) over echo time",
        "arlo": "auto-regression on linear operations (ARLO, Pei et al. 2015)",
    }[method]
    common = {"Sources": sources, "SkullStripped": True, "EchoTime": list(run.echo_times)}
    r2 = {"Description": f"R2* map: {fit}", "Units": "1/s", **common}
    t2 = {"Description": f"T2* map: 1/R2*, clipped; R2* by {fit}", "Units": "s", **common}
    return [
        ("r2star", f"{run.prefix}_R2starmap.nii.gz", r2, False),
        ("t2star", f"{run.prefix}_T2starmap.nii.gz", t2, False),
    ]


def _swi_outputs(run: MEGRERun, bids_dir: Path) -> list:
    from ..qsm import swi as swi_module

    params = {
        k: p.default
        for k, p in inspect.signature(swi_module.swi).parameters.items()
        if p.default is not inspect.Parameter.empty
        and _json_scalar(p.default)
        and k != "unwrapped"  # the pipeline passes the unwrapped total field
    }
    slab = inspect.signature(swi_module.minip).parameters["slab_mm"].default
    sources = [bids_uri(f, bids_dir) for f in run.source_files]
    swi_meta = {
        "Description": "Susceptibility-weighted image: root-sum-of-squares magnitude times "
        "the phase mask of the high-passed phase 2 pi f TE at the last echo time",
        "Units": "arbitrary",
        "Sources": sources,
        "EchoTime": max(run.echo_times),
        "Parameters": params,
    }
    minip_meta = {
        "Description": "Minimum-intensity projection of the SWI over sliding slabs along "
        "the third voxel axis",
        "Units": "arbitrary",
        "Sources": sources,
        "SlabThickness": slab,
    }
    return [
        ("swi", f"{run.prefix}_swi.nii.gz", swi_meta, False),
        ("minip", f"{run.prefix}_minIP.nii.gz", minip_meta, False),
    ]


def _quality_output(run: MEGRERun, bids_dir: Path, unwrapping: str):
    meta = {
        "Description": f"Voxel quality of the {unwrapping} phase unwrapping, in [0, 1]",
        "Units": "arbitrary",
        "Sources": [bids_uri(f, bids_dir) for f in run.source_files],
    }
    return ("quality", f"{run.prefix}_desc-{unwrapping}_quality.nii.gz", meta, False)


def _outputs(run: MEGRERun, bids_dir: Path, b0: float, records: dict, mcpc3ds: bool):
    """(outputnode field, file name, sidecar, add SideInformation) for each output of a run."""
    sources = [bids_uri(f, bids_dir) for f in run.source_files]
    reference = bids_uri(run.mag_files[0], bids_dir)
    common = {"Sources": sources, "SkullStripped": True}
    if run.fieldmap_file is not None:
        field_model: dict[str, Any] = {
            "FieldSource": f"input total field map (Units {run.fieldmap_units})",
            "MagneticFieldStrength": b0,
        }
    else:
        field_model = {"Unwrapping": records["unwrapping"]}
        if mcpc3ds:
            field_model["PhaseOffsetRemoval"] = "MCPC-3D-S"
        combination = (
            "magnitude-weighted least-squares fit of the phase over echo time, with a "
            "phase-offset term"
            if len(run.echo_times) > 1
            else "one echo: phase / (2 pi TE); its phase offset cannot be separated"
        )
        field_model.update(
            EchoCombination=combination,
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
        "Description": "Brain mask in which the susceptibility is valid (the local field "
        "may be defined on less of it: see its own zeros)",
        "Type": "Brain",
        "Sources": sources,
        "SpatialReference": reference,
        "Masking": records["masking"],
        "BackgroundFieldRemoval": records["bf_removal"],
    }
    total_meta = {
        "Description": "Total field: frequency offset of the water signal",
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
    outputs = [
        ("chi_map", f"{p}_Chimap.nii.gz", chi_meta, True),
        ("mask", f"{p}_desc-brain_mask.nii.gz", mask_meta, False),
        ("total_field", f"{p}_totalfield.nii.gz", total_meta, False),
        ("local_field", f"{p}_localfield.nii.gz", local_meta, True),
    ]
    if run.fieldmap_file is None:
        reliability_meta = {
            "Description": "Data weights of the total field in [0, 1]: the noise of the echo "
            "fit relative to its median in the brain mask (capped at 1), and 0 where the field "
            "departs from its neighbourhood's median by more than a third of 1/TE1",
            "Units": "arbitrary",
            "Sources": sources,
        }
        outputs.append(
            ("reliability", f"{p}_desc-field_reliability.nii.gz", reliability_meta, False)
        )
    return outputs
