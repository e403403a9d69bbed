"""The group level: QC table, deep grey ROI statistics in template space, group report.

``qsmprep BIDS_DIR OUTPUT_DIR group`` reads every run's outputs in OUTPUT_DIR (made by the
participant level) and writes

- ``group/group_qc.tsv``: one row per run with its QC numbers
  (:mod:`qsmprep.reports.qc`), the rules it breaks and the QC numbers that are outliers
  of the group (robust z above :data:`OUTLIER_Z`);
- per run, ``<run>_seg-HOSPA_rois.tsv`` beside its Chimap: chi mean, median and std in
  each deep grey ROI of the atlas, brought to the run's grid through the registration
  of the run's magnitude to MNI152NLin2009cAsym (:mod:`qsmprep.group.registration`);
- ``group/group_rois.tsv``: those rows for every run;
- optionally ``<run>_space-MNI152NLin2009cAsym_Chimap.nii.gz`` (chi on the template grid);
- ``group/group.html`` with its figures in ``group/figures/``.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

from ..reports.outputs import RunOutputs, add_entity, find_runs
from ..reports.qc import QC_COLUMNS, robust_z, run_qc
from .templates import ATLAS, DEEP_GREY_LABELS, TEMPLATE, TemplateError, template_files

logger = logging.getLogger("qsmprep")

#: A QC number whose robust z-score exceeds this (in absolute value) is a group outlier.
OUTLIER_Z = 3.0

#: Columns of ``group_rois.tsv`` (and, without the first three, of each run's ROI table).
ROI_COLUMNS = (
    "participant_id",
    "session_id",
    "run",
    "roi",
    "label",
    "n_voxels",
    "volume_ml",
    "chi_mean_ppm",
    "chi_median_ppm",
    "chi_std_ppm",
)

#: Columns of ``group_qc.tsv``.
QC_TABLE_COLUMNS = ("participant_id", "session_id", "run", *QC_COLUMNS, "flags", "outliers")


@dataclass
class GroupResult:
    """What the group level wrote, and the problems it met (one line each)."""

    qc_rows: list[dict] = field(default_factory=list)
    roi_rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def group_dir(output_dir: Path) -> Path:
    """``OUTPUT_DIR/group``."""
    return Path(output_dir) / "group"


def roi_table_path(run: RunOutputs) -> Path:
    """The run's ROI table: ``<run>_seg-<atlas>_rois.tsv`` beside its Chimap."""
    return run.anat_dir / f"{add_entity(run.stem, 'seg', ATLAS)}_rois.tsv"


def template_chimap_path(run: RunOutputs) -> Path:
    """The run's Chimap on the template grid: ``space-`` among the run's entities in BIDS
    order (before ``recording-`` and ``chunk-``)."""
    return run.anat_dir / f"{add_entity(run.stem, 'space', TEMPLATE)}_Chimap.nii.gz"


def write_tsv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path:
    """Write ``rows`` as a tab-separated table (``n/a`` for missing values) atomically."""
    from ..interfaces._io import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    atomic_write_bytes(buf.getvalue().encode(), Path(path))
    return Path(path)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else ""
    return str(value)


def qc_table(runs: Sequence[RunOutputs]) -> tuple[list[dict], list[str]]:
    """QC rows of ``runs`` with their flags and group outliers; and error lines."""
    rows, errors = [], []
    for run in runs:
        try:
            qc = run_qc(run)
        except Exception as e:
            errors.append(f"{run.stem}: QC failed: {type(e).__name__}: {e}")
            continue
        row = {"participant_id": f"sub-{run.subject}", "session_id": run.session, "run": run.stem}
        row.update({c: qc[c] for c in QC_COLUMNS}, flags=qc["flagged"])
        rows.append(row)
    z = {c: robust_z(np.array([_num(r[c]) for r in rows])) for c in QC_COLUMNS}
    for i, row in enumerate(rows):
        row["outliers"] = [
            c for c in QC_COLUMNS if np.isfinite(z[c][i]) and abs(z[c][i]) > OUTLIER_Z
        ]
        row["z"] = {c: float(z[c][i]) for c in QC_COLUMNS}
    return rows, errors


