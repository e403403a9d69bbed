"""Per-subject refinement of the U-Net inversion by the physics alone (no training data).

Two methods, both optimised on the mask's bounding box of one run:

- :func:`finetune` (after QSMInvNet, Liu & Koch 2019): start from a trained model (the
  bundled one by default) and fine-tune it on this subject so that its chi explains the
  measured local field. Loss::

      sum(W^2 |exp(i r f) - exp(i r D*chi)|^2) / sum(W^2)  +  tv_weight * TV(chi)

  with ``f`` the local field (ppm), ``r`` the phase per ppm at a reference echo time
  (:func:`rad_per_ppm`: the field as the phase it would have at that TE), ``D*chi`` the
  dipole field of chi in the mask, ``W`` the data weight (:func:`data_weight`: the front
  end's field reliability, else the normalised magnitude, else 1 in the mask) and TV the
  mean absolute forward difference (ppm/mm) inside the mask. The adaptive layer and the
  encoder stay frozen; the upper ``levels`` decoder levels and the output convolution
  learn (their input features are computed once, so a step costs a fraction of a full
  pass). Stops when the loss has not improved by ``tol`` (relative) for ``patience``
  steps, or after ``steps``.
- :func:`deep_image_prior` (QSM with Deep Image Prior, seed 003): a randomly initialised
  adaptive U-Net (:class:`~qsmprep.nn.unet.AdaptiveUNet3d`) fed noise, the local field or
  its TKD inversion, optimised so that the dipole field of its output matches the local
  field: ``sum(W |D*chi - f|) / sum(W) + tv_weight * TV(chi)`` (L1 data consistency),
  Adam, stopped early by the same rule.

Both return chi (ppm, zero outside the mask, not referenced) with a record of the
settings, steps, stop reason and losses (:class:`RefineResult`), log their progress
(step, loss, ETA) on the ``qsmprep`` logger, run on ``device`` and are deterministic on
the CPU for a given ``seed``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from qsmprep.nn import physics
from qsmprep.nn.inference import _torch_settings, prepare_model, resolve_device
from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.nn.weights import load_model
from qsmprep.qsm.dipole import GAMMA_BAR_MHZ_PER_T
from qsmprep.qsm.inversion import PAD_FACTOR
from qsmprep.qsm.sideinfo import SideInformation

__all__ = [
    "DIP_INPUTS",
    "REFINE_METHODS",
    "RefineResult",
    "data_weight",
    "deep_image_prior",
    "finetune",
    "l1_consistency",
    "phase_consistency",
    "rad_per_ppm",
    "refine",
    "total_variation",
]

LOGGER = logging.getLogger("qsmprep")

#: ``--refine`` choices: none (the U-Net alone), finetune, dip.
REFINE_METHODS = ("none", "finetune", "dip")

#: What the Deep Image Prior network is fed.
DIP_INPUTS = ("noise", "field", "tkd")

#: Reference echo time (s) and field (T) of the phase loss when the caller gives none.
DEFAULT_TE_S = 0.02
DEFAULT_B0_T = 3.0

#: Per-method defaults (measured on the external heads in docs/benchmarks.md, not tuned).
FINETUNE_DEFAULTS = {
    "steps": 80,
    "lr": 3e-4,
    "tv_weight": 0.01,
    "tol": 1e-3,
    "patience": 10,
    "levels": 2,
}
DIP_DEFAULTS = {
    "steps": 300,
    "lr": 1e-3,
    "tv_weight": 5e-4,
    "tol": 1e-3,
    "patience": 25,
    "net_input": "tkd",
    "base_channels": 8,
    "depth": 4,
}

Progress = Callable[[int, int, float], None]


@dataclass
class RefineResult:
    """Chi (ppm, float32, zero outside the mask) and what the refinement did.

    ``record`` is JSON-serialisable: ``Method``, ``Settings``, ``Steps``, ``StoppedBy``
    (``"tolerance"`` or ``"step budget"``), ``InitialLoss`` and ``FinalLoss`` (total,
    data, tv: at the start and at the returned chi), ``BestStep`` and ``WallTimeS``.
    """

    chi: np.ndarray
    record: dict
    #: Per step: total loss, data and tv terms (step 0 is the starting point).
    history: list[dict] = field(default_factory=list)
    #: The optimised network (finetune: a fused copy of the model; dip: the new one).
    model: torch.nn.Module | None = None


# ----------------------------------------------------------------------------- losses


def rad_per_ppm(te_s: float = DEFAULT_TE_S, b0_t: float = DEFAULT_B0_T) -> float:
    """Phase (rad) that 1 ppm of field accrues at echo time ``te_s`` (s) in ``b0_t`` (T)."""
    if not (te_s > 0 and b0_t > 0):
        raise ValueError(f"need a positive echo time and field, got {te_s} s, {b0_t} T")
    return 2 * math.pi * te_s * GAMMA_BAR_MHZ_PER_T * b0_t


def phase_consistency(
    fwd: torch.Tensor, field_ppm: torch.Tensor, weight: torch.Tensor, r: float
) -> torch.Tensor:
    """``sum(W^2 |exp(i r field) - exp(i r fwd)|^2) / sum(W^2)`` (dimensionless).

    ``fwd`` is the dipole field of the estimate (ppm), ``r`` rad per ppm
    (:func:`rad_per_ppm`). Written as ``4 sin^2(r (fwd - field) / 2)``, exact for small
    differences; 2 pi-periodic in the phase, so wraps of a strong source do not count.
    """
    w2 = weight * weight
    diff = torch.sin(0.5 * r * (fwd - field_ppm))
    return (w2 * 4 * diff * diff).sum() / w2.sum().clamp_min(1e-12)


def l1_consistency(fwd: torch.Tensor, field_ppm: torch.Tensor, weight: torch.Tensor):
    """``sum(W |fwd - field|) / sum(W)`` (ppm)."""
    return (weight * (fwd - field_ppm).abs()).sum() / weight.sum().clamp_min(1e-12)


def total_variation(
    chi: torch.Tensor, mask: torch.Tensor, voxel_size: Sequence[float]
) -> torch.Tensor:
    """Anisotropic TV (ppm/mm): the sum over axes of the mean ``|forward difference| / h``
    over the voxel pairs that both lie in ``mask``. ``chi`` and ``mask`` are
    ``(N, 1, X, Y, Z)``."""
    total = chi.new_zeros(())
    m = mask.to(chi.dtype)
    for axis, h in zip((2, 3, 4), voxel_size, strict=True):
        n = chi.shape[axis] - 1
        d = chi.narrow(axis, 1, n) - chi.narrow(axis, 0, n)
        both = m.narrow(axis, 1, n) * m.narrow(axis, 0, n)
        total = total + (both * d.abs()).sum() / both.sum().clamp_min(1) / float(h)
    return total


def data_weight(
    mask: np.ndarray, weight: np.ndarray | None = None, magnitude: np.ndarray | None = None
) -> np.ndarray:
    """The data weight ``W`` in [0, 1], zero outside ``mask``.

    ``weight`` (e.g. the front end's field reliability) when given; else ``magnitude``
    (3D, or 4D with echoes last: root sum of squares) divided by its 99th percentile in
    the mask and capped at 1; else 1 in the mask.
    """
    m = np.asarray(mask, bool)
    if weight is not None:
        w = np.asarray(weight, np.float32)
        if w.shape != m.shape:
            raise ValueError(f"weight shape {w.shape} does not match the mask {m.shape}")
        if not np.all(np.isfinite(w[m])) or np.any(w[m] < 0):
            raise ValueError("weight must be finite and non-negative in the mask")
    elif magnitude is not None:
        mag = np.asarray(magnitude, np.float32)
        if mag.ndim == 4:
            mag = np.sqrt((mag * mag).sum(-1))
        if mag.shape != m.shape:
            raise ValueError(f"magnitude shape {mag.shape} does not match the mask {m.shape}")
        scale = np.percentile(mag[m], 99) if m.any() else 0
        w = np.clip(mag / scale, 0, 1) if scale > 0 else np.ones_like(mag)
    else:
        w = np.ones(m.shape, np.float32)
    w = np.where(m, np.clip(w, 0, 1), 0).astype(np.float32)
    if not np.any(w > 0):
        raise ValueError("the data weight is zero everywhere in the mask")
    return w


# --------------------------------------------------------------------------- set-up


@dataclass
class _Crop:
    """The mask's bounding box, zero padded at its end to multiples of ``multiple``."""

    box: tuple[slice, ...]
    shape: tuple[int, int, int]
    in_shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: np.ndarray, multiple: int) -> _Crop:
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        shape = tuple(math.ceil((s.stop - s.start) / multiple) * multiple for s in box)
        return cls(box, shape, mask.shape)

    def take(self, x: np.ndarray, device: torch.device) -> torch.Tensor:
        out = np.zeros(self.shape, np.float32)
        part = x[self.box]
        out[: part.shape[0], : part.shape[1], : part.shape[2]] = part
        return torch.from_numpy(out)[None, None].to(device)

    def put(self, x: torch.Tensor, mask: np.ndarray) -> np.ndarray:
        full = np.zeros(self.in_shape, np.float32)
        sizes = [s.stop - s.start for s in self.box]
        full[self.box] = x[0, 0, : sizes[0], : sizes[1], : sizes[2]].detach().cpu().numpy()
        return np.where(mask, full, 0).astype(np.float32)


