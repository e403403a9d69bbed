"""Writing the BIDS derivatives: the sink interface, dataset_description and .bidsignore."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .. import __version__
from ..bids import DERIVATIVE_ENTITIES, NAME_ENTITIES
from ._io import atomic_write_bytes, atomic_write_json

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
    "*_swi.nii.gz",
    "*_swi.json",
    "*_minIP.nii.gz",
    "*_minIP.json",
)

#: Outputs keep every entity of their input run, also those that BIDS does not allow on
#: derivative maps (e.g. ``inv-`` of MP2RAGE): such files are listed in .bidsignore too.
NONSTANDARD_ENTITY_PATTERNS = tuple(
    f"*_{key}-*" for entity, key in NAME_ENTITIES.items() if entity not in DERIVATIVE_ENTITIES
)


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to store")
    base_directory = traits.Directory(mandatory=True, desc="derivatives dataset root")
    out_path = traits.Str(mandatory=True, desc="path relative to base_directory (.nii.gz)")
    metadata = traits.Dict(traits.Str, traits.Any, usedefault=True, desc="sidecar content")
    side_info = File(exists=True, desc="side information JSON, stored as SideInformation")


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
        if not src.name.endswith(".nii.gz"):
            raise ValueError(f"in_file must be a compressed NIfTI (.nii.gz), not {src.name}")
        out = Path(self.inputs.base_directory) / rel
        meta = dict(self.inputs.metadata)
        if isdefined(self.inputs.side_info):
            meta["SideInformation"] = json.loads(Path(self.inputs.side_info).read_text())
        sidecar = out.with_name(out.name[: -len(".nii.gz")] + ".json")
        atomic_write_bytes(src.read_bytes(), out)
        atomic_write_json(meta, sidecar)
        self._results["out_file"] = str(out)
        self._results["out_meta"] = str(sidecar)
        return runtime


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
