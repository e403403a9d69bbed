"""Pre-training the adaptive U-Net on synthetic pairs, with checkpoints and resume.

Recipe (after the adaptive U-Net's ISMRM abstracts, FIELD-NOTES §1): AdamW, cosine
annealing with warm restarts (stepped per optimisation step), L1 loss on chi (ppm) inside
the mask, optionally plus ``dc_weight`` times an L1 data-consistency term between the
dipole-convolved prediction and the input field (per-sample dipole kernel). Mixed
precision (bf16, or fp16 with a gradient scaler) is used on CUDA only.

Every ``checkpoint_every`` steps ``OUT/checkpoint.pt`` is replaced atomically; it holds
the model, optimiser, scheduler and scaler states, the step, the RNG states, the
configuration and the history. Training pairs are a deterministic function of their
index (:mod:`qsmprep.nn.synth`), so a resumed run sees exactly the pairs it would have
seen without the interruption. ``OUT/history.jsonl`` gets one line per logged step
(readable while a background run goes on). At the end ``OUT/model.pt`` and its model card
``OUT/model.json`` are written with :func:`qsmprep.nn.weights.save_model`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qsmprep.nn.inference import resolve_device
from qsmprep.nn.physics import dipole_convolve
from qsmprep.nn.synth import SynthConfig, SyntheticQSMDataset
from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.nn.weights import save_model
from qsmprep.qsm.dipole import DEFAULT_PAD_FACTOR

log = logging.getLogger("qsmprep")

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"
WEIGHTS = "model.pt"

#: TrainConfig fields that may change when a run is resumed (they do not alter the result
#: of the steps already taken, or only extend the run).
RESUMABLE_CHANGES = frozenset(
    {
        "out_dir",
        "steps",
        "val_every",
        "checkpoint_every",
        "log_every",
        "device",
        "threads",
        "workers",
    }
)


@dataclass
class TrainConfig:
    """Pre-training settings (lr in 1/step units of AdamW, lengths in voxels)."""

    out_dir: str = "qsmprep-train"
    steps: int = 20000
    batch_size: int = 2
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-2
    #: Length (steps) of the first cosine cycle; later cycles are ``restart_mult`` times longer.
    restart_steps: int = 2000
    restart_mult: int = 2
    #: Weight of the L1 data-consistency term (0: chi loss only).
    dc_weight: float = 0.0
    base_channels: int = 16
    depth: int = 5
    adaptive: bool = True
    #: Network input: the field ("none", the paper's) or its TKD ("tkd"), see AdaptiveUNet3d.
    input_transform: str = "none"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    #: Data-generation processes (0: in the training process); the batches do not change.
    workers: int = 0
    val_every: int = 500
    val_pairs: int = 16
    checkpoint_every: int = 100
    log_every: int = 10
    synth: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self) -> None:
        if isinstance(self.synth, dict):
            self.synth = SynthConfig.from_dict(self.synth)
        positive = ("steps", "batch_size", "restart_steps", "restart_mult", "base_channels")
        for name in positive + ("val_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2, got {self.depth}")
        if not (self.lr > 0 and 0 <= self.min_lr < self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr < lr, got {self.lr}, {self.min_lr}")
        if min(self.dc_weight, self.weight_decay, self.val_pairs, self.workers) < 0:
            raise ValueError("dc_weight, weight_decay, val_pairs and workers must be >= 0")
        m = 2 ** (self.depth - 1)
        if any(n % m for n in self.synth.patch_size):
            raise ValueError(
                f"patch size {self.synth.patch_size} must be a multiple of {m} for depth "
                f"{self.depth}"
            )

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        d = asdict(self)
        d["synth"] = self.synth.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


@dataclass
class TrainResult:
    """What a finished run wrote and measured."""

    weights: Path
    sha256: str
    step: int
    elapsed_s: float
    validation: dict
    #: The same validation scored for a classical inversion (TKD), as a yardstick.
    reference: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- physics


# ----------------------------------------------------------------------------- losses


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference inside ``mask`` over the whole batch (ppm)."""
    m = mask.to(pred.dtype)
    return ((pred - target).abs() * m).sum() / m.sum().clamp_min(1)


