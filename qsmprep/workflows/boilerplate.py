"""Methods boilerplate: workflows that describe themselves, and the text of each method.

As in niworkflows' ``LiterateWorkflow``, every ``init_*_wf`` factory sets ``__desc__`` on
the workflow it returns: a paragraph saying what the workflow does, with citations as
``[@key]`` (keys of ``qsmprep/data/qsmprep.bib``). :meth:`LiterateWorkflow.visit_desc`
collects the paragraphs of a workflow and of every workflow inside it, in order;
:mod:`qsmprep.reports.boilerplate` turns them into the report's methods section and the
``CITATION`` files. The text says what runs, so it is built from the same arguments as the
workflow.
"""

from __future__ import annotations

from collections.abc import Mapping

from nipype.pipeline import engine as pe

#: How each method of each stage is described (sentence fragments with citations).
#: ``tests/test_boilerplate.py`` checks that every name in the method registries has one.
METHOD_TEXT: Mapping[str, Mapping[str, str]] = {
    "unwrapping": {
        "romeo": "ROMEO, region growing guided by a voxel-quality map [@dymerska2021]",
        "laplacian": "a Laplacian (Poisson) solver [@schofield2003]",
    },
    "masking": {
        "threshold": "thresholding the root-sum-of-squares magnitude at a multiple of its "
        "noise level",
        "quality": "thresholding ROMEO's voxel-quality map with Otsu's method [@otsu1979]",
    },
    "bf_removal": {
        "vsharp": "V-SHARP, spherical mean value filtering with kernels that shrink towards "
        "the mask edge [@li2011vsharp; @wu2012]",
        "pdf": "projection onto dipole fields (PDF) [@liu2011pdf] with outlier rejection "
        "(voxels of 1 mm or less: fitted on 2 mm blocks first)",
        "lbv": "the Laplacian boundary value method (LBV) [@zhou2014lbv]",
        "ismv": "the iterative spherical mean value method (iSMV) [@wen2014ismv]",
    },
    "inversion": {
        "tkd": "thresholded k-space division (TKD) [@shmueli2009; @wharton2010]",
        "rts": "the rapid two-step method (RTS) [@kames2018]",
        "tv": "total-variation regularised inversion solved by ADMM [@bilgic2014]",
        "ilsqr": "iLSQR, LSQR with streaking-artifact estimation [@li2015ilsqr]",
        "adaptive-unet": "an adaptive U-Net [@graf2024; @ronneberger2015] in PyTorch "
        "[@paszke2019]: a 3D U-Net one of whose convolutions has its kernel generated from "
        "the voxel size and the B0 direction of the run, pre-trained by qsmprep on synthetic "
        "field-susceptibility pairs augmented with contrast changes as in QSMInvNet "
        "[@liu2019qsminvnet]",
    },
    "r2star": {
        "loglinear": "a weighted least-squares line through the logarithm of the magnitude "
        "over echo time",
        "arlo": "auto-regression on linear operations (ARLO) [@pei2015]",
    },
    # per-run refinement of a network's output (issue 11); described here so that the
    # option only has to pass its choice to qsm_desc
    "refine": {
        "finetune": "The network was then fine-tuned on each run, its adaptive layer and "
        "encoder frozen, so that the dipole field of its output matched the local field "
        "compared as phase at the mean echo time and weighted by the field's reliability, "
        "with total-variation regularisation, as in QSMInvNet [@liu2019qsminvnet].",
        "dip": "The susceptibility map was then optimised on each run as the output of a "
        "randomly initialised adaptive U-Net fed the TKD estimate (a deep image prior "
        "[@ulyanov2018]), so that its dipole field matched the local field (L1 distance "
        "weighted by the field's reliability, with total-variation regularisation).",
    },
}


class LiterateWorkflow(pe.Workflow):
    """A nipype workflow with a methods description.

    ``__desc__`` and ``__postdesc__`` are paragraphs (markdown-like text with ``[@key]``
    citations) placed before and after the descriptions of the workflows inside it.
    """

    def __init__(self, name: str, base_dir: str | None = None):
        super().__init__(name, base_dir)
        self.__desc__: str | None = None
        self.__postdesc__: str | None = None

    def visit_desc(self) -> str:
        """This workflow's description, then its sub-workflows' (in graph order, each
        distinct paragraph once), then ``__postdesc__``; paragraphs separated by blank lines."""
        parts: list[str] = []
        if self.__desc__:
            parts.append(self.__desc__.strip())
        for node in self._graph.nodes():
            if isinstance(node, LiterateWorkflow):
                inner = node.visit_desc()
                if inner and inner not in parts:
                    parts.append(inner)
        if self.__postdesc__:
            parts.append(self.__postdesc__.strip())
        return "\n\n".join(parts)


