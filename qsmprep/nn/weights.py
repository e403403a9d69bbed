"""Saving and loading adaptive U-Net weights with a JSON model card and a sha256 check.

A model file ``NAME.pt`` is a torch file holding ``{"config": model.config,
"state_dict": ...}`` and is read with ``torch.load(..., weights_only=True)`` (no pickled
code runs). Its model card ``NAME.json`` records the architecture, the training recipe,
data and metrics given by the trainer, and the sha256 of ``NAME.pt``; loading refuses a
file whose sha256 does not match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from qsmprep import __version__
from qsmprep.nn.unet import AdaptiveUNet3d

__all__ = [
    "BUNDLED_MODEL",
    "ModelLoadError",
    "card_path",
    "file_sha256",
    "load_card",
    "load_model",
    "save_model",
]

#: The default model shipped with qsmprep (present once a trained model is bundled).
BUNDLED_MODEL = Path(__file__).parent / "weights" / "adaptive_unet.pt"

#: ``format`` entry of every model card written here.
CARD_FORMAT = "qsmprep-adaptive-unet/1"


class ModelLoadError(ValueError):
    """A model file is missing, unreadable, corrupt or does not match its model card."""


def card_path(path: str | Path) -> Path:
    """The model card next to a weights file: ``NAME.pt`` -> ``NAME.json``."""
    return Path(path).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(
    model: AdaptiveUNet3d,
    path: str | Path,
    card: dict,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Write ``path`` (config + state dict) and its model card; return the file's sha256.

    ``card`` holds what the trainer knows (training recipe, data, metrics, ...); the
    architecture config, parameter count, storage dtype, versions and sha256 are added.
    ``dtype=torch.float16`` halves the file; tensors are loaded back as float32.
    """
    if not isinstance(model, AdaptiveUNet3d):
        raise ValueError(f"save_model needs an AdaptiveUNet3d, got {type(model).__name__}")
    if not isinstance(card, dict):
        raise ValueError("card must be a dict")
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{path}: the weights file cannot have the model card's .json suffix")
    # Scalars (the normalisation scales) stay float32 so the config round-trips exactly.
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() and v.dim() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.config, "state_dict": state}, path)
    sha = file_sha256(path)
    full_card = {
        **card,
        "format": CARD_FORMAT,
        "weights_file": path.name,
        "sha256": sha,
        "storage_dtype": str(dtype).removeprefix("torch."),
        "architecture": {
            "class": "AdaptiveUNet3d",
            "config": model.config,
            "n_parameters": model.n_parameters(),
        },
        "software": {"qsmprep": __version__, "torch": torch.__version__},
    }
    card_path(path).write_text(json.dumps(full_card, indent=2, sort_keys=False) + "\n")
    return sha


def load_card(path: str | Path | None = None) -> dict:
    """The model card of ``path`` (``None``: the bundled model); raises :class:`ModelLoadError`."""
    path = _resolve(path)
    cpath = card_path(path)
    if not cpath.is_file():
        raise ModelLoadError(f"no model card {cpath} next to {path}")
    try:
        card = json.loads(cpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"model card {cpath} is not valid JSON: {_first_line(e)}") from e
    if not isinstance(card, dict):
        raise ModelLoadError(f"model card {cpath} is not a JSON object")
    return card


def load_model(
    path: str | Path | None = None,
    map_location: str | torch.device = "cpu",
    expected_sha256: str | None = None,
) -> AdaptiveUNet3d:
    """Load a model saved by :func:`save_model`, in eval mode and float32.

    ``path=None`` loads the bundled default model. The file's sha256 must equal
    ``expected_sha256`` or, when that is not given, the ``sha256`` of its model card.
    Any failure raises :class:`ModelLoadError` with a one-line message naming the file.
    """
    path = _resolve(path)
    if expected_sha256 is None:
        expected = load_card(path).get("sha256")
        source = f"its model card {card_path(path).name}"
        if not isinstance(expected, str):
            raise ModelLoadError(f"model card {card_path(path)} has no sha256 entry")
    else:
        expected, source = expected_sha256, "the expected sha256"
    sha = file_sha256(path)
    if sha != expected.lower():
        raise ModelLoadError(
            f"{path} has sha256 {sha[:16]}... but {source} says {expected[:16]}...: "
            "the file is corrupt or was changed"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt zip or a pickle it refuses
        raise ModelLoadError(f"cannot read {path} as a torch file: {_first_line(e)}") from e
    if not (isinstance(blob, dict) and {"config", "state_dict"} <= set(blob)):
        raise ModelLoadError(f"{path} is not a qsmprep model (no config/state_dict)")
    try:
        model = AdaptiveUNet3d.from_config(blob["config"])
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
        )
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path} does not fit AdaptiveUNet3d: {_first_line(e)}") from e
    return model.to(map_location).eval()


def _resolve(path: str | Path | None) -> Path:
    if path is None:
        if not BUNDLED_MODEL.is_file():
            raise ModelLoadError(
                f"no bundled adaptive U-Net model is available ({BUNDLED_MODEL} is missing); "
                "pass your own model file with --model PATH"
            )
        return BUNDLED_MODEL
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    return path


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