def _check_inputs(local_ppm, mask, side_info) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    local = np.asarray(local_ppm, np.float32)
    if local.ndim != 3:
        raise ValueError(f"local_ppm must be a 3D array, got shape {local.shape}")
    m = np.asarray(mask).astype(bool)
    if m.shape != local.shape:
        raise ValueError(f"mask shape {m.shape} differs from local_ppm shape {local.shape}")
    if not m.any():
        raise ValueError("the mask is empty")
    if not np.all(np.isfinite(local[m])):
        raise ValueError("local_ppm has NaN or infinite values inside the mask")
    side = np.asarray(
        side_info.as_vector() if isinstance(side_info, SideInformation) else side_info,
        np.float32,
    )
    if side.shape != (6,) or not np.all(np.isfinite(side)):
        raise ValueError(f"side information must be 6 finite numbers, got {side}")
    return np.where(m, local, 0).astype(np.float32), m, side


@dataclass
class _Problem:
    """Tensors of one run on the cropped grid."""

    field: torch.Tensor  # local field (ppm), zero outside the mask
    mask: torch.Tensor  # float 0/1
    weight: torch.Tensor  # data weight
    side: torch.Tensor  # (1, 6)
    kern: torch.Tensor  # half-spectrum dipole kernel of the padded grid
    pshape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]

    def forward_field(self, chi: torch.Tensor) -> torch.Tensor:
        """The dipole field (ppm) of ``chi`` inside the mask."""
        return physics.apply_kernel(chi * self.mask, self.kern, self.pshape)


