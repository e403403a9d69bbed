"""The QSM workflow: multi-echo magnitude and phase in, susceptibility map out."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.qsm import (
    BackgroundRemoval,
    BrainMask,
    DipoleInversion,
    FieldMap,
    PrepareEchoes,
)

#: Memory (GB) of the light nodes (stacking echoes, masking).
LIGHT_MEM_GB = 0.5


#: Unwrapping methods that also give a voxel-quality map in [0, 1].
QUALITY_UNWRAPPING = frozenset({"romeo"})

#: Masking methods that threshold that quality map (they run after the unwrapping).
QUALITY_MASKING = frozenset({"quality"})


def check_methods(unwrapping: str, masking: str) -> None:
    """Raise ``ValueError`` for a combination that cannot run."""
    if masking in QUALITY_MASKING and unwrapping not in QUALITY_UNWRAPPING:
        raise ValueError(
            f"masking {masking!r} thresholds the unwrapping's voxel-quality map: use it with "
            f"unwrapping {' or '.join(sorted(QUALITY_UNWRAPPING))}, not {unwrapping!r}"
        )


def init_qsm_wf(
    *,
    unwrapping: str,
    bf_removal: str,
    inversion: str,
    masking: str,
    mcpc3ds: bool = False,
    device: str = "auto",
    model: str | None = None,
    omp_nthreads: int = 1,
    mem_gb: float = 4.0,
    name: str = "qsm_wf",
) -> pe.Workflow:
    """Build the QSM workflow for one multi-echo GRE run.

    The steps: stack the echoes and scale the phase to radians, compute the side
    information (voxel size, B0 direction in voxel axes) from the affine, mask the
    brain, unwrap the phase and fit the total field over echo time, convert it to ppm
    and remove the background field, invert the dipole kernel, and reference chi to
    its mean in the mask. Everything stays on the input grid.

    Parameters
    ----------
    unwrapping : str
        A name in ``qsmprep.qsm.unwrap.METHODS``.
    bf_removal : str
        A name in ``qsmprep.qsm.bgremove.METHODS``.
    inversion : str
        A name in ``qsmprep.qsm.inversion.METHODS``, or ``"adaptive-unet"``.
    masking : str
        A name in ``qsmprep.qsm.masking.METHODS``; ``quality`` thresholds the voxel
        quality map of ``romeo`` and runs after the unwrapping.
    mcpc3ds : bool
        Remove the echo-independent phase offset (MCPC-3D-S) before unwrapping; the echo
        fit then goes through the origin. Without it, the fit has a phase-offset term
        (with two echoes or more).
    device, model : str
        ``adaptive-unet`` only: ``auto``/``cpu``/``cuda`` and a weights file
        (``None``: the bundled model).
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
    """
    check_methods(unwrapping, masking)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=["mag_files", "phase_files", "echo_times", "field_strength", "phase_units"]
        ),
        name="inputnode",
    )
    inputnode.inputs.phase_units = None
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["chi_map", "mask", "total_field", "local_field", "side_info"]
        ),
        name="outputnode",
    )
    prep = pe.Node(PrepareEchoes(), name="prepare_echoes", mem_gb=LIGHT_MEM_GB)
    brainmask = pe.Node(BrainMask(method=masking), name="brain_mask", mem_gb=LIGHT_MEM_GB)
    fieldmap = pe.Node(
        FieldMap(
            method=unwrapping, mcpc3ds=mcpc3ds, fit_offset=not mcpc3ds, omp_nthreads=omp_nthreads
        ),
        name="field_map",
        n_procs=omp_nthreads,
        mem_gb=mem_gb,
    )
    bgremove = pe.Node(
        BackgroundRemoval(method=bf_removal, omp_nthreads=omp_nthreads),
        name="background_removal",
        n_procs=omp_nthreads,
        mem_gb=mem_gb,
    )
    invert = pe.Node(
        DipoleInversion(method=inversion, omp_nthreads=omp_nthreads, device=device, mem_gb=mem_gb),
        name="dipole_inversion",
        n_procs=omp_nthreads,
        mem_gb=mem_gb,
    )
    if model is not None:
        invert.inputs.model = str(model)

    # fmt: off
    wf.connect([
        (inputnode, prep, [("mag_files", "mag_files"),
                           ("phase_files", "phase_files"),
                           ("echo_times", "echo_times"),
                           ("phase_units", "phase_units")]),
        (inputnode, fieldmap, [("echo_times", "echo_times")]),
        (prep, brainmask, [("out_mag", "in_mag")]),
        (prep, fieldmap, [("out_mag", "in_mag"),
                          ("out_phase", "in_phase"),
                          ("side_info", "side_info")]),
        (fieldmap, bgremove, [("total_field", "total_field")]),
        (brainmask, bgremove, [("out_mask", "mask")]),
        (prep, bgremove, [("side_info", "side_info")]),
        (inputnode, bgremove, [("field_strength", "field_strength")]),
        (bgremove, invert, [("local_field", "local_field"),
                            ("out_mask", "mask")]),
        (prep, invert, [("side_info", "side_info")]),
        (invert, outputnode, [("chi_map", "chi_map")]),
        (bgremove, outputnode, [("out_mask", "mask"),
                                ("local_field", "local_field")]),
        (fieldmap, outputnode, [("total_field", "total_field")]),
        (prep, outputnode, [("side_info", "side_info")]),
    ])
    if masking in QUALITY_MASKING:
        wf.connect([(fieldmap, brainmask, [("quality", "quality")])])
    else:
        wf.connect([(brainmask, fieldmap, [("out_mask", "mask")])])
    # fmt: on
    return wf