def _num(value) -> float:
    return float(value) if value is not None else float("nan")


def roi_stats(
    chi: np.ndarray, mask: np.ndarray, labels: np.ndarray, voxel_ml: float
) -> list[dict]:
    """Chi statistics (ppm) of each deep grey ROI (:data:`DEEP_GREY_LABELS`) in ``labels``
    (on chi's grid), inside ``mask``; ROIs with no voxel get ``None`` statistics."""
    rows = []
    for value, name in DEEP_GREY_LABELS.items():
        v = chi[(labels == value) & mask].astype(np.float64)
        rows.append(
            {
                "roi": name,
                "label": value,
                "n_voxels": int(v.size),
                "volume_ml": float(v.size * voxel_ml),
                "chi_mean_ppm": float(v.mean()) if v.size else None,
                "chi_median_ppm": float(np.median(v)) if v.size else None,
                "chi_std_ppm": float(v.std()) if v.size else None,
            }
        )
    return rows


@dataclass
class Template:
    """The registration target (skull-stripped T1w), its grid, and the atlas."""

    t1w: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    atlas: np.ndarray
    atlas_affine: np.ndarray

    @classmethod
    def load(cls, home: Path | None = None) -> Template:
        files = template_files(home)
        t1_img = nb.load(files["T1w"])
        atlas_img = nb.load(files["atlas"])
        return cls(
            np.asarray(t1_img.dataobj, dtype=np.float32),
            np.asarray(nb.load(files["mask"]).dataobj) > 0,
            t1_img.affine,
            np.asarray(atlas_img.dataobj).astype(np.int32),
            atlas_img.affine,
        )

    def registration_grid(self, voxel_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """T1w, brain mask and affine block-averaged by the largest integer factor whose
        voxels stay within ``voxel_mm`` (a coarse run registers as well, and much faster,
        on a grid like its own)."""
        size = float(np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)).max())
        k = max(1, int(np.floor(voxel_mm / size + 1e-6)))
        if k == 1:
            return self.t1w, self.mask, self.affine
        shape = tuple(n // k for n in self.t1w.shape)
        crop = tuple(slice(0, n * k) for n in shape)

        def blocks(x):
            x = x[crop].reshape(shape[0], k, shape[1], k, shape[2], k)
            return x.mean(axis=(1, 3, 5))

        affine = self.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.full(3, (k - 1) / 2)
        affine[:3, :3] *= k
        return blocks(self.t1w), blocks(self.mask.astype(np.float32)) > 0.5, affine


def run_rois(
    run: RunOutputs,
    template: Template,
    *,
    registration: str = "affine",
    template_chimap: bool = False,
    figure: Path | None = None,
) -> list[dict]:
    """Register ``run`` to the template, bring the atlas to the run's grid and return the
    ROI rows; write the run's ROI table (and optionally its template-space Chimap and an
    ROI figure)."""
    from ..interfaces._io import atomic_write_json
    from ..reports import figures
    from .registration import register, sample_labels

    mag_path = run.magnitude()
    if mag_path is None:
        raise FileNotFoundError("the input magnitude (mask sidecar's SpatialReference) is gone")
    mag_img = nb.load(mag_path)
    chi_img = nb.load(run.path("chi_map"))
    chi = np.asarray(chi_img.dataobj, dtype=np.float32)
    mask = np.asarray(nb.load(run.path("mask")).dataobj) > 0
    t0 = time.perf_counter()
    voxel_mm = float(np.sqrt((chi_img.affine[:3, :3] ** 2).sum(axis=0)).min())
    t1w, t1w_mask, t1w_affine = template.registration_grid(voxel_mm)
    reg = register(
        np.asarray(mag_img.dataobj, dtype=np.float32), chi_img.affine, t1w, t1w_affine,
        moving_mask=mask, static_mask=t1w_mask, method=registration,
    )  # fmt: skip
    logger.info("%s: %s registration to %s in %.0f s", run.stem, registration, TEMPLATE,
                time.perf_counter() - t0)  # fmt: skip
    coords, valid = reg.template_coordinates()
    labels = sample_labels(template.atlas, template.atlas_affine, coords, valid)
    voxel_ml = float(abs(np.linalg.det(chi_img.affine[:3, :3]))) / 1000.0
    rows = roi_stats(chi, mask, labels, voxel_ml)
    for row in rows:
        row.update(participant_id=f"sub-{run.subject}", session_id=run.session, run=run.stem)
    write_tsv(rows, ROI_COLUMNS[3:], roi_table_path(run))
    if template_chimap:
        warped = reg.to_template(np.where(mask, chi, 0))
        inside = reg.to_template(mask.astype(np.float32)) > 0.5
        img = nb.Nifti1Image(np.where(inside, warped, 0).astype(np.float32), t1w_affine)
        img.set_qform(t1w_affine, code=4)
        img.set_sform(t1w_affine, code=4)
        path = template_chimap_path(run)
        nb.save(img, str(path) + ".tmp.nii.gz")
        Path(str(path) + ".tmp.nii.gz").replace(path)
        atomic_write_json(
            {
                "Description": f"Chimap resampled on the {TEMPLATE} template grid (linear)",
                "Units": "ppm",
                "SkullStripped": True,
                "Sources": [run.path("chi_map").relative_to(run.output_dir).as_posix()],
                "SpatialReference": TEMPLATE,
                "Registration": f"{registration} (DIPY) of the first-echo magnitude",
            },
            path.with_name(path.name.replace(".nii.gz", ".json")),
        )
    if figure is not None:
        figures.plot_rois(chi_img, nb.Nifti1Image(labels, chi_img.affine), figure,
                          labels=list(DEEP_GREY_LABELS))  # fmt: skip
    return rows


def run_group_level(
    output_dir: Path,
    participants: Sequence[str] | None = None,
    *,
    registration: str = "affine",
    template_chimaps: bool = False,
    templateflow_home: Path | None = None,
) -> GroupResult:
    """The group level over the runs in ``output_dir`` (of ``participants`` only, if given).

    The QC table and report are written even when the template is missing or a run's
    registration fails; those problems are in ``GroupResult.errors``.
    """
    from ..reports.group import write_group_report

    output_dir = Path(output_dir)
    runs = [r for r in find_runs(output_dir) if participants is None or r.subject in participants]
    result = GroupResult()
    if not runs:
        result.errors.append(f"no Chimap in {output_dir}: run the participant level first")
        return result
    out = group_dir(output_dir)
    result.qc_rows, errors = qc_table(runs)
    result.errors += errors
    result.files.append(write_tsv(result.qc_rows, QC_TABLE_COLUMNS, out / "group_qc.tsv"))
    try:
        template = Template.load(templateflow_home)
    except TemplateError as e:
        result.errors.append(str(e))
        template = None
    if template is not None:
        for i, run in enumerate(runs, 1):
            logger.info("group: ROIs of %s (%d/%d)", run.stem, i, len(runs))
            try:
                rows = run_rois(
                    run, template, registration=registration, template_chimap=template_chimaps,
                    figure=out / "figures" / f"{run.stem}_desc-rois_qc.png",
                )  # fmt: skip
            except Exception as e:
                result.errors.append(f"{run.stem}: ROI statistics failed: {type(e).__name__}: {e}")
                continue
            result.roi_rows += rows
        result.files.append(write_tsv(result.roi_rows, ROI_COLUMNS, out / "group_rois.tsv"))
    result.files.append(
        write_group_report(
            output_dir, runs, result, registration=registration, rois=template is not None
        )  # fmt: skip
    )
    return result