def _problem(crop: _Crop, local, mask, weight, side, device) -> _Problem:
    side_t = torch.from_numpy(side)[None].to(device)
    kern, pshape = physics.dipole_kernels(crop.shape, side_t, PAD_FACTOR)
    return _Problem(
        field=crop.take(local, device),
        mask=crop.take(mask.astype(np.float32), device),
        weight=crop.take(weight, device),
        side=side_t,
        kern=kern.float().to(device),
        pshape=pshape,
        voxel_size=tuple(float(v) for v in side[:3]),
    )


class _Stopper:
    """Early stopping: stop once the loss has not dropped below ``(1 - tol)`` times the
    last significant low for ``patience`` steps; remembers the best step."""

    def __init__(self, tol: float, patience: int) -> None:
        self.tol, self.patience = tol, patience
        self.ref = math.inf
        self.ref_step = 0
        self.best = math.inf
        self.best_step = 0

    def update(self, step: int, loss: float) -> bool:
        """Record ``loss`` at ``step``; return True when it is the best so far."""
        if loss < self.ref * (1 - self.tol):
            self.ref, self.ref_step = loss, step
        if loss < self.best:
            self.best, self.best_step = loss, step
            return True
        return False

    def done(self, step: int) -> bool:
        return step - self.ref_step >= self.patience


