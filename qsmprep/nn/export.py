"""Export an adaptive U-Net for use outside qsmprep (``torch.export``, a ``.pt2`` file).

The exported program is the inference model (eval mode, batch norm folded) with a
dynamic batch size and dynamic spatial sizes (multiples of ``2**(depth-1)``, at least
twice that); it takes the network's input in ppm and returns chi in ppm: the local
field, or, for a model with ``input_transform="tkd"``, the field's TKD
(:func:`qsmprep.nn.physics.tkd` with the model's ``tkd_threshold``), which depends on the
whole volume and is computed before tiling, as
:func:`qsmprep.nn.inference.invert_adaptive_unet` does. Load it with
``torch.export.load(path).module()``; no qsmprep import is needed. The model's config is
stored in the file's ``extra_files`` as ``config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from qsmprep.nn.inference import prepare_model
from qsmprep.nn.unet import AdaptiveUNet3d

__all__ = ["export_model", "load_exported"]


class _Refine(nn.Module):
    """``(network input, side) -> chi``: the model without its input transform."""

    def __init__(self, net: AdaptiveUNet3d) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_ppm: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.net.refine(x_ppm, side)


class _FixedSide(nn.Module):
    """``network input -> chi`` with the side information stored in the module."""

    def __init__(self, net: AdaptiveUNet3d, side: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("side", side.reshape(1, -1))

    def forward(self, x_ppm: torch.Tensor) -> torch.Tensor:
        return self.net.refine(x_ppm, self.side.expand(x_ppm.shape[0], -1))


def export_model(
    model: AdaptiveUNet3d,
    path: str | Path,
    side: Sequence[float] | None = None,
    max_size: int = 1024,
) -> Path:
    """Write ``model`` as a ``torch.export`` program to ``path`` (``.pt2``); return the path.

    With ``side=None`` the program is ``(x_ppm (N,1,X,Y,Z), side (N,6)) -> chi_ppm``;
    with a 6-vector ``side`` (voxel size in mm, unit B0 direction in voxel axes) it is
    baked in and the program is ``x_ppm -> chi_ppm``. ``x_ppm`` is the network input
    (the field, or its TKD for ``input_transform="tkd"``: see the module docstring).
    Spatial sizes may be any multiple of ``m = 2**(depth-1)`` from ``2*m`` to ``max_size``.
    """
    if not isinstance(model, AdaptiveUNet3d):
        raise ValueError(f"export_model needs an AdaptiveUNet3d, got {type(model).__name__}")
    cfg = model.config
    mult = model.size_multiple
    if max_size < 2 * mult:
        raise ValueError(f"max_size must be at least {2 * mult}, got {max_size}")
    # Contiguous weights: the portable layout (and torch.export.save packs them whole).
    net = prepare_model(model, torch.device("cpu")).to(memory_format=torch.contiguous_format)
    # Size 1 at the bottleneck is a special case for torch.export's symbolic shapes.
    dims = [Dim(f"k{ax}", min=2, max=max_size // mult) for ax in "xyz"]
    batch = Dim("batch", min=1, max=1024)
    field_dims = {0: batch, 2: mult * dims[0], 3: mult * dims[1], 4: mult * dims[2]}
    example = torch.zeros(2, cfg["in_channels"], 2 * mult, 2 * mult, 2 * mult)
    if side is None:
        example_side = torch.zeros(2, cfg["side_dim"])
        example_side[:, :3] = 1.0
        example_side[:, 5] = 1.0
        program = torch.export.export(
            _Refine(net), (example, example_side), dynamic_shapes=(field_dims, {0: batch})
        )
    else:
        side_t = torch.as_tensor(side, dtype=torch.float32)
        if side_t.shape != (cfg["side_dim"],) or not torch.isfinite(side_t).all():
            raise ValueError(f"side must be {cfg['side_dim']} finite numbers, got {side}")
        program = torch.export.export(
            _FixedSide(net, side_t), (example,), dynamic_shapes=(field_dims,)
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": cfg, "side": None if side is None else [float(v) for v in side]}
    torch.export.save(program, path, extra_files={"config.json": json.dumps(meta)})
    return path


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """The callable module of an exported program and its metadata (``config``, ``side``)."""
    extra = {"config.json": ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra["config.json"])