def method_text(stage: str, method: str) -> str:
    """The description of ``method`` of ``stage`` (``KeyError`` naming both if missing)."""
    try:
        return METHOD_TEXT[stage][method]
    except KeyError:
        raise KeyError(f"no methods text for {stage} {method!r}") from None


def qsm_desc(
    *,
    unwrapping: str,
    bf_removal: str,
    inversion: str,
    masking: str,
    input_type: str = "phase",
    mcpc3ds: bool = False,
    two_pass: bool = False,
    user_mask: bool = False,
    r2star: str | None = None,
    swi: bool = False,
    refine: str = "none",
) -> str:
    """The ``__desc__`` of :func:`~qsmprep.workflows.qsm.init_qsm_wf` for these arguments."""
    s = []
    if input_type == "fieldmap":
        s.append("Each run started from its total field map (converted to Hz) and its magnitude.")
    else:
        s.append(
            "The magnitude and phase images of each multi-echo gradient-echo run were stacked "
            "over echo time and the phase was scaled to radians (vendor integer ranges were "
            "recognised from the sidecar's Units and the stored range) and given the "
            "right-handed sign convention (GE phase negated)."
        )
    s.append(
        "The voxel size and the direction of B0 in the image axes were computed from the "
        "scanner (qform) affine; all processing stayed on the grid of the input."
    )
    if user_mask:
        mask_text = "The brain mask was provided by the user."
    else:
        mask_text = (
            f"A brain mask was computed by {method_text('masking', masking)}, keeping the "
            "largest connected component, filling holes and eroding it by one voxel."
        )
    quality_mask = masking == "quality" and not user_mask  # made after the unwrapping
    if not quality_mask:
        s.append(mask_text)
    if input_type == "phase":
        if mcpc3ds:
            s.append(
                "The echo-independent phase offset was removed with MCPC-3D-S [@eckstein2018] "
                "(runs with two echoes or more)."
            )
        s.append(
            f"The phase of every echo was unwrapped with {method_text('unwrapping', unwrapping)}."
        )
        if quality_mask:
            s.append(mask_text)
    elif input_type == "unwrapped":
        s.append("The phase was provided unwrapped.")
    if input_type != "fieldmap":
        s.append(
            "The total field (Hz) was estimated by a magnitude-weighted least-squares fit of "
            "the unwrapped phase over echo time, through the origin."
        )
    s.append(
        "The total field was converted to ppm of the Larmor frequency (the scanner's imaging "
        "frequency where the sidecar gives it) and the background field was removed "
        f"with {method_text('bf_removal', bf_removal)}."
    )
    s.append(
        f"Magnetic susceptibility was computed from the local field by "
        f"{method_text('inversion', inversion)}, with the dipole kernel [@marques2005] of "
        "the run's voxel size and B0 direction, and referenced to its mean within the brain "
        "mask."
    )
    if two_pass:
        s.append(
            "Two-pass inversion [@stewart2022] combined an inversion of the reliable voxels "
            "(the mask without hole filling) with an inversion of the filled mask, against "
            "streaks from strong sources and rims."
        )
    if refine != "none":
        s.append(method_text("refine", refine))
    if r2star:
        s.append(
            "R2* and T2* maps were fitted to the magnitude decay by "
            f"{method_text('r2star', r2star)}."
        )
    if swi:
        s.append(
            "Susceptibility-weighted images [@haacke2004] and their minimum-intensity "
            "projections were computed from the magnitude and the total field at the last "
            "echo time."
        )
    return " ".join(s)


def package_version(name: str) -> str:
    """The installed version of package ``name`` (``"unknown"`` if it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def participant_desc() -> str:
    """The ``__desc__`` of the per-participant workflow, with the installed versions."""
    v = {n: package_version(n) for n in ("qsmprep", "nipype", "numpy", "scipy", "numba")}
    return (
        f"Results included in this manuscript come from processing performed using qsmprep "
        f"{v['qsmprep']}, a BIDS App for quantitative susceptibility mapping, built on Nipype "
        f"{v['nipype']} [@gorgolewski2011], NumPy {v['numpy']} [@harris2020], SciPy "
        f"{v['scipy']} [@virtanen2020] and Numba {v['numba']} [@lam2015]."
    )


#: Closing paragraph of the participant boilerplate (reports and figures).
REPORT_POSTDESC = (
    "Quality-control figures were made with Nilearn [@abraham2014] and Matplotlib "
    "[@hunter2007]. The text above was generated automatically by qsmprep from the "
    "workflows that ran, so that it matches the processing; it may be copied into a "
    "manuscript unchanged (CC0 licence)."
)
