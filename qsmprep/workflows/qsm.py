"""The QSM workflow: multi-echo magnitude and phase in, susceptibility map out."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.qsm import (
    SWI,
    BackgroundRemoval,
    BrainMask,
    DipoleInversion,
    FieldMap,
    FieldReliability,
    FillField,
    PrepareEchoes,
    PrepareFieldMap,
    Relaxometry,
    UserMask,
)
from .boilerplate import LiterateWorkflow, qsm_desc

#: Default algorithm of each stage, the one place where they are set (the CLI and
#: :mod:`qsmprep.config` take them from here). Chosen by ``benchmarks/bench_external.py``
#: on heads simulated with qsm-forward (axial, oblique, 2x2x3 mm oblique, 7 T;
#: docs/benchmarks.md): ROMEO after MCPC-3D-S, the brain mask from ROMEO's voxel quality
#: (it keeps 96-98 % of the brain), PDF (with outlier rejection) and TV, both with the
#: field's reliability as data weights, gave the lowest worst-case NRMSE from the raw
#: phase over those heads and qsmprep's own phantom.
DEFAULT_METHODS: Mapping[str, str] = MappingProxyType(
    {
        "unwrapping": "romeo",
        "masking": "auto",  # quality with ROMEO on wrapped phase, else threshold
        "bf_removal": "pdf",
        "inversion": "tv",
    }
)
#: Masking choice that picks ``quality`` when the unwrapping makes a voxel-quality map.
AUTO_MASKING = "auto"

#: Default processing options besides the algorithms (also set only here).
DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "input_type": "phase",  # wrapped phase per echo
        "mcpc3ds": True,  # phase-offset removal (MCPC-3D-S) before unwrapping
        "two_pass": False,  # two-pass masking/inversion
        "r2star": "off",  # R2*/T2* maps: "off", "loglinear" or "arlo"
        "swi": False,  # SWI and minIP
        "refine": "none",  # adaptive-unet: per-subject refinement (none, finetune, dip)
    }
)

#: Memory (GB) of the light nodes (stacking echoes, masking).
LIGHT_MEM_GB = 0.5

#: What the phase inputs hold: wrapped phase, pre-unwrapped phase (rad), or a total
#: field map (Hz) with its magnitude.
INPUT_TYPES = ("phase", "unwrapped", "fieldmap")

#: Unwrapping methods that also give a voxel-quality map in [0, 1].
QUALITY_UNWRAPPING = frozenset({"romeo"})

#: Masking methods that threshold that quality map (they run after the unwrapping).
QUALITY_MASKING = frozenset({"quality"})

#: Inversions that the two-pass scheme cannot wrap (not in qsmprep.qsm.inversion).
NO_TWO_PASS = frozenset({"adaptive-unet"})

#: Per-subject refinements of the adaptive U-Net (qsmprep.nn.refine.REFINE_METHODS).
REFINE_METHODS = ("none", "finetune", "dip")


def resolve_masking(masking: str, unwrapping: str, input_type: str = "phase") -> str:
    """``auto`` becomes ``quality`` when ``unwrapping`` gives a voxel-quality map (wrapped
    phase in), else ``threshold``; any other name is returned as it is."""
    if masking != AUTO_MASKING:
        return masking
    quality = input_type == "phase" and unwrapping in QUALITY_UNWRAPPING
    return "quality" if quality else "threshold"


def check_methods(
    unwrapping: str,
    masking: str,
    *,
    inversion: str | None = None,
    input_type: str = "phase",
    two_pass: bool = False,
    user_mask: bool = False,
    r2star: str | None = None,
    swi: bool = False,
    refine: str = "none",
) -> None:
    """Raise ``ValueError`` with a one-line reason for a combination that cannot run."""
    if refine not in REFINE_METHODS:
        raise ValueError(f"refine must be one of {', '.join(REFINE_METHODS)}, not {refine!r}")
    if refine != "none" and inversion != "adaptive-unet":
        raise ValueError(f"refine {refine!r} refines the adaptive U-Net: use it with inversion "
                         "adaptive-unet")  # fmt: skip
    if input_type == "fieldmap" and (r2star or swi):
        raise ValueError("R2*/T2* and SWI need the echoes: not available from a field map")
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input type must be one of {', '.join(INPUT_TYPES)}, not {input_type!r}")
    unwraps = input_type == "phase"
    if masking in QUALITY_MASKING and not user_mask:
        if not unwraps or unwrapping not in QUALITY_UNWRAPPING:
            raise ValueError(
                f"masking {masking!r} thresholds the unwrapping's voxel-quality map: use it "
                f"with unwrapping {' or '.join(sorted(QUALITY_UNWRAPPING))} on wrapped phase"
            )
    if two_pass and inversion in NO_TWO_PASS:
        raise ValueError(f"two-pass inversion is not available with {inversion}")
    if two_pass and user_mask:
        raise ValueError("two-pass inversion derives its masks itself: drop the user mask")


def init_qsm_wf(
    *,
    unwrapping: str = DEFAULT_METHODS["unwrapping"],
    bf_removal: str = DEFAULT_METHODS["bf_removal"],
    inversion: str = DEFAULT_METHODS["inversion"],
    masking: str = DEFAULT_METHODS["masking"],
    input_type: str = DEFAULT_OPTIONS["input_type"],
    mcpc3ds: bool = DEFAULT_OPTIONS["mcpc3ds"],
    two_pass: bool = DEFAULT_OPTIONS["two_pass"],
    user_mask: bool = False,
    r2star: str | None = None,
    swi: bool = False,
    device: str = "auto",
    model: str | None = None,
    refine: str = DEFAULT_OPTIONS["refine"],
    refine_steps: int | None = None,
    omp_nthreads: int = 1,
    mem_gb: float = 4.0,
    name: str = "qsm_wf",
) -> pe.Workflow:
    """Build the QSM workflow for one multi-echo GRE run; with no arguments, the
    recommended pipeline (:data:`DEFAULT_METHODS`, :data:`DEFAULT_OPTIONS`).

    The steps: stack the echoes and scale the phase to radians, compute the side
    information (voxel size, B0 direction in voxel axes) from the affine, mask the
    brain, unwrap the phase and fit the total field over echo time, convert it to ppm
    and remove the background field, invert the dipole kernel, and reference chi to
    its mean in the mask. Everything stays on the input grid.

    Parameters
    ----------
    unwrapping : str
        A name in ``qsmprep.qsm.unwrap.METHODS`` (unused unless ``input_type="phase"``).
    bf_removal : str
        A name in ``qsmprep.qsm.bgremove.METHODS``.
    inversion : str
        A name in ``qsmprep.qsm.inversion.METHODS``, or ``"adaptive-unet"``.
    masking : str
        A name in ``qsmprep.qsm.masking.METHODS``, or ``auto`` (:func:`resolve_masking`);
        ``quality`` thresholds the voxel quality map of ``romeo`` and runs after the
        unwrapping.
    input_type : str
        ``"phase"`` (wrapped phase per echo), ``"unwrapped"`` (unwrapped phase per echo,
        rad: the unwrapping is skipped) or ``"fieldmap"`` (``fieldmap_file``, a total
        field in Hz, with ``mag_files``: unwrapping and echo fit are skipped).
    mcpc3ds : bool
        Remove the echo-independent phase offset (MCPC-3D-S) before unwrapping (wrapped
        phase with two echoes or more; otherwise it does nothing).
    two_pass : bool
        Two-pass inversion: a second mask without hole filling (the reliable voxels) is
        inverted first, the filled mask second, and the two are combined.
    user_mask : bool
        Take the mask from ``inputnode.mask_file`` instead of computing it.
    r2star : str or None
        Also fit R2* and T2* in the brain mask: ``"loglinear"`` or ``"arlo"`` (ARLO needs
        three equally spaced echoes or more); ``None``: no relaxometry. Needs two echoes.
    swi : bool
        Also compute the susceptibility-weighted image and its minimum-intensity
        projection (from the total field at the last echo time).
    device, model : str
        ``adaptive-unet`` only: ``auto``/``cpu``/``cuda`` and a weights file
        (``None``: the bundled model).
    refine : str
        ``adaptive-unet`` only: ``"none"``, ``"finetune"`` (fine-tune the model on this
        run's field, QSMInvNet's loss) or ``"dip"`` (Deep Image Prior: a randomly
        initialised adaptive U-Net fitted to the field); see :mod:`qsmprep.nn.refine`.
        The field's reliability weighs the data term, as for TV.
    refine_steps : int or None
        Largest number of refinement steps (``None``: the method's default).
    omp_nthreads : int
        Threads of each numerical node (scipy.fft workers, numba, torch).
    mem_gb : float
        Peak memory (GB) expected of the heavy nodes, for nipype's scheduler.
    name : str
        Name of the workflow.

    Inputs
    ------
    mag_files : list of str
        Magnitude images, ordered by echo.
    phase_files : list of str
        Phase images, ordered by echo (radians or an integer vendor range).
    echo_times : list of float
        Echo times (s).
    field_strength : float
        B0 (T).
    phase_units : str, optional
        The phase sidecar's ``Units`` (``"rad"``, ``"arbitrary"``), if known.
    phase_sign : int, optional
        +1 (default) or -1: the factor applied to the phase (-1 for GE's left-handed phase).
    phase_scale : float, optional
        Radians per stored unit of the phase, when it is neither radians nor a known
        integer range (default: detected).
    mask_file : str
        ``user_mask`` only: the mask (non-zero inside), on the run's grid.
    fieldmap_file : str
        ``input_type="fieldmap"`` only: the total field map.
    fieldmap_units : str
        ``input_type="fieldmap"`` only: ``"Hz"`` (default) or ``"rad/s"``.

    Outputs
    -------
    chi_map : str
        Susceptibility (ppm), referenced to its mean in ``mask``, zero outside.
    mask : str
        The mask in which the local field and chi are valid.
    total_field : str
        Total field (Hz).
    local_field : str
        Local field (ppm).
    side_info : str
        JSON with ``VoxelSize`` (mm) and ``B0Direction`` (unit vector, voxel axes).
    conventions : str
        JSON of how the inputs were read: ``PhaseScaling``, ``PhaseSign`` (phase inputs),
        ``NonFiniteVoxels`` (NaN/Inf in the inputs: the field there is interpolated, and
        they are left out of the reliable mask), ``B0DirectionSource``.
    quality : str
        Voxel quality of the unwrapping in [0, 1] (``romeo`` only; otherwise undefined).
    r2star, t2star : str
        R2* (1/s) and T2* (s), with ``r2star``.
    swi, minip : str
        SWI and its minIP (the magnitude's scale), with ``swi``.
    phase, unwrapped_last, phase_scaling : str
        For the report (not with ``input_type="fieldmap"``): the phase as read (rad,
        ``(X, Y, Z, E)``, after ``phase_sign`` and the NaN/Inf filling), the unwrapped phase
        of the last echo, and how the stored phase was scaled to radians.
    reliability : str
        Data weights of the total field in [0, 1] (not with ``input_type="fieldmap"``).
    inversion_record : str
        JSON to merge into the chi map's sidecar (the refinement's record; ``{}`` without).
    """
    masking = resolve_masking(masking, unwrapping, input_type)
    check_methods(
        unwrapping,
        masking,
        inversion=inversion,
        input_type=input_type,
        two_pass=two_pass,
        user_mask=user_mask,
        r2star=r2star,
        swi=swi,
        refine=refine,
    )
    wf = LiterateWorkflow(name=name)
    wf.__desc__ = qsm_desc(
        unwrapping=unwrapping,
        bf_removal=bf_removal,
        inversion=inversion,
        masking=masking,
        input_type=input_type,
        mcpc3ds=mcpc3ds,
        two_pass=two_pass,
        user_mask=user_mask,
        r2star=r2star,
        swi=swi,
        refine=refine,
    )
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "mag_files",
                "phase_files",
                "echo_times",
                "field_strength",
                "phase_units",
                "phase_sign",
                "phase_scale",
                "mask_file",
                "fieldmap_file",
                "fieldmap_units",
            ]
        ),
        name="inputnode",
    )
    inputnode.inputs.phase_units = None
    inputnode.inputs.phase_sign = 1
    inputnode.inputs.phase_scale = None
    inputnode.inputs.fieldmap_units = "Hz"
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "chi_map",
                "mask",
                "total_field",
                "local_field",
                "side_info",
                "conventions",
                "quality",
                "r2star",
                "t2star",
                "swi",
                "minip",
                "phase",
                "unwrapped_last",
                "phase_scaling",
                "reliability",
                "inversion_record",
            ]
        ),
        name="outputnode",
    )
    heavy = {"n_procs": omp_nthreads, "mem_gb": mem_gb}
    bgremove = pe.Node(
        BackgroundRemoval(method=bf_removal, omp_nthreads=omp_nthreads),
        name="background_removal",
        **heavy,
    )
    invert = pe.Node(
        DipoleInversion(method=inversion, omp_nthreads=omp_nthreads, device=device, mem_gb=mem_gb),
        name="dipole_inversion",
        **heavy,
    )
    if model is not None:
        invert.inputs.model = str(model)
    if refine != "none":
        invert.inputs.refine = refine
        if refine_steps is not None:
            invert.inputs.refine_steps = int(refine_steps)
        # the reference echo time and field of the phase loss; the magnitude as a fallback
        # data weight where there is no reliability map
        wf.connect([(inputnode, invert, [("echo_times", "echo_times"),
                                         ("field_strength", "field_strength")])])  # fmt: skip

    # Inputs -> magnitude, side information and total field (Hz)
    if input_type == "fieldmap":
        prep = pe.Node(PrepareFieldMap(), name="prepare_fieldmap", mem_gb=LIGHT_MEM_GB)
        # fmt: off
        wf.connect([
            (inputnode, prep, [("mag_files", "mag_files"),
                               ("fieldmap_file", "fieldmap"),
                               ("fieldmap_units", "units")]),
            (prep, bgremove, [("total_field", "total_field")]),
            (prep, outputnode, [("total_field", "total_field"),
                                ("conventions", "conventions")]),
        ])
        # fmt: on
        fieldmap = None
    else:
        prep = pe.Node(
            PrepareEchoes(wrapped=input_type == "phase", omp_nthreads=omp_nthreads),
            name="prepare_echoes",
            n_procs=omp_nthreads,
            mem_gb=LIGHT_MEM_GB,
        )
        fieldmap = pe.Node(
            FieldMap(
                method=unwrapping if input_type == "phase" else None,
                mcpc3ds=mcpc3ds and input_type == "phase",
                omp_nthreads=omp_nthreads,
            ),
            name="field_map",
            **heavy,
        )
        # where the inputs were NaN/Inf, the field of the neighbours (a no-op otherwise)
        fill = pe.Node(FillField(), name="fill_field", mem_gb=LIGHT_MEM_GB)
        # fmt: off
        wf.connect([
            (inputnode, prep, [("mag_files", "mag_files"),
                               ("phase_files", "phase_files"),
                               ("echo_times", "echo_times"),
                               ("phase_units", "phase_units"),
                               ("phase_sign", "phase_sign"),
                               ("phase_scale", "phase_scale")]),
            (prep, outputnode, [("conventions", "conventions"),
                                ("out_phase", "phase"),
                                ("phase_scaling", "phase_scaling")]),
            (inputnode, fieldmap, [("echo_times", "echo_times")]),
            (prep, fieldmap, [("out_mag", "in_mag"),
                              ("out_phase", "in_phase"),
                              ("side_info", "side_info")]),
            (fieldmap, fill, [("total_field", "total_field")]),
            (prep, fill, [("out_valid", "valid")]),
            (fill, bgremove, [("total_field", "total_field")]),
            (fill, outputnode, [("total_field", "total_field")]),
            (fieldmap, outputnode, [("quality", "quality"),
                                    ("unwrapped_last", "unwrapped_last")]),
        ])
        # fmt: on

    # Mask: the user's, or from the magnitude, or from the unwrapping's quality map
    if user_mask:
        brainmask = pe.Node(UserMask(), name="user_mask", mem_gb=LIGHT_MEM_GB)
        wf.connect([(inputnode, brainmask, [("mask_file", "in_mask")]),
                    (prep, brainmask, [("out_mag", "reference")])])  # fmt: skip
    else:
        brainmask = pe.Node(BrainMask(method=masking), name="brain_mask", mem_gb=LIGHT_MEM_GB)
        wf.connect([(prep, brainmask, [("out_mag", "in_mag")])])
    uses_quality = masking in QUALITY_MASKING and not user_mask
    if uses_quality:
        wf.connect([(fieldmap, brainmask, [("quality", "quality")])])
    elif fieldmap is not None:
        wf.connect([(brainmask, fieldmap, [("out_mask", "mask")])])
    if two_pass:
        reliable = pe.Node(
            BrainMask(method=masking, params={"fill_holes": False}),
            name="reliable_mask",
            mem_gb=LIGHT_MEM_GB,
        )
        wf.connect([(prep, reliable, [("out_mag", "in_mag"), ("out_valid", "valid")]),
                    (reliable, invert, [("out_mask", "reliable_mask")])])  # fmt: skip
        if uses_quality:
            wf.connect([(fieldmap, reliable, [("quality", "quality")])])

    if fieldmap is not None:
        # data weights of the total field: noise of the echo fit, outliers, NaN/Inf inputs
        reliability = pe.Node(FieldReliability(), name="field_reliability", mem_gb=LIGHT_MEM_GB)
        # fmt: off
        wf.connect([
            (fill, reliability, [("total_field", "total_field")]),
            (prep, reliability, [("out_mag", "in_mag"), ("side_info", "side_info"),
                                 ("out_valid", "valid")]),
            (inputnode, reliability, [("echo_times", "echo_times")]),
            (brainmask, reliability, [("out_mask", "mask")]),
            (reliability, bgremove, [("reliability", "weight"), ("out_mask", "mask")]),
            (reliability, invert, [("reliability", "weight"), ("out_mask", "brain_mask")]),
            (reliability, outputnode, [("reliability", "reliability")]),
        ])
        # fmt: on
    else:
        wf.connect([(brainmask, bgremove, [("out_mask", "mask")]),
                    (brainmask, invert, [("out_mask", "brain_mask")])])  # fmt: skip
        if refine != "none":
            wf.connect([(prep, invert, [("out_mag", "magnitude")])])

    if r2star:
        relax = pe.Node(Relaxometry(method=r2star), name="relaxometry", mem_gb=LIGHT_MEM_GB)
        # fmt: off
        wf.connect([
            (prep, relax, [("out_mag", "in_mag")]),
            (inputnode, relax, [("echo_times", "echo_times")]),
            (brainmask, relax, [("out_mask", "mask")]),
            (relax, outputnode, [("r2star", "r2star"), ("t2star", "t2star")]),
        ])
        # fmt: on
    if swi:
        swi_node = pe.Node(SWI(), name="swi", mem_gb=LIGHT_MEM_GB)
        # fmt: off
        wf.connect([
            (prep, swi_node, [("out_mag", "in_mag"), ("side_info", "side_info")]),
            (fill, swi_node, [("total_field", "total_field")]),
            (inputnode, swi_node, [("echo_times", "echo_times")]),
            (brainmask, swi_node, [("out_mask", "mask")]),
            (swi_node, outputnode, [("swi", "swi"), ("minip", "minip")]),
        ])
        # fmt: on

    # fmt: off
    wf.connect([
        (prep, bgremove, [("side_info", "side_info")]),
        (inputnode, bgremove, [("field_strength", "field_strength")]),
        (bgremove, invert, [("local_field", "local_field"),
                            ("out_mask", "mask")]),
        (prep, invert, [("side_info", "side_info")]),
        (invert, outputnode, [("chi_map", "chi_map"),
                              ("out_mask", "mask"),
                              ("record", "inversion_record")]),
        (bgremove, outputnode, [("local_field", "local_field")]),
        (prep, outputnode, [("side_info", "side_info")]),
    ])
    # fmt: on
    return wf