def batch_nrmse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NRMSE (%) per sample inside ``mask``, both maps demeaned in the mask (QSM challenge 2.0).

    ``100 * ||(p - mean p) - (t - mean t)|| / ||t - mean t||``; returns ``(N,)``.
    """
    m = mask.to(torch.float64).flatten(1)
    p = pred.to(torch.float64).flatten(1)
    t = target.to(torch.float64).flatten(1)
    n = m.sum(1).clamp_min(1)
    p = (p - (p * m).sum(1, keepdim=True) / n[:, None]) * m
    t = (t - (t * m).sum(1, keepdim=True) / n[:, None]) * m
    return 100 * (p - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)


def compute_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    dc_weight: float = 0.0,
    pad_factor: float = DEFAULT_PAD_FACTOR,
    autocast: Callable[[], object] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of ``model`` on ``batch`` (tensors on the model's device) and its parts.

    ``L1(chi inside mask) + dc_weight * L1(dipole(pred * mask) - field inside mask)``; the
    prediction is made under ``autocast()`` when given, the losses in float32.
    """
    field_, chi, mask, side = batch["field"], batch["chi"], batch["mask"], batch["side"]
    if autocast is None:
        pred = model(field_, side)
    else:
        with autocast():
            pred = model(field_, side)
    pred = pred.float()
    chi_loss = masked_l1(pred, chi, mask)
    parts = {"chi_l1": float(chi_loss.detach())}
    loss = chi_loss
    if dc_weight > 0:
        fwd = dipole_convolve(pred * mask, side, pad_factor)
        dc_loss = masked_l1(fwd, field_, mask)
        parts["dc_l1"] = float(dc_loss.detach())
        loss = loss + dc_weight * dc_loss
    parts["loss"] = float(loss.detach())
    return loss, parts


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Mean chi L1 (ppm) and NRMSE (%) of ``model`` (eval mode) over ``batches``."""
    was_training = model.training
    model.eval()
    l1, nrmse, n = 0.0, [], 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        pred = model(b["field"], b["side"]).float()
        l1 += float(masked_l1(pred, b["chi"], b["mask"])) * b["field"].shape[0]
        nrmse += batch_nrmse(pred, b["chi"], b["mask"]).tolist()
        n += b["field"].shape[0]
    model.train(was_training)
    if n == 0:
        return {}
    return {"chi_l1": l1 / n, "nrmse": float(np.mean(nrmse)), "n_pairs": n}


def classical_reference(
    batches: Iterable[dict[str, torch.Tensor]], method: str = "tkd"
) -> dict[str, float]:
    """Mean NRMSE (%) of a classical inversion on the same pairs: a yardstick for ``evaluate``."""
    from qsmprep.qsm.inversion import invert

    scores = []
    for b in batches:
        for i in range(b["field"].shape[0]):
            side = b["side"][i].double().numpy()
            chi = invert(b["field"][i, 0].numpy(), b["mask"][i, 0].numpy(), side[:3], side[3:],
                         method)  # fmt: skip
            t = torch.from_numpy(chi)[None, None]
            scores.append(float(batch_nrmse(t, b["chi"][i : i + 1], b["mask"][i : i + 1])[0]))
    return {"method": method, "nrmse": float(np.mean(scores))} if scores else {}


#: Side information of an axial 1 mm scan: the "wrong" side of the ablation.
AXIAL_1MM = (1.0, 1.0, 1.0, 0.0, 0.0, 1.0)


@torch.no_grad()
def side_ablation(
    model: AdaptiveUNet3d,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    wrong: Sequence[float] = AXIAL_1MM,
) -> dict:
    """Does the side information matter? NRMSE (%) of ``model`` on ``batches`` with each
    pair's own side information (``right``), with ``wrong`` fed to the adaptive layer only
    (``wrong_adaptive``; the TKD input keeps the right kernel) and, for a TKD-input model,
    ``wrong`` everywhere (``wrong_all``). Means over all pairs and over the pairs that are
    not axial and isotropic (``oblique_or_anisotropic``)."""
    from qsmprep.nn.unet import adaptive_side_override

    model = model.to(device).eval()
    scores: dict[str, list[float]] = {"right": [], "wrong_adaptive": [], "wrong_all": []}
    tilted = []
    wrong_t = torch.tensor(wrong, dtype=torch.float32, device=device)
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        side = b["side"]
        tilted += [
            not (np.allclose(s[:3], s[0]) and abs(s[5]) > 0.9999) for s in side.cpu().numpy()
        ]
        scores["right"] += batch_nrmse(model(b["field"], side), b["chi"], b["mask"]).tolist()
        with adaptive_side_override(model, wrong):
            pred = model(b["field"], side)
        scores["wrong_adaptive"] += batch_nrmse(pred, b["chi"], b["mask"]).tolist()
        if model.input_transform != "none":
            pred = model(b["field"], wrong_t.expand_as(side))
            scores["wrong_all"] += batch_nrmse(pred, b["chi"], b["mask"]).tolist()
    tilted_ = np.array(tilted, bool)
    out: dict = {"pairs": len(tilted), "oblique_or_anisotropic_pairs": int(tilted_.sum())}
    for key, vals in scores.items():
        if vals:
            v = np.array(vals)
            out[key] = float(v.mean())
            if tilted_.any():
                out.setdefault("oblique_or_anisotropic", {})[key] = float(v[tilted_].mean())
    return out


# ------------------------------------------------------------------------------ setup


def build_model(cfg: TrainConfig) -> AdaptiveUNet3d:
    """A freshly initialised model for ``cfg`` (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    return AdaptiveUNet3d(
        base_channels=cfg.base_channels,
        depth=cfg.depth,
        adaptive=cfg.adaptive,
        input_transform=cfg.input_transform,
    )


def make_optimizer(
    params, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and cosine annealing with warm restarts, stepped once per optimisation step."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=cfg.restart_steps, T_mult=cfg.restart_mult, eta_min=cfg.min_lr
    )
    return opt, sched


def _amp(device: torch.device):
    """(autocast factory or None, GradScaler or None): mixed precision on CUDA only."""
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


def hardware_description(device: torch.device) -> dict:
    """Where a run happened, for the model card."""
    hw = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`pretrain` (``weights_only`` torch load)."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(ck, dict) or not {"model", "optimizer", "step", "config"} <= set(ck):
        raise ValueError(f"{path} is not a qsmprep training checkpoint")
    return ck


def _check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and now[k] != saved.get(k))
    if diff:
        raise ValueError(
            f"{path} was written with different settings ({', '.join(diff)}); "
            "use a new --out directory or the same settings"
        )


