"""Finding a run's outputs (and its inputs) in a qsmprep derivatives dataset.

The reports and the group level read outputs through :func:`find_runs` and
:class:`RunOutputs`, never by spelling file names elsewhere: a run is found by its
susceptibility map, and its other outputs are named from the same stem by
:func:`output_path`. The report's own files are named by :func:`figure_path` and
:func:`log_root`.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import nibabel as nb

#: Output kind -> what follows the run's stem in its file name (before ``.nii.gz``).
OUTPUT_SUFFIXES = {
    "chi_map": "Chimap",
    "mask": "desc-brain_mask",
    "total_field": "totalfield",
    "local_field": "localfield",
    "r2star": "R2starmap",
    "t2star": "T2starmap",
    "swi": "swi",
    "minip": "minIP",
    "reliability": "desc-field_reliability",
}

#: The voxel-quality (reliability) maps: ``<stem>_desc-<method>_quality``.
QUALITY_SUFFIX = "quality"

#: BIDS entity keys in file-name order (BIDS 1.10 schema). A run's stem keeps its input
#: entities in this order (:data:`qsmprep.bids.NAME_ENTITIES`); derived files add others
#: (``space``, ``seg``, ``desc``) with :func:`add_entity`.
ENTITY_ORDER = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain",
    "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space",
    "split", "recording", "chunk", "seg", "res", "den", "label", "desc",
)  # fmt: skip

_CHI_SUFFIX = f"_{OUTPUT_SUFFIXES['chi_map']}.nii.gz"
_SUBJECT_RE = re.compile(r"^sub-([A-Za-z0-9]+)")
_SESSION_RE = re.compile(r"_ses-([A-Za-z0-9]+)")


def output_path(anat_dir: Path, stem: str, kind: str, ext: str = ".nii.gz") -> Path:
    """``anat_dir/<stem>_<suffix of kind><ext>``, e.g. the mask of a run."""
    return Path(anat_dir) / f"{stem}_{OUTPUT_SUFFIXES[kind]}{ext}"


def add_entity(stem: str, key: str, value: str) -> str:
    """``stem`` with ``<key>-<value>`` inserted where BIDS orders it (:data:`ENTITY_ORDER`):
    ``add_entity("sub-01_inv-2_chunk-1", "space", "MNI")`` is
    ``sub-01_inv-2_space-MNI_chunk-1``."""
    rank = ENTITY_ORDER.index(key)
    parts = stem.split("_")
    for i, part in enumerate(parts):
        other = part.split("-", 1)[0]
        if other in ENTITY_ORDER and ENTITY_ORDER.index(other) > rank:
            return "_".join([*parts[:i], f"{key}-{value}", *parts[i:]])
    return f"{stem}_{key}-{value}"


def figure_path(output_dir: Path, subject: str, stem: str, figure: str) -> Path:
    """Where a run's report figure lives: ``sub-X/figures/<stem>_desc-<figure>_qc.png``."""
    return Path(output_dir) / f"sub-{subject}" / "figures" / f"{stem}_desc-{figure}_qc.png"


def report_path(output_dir: Path, subject: str) -> Path:
    """The participant report: ``OUTPUT_DIR/sub-X.html``."""
    return Path(output_dir) / f"sub-{subject}.html"


def log_root(output_dir: Path, subject: str) -> Path:
    """The participant's log folders live here: ``sub-X/log/<timestamp>/``."""
    return Path(output_dir) / f"sub-{subject}" / "log"


def latest_log_dir(output_dir: Path, subject: str) -> Path | None:
    """The newest ``sub-X/log/<timestamp>`` folder (timestamps sort by time), or ``None``."""
    root = log_root(output_dir, subject)
    dirs = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
    return dirs[-1] if dirs else None


def load_image(path: str | os.PathLike) -> nb.spatialimages.SpatialImage:
    """The image at ``path``, read into memory once while the file is unchanged: a run's
    figures and QC numbers read the same outputs."""
    st = os.stat(path)
    return _load_image(os.fspath(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _load_image(path: str, mtime_ns: int, size: int) -> nb.spatialimages.SpatialImage:
    from ..interfaces._io import read_image

    return read_image(path)


def preload(paths, threads: int = 2) -> None:
    """:func:`load_image` of the existing ``paths``, ``threads`` at a time (unreadable
    files are left for their reader to report)."""

    def one(path) -> None:
        try:
            load_image(path)
        except Exception:  # noqa: BLE001 - reported where the image is used
            pass

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, [p for p in paths if p is not None]))


@dataclass(frozen=True)
class RunOutputs:
    """One run's outputs in a derivatives dataset ``output_dir``."""

    output_dir: Path
    anat_dir: Path
    stem: str

    @property
    def subject(self) -> str:
        m = _SUBJECT_RE.match(self.stem)
        return m.group(1) if m else ""

    @property
    def session(self) -> str | None:
        m = _SESSION_RE.search(self.stem)
        return m.group(1) if m else None

    def path(self, kind: str) -> Path | None:
        """The output ``kind`` (an :data:`OUTPUT_SUFFIXES` key), or ``None`` if not written."""
        p = output_path(self.anat_dir, self.stem, kind)
        return p if p.is_file() else None

    def sidecar(self, kind: str) -> dict[str, Any]:
        """The JSON sidecar of output ``kind`` (``{}`` when missing or unreadable)."""
        p = output_path(self.anat_dir, self.stem, kind, ext=".json")
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    def quality(self) -> Path | None:
        """The unwrapping's voxel-quality map in [0, 1], when one was written."""
        found = sorted(self.anat_dir.glob(f"{self.stem}_desc-*_{QUALITY_SUFFIX}.nii.gz"))
        return found[0] if found else None

    def figure(self, name: str) -> Path:
        """Where this run's report figure ``name`` lives (see :func:`figure_path`)."""
        return figure_path(self.output_dir, self.subject, self.stem, name)

    def magnitude(self) -> Path | None:
        """The first magnitude image of the input run, from the mask sidecar's
        ``SpatialReference`` (a ``bids:raw:`` URI resolved through the dataset's
        ``DatasetLinks``); ``None`` when it cannot be found."""
        ref = self.sidecar("mask").get("SpatialReference")
        return resolve_bids_uri(self.output_dir, ref) if isinstance(ref, str) else None


def resolve_bids_uri(output_dir: Path, uri: str) -> Path | None:
    """The file that a ``bids:<dataset>:<path>`` URI of ``output_dir``'s sidecars names."""
    if not uri.startswith("bids:"):
        return None
    _, dataset, rel = uri.split(":", 2)
    try:
        desc = json.loads((Path(output_dir) / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return None
    link = desc.get("DatasetLinks", {}).get(dataset)
    if not isinstance(link, str):
        return None
    root = Path(unquote(urlparse(link).path)) if link.startswith("file:") else Path(link)
    path = root / rel
    return path if path.is_file() else None


def find_runs(output_dir: Path, subject: str | None = None) -> list[RunOutputs]:
    """Every run with a susceptibility map under ``output_dir`` (of ``subject`` only, if
    given), sorted by name. Maps in a template space (``space-`` entity) are not runs."""
    output_dir = Path(output_dir)
    pattern = f"sub-{subject}" if subject else "sub-*"
    runs = []
    for chi in sorted(output_dir.glob(f"{pattern}/**/anat/*{_CHI_SUFFIX}")):
        stem = chi.name[: -len(_CHI_SUFFIX)]
        if "_space-" in f"_{stem}":
            continue
        runs.append(RunOutputs(output_dir, chi.parent, stem))
    return runs
