"""Transfer learning of a pre-trained adaptive U-Net on the user's own (local field, chi) pairs.

The recipe of the adaptive U-Net's ISMRM 2024 abstract (#1205): the adaptive layer (the
side-information-driven convolution and its filter manifold network) is frozen, the
decoder learns with lr 1e-3 and every other parameter with lr 1e-5 (AdamW). Training
uses random patches of the pairs (with flips, which flip the B0 direction's component
along the flipped axis); the result is written as a new weights file with its model card
(:func:`qsmprep.nn.weights.save_model`).

Pairs come from a BIDS derivatives folder (:func:`discover_pairs`), per run:

- local field (ppm): ``<entities>_localfield.nii[.gz]`` (qsmprep's own output) or any
  ``<entities>_desc-local_<suffix>.nii[.gz]``; a sidecar ``Units`` other than ppm is refused;
- reference chi (ppm), e.g. COSMOS: ``<entities>_desc-<label>_Chimap.nii[.gz]``. qsmprep's
  own ``<entities>_Chimap`` (no ``desc``) is never taken as a reference; with several
  labels per run, pick one with ``reference_desc``;
- mask (optional): ``<entities>_desc-brain_mask.nii[.gz]``; without it, ``chi != 0``.

``<entities>`` (everything but ``desc`` and the suffix, e.g. ``sub-01_ses-2_run-1``) pairs
the files. Side information is read from a ``SideInformation`` entry
(``{"VoxelSize": [...], "B0Direction": [...]}``) in the field's or the chi's sidecar, else
computed from the field's affine (:meth:`SideInformation.from_affine`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qsmprep.nn.inference import resolve_device
from qsmprep.nn.train import (
    TrainResult,
    compute_loss,
    evaluate,
    hardware_description,
    progress_bar,
)
from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.nn.weights import BUNDLED_MODEL, file_sha256, load_card, load_model, save_model
from qsmprep.qsm.sideinfo import SideInformation

log = logging.getLogger("qsmprep")

_NII = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")


@dataclass(frozen=True)
class PairFiles:
    """One run's files for transfer learning."""

    key: str  #: the shared entities, e.g. ``sub-01_ses-2``
    field: Path
    chi: Path
    mask: Path | None

    @property
    def subject(self) -> str:
        """The subject label (without ``sub-``)."""
        m = re.match(r"sub-([a-zA-Z0-9]+)", self.key)
        return m.group(1) if m else ""


def _split_name(path: Path) -> tuple[str, str | None, str] | None:
    """``(entities without desc, desc label or None, suffix)`` of a NIfTI name, else None."""
    m = _NII.match(path.name)
    if not m:
        return None
    parts = m.group("stem").split("_")
    if len(parts) < 2:
        return None
    suffix, ents = parts[-1], parts[:-1]
    desc = next((e[5:] for e in ents if e.startswith("desc-")), None)
    key = "_".join(e for e in ents if not e.startswith("desc-"))
    return key, desc, suffix


def discover_pairs(root: str | Path, reference_desc: str | None = None) -> list[PairFiles]:
    """Find (local field, reference chi, mask) files per run under ``root`` (see module doc).

    Raises ``ValueError`` when ``root`` is not a folder, when a run has several candidate
    fields or references, or when nothing pairs up.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    fields: dict[str, list[Path]] = {}
    chis: dict[str, list[Path]] = {}
    masks: dict[str, Path] = {}
    for p in sorted(root.rglob("*.nii*")):
        parsed = _split_name(p)
        if parsed is None:
            continue
        key, desc, suffix = parsed
        if suffix == "localfield" or desc == "local":
            fields.setdefault(key, []).append(p)
        elif suffix == "Chimap" and desc is not None:
            if reference_desc is None or desc == reference_desc:
                chis.setdefault(key, []).append(p)
        elif suffix == "mask" and desc == "brain":
            masks[key] = p
    pairs = []
    for key in sorted(fields):
        if key not in chis:
            continue
        for what, found in (("local field", fields[key]), ("reference Chimap", chis[key])):
            if len(found) > 1:
                names = ", ".join(f.name for f in found)
                hint = "; choose one with --reference-desc" if what != "local field" else ""
                raise ValueError(f"{key}: several {what} files ({names}){hint}")
        pairs.append(PairFiles(key, fields[key][0], chis[key][0], masks.get(key)))
    if not pairs:
        want = f"desc-{reference_desc}_Chimap" if reference_desc else "desc-<label>_Chimap"
        raise ValueError(
            f"no (local field, reference chi) pairs under {root}: expected "
            f"*_localfield.nii[.gz] or *_desc-local_*.nii[.gz] next to *_{want}.nii[.gz]"
        )
    return pairs


def _sidecar(path: Path) -> dict:
    side = path.with_name(_NII.match(path.name).group("stem") + ".json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{side} is not valid JSON: {e}") from e


@dataclass
class LoadedPair:
    """A run's arrays: local field and chi (ppm, float32), mask (bool), side information."""

    key: str
    field: np.ndarray
    chi: np.ndarray
    mask: np.ndarray
    side_info: SideInformation