# ------------------------------------------------------------------------- training


def pretrain(
    cfg: TrainConfig,
    resume: bool = True,
    progress: bool = True,
    command: str | None = None,
    stop_after: int | None = None,
    time_limit_s: float | None = None,
    weights_dtype: torch.dtype = torch.float32,
    checkpoint: str | Path | None = None,
    finish_by_s: float | None = None,
) -> TrainResult | None:
    """Pre-train a model as ``cfg`` says; resume from the checkpoint when present.

    The checkpoint is ``checkpoint`` (default ``OUT/checkpoint.pt``); neither it nor
    ``OUT`` may lie inside the installed qsmprep package. Returns the result once
    ``cfg.steps`` are done (weights, stored as ``weights_dtype``, and card written), or
    ``None`` when this call stopped early: after ``stop_after`` steps, after
    ``time_limit_s`` seconds, or on SIGINT/SIGTERM (the step in flight is finished and the
    checkpoint saved; a second signal aborts at once). ``finish_by_s`` instead ends the run
    after that many seconds as if its steps were done: the checkpoint is saved (a later
    call with more ``steps`` continues it) and the weights and card are written, the card
    noting the planned steps. ``command`` is recorded in the model card (the command line
    that reproduces the run).
    """
    out = Path(cfg.out_dir)
    ck_path = out / CHECKPOINT if checkpoint is None else Path(checkpoint)
    for path, what in ((out, "the run folder"), (ck_path, "the checkpoint")):
        _check_outside_package(path, what)
    out.mkdir(parents=True, exist_ok=True)
    ck_path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model = build_model(cfg).to(device)
    opt, sched = make_optimizer(model.parameters(), cfg)
    autocast, scaler = _amp(device)
    step, elapsed, history = 0, 0.0, []
    if resume and ck_path.is_file():
        ck = load_checkpoint(ck_path)
        _check_resume_config(ck["config"], cfg, ck_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        step, elapsed, history = int(ck["step"]), float(ck["elapsed_s"]), list(ck["history"])
        log.info("resuming %s at step %d", ck_path, step)
    elif not resume and ck_path.exists():
        ck_path.unlink()

    def save_checkpoint() -> None:
        _save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "step": step,
                "elapsed_s": elapsed,
                "history": history,
                "config": cfg.to_dict(),
                "model_config": model.config,
                "rng": _rng_state(),
                "command": command or "",
            },
            ck_path,
        )

    val_ds = SyntheticQSMDataset(
        cfg.synth,
        "val",
        cfg.seed,
        length=math.ceil(cfg.val_pairs / cfg.batch_size),
        batch_size=cfg.batch_size,
    )
    val_batches = list(val_ds) if cfg.val_pairs else []
    val_reference = classical_reference(val_batches)
    if val_reference:
        log.info("validation pairs: TKD NRMSE %.1f %%", val_reference["nrmse"])
    train_ds = SyntheticQSMDataset(
        cfg.synth, "train", cfg.seed, start=step * cfg.batch_size, batch_size=cfg.batch_size
    )
    last_val = next((h["val"] for h in reversed(history) if "val" in h), {})
    bar = progress_bar(cfg.steps, step, progress)
    model.train()
    done_here = 0
    train_ds.warm_up()  # build the phantom pool once, before any worker is forked
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda"
    )
    batches = iter(loader)
    t_start = t0 = time.perf_counter()

    finished_early = False

    def keep_going() -> bool:
        nonlocal finished_early
        if stop_after is not None and done_here >= stop_after:
            return False
        if time_limit_s is not None and time.perf_counter() - t_start >= time_limit_s:
            return False
        if finish_by_s is not None and time.perf_counter() - t_start >= finish_by_s:
            finished_early = step > 0
            return False
        return not stop.requested

    # Rewritten from the checkpoint: lines of steps after it (a hard kill) would repeat.
    with open(out / HISTORY, "w") as hist_file, _GracefulStop() as stop:
        hist_file.writelines(json.dumps(rec) + "\n" for rec in history)
        while step < cfg.steps and keep_going():
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            opt.zero_grad(set_to_none=True)
            loss, parts = compute_loss(model, batch, cfg.dc_weight, cfg.synth.pad_factor, autocast)
            if not torch.isfinite(loss):
                save_checkpoint()
                raise FloatingPointError(f"non-finite loss at step {step}; checkpoint saved")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            step += 1
            done_here += 1
            now = time.perf_counter()
            elapsed += now - t0
            t0 = now
            rec = {"step": step, **parts, "lr": opt.param_groups[0]["lr"], "time_s": elapsed}
            if step % cfg.val_every == 0 or step == cfg.steps:
                last_val = evaluate(model, val_batches, device)
                rec["val"] = last_val
            if step % cfg.log_every == 0 or "val" in rec:
                history.append(rec)
                hist_file.write(json.dumps(rec) + "\n")
                hist_file.flush()
            bar.update(1)
            bar.set_postfix(
                loss=f"{parts['loss']:.4f}", val_nrmse=f"{last_val.get('nrmse', float('nan')):.1f}"
            )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint()
    bar.close()
    if step < cfg.steps:
        save_checkpoint()
        if not finished_early:
            log.info("stopped at step %d of %d; checkpoint saved in %s", step, cfg.steps, ck_path)
            return None
        log.info("time budget spent at step %d of %d: writing the model", step, cfg.steps)
        if not any("val" in h and h["step"] == step for h in history):
            last_val = evaluate(model, val_batches, device)
    card = {
        "description": ("Adaptive U-Net" if cfg.adaptive else "Plain U-Net (no adaptive layer)")
        + " pre-trained on qsmprep's synthetic pairs (qsmprep.nn.synth)",
        "command": command or "",
        "training": {
            "steps": step,
            **({"planned_steps": cfg.steps, "ended_by": "time budget"} if finished_early else {}),
            "time_s": round(elapsed, 1),
            "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            "schedule": {
                "name": "CosineAnnealingWarmRestarts",
                "T_0": cfg.restart_steps,
                "T_mult": cfg.restart_mult,
                "eta_min": cfg.min_lr,
            },
            "loss": "L1 on chi in mask"
            + (f" + {cfg.dc_weight} * L1 dipole consistency" if cfg.dc_weight else ""),
            "batch_size": cfg.batch_size,
            "mixed_precision": autocast is not None,
            "seed": cfg.seed,
            "config": cfg.to_dict(),
        },
        "data": {
            "generator": "qsmprep.nn.synth",
            "synth": cfg.synth.to_dict(),
            "train": f"split 'train', seed {cfg.seed}, pairs 0..{step * cfg.batch_size - 1}",
            "validation": f"split 'val', seed {cfg.seed}, {cfg.val_pairs} pairs",
        },
        "hardware": hardware_description(device),
        "metrics": {"validation": last_val, "validation_tkd_reference": val_reference},
    }
    weights = out / WEIGHTS
    sha = save_model(model.cpu(), weights, card, dtype=weights_dtype)
    log.info("wrote %s (sha256 %s)", weights, sha)
    return TrainResult(weights, sha, step, elapsed, last_val, val_reference)


