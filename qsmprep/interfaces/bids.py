"""Writing the BIDS derivatives: the sink interface, dataset_description and .bidsignore."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .. import __version__
from ..bids import DERIVATIVE_ENTITIES, NAME_ENTITIES
from ._io import atomic_write_bytes, atomic_write_json, signals_deferred

logger = logging.getLogger("qsmprep")

CODE_URL = "https://github.com/qsmprep/qsmprep"
BIDS_VERSION = "1.10.0"

#: Output files with no BIDS suffix yet, listed in the derivatives' .bidsignore.
NONSTANDARD_PATTERNS = (
    "*_totalfield.nii.gz",
    "*_totalfield.json",
    "*_localfield.nii.gz",
    "*_localfield.json",
    "*_quality.nii.gz",
    "*_quality.json",
    "*_reliability.nii.gz",
    "*_reliability.json",
    "*_swi.nii.gz",
    "*_swi.json",
    "*_minIP.nii.gz",
    "*_minIP.json",
    "*_rois.tsv",  # group level: deep grey ROI statistics per run
    "*.html",  # reports, with their figures, logs and the group level's folder
    "**/figures",
    "**/log",
    "logs",
    "group",
)

#: Outputs keep every entity of their input run, also those that BIDS does not allow on
#: derivative maps (e.g. ``inv-`` of MP2RAGE): such files are listed in .bidsignore too.
NONSTANDARD_ENTITY_PATTERNS = tuple(
    f"*_{key}-*" for entity, key in NAME_ENTITIES.items() if entity not in DERIVATIVE_ENTITIES
)


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to store (.nii or .nii.gz)")
    base_directory = traits.Directory(mandatory=True, desc="derivatives dataset root")
    out_path = traits.Str(mandatory=True, desc="path relative to base_directory (.nii.gz)")
    metadata = traits.Dict(traits.Str, traits.Any, usedefault=True, desc="sidecar content")
    side_info = File(exists=True, desc="side information JSON, stored as SideInformation")
    extra_meta = File(exists=True, desc="JSON object whose keys are added to the sidecar")
    metadata_file = File(exists=True, desc="JSON object merged into the sidecar (nested keys too)")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the stored image")
    out_meta = File(exists=True, desc="its JSON sidecar")


class DerivativesSink(SimpleInterface):
    """Copy an image into the derivatives dataset and write its sidecar, both atomically.

    Each file is written to a temporary file in its destination folder and moved into
    place with ``os.replace``, so an interrupted run never leaves a truncated output.
    """

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        rel = Path(self.inputs.out_path)
        if rel.is_absolute() or ".." in rel.parts or not rel.name.endswith(".nii.gz"):
            raise ValueError(f"out_path must be a relative .nii.gz path, not {rel}")
        src = Path(self.inputs.in_file)
        if not src.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"in_file must be a NIfTI (.nii or .nii.gz), not {src.name}")
        out = Path(self.inputs.base_directory) / rel
        meta = dict(self.inputs.metadata)
        if isdefined(self.inputs.extra_meta):
            meta.update(json.loads(Path(self.inputs.extra_meta).read_text()))
        if isdefined(self.inputs.side_info):
            meta["SideInformation"] = json.loads(Path(self.inputs.side_info).read_text())
        if isdefined(self.inputs.metadata_file):
            meta = merge_metadata(meta, json.loads(Path(self.inputs.metadata_file).read_text()))
        sidecar = out.with_name(out.name[: -len(".nii.gz")] + ".json")
        data = src.read_bytes()
        if src.name.endswith(".nii"):
            # the work directory keeps images uncompressed (a 4D 1 mm image takes 5 s to
            # gzip); outputs are compressed once, here (level 1, as nibabel; no timestamp,
            # so that re-runs are byte-identical)
            data = gzip.compress(data, compresslevel=1, mtime=0)
        atomic_write_bytes(data, out)
        atomic_write_json(meta, sidecar)
        self._results["out_file"] = str(out)
        self._results["out_meta"] = str(sidecar)
        return runtime


def merge_metadata(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``; where both hold an object, the objects are merged."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_metadata(out[key], value)
        else:
            out[key] = value
    return out


class _CommitRunInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="every file of the run, under stage_dir"
    )
    stage_dir = traits.Directory(mandatory=True, desc="where the sinks wrote")
    output_dir = traits.Directory(mandatory=True, desc="derivatives dataset root")
    replaces = traits.Str(
        mandatory=True,
        desc="regular expression of the paths (relative to output_dir) of the run's earlier "
        "outputs, which the new set replaces",
    )


class _CommitRunOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="the files in output_dir")


class CommitRun(SimpleInterface):
    """Move a run's complete set of outputs from the staging folder into the dataset.

    Connected after every sink of a run, it runs only when all of them succeeded; a run
    that fails leaves its earlier outputs untouched. See :func:`commit_files`.
    """

    input_spec = _CommitRunInputSpec
    output_spec = _CommitRunOutputSpec

    def _run_interface(self, runtime):
        self._results["out_files"] = commit_files(
            self.inputs.in_files,
            self.inputs.stage_dir,
            self.inputs.output_dir,
            self.inputs.replaces,
        )
        return runtime


def commit_files(
    files: list[str], stage_dir: str | Path, output_dir: str | Path, replaces: str
) -> list[str]:
    """Move ``files`` (under ``stage_dir``) to the same relative paths under ``output_dir``.

    Files of ``output_dir`` whose relative path matches ``replaces`` (the run's earlier
    outputs) and that the new set lacks are deleted, so the folder never mixes two runs'
    files. The moves are ``os.replace`` within one file system, with SIGINT and SIGTERM held
    back until all are done. Returns the new paths.
    """
    stage, out = Path(stage_dir).absolute(), Path(output_dir).absolute()
    rels = [Path(f).absolute().relative_to(stage) for f in files]
    pattern = re.compile(replaces)
    keep = {rel.as_posix() for rel in rels}
    stale = []
    for folder in sorted({rel.parent for rel in rels}):
        if (out / folder).is_dir():
            for old in (out / folder).iterdir():
                rel = (folder / old.name).as_posix()
                if rel not in keep and pattern.fullmatch(rel):
                    stale.append(old)
    with signals_deferred():
        for rel in rels:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, out / rel)
        for old in stale:
            old.unlink(missing_ok=True)
    if stale:
        logger.info("replaced the earlier outputs %s", ", ".join(p.name for p in stale))
    return [str(out / rel) for rel in rels]


def write_dataset_description(output_dir: Path, bids_dir: Path) -> None:
    """Write ``dataset_description.json`` and ``.bidsignore`` of the derivatives dataset.

    ``DatasetLinks`` names the raw dataset ``raw``, so that sidecars can cite their
    inputs as ``bids:raw:<path>``.
    """
    output_dir = Path(output_dir)
    raw_uri = Path(bids_dir).absolute().as_uri()
    description = {
        "Name": "qsmprep: quantitative susceptibility maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "qsmprep",
                "Version": __version__,
                "CodeURL": CODE_URL,
            }
        ],
        "SourceDatasets": [{"URL": raw_uri}],
        "DatasetLinks": {"raw": raw_uri},
        "HowToAcknowledge": "Cite qsmprep and the methods named in each map's sidecar.",
    }
    atomic_write_json(description, output_dir / "dataset_description.json")
    ignore = output_dir / ".bidsignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    lines += [p for p in (*NONSTANDARD_PATTERNS, *NONSTANDARD_ENTITY_PATTERNS) if p not in lines]
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), ignore)