def _check_settings(steps: int, lr: float, tv_weight: float, tol: float, patience: int):
    if steps < 1 or patience < 1:
        raise ValueError(f"steps and patience must be >= 1, got {steps}, {patience}")
    if not (lr > 0 and tv_weight >= 0 and tol >= 0):
        raise ValueError(f"need lr > 0, tv_weight >= 0, tol >= 0; got {lr}, {tv_weight}, {tol}")


def _optimise(
    label: str,
    predict: Callable[[], torch.Tensor],
    losses: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    params: list[torch.nn.Parameter],
    tv_weight: float,
    steps: int,
    lr: float,
    tol: float,
    patience: int,
    progress: Progress | None,
) -> tuple[torch.Tensor, dict, list[dict]]:
    """Adam on ``params`` for ``data + tv_weight * tv``; return the best chi, a summary
    and the history (one entry per step; step 0 is the starting point)."""
    opt = torch.optim.Adam(params, lr=lr)
    stopper = _Stopper(tol, patience)
    history: list[dict] = []
    best_chi = None
    t0 = last_log = time.perf_counter()
    stopped_by = "step budget"
    step = 0
    while True:
        chi = predict()
        data, tv = losses(chi)
        loss = data + tv_weight * tv
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{label}: the loss became {value} at step {step}")
        history.append(
            {"step": step, "loss": value, "data": float(data.detach()), "tv": float(tv.detach())}
        )
        if stopper.update(step, value):
            best_chi = chi.detach().clone()
        now = time.perf_counter()
        if progress is not None:
            progress(step, steps, value)
        if step and (step == steps or now - last_log > 10 or step % 25 == 0):
            eta = (now - t0) / step * (steps - step)
            LOGGER.info(
                "%s step %d/%d: loss %.4g (data %.4g, tv %.4g), ETA %.0f s",
                label, step, steps, value, history[-1]["data"], history[-1]["tv"], eta,
            )  # fmt: skip
            last_log = now
        if step == steps:
            break
        if stopper.done(step):
            stopped_by = "tolerance"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    best = history[stopper.best_step]
    summary = {
        "Steps": step,
        "StoppedBy": stopped_by,
        "BestStep": stopper.best_step,
        "InitialLoss": {k: history[0][k] for k in ("loss", "data", "tv")},
        "FinalLoss": {k: best[k] for k in ("loss", "data", "tv")},
        "WallTimeS": round(time.perf_counter() - t0, 2),
    }
    LOGGER.info(
        "%s: %d steps (%s), loss %.4g -> %.4g in %.0f s",
        label, step, stopped_by, history[0]["loss"], best["loss"], summary["WallTimeS"],
    )  # fmt: skip
    return best_chi, summary, history


# ---------------------------------------------------------------------------- methods


