"""Tiled, memory-bounded inference of the adaptive U-Net: local field (ppm) -> chi (ppm).

The volume is zero-padded to multiples of ``2**(depth-1)`` and cut into the overlapping
tiles that fit the memory budget with the least computation (the whole volume when it
fits). Tiles start on the whole volume's pooling grid and batch norm in eval mode acts
voxel by voxel (it is folded into the preceding convolution), so a tile computes what a
whole-volume pass computes except within the network's reach of the tile's border.
Over each overlap the tile near its own border is ignored for the outer quarter, then a
raised-cosine ramp hands over to its neighbour; the weights of neighbours sum to one.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.nn.weights import load_model
from qsmprep.qsm.sideinfo import SideInformation

__all__ = [
    "DEFAULT_MEM_GB",
    "DEFAULT_OVERLAP",
    "activation_bytes_per_voxel",
    "invert_adaptive_unet",
    "plan_inference",
    "plan_tiles",
    "prepare_model",
    "resolve_device",
]

LOGGER = logging.getLogger("qsmprep")

#: Memory budget (GB) when none is given: a 1 mm head (~180x220x180) runs as one tile.
DEFAULT_MEM_GB = 4.0

#: Minimum overlap (voxels) between neighbouring tiles.
DEFAULT_OVERLAP = 32


def activation_bytes_per_voxel(model: AdaptiveUNet3d) -> float:
    """Peak inference memory per tile voxel (bytes) for ``model``'s configuration.

    Measured peak resident memory of float32 CPU inference (batch norm folded,
    channels-last, in-place ELU; torch 2.13, 2 threads) on the 1 mm head padded to
    192x224x192: 352 and 167 bytes per voxel with 16 and 8 base channels. Deeper
    levels add little (each has 1/8 of the voxels and twice the channels), so the
    estimate scales with the base channels, rounded up: ``24*C + 32``.
    """
    return 24.0 * model.config["base_channels"] + 32.0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without CUDA is a ``ValueError``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but CUDA is not available to torch "
            f"{torch.__version__} (CPU build or no GPU); use --device cpu or auto"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda")
    return dev


def prepare_model(model: AdaptiveUNet3d, device: torch.device) -> AdaptiveUNet3d:
    """An eval-mode copy on ``device`` with batch norm folded into the convolutions.

    Every ``Conv3d`` directly followed by a ``BatchNorm3d`` becomes one convolution
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``), the ELUs work in place. The caller's
    model is not changed. On CPU the weights are stored channels-last.
    """
    fused = copy.deepcopy(model).eval()
    for seq in fused.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv3d) and isinstance(seq[i + 1], nn.BatchNorm3d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    for mod in fused.modules():
        if isinstance(mod, nn.ELU):
            mod.inplace = True
    return fused.to(device, memory_format=_memory_format(device))


def _memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on CPU: oneDNN's 3D convolutions run about 30 % faster on it."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def _axis_starts(n: int, length: int, overlap: int, multiple: int) -> list[int]:
    """Starts (multiples of ``multiple``) of the fewest tiles of ``length`` covering ``n``.

    Tiles cover ``ceil(n / multiple) * multiple`` voxels, the extent of a whole-volume
    pass, and start on its pooling grid, so a tile computes exactly what the whole
    volume computes wherever the tile's border is out of reach.
    """
    extent = math.ceil(n / multiple) * multiple
    if length >= extent:
        return [0]
    if length - overlap < multiple:
        raise ValueError(f"tile length {length} leaves no room beyond the overlap {overlap}")
    units = (extent - length) // multiple
    gaps = 1
    while math.ceil(units / gaps) * multiple > length - overlap:
        gaps += 1
    return [multiple * (i * units // gaps) for i in range(gaps + 1)]


def plan_tiles(
    shape: Sequence[int],
    max_voxels: int,
    overlap: int = DEFAULT_OVERLAP,
    multiple: int = 16,
) -> tuple[tuple[int, int, int], list[list[int]]]:
    """Tile shape and per-axis start offsets for a volume of ``shape``.

    Picks the tile shape (sides multiples of ``multiple``, at most ``max_voxels``
    voxels, neighbours overlapping by at least ``overlap`` voxels) that minimises the
    voxels computed in total (ties: fewer tiles). Raises ``ValueError`` when no tile
    fits the budget.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes, got {tuple(shape)}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    min_len = max(multiple, 2 * overlap)  # room for a ramp on each side
    options = []
    for n in shape:
        full = math.ceil(n / multiple) * multiple
        lengths = range(min(full, math.ceil(min_len / multiple) * multiple), full + 1, multiple)
        options.append([(t, _axis_starts(n, t, overlap, multiple)) for t in lengths])
    best = None
    for combo in itertools.product(*options):
        if math.prod(t for t, _ in combo) > max_voxels:
            continue
        n_tiles = math.prod(len(st) for _, st in combo)
        key = (n_tiles * math.prod(t for t, _ in combo), n_tiles)
        if best is None or key < best[0]:
            best = (key, combo)
    if best is None:
        smallest = math.prod(opts[0][0] for opts in options)
        raise ValueError(
            f"the memory budget allows {max_voxels} voxels per tile, fewer than the smallest "
            f"usable tile ({smallest} voxels); raise the memory budget"
        )
    return tuple(t for t, _ in best[1]), [st for _, st in best[1]]