def load_pair(files: PairFiles) -> LoadedPair:
    """Read a pair; check shapes, affines and units (``ValueError`` naming the file)."""
    import nibabel as nib

    imgs = {"field": nib.load(files.field), "chi": nib.load(files.chi)}
    if files.mask is not None:
        imgs["mask"] = nib.load(files.mask)
    ref = imgs["field"]
    for name, img in imgs.items():
        path = getattr(files, name)
        if img.shape[:3] != ref.shape[:3] or len(img.shape) != 3:
            raise ValueError(f"{path}: shape {img.shape} differs from the field's {ref.shape}")
        if not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise ValueError(f"{path}: affine differs from the field's ({files.field.name})")
    meta_f, meta_c = _sidecar(files.field), _sidecar(files.chi)
    for path, meta in ((files.field, meta_f), (files.chi, meta_c)):
        units = meta.get("Units")
        if units is not None and units.lower() != "ppm":
            raise ValueError(f"{path}: Units is {units!r}; transfer learning needs ppm")
    side = meta_f.get("SideInformation") or meta_c.get("SideInformation")
    side_info = (
        SideInformation.from_dict(side) if side else SideInformation.from_affine(ref.affine)
    )
    fld = np.asarray(ref.dataobj, dtype=np.float32)
    chi = np.asarray(imgs["chi"].dataobj, dtype=np.float32)
    if "mask" in imgs:
        mask = np.asarray(imgs["mask"].dataobj) > 0
    else:
        mask = chi != 0
    if not mask.any():
        raise ValueError(f"{files.mask or files.chi}: the mask is empty")
    fld = np.where(mask, np.nan_to_num(fld), 0).astype(np.float32)
    chi = np.where(mask, np.nan_to_num(chi), 0).astype(np.float32)
    return LoadedPair(files.key, fld, chi, mask, side_info)


def random_patch(
    pair: LoadedPair, patch_size: Sequence[int], rng: np.random.Generator, flips: bool = True
) -> dict[str, np.ndarray]:
    """A ``patch_size`` patch centred on a random mask voxel (zero padded at the edges).

    With ``flips`` each axis is flipped with probability 1/2, and the B0 direction's
    component along a flipped axis changes sign (the physics stays consistent).
    """
    ps = np.asarray(patch_size)
    idx = np.argwhere(pair.mask)
    centre = idx[int(rng.integers(len(idx)))]
    lo = centre - ps // 2
    out = {}
    for name in ("field", "chi", "mask"):
        vol = getattr(pair, name)
        patch = np.zeros(tuple(ps), dtype=vol.dtype)
        src = tuple(
            slice(max(a, 0), min(a + n, s)) for a, n, s in zip(lo, ps, vol.shape, strict=True)
        )
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
        patch[dst] = vol[src]
        out[name] = patch
    b = np.array(pair.side_info.b0_direction, dtype=np.float32)
    if flips:
        for axis in np.flatnonzero(rng.random(3) < 0.5):
            for name in out:
                out[name] = np.flip(out[name], axis)
            b[axis] = -b[axis]
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    out["side"] = np.concatenate([np.float32(pair.side_info.voxel_size), b]).astype(np.float32)
    return out