def finetune(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    side_info: SideInformation | Sequence[float],
    *,
    model: AdaptiveUNet3d | str | None = None,
    weight: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
    te_s: float = DEFAULT_TE_S,
    b0_t: float = DEFAULT_B0_T,
    steps: int = FINETUNE_DEFAULTS["steps"],
    lr: float = FINETUNE_DEFAULTS["lr"],
    tv_weight: float = FINETUNE_DEFAULTS["tv_weight"],
    tol: float = FINETUNE_DEFAULTS["tol"],
    patience: int = FINETUNE_DEFAULTS["patience"],
    levels: int = FINETUNE_DEFAULTS["levels"],
    seed: int = 0,
    device: str | torch.device = "auto",
    nthreads: int | None = None,
    progress: Progress | None = None,
) -> RefineResult:
    """Chi (ppm) of ``model`` fine-tuned on this run's local field (QSMInvNet's loss).

    ``local_ppm``, ``mask`` ``(X, Y, Z)``; ``side_info`` the run's voxel size (mm) and B0
    direction (voxel axes); ``model`` a model, a weights file or ``None`` (bundled);
    ``weight``/``magnitude`` give the data weight (:func:`data_weight`); ``te_s`` (s) and
    ``b0_t`` (T) the reference echo time and field at which the field is compared as
    phase (the pipeline passes the mean echo time); ``levels`` the number of decoder
    levels that learn (1 to depth - 1), with the output convolution. The caller's model
    is not changed. See the module docstring for the loss and the stopping rule.
    """
    local, m, side = _check_inputs(local_ppm, mask, side_info)
    _check_settings(steps, lr, tv_weight, tol, patience)
    if model is None or isinstance(model, str):
        model = load_model(model)
    if not isinstance(model, AdaptiveUNet3d):
        raise ValueError(f"model must be an AdaptiveUNet3d, a path or None, not {type(model)}")
    if not 1 <= levels <= model.depth - 1:
        raise ValueError(f"levels must be in 1..{model.depth - 1}, got {levels}")
    r = rad_per_ppm(te_s, b0_t)
    w = data_weight(m, weight, magnitude)
    dev = resolve_device(device)
    settings = {
        "Loss": "sum(W^2 |exp(i r f) - exp(i r D*chi)|^2) / sum(W^2) + TVWeight * TV(chi)",
        "ReferenceEchoTime": te_s,
        "MagneticFieldStrength": b0_t,
        "RadPerPpm": round(r, 4),
        "DataWeight": _weight_source(weight, magnitude),
        "Optimizer": "Adam",
        "LearningRate": lr,
        "TVWeight": tv_weight,
        "MaxSteps": steps,
        "Tolerance": tol,
        "Patience": patience,
        "TrainedLevels": levels,
        "Frozen": "adaptive layer (FMN), encoder, lower decoder levels",
        "Seed": seed,
        "Device": str(dev),
    }
    with _torch_settings(dev, nthreads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = prepare_model(model, dev)
        for p in net.parameters():
            p.requires_grad_(False)
        level = levels
        tail = [*net.up[:level].parameters(), *net.dec[:level].parameters()]
        tail += list(net.head.parameters())
        for p in tail:
            p.requires_grad_(True)
        crop = _Crop.of(m, net.size_multiple)
        prob = _problem(crop, local, m, w, side, dev)
        with torch.no_grad():
            x = net.transform_input(prob.field, prob.side)
            feats = net.features(x, prob.side, level)

        def predict() -> torch.Tensor:
            return net.decode_from(*feats) * prob.mask

        def losses(chi: torch.Tensor):
            data = phase_consistency(prob.forward_field(chi), prob.field, prob.weight, r)
            return data, total_variation(chi, prob.mask, prob.voxel_size)

        chi, summary, history = _optimise(
            "finetune", predict, losses, tail, tv_weight, steps, lr, tol, patience, progress
        )
    record = {"Method": "finetune", "Settings": settings, **summary}
    return RefineResult(crop.put(chi, m), record, history, net.eval())


def deep_image_prior(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    side_info: SideInformation | Sequence[float],
    *,
    weight: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
    net_input: str = DIP_DEFAULTS["net_input"],
    base_channels: int = DIP_DEFAULTS["base_channels"],
    depth: int = DIP_DEFAULTS["depth"],
    steps: int = DIP_DEFAULTS["steps"],
    lr: float = DIP_DEFAULTS["lr"],
    tv_weight: float = DIP_DEFAULTS["tv_weight"],
    tol: float = DIP_DEFAULTS["tol"],
    patience: int = DIP_DEFAULTS["patience"],
    seed: int = 0,
    device: str | torch.device = "auto",
    nthreads: int | None = None,
    progress: Progress | None = None,
) -> RefineResult:
    """Chi (ppm) from a randomly initialised adaptive U-Net fitted to this run's field.

    The network (``base_channels``, ``depth``) is fed ``net_input``: ``"noise"`` (fixed
    uniform noise, the seed's), ``"field"`` (the local field) or ``"tkd"`` (its TKD
    inversion); with the field or TKD it predicts a correction of its input (residual,
    output convolution started at zero, so step 0 is the input itself). Loss: L1 data
    consistency ``sum(W |D*chi - f|) / sum(W)`` (ppm) plus ``tv_weight * TV(chi)``.
    Other arguments as :func:`finetune`.
    """
    local, m, side = _check_inputs(local_ppm, mask, side_info)
    _check_settings(steps, lr, tv_weight, tol, patience)
    if net_input not in DIP_INPUTS:
        raise ValueError(f"net_input must be one of {DIP_INPUTS}, got {net_input!r}")
    w = data_weight(m, weight, magnitude)
    dev = resolve_device(device)
    settings = {
        "Loss": "sum(W |D*chi - f|) / sum(W) + TVWeight * TV(chi)",
        "Network": f"adaptive U-Net, {base_channels} base channels, depth {depth}, random "
        "initialisation",
        "Input": net_input,
        "DataWeight": _weight_source(weight, magnitude),
        "Optimizer": "Adam",
        "LearningRate": lr,
        "TVWeight": tv_weight,
        "MaxSteps": steps,
        "Tolerance": tol,
        "Patience": patience,
        "Seed": seed,
        "Device": str(dev),
    }
    with _torch_settings(dev, nthreads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        residual = net_input != "noise"
        net = AdaptiveUNet3d(base_channels=base_channels, depth=depth, residual=residual)
        if residual:  # start from the input itself
            torch.nn.init.zeros_(net.head.weight)
            torch.nn.init.zeros_(net.head.bias)
        crop = _Crop.of(m, net.size_multiple)
        prob = _problem(crop, local, m, w, side, dev)
        if net_input == "noise":
            x = torch.rand(prob.field.shape, device=dev) * 0.1
        elif net_input == "field":
            x = prob.field
        else:
            x = physics.tkd(prob.field, prob.side, pad_factor=PAD_FACTOR) * prob.mask
        scale = float(x[prob.mask > 0].std()) or 1.0
        net.field_scale.fill_(scale)
        net.chi_scale.fill_(scale if residual else 0.1)
        net = net.to(dev).train()  # batch norm on this one input's statistics

        def predict() -> torch.Tensor:
            return net.refine(x, prob.side) * prob.mask

        def losses(chi: torch.Tensor):
            data = l1_consistency(prob.forward_field(chi), prob.field, prob.weight)
            return data, total_variation(chi, prob.mask, prob.voxel_size)

        chi, summary, history = _optimise(
            "dip", predict, losses, list(net.parameters()), tv_weight, steps, lr, tol,
            patience, progress,
        )  # fmt: skip
    record = {"Method": "dip", "Settings": settings, **summary}
    return RefineResult(crop.put(chi, m), record, history, net.eval())


def _weight_source(weight, magnitude) -> str:
    if weight is not None:
        return "given weight (the field's reliability in the pipeline)"
    if magnitude is not None:
        return "magnitude / its 99th percentile in the mask, capped at 1"
    return "1 in the mask"


def refine(
    method: str,
    local_ppm: np.ndarray,
    mask: np.ndarray,
    side_info: SideInformation | Sequence[float],
    **kwargs,
) -> RefineResult:
    """Dispatch ``method`` (``finetune`` or ``dip``) with its keyword arguments."""
    if method == "finetune":
        return finetune(local_ppm, mask, side_info, **kwargs)
    if method == "dip":
        return deep_image_prior(local_ppm, mask, side_info, **kwargs)
    raise ValueError(f"refine method must be finetune or dip, got {method!r}")