def _ramps(length: int, starts: list[int]) -> list[np.ndarray]:
    """Per-tile 1D blending weights that sum to one along the axis.

    Over an overlap of ``ov`` voxels the tile closer to its own border gets weight 0 on
    the outer ``ov // 4`` voxels (where its output lacks context), then a raised-cosine
    ramp hands over to its neighbour; away from overlaps the weight is 1.
    """

    def rise(ov: int) -> np.ndarray:
        margin = ov // 4
        ramp = ov - 2 * margin
        w = np.ones(ov, dtype=np.float32)
        w[:margin] = 0
        w[margin : ov - margin] = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
        return w

    out = []
    for i, s in enumerate(starts):
        w = np.ones(length, dtype=np.float32)
        if i > 0:
            ov = starts[i - 1] + length - s
            w[:ov] *= rise(ov)
        if i < len(starts) - 1:
            ov = s + length - starts[i + 1]
            w[length - ov :] *= rise(ov)[::-1]
        out.append(w)
    return out


@contextlib.contextmanager
def _torch_settings(device: torch.device, nthreads: int | None) -> Iterator[None]:
    """Set threads and deterministic algorithms for the call, then restore them."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if nthreads is not None:
            torch.set_num_threads(nthreads)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def plan_inference(
    model: AdaptiveUNet3d,
    shape: Sequence[int],
    device: str | torch.device = "cpu",
    mem_gb: float | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> tuple[tuple[int, int, int], list[list[int]]]:
    """The tiling :func:`invert_adaptive_unet` uses for a volume of ``shape``.

    The budget (``mem_gb``, default :data:`DEFAULT_MEM_GB`; on CUDA at most 80 % of the
    free GPU memory) pays for two copies of the weights and three float32 copies of the
    padded volume (input, blended output, result); the rest bounds a tile's activations
    (:func:`activation_bytes_per_voxel`). Returns ``(tile_shape, starts per axis)``.
    """
    budget = (DEFAULT_MEM_GB if mem_gb is None else float(mem_gb)) * 1e9
    if not budget > 0:
        raise ValueError(f"mem_gb must be positive, got {mem_gb}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = min(budget, 0.8 * free)
    m = model.size_multiple
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    volume = math.prod(math.ceil(n / m) * m for n in shape) * 4
    budget -= 2 * weights + 3 * volume
    max_voxels = max(0, int(budget // activation_bytes_per_voxel(model)))
    return plan_tiles(shape, max_voxels, overlap, m)


def invert_adaptive_unet(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    side_info: SideInformation | Sequence[float],
    model: AdaptiveUNet3d | str | Path | None = None,
    device: str | torch.device = "auto",
    mem_gb: float | None = None,
    nthreads: int | None = None,
    *,
    overlap: int = DEFAULT_OVERLAP,
    tile_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Susceptibility (ppm) from the local field (ppm) with the adaptive U-Net.

    ``local_ppm`` and ``mask`` are ``(X, Y, Z)`` on the acquisition grid; ``side_info``
    the voxel size (mm) and B0 direction in voxel axes of that grid (or its 6-vector).
    ``model``: a loaded model, a path to a model file, or ``None`` for the bundled one.
    ``mem_gb`` bounds the activation memory and so the tile size (default
    :data:`DEFAULT_MEM_GB`; on CUDA also at most 80 % of the free GPU memory);
    ``nthreads`` sets torch's CPU threads for the call. ``tile_shape`` forces a tile
    shape (multiples of ``2**(depth-1)``). Returns float32 chi, zero outside ``mask``,
    not referenced. On CPU the result is deterministic for a given tiling.
    """
    field = np.asarray(local_ppm)
    if field.ndim != 3:
        raise ValueError(f"local_ppm must be a 3D array, got shape {field.shape}")
    mask = np.asarray(mask)
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} differs from local_ppm shape {field.shape}")
    mask = mask.astype(bool)
    if not np.isfinite(field[mask]).all():
        raise ValueError("local_ppm has NaN or infinite values inside the mask")
    side = np.asarray(
        side_info.as_vector() if isinstance(side_info, SideInformation) else side_info,
        dtype=np.float32,
    )
    if nthreads is not None and nthreads < 1:
        raise ValueError(f"nthreads must be >= 1, got {nthreads}")
    dev = resolve_device(device)
    if model is None or isinstance(model, str | Path):
        model = load_model(model)
    elif not isinstance(model, AdaptiveUNet3d):
        raise ValueError(f"model must be an AdaptiveUNet3d, a path or None, not {type(model)}")
    if side.shape != (model.config["side_dim"],) or not np.isfinite(side).all():
        raise ValueError(
            f"side information must be {model.config['side_dim']} finite numbers, got {side}"
        )

    m = model.size_multiple
    if tile_shape is None:
        tshape, starts = plan_inference(model, field.shape, dev, mem_gb, overlap)
    else:
        if len(tile_shape) != 3 or any(t < m or t % m for t in tile_shape):
            raise ValueError(f"tile_shape must be 3 positive multiples of {m}, got {tile_shape}")
        # A tile larger than the padded volume is the whole-volume pass.
        tshape = tuple(
            min(int(t), math.ceil(n / m) * m) for t, n in zip(tile_shape, field.shape, strict=True)
        )
        starts = [_axis_starts(n, t, overlap, m) for n, t in zip(field.shape, tshape, strict=True)]
    padded = tuple(math.ceil(n / m) * m for n in field.shape)
    vol = np.zeros(padded, dtype=np.float32)
    vol[: field.shape[0], : field.shape[1], : field.shape[2]] = np.where(mask, field, 0)
    LOGGER.info(
        "adaptive U-Net on %s: %d tile(s) of %s, device %s",
        field.shape,
        math.prod(len(s) for s in starts),
        tshape,
        dev,
    )
    net = prepare_model(model, dev)
    side_t = torch.from_numpy(side)[None].to(dev)
    with _torch_settings(dev, nthreads), torch.inference_mode():
        if net.input_transform != "none":  # on the whole volume, not tile by tile
            x = net.transform_input(torch.from_numpy(vol)[None, None].to(dev), side_t)
            vol = x[0, 0].float().cpu().numpy()
        out = _blend_tiles(net, vol, side_t, tshape, starts)
    chi = out[: field.shape[0], : field.shape[1], : field.shape[2]]
    return np.where(mask, chi, 0).astype(np.float32)