class PairPatchDataset(torch.utils.data.IterableDataset):
    """Stream of batches of random patches from loaded pairs (deterministic for a seed)."""

    def __init__(
        self,
        pairs: Sequence[LoadedPair],
        patch_size: Sequence[int],
        batch_size: int,
        seed: int = 0,
        flips: bool = True,
        length: int | None = None,
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("PairPatchDataset needs at least one pair")
        self.pairs = list(pairs)
        self.patch_size = tuple(int(n) for n in patch_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.flips = flips
        self.length = length

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch ``k``: ``field``/``chi``/``mask`` ``(B, 1, *patch)``, ``side`` ``(B, 6)``."""
        rng = np.random.default_rng([self.seed, k])
        items = []
        for _ in range(self.batch_size):
            pair = self.pairs[int(rng.integers(len(self.pairs)))]
            items.append(random_patch(pair, self.patch_size, rng, self.flips))
        out = {key: torch.from_numpy(np.stack([it[key] for it in items])) for key in items[0]}
        for key in ("field", "chi", "mask"):
            out[key] = out[key][:, None]
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        k = 0
        while self.length is None or k < self.length:
            yield self.batch(k)
            k += 1


@dataclass
class TransferConfig:
    """Transfer-learning settings (the seed's recipe by default)."""

    out: str = "adaptive_unet_tl.pt"
    steps: int = 1000
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (64, 64, 64)
    lr_decoder: float = 1e-3
    lr_rest: float = 1e-5
    weight_decay: float = 1e-2
    dc_weight: float = 0.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    #: Subjects (labels without ``sub-``) held out of training and used for validation.
    val_subjects: tuple[str, ...] = ()
    val_patches: int = 8
    val_every: int = 100
    reference_desc: str | None = None
    fp16: bool = False
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr_decoder > 0 and self.lr_rest >= 0):
            raise ValueError("lr_decoder must be > 0 and lr_rest >= 0")


def freeze_adaptive(model: AdaptiveUNet3d) -> list[dict]:
    """Freeze ``model.adaptive``; return AdamW groups ``[decoder, rest]`` (lrs set later)."""
    for p in model.adaptive.parameters():
        p.requires_grad_(False)
    return [
        {"name": "decoder", "params": model.decoder_parameters()},
        {"name": "rest", "params": model.encoder_parameters()},
    ]


def transfer_learn(
    base_model: str | Path | AdaptiveUNet3d | None,
    pairs: Sequence[PairFiles],
    cfg: TransferConfig,
    command: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``base_model`` (a weights file, a model, or None for the bundled model)
    on ``pairs``; write ``cfg.out``.

    Subjects in ``cfg.val_subjects`` are held out and give validation metrics (fixed
    patches) before and after fine-tuning, recorded in the model card.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    base_info: dict = {}
    if isinstance(base_model, AdaptiveUNet3d):
        model = base_model
    else:
        model = load_model(base_model)
        card = load_card(base_model)
        path = BUNDLED_MODEL if base_model is None else Path(base_model)
        base_info = {
            "file": path.name,
            "sha256": file_sha256(path),
            "description": card.get("description", ""),
        }
    m = model.size_multiple
    if any(n % m for n in cfg.patch_size):
        raise ValueError(f"patch size {cfg.patch_size} must be a multiple of {m}")
    val_set = set(cfg.val_subjects)
    train_files = [p for p in pairs if p.subject not in val_set]
    val_files = [p for p in pairs if p.subject in val_set]
    missing = val_set - {p.subject for p in val_files}
    if missing:
        raise ValueError(f"validation subjects not found among the pairs: {sorted(missing)}")
    if not train_files:
        raise ValueError("no pairs left for training after holding out the validation subjects")
    train_pairs = [load_pair(p) for p in train_files]
    val_pairs = [load_pair(p) for p in val_files]
    val_batches = (
        list(
            PairPatchDataset(
                val_pairs,
                cfg.patch_size,
                1,
                seed=cfg.seed + 1,
                flips=False,
                length=cfg.val_patches,
            )
        )
        if val_pairs
        else []
    )
    model = model.to(device)
    groups = freeze_adaptive(model)
    groups[0]["lr"], groups[1]["lr"] = cfg.lr_decoder, cfg.lr_rest
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    before = evaluate(model, val_batches, device)
    stream = iter(PairPatchDataset(train_pairs, cfg.patch_size, cfg.batch_size, seed=cfg.seed))
    model.train()
    bar = progress_bar(cfg.steps, 0, progress)
    last_val: dict = before
    history = []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        opt.zero_grad(set_to_none=True)
        loss, parts = compute_loss(model, batch, cfg.dc_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at transfer step {step}")
        loss.backward()
        opt.step()
        if val_batches and (step % cfg.val_every == 0 or step == cfg.steps):
            last_val = evaluate(model, val_batches, device)
            history.append({"step": step, **parts, "val": last_val})
        bar.update(1)
        bar.set_postfix(
            loss=f"{parts['loss']:.4f}", val_nrmse=f"{last_val.get('nrmse', float('nan')):.1f}"
        )
    bar.close()
    elapsed = time.perf_counter() - t0
    card = {
        "description": "Adaptive U-Net after transfer learning on user-supplied pairs"
        if model.is_adaptive
        else "Plain U-Net after transfer learning on user-supplied pairs",
        "command": command or "",
        "base_model": base_info,
        "training": {
            "kind": "transfer learning (adaptive layer frozen)",
            "steps": cfg.steps,
            "time_s": round(elapsed, 1),
            "optimizer": {
                "name": "AdamW",
                "lr_decoder": cfg.lr_decoder,
                "lr_rest": cfg.lr_rest,
                "weight_decay": cfg.weight_decay,
            },
            "loss": "L1 on chi in mask"
            + (f" + {cfg.dc_weight} * L1 dipole consistency" if cfg.dc_weight else ""),
            "config": {k: v for k, v in asdict(cfg).items() if k != "notes"},
        },
        "data": {
            "train_pairs": [p.key for p in train_files],
            "validation_pairs": [p.key for p in val_files],
            "patch_size": list(cfg.patch_size),
            **cfg.notes,
        },
        "hardware": hardware_description(device),
        "metrics": {"validation_before": before, "validation": last_val, "history": history},
    }
    out = Path(cfg.out)
    dtype = torch.float16 if cfg.fp16 else torch.float32
    sha = save_model(model.cpu(), out, card, dtype=dtype)
    log.info("wrote %s (sha256 %s)", out, sha)
    return TrainResult(out, sha, cfg.steps, elapsed, last_val)
