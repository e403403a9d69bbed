"""The group report: ``OUTPUT_DIR/group/group.html`` with its figures in ``group/figures/``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

from .. import __version__
from . import figures
from .outputs import RunOutputs
from .qc import QC_COLUMNS


def group_desc(registration: str, rois: bool) -> str:
    """The group level's methods text (``[@key]`` citations)."""
    from ..workflows.boilerplate import package_version

    text = (
        "Quality-control numbers of every run were gathered in a table and runs whose numbers "
        "are outliers of the group (robust z-score above 3, from the median and the median "
        "absolute deviation) were marked."
    )
    if rois:
        how = (
            "an affine registration maximising Mattes mutual information [@mattes2003]"
            if registration == "affine"
            else "an affine registration maximising Mattes mutual information "
            "[@mattes2003] followed by symmetric diffeomorphic registration (SyN) with the "
            "cross-correlation metric [@avants2008]"
        )
        text += (
            " The first-echo magnitude of each run, inside its brain mask, was registered to "
            "the skull-stripped MNI152NLin2009cAsym template [@fonov2009; @fonov2011] from "
            f"TemplateFlow [@ciric2022] with DIPY {package_version('dipy')} "
            f"[@garyfallidis2014], by {how}. The deep grey matter labels (thalamus, caudate, "
            "putamen and pallidum of each hemisphere) of the Harvard-Oxford subcortical atlas "
            "[@desikan2006; @frazier2005; @makris2006; @goldstein2007], thresholded at 25 %, "
            "were brought to each run's grid with the inverse transform (nearest neighbour), "
            "and the mean, median and standard deviation of chi were computed in each region "
            "within the brain mask."
        )
    return text


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_group_report(
    output_dir: Path,
    runs: Sequence[RunOutputs],
    result,
    *,
    registration: str,
    rois: bool,
) -> Path:
    """Write ``group/group.html`` (and its figures) from the group level's ``result``
    (:class:`qsmprep.group.level.GroupResult`); return its path."""
    from ..group.level import OUTLIER_Z, group_dir
    from ..group.templates import ATLAS_DESCRIPTION, DEEP_GREY_LABELS, TEMPLATE
    from ..interfaces._io import atomic_write_bytes
    from .boilerplate import render, write_citation_files
    from .participant import environment

    out = group_dir(output_dir)
    values = {}
    for run in runs:
        chi = np.asarray(nb.load(run.path("chi_map")).dataobj, dtype=np.float32)
        mask = np.asarray(nb.load(run.path("mask")).dataobj) > 0
        values[run.stem] = chi[mask]
    hist = figures.plot_histograms(values, out / "figures" / "desc-histograms_qc.png")
    qc_rows = []
    for row in result.qc_rows:
        qc_rows.append(
            {
                "run": row["run"],
                "subject": row["participant_id"].removeprefix("sub-"),
                "cells": {c: _fmt(row[c]) for c in QC_COLUMNS},
                "z": {c: f"{row['z'][c]:+.1f}" for c in QC_COLUMNS},
                "flags": row["flags"],
                "outliers": row["outliers"],
            }
        )
    roi_names = list(DEEP_GREY_LABELS.values())
    by_run: dict[str, dict] = {}
    for row in result.roi_rows:
        by_run.setdefault(row["run"], {})[row["roi"]] = _fmt(row["chi_mean_ppm"])
    roi_table = [{"run": k, "means": v} for k, v in by_run.items()]
    roi_figures = []
    for run in runs:
        path = out / "figures" / f"{run.stem}_desc-rois_qc.png"
        if path.is_file():
            roi_figures.append(
                {
                    "src": path.relative_to(out).as_posix(),
                    "alt": f"{run.stem} ROIs",
                    "caption": f"{run.stem}: deep grey ROIs (red outlines) on chi, axial cuts.",
                }
            )
    text = group_desc(registration, rois)
    write_citation_files(text, out)
    tables = [p.relative_to(output_dir).as_posix() for p in result.files]
    page = (
        environment()
        .get_template("group.html")
        .render(
            qc_rows=qc_rows,
            columns=QC_COLUMNS,
            n_flagged=sum(bool(r["flags"]) for r in qc_rows),
            n_outliers=sum(bool(r["outliers"]) for r in qc_rows),
            outlier_z=OUTLIER_Z,
            tables=tables,
            histogram=hist.relative_to(out).as_posix(),
            roi_names=roi_names,
            roi_table=roi_table,
            roi_figures=roi_figures,
            atlas=ATLAS_DESCRIPTION,
            template=TEMPLATE,
            registration=registration,
            errors=result.errors,
            methods=render(text).html,
            version=__version__,
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
    )
    path = out / "group.html"
    atomic_write_bytes(page.encode(), path)
    return path