def _blend_tiles(
    net: AdaptiveUNet3d,
    vol: np.ndarray,
    side: torch.Tensor,
    tshape: tuple[int, int, int],
    starts: list[list[int]],
) -> np.ndarray:
    """Run ``net.refine`` on every tile of the network input ``vol`` and blend the
    outputs with :func:`_ramps`."""
    dev = side.device
    ramps = [_ramps(t, s) for t, s in zip(tshape, starts, strict=True)]
    wsum = [np.zeros(n, dtype=np.float32) for n in vol.shape]
    for ax in range(3):
        for s, w in zip(starts[ax], ramps[ax], strict=True):
            wsum[ax][s : s + tshape[ax]] += w
    out = np.zeros(vol.shape, dtype=np.float32)
    n_tiles = math.prod(len(s) for s in starts)
    for i, idx in enumerate(itertools.product(*(range(len(s)) for s in starts))):
        sl = tuple(slice(starts[ax][j], starts[ax][j] + tshape[ax]) for ax, j in enumerate(idx))
        x = torch.from_numpy(np.ascontiguousarray(vol[sl]))[None, None]
        x = x.to(dev).contiguous(memory_format=_memory_format(dev))
        y = net.refine(x, side)[0, 0].float().cpu().numpy()
        w = (
            ramps[0][idx[0]][:, None, None]
            * ramps[1][idx[1]][None, :, None]
            * ramps[2][idx[2]][None, None, :]
        )
        out[sl] += w * y
        if n_tiles > 1:
            LOGGER.info("adaptive U-Net tile %d/%d done", i + 1, n_tiles)
    out /= wsum[0][:, None, None] * wsum[1][None, :, None] * wsum[2][None, None, :]
    return out