def _check_outside_package(path: Path, what: str) -> None:
    """Refuse ``path`` inside the installed qsmprep package (training writes elsewhere)."""
    package = Path(__file__).resolve().parents[1]
    try:
        Path(path).resolve().relative_to(package)
    except ValueError:
        return
    raise ValueError(f"{what} {path} is inside the qsmprep package ({package}); use a folder "
                     "outside it")  # fmt: skip


def plot_history(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Training curves of run folders (their ``history.jsonl``) as one PNG: the training
    loss (mean over windows of logged steps) and the validation NRMSE, by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for run in runs:
        path = Path(run) / HISTORY
        if not path.is_file():
            raise ValueError(f"no {HISTORY} in {run}")
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = np.array([r["step"] for r in recs if "loss" in r])
        loss = np.array([r["loss"] for r in recs if "loss" in r])
        if len(loss):
            k = max(1, len(loss) // 50)
            n = len(loss) // k * k
            ax_loss.plot(steps[:n].reshape(-1, k).mean(1), loss[:n].reshape(-1, k).mean(1),
                         label=Path(run).name)  # fmt: skip
        val = [(r["step"], r["val"]["nrmse"]) for r in recs if r.get("val", {}).get("nrmse")]
        if val:
            ax_val.plot(*zip(*val, strict=True), marker="o", label=Path(run).name)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax_val.set(xlabel="step", ylabel="NRMSE (%)", title="validation NRMSE")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class _GracefulStop:
    """Turn the first SIGINT/SIGTERM into a stop request (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and saving the checkpoint")

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimisation steps (disabled when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", smoothing=0.05)
