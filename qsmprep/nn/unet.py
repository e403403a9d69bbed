"""The adaptive 3D U-Net for field-to-susceptibility inversion.

Graf, Wohlgemuth and Deistung, Front. Neurosci. 2024 (18:1366165): a 3D U-Net in which
one 3x3x3 convolution (the first of the second encoder stage) takes its kernel from a
Filter Manifold Network (FMN) fed with the side information
``s = (vx, vy, vz, bx, by, bz)``: voxel size in mm and the unit B0 direction in voxel
axes (:meth:`qsmprep.qsm.sideinfo.SideInformation.as_vector`).

Differences from the public reference implementation:

- the kernel is computed per sample, so one batch can mix acquisitions (a grouped
  convolution over the batch);
- ``residual`` is a real bool;
- the input/output normalisation (``field_scale``, ``chi_scale``, in ppm) lives in the
  model's buffers and config, so callers pass the local field in ppm and get chi in ppm;
- optionally (``input_transform="tkd"``) a physics-informed input: the model first
  inverts the field by truncated k-space division with each sample's own dipole kernel
  (from the side information) and the U-Net refines that estimate. The default
  (``"none"``) is the paper's network, which maps the field itself.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qsmprep.nn import physics

#: Input transforms of :class:`AdaptiveUNet3d`: the field itself, or its TKD inversion.
INPUT_TRANSFORMS = ("none", "tkd")

__all__ = [
    "AdaptiveConv3d",
    "AdaptiveUNet3d",
    "FilterManifoldNetwork",
    "adaptive_side_override",
    "canonical_side",
]


def canonical_side(side: torch.Tensor) -> torch.Tensor:
    """Side information ``(..., 6)`` with the B0 direction's sign made canonical.

    ``b`` and ``-b`` are the same physics (the dipole kernel depends on ``(k.b)^2``), so
    the direction is flipped where its first non-zero component, in the order ``b_z``,
    ``b_y``, ``b_x``, is negative: afterwards ``b_z >= 0`` (and ``b_y >= 0`` when
    ``b_z = 0``). ``b`` and ``-b`` map to the same vector exactly.
    """
    b = side[..., 3:6]
    bx, by, bz = b[..., 0], b[..., 1], b[..., 2]
    sign = torch.where(bz != 0, bz.sign(), torch.where(by != 0, by.sign(), bx.sign()))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return torch.cat([side[..., :3], b * sign[..., None], side[..., 6:]], dim=-1)


class FilterManifoldNetwork(nn.Module):
    """Fully connected network mapping side information to a flat convolution kernel.

    ``side_dim -> hidden[0] -> ... -> hidden[-1] -> n_out``, ELU after every layer
    (the paper's FMN: 6 -> 12 -> 48 -> 192 -> in*out*27).
    """

    def __init__(self, side_dim: int, hidden: Sequence[int], n_out: int) -> None:
        super().__init__()
        sizes = [side_dim, *hidden, n_out]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ELU()]
        self.net = nn.Sequential(*layers)

    @property
    def last(self) -> nn.Linear:
        """The output layer (holds most of the FMN's parameters)."""
        return self.net[-2]

    def forward(self, side: torch.Tensor) -> torch.Tensor:
        return self.net(side)


class AdaptiveConv3d(nn.Module):
    """3x3x3 convolution whose kernel is produced per sample by a :class:`FilterManifoldNetwork`.

    No bias: in the U-Net a batch norm follows, which would cancel it. A batch whose
    samples carry different side information is convolved with one kernel per sample
    (a grouped convolution with the batch folded into the channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        side_dim: int = 6,
        hidden: Sequence[int] = (12, 48, 192),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.side_dim = side_dim
        n_out = out_channels * in_channels * kernel_size**3
        self.fmn = FilterManifoldNetwork(side_dim, hidden, n_out)
        #: When set (a ``(side_dim,)`` tensor), used instead of the side information passed
        #: to :meth:`kernels`: see :func:`adaptive_side_override`.
        self.side_override: torch.Tensor | None = None
        # Start from an ordinary convolution's kernel: the output layer's bias is a
        # Kaiming-uniform kernel (as nn.Conv3d initialises) and its weights are scaled so
        # that the side information modulates that kernel by roughly 10 % between typical
        # acquisitions. PyTorch's default Linear init would instead give a kernel about
        # ten times an ordinary convolution's scale, all of it side-dependent.
        bound = 1.0 / math.sqrt(in_channels * kernel_size**3)
        with torch.no_grad():
            nn.init.uniform_(self.fmn.last.bias, -bound, bound)
            nn.init.normal_(self.fmn.last.weight, std=bound / math.sqrt(hidden[-1]))

    def kernels(self, side: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(N, out, in, k, k, k)`` for side information ``(N, side_dim)``.

        A 6-vector's B0 direction is made canonical first (:func:`canonical_side`), so
        ``b`` and ``-b`` give the same kernel.
        """
        k = self.kernel_size
        if self.side_override is not None:
            side = self.side_override.to(side).expand_as(side)
        if self.side_dim == 6:
            side = canonical_side(side)
        w = self.fmn(side)
        return w.view(side.shape[0], self.out_channels, self.in_channels, k, k, k)

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        pad = self.kernel_size // 2
        if n == 1:  # keeps the input's memory format (channels-last runs much faster on CPU)
            w = self.kernels(side)[0]
            if x.is_contiguous(memory_format=torch.channels_last_3d):
                w = w.contiguous(memory_format=torch.channels_last_3d)
            return F.conv3d(x, w, padding=pad)
        w = self.kernels(side).reshape(n * self.out_channels, c, *([self.kernel_size] * 3))
        y = F.conv3d(x.reshape(1, n * c, *x.shape[2:]), w, padding=pad, groups=n)
        y = y.view(n, self.out_channels, *x.shape[2:])
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            y = y.contiguous(memory_format=torch.channels_last_3d)
        return y


@contextlib.contextmanager
def adaptive_side_override(
    model: AdaptiveUNet3d, side: Sequence[float] | None
) -> Iterator[AdaptiveUNet3d]:
    """Within the block, ``model``'s adaptive layer uses ``side`` whatever side information
    the calls pass (``None``: no override); the TKD input transform keeps the passed one.

    An ablation tool: with a wrong ``side`` here and the right one in the calls, only the
    adaptive layer's kernel is wrong. Copies made inside the block (e.g. by
    :func:`qsmprep.nn.inference.prepare_model`) keep the override.
    """
    layer = model.adaptive
    if not isinstance(layer, AdaptiveConv3d):
        yield model
        return
    old = layer.side_override
    layer.side_override = None if side is None else torch.as_tensor(side, dtype=torch.float32)
    try:
        yield model
    finally:
        layer.side_override = old


def _short_float(t: torch.Tensor) -> float:
    """The shortest decimal that round-trips the float32 scalar ``t`` (0.1, not 0.10000000149)."""
    return float(str(np.float32(t.item())))


def _memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """Channels-last when ``x`` is stored so (and has more than one channel), else contiguous."""
    cl = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.channels_last_3d if cl else torch.contiguous_format


def _conv_bn_elu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ELU()]


class AdaptiveUNet3d(nn.Module):
    """3D U-Net with one side-information-driven convolution; local field (ppm) -> chi (ppm).

    Levels ``0..depth-1`` have ``base_channels * 2**level`` channels; each has two 3x3x3
    convolutions with batch norm and ELU; 2x max pooling down, 2x transposed convolution
    up, skip concatenation, 1x1x1 output convolution. The first convolution of level 1
    is ``self.adaptive`` (an :class:`AdaptiveConv3d`, or a plain ``nn.Conv3d`` when
    ``adaptive=False``). With ``residual`` the network predicts a correction to its
    normalised input: ``chi = chi_scale * (x / field_scale + net(x / field_scale))``, where
    ``x`` is the field, or with ``input_transform="tkd"`` its truncated k-space division
    (threshold ``tkd_threshold``) computed with each sample's dipole kernel; the network
    then refines a chi estimate and ``field_scale`` is that estimate's scale (ppm).

    Spatial sizes must be multiples of ``2**(depth-1)``; ``side`` is ``(N, side_dim)``
    (or ``(side_dim,)``, shared by the batch); it is ignored when ``adaptive=False`` and
    ``input_transform="none"``. :meth:`forward` is :meth:`transform_input` then
    :meth:`refine`; tiled inference calls them apart (the transform on the whole volume).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 5,
        residual: bool = True,
        side_dim: int = 6,
        fmn_hidden: Sequence[int] = (12, 48, 192),
        adaptive: bool = True,
        field_scale: float = 0.1,
        chi_scale: float = 0.1,
        input_transform: str = "none",
        tkd_threshold: float = 0.15,
    ) -> None:
        super().__init__()
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(
                f"input_transform must be one of {INPUT_TRANSFORMS}, got {input_transform!r}"
            )
        if input_transform == "tkd" and side_dim != 6:
            raise ValueError("the TKD input needs the 6-vector side information")
        if not 0 < tkd_threshold < 1:
            raise ValueError(f"tkd_threshold must be in (0, 1), got {tkd_threshold}")
        if not isinstance(residual, bool) or not isinstance(adaptive, bool):
            raise ValueError("residual and adaptive must be bools (not strings or numbers)")
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (the adaptive layer is in level 1), got {depth}")
        if min(in_channels, out_channels, base_channels, side_dim) < 1:
            raise ValueError("channel counts and side_dim must be positive")
        if residual and in_channels != out_channels:
            raise ValueError("residual needs in_channels == out_channels")
        if not (field_scale > 0 and chi_scale > 0):
            raise ValueError("field_scale and chi_scale must be positive (ppm)")
        self._config = {
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "base_channels": int(base_channels),
            "depth": int(depth),
            "residual": residual,
            "side_dim": int(side_dim),
            "fmn_hidden": [int(h) for h in fmn_hidden],
            "adaptive": adaptive,
            "input_transform": input_transform,
            "tkd_threshold": float(tkd_threshold),
        }
        self.depth = depth
        self.input_transform = input_transform
        self.residual = residual
        self.is_adaptive = adaptive
        self.register_buffer("field_scale", torch.tensor(float(field_scale)))
        self.register_buffer("chi_scale", torch.tensor(float(chi_scale)))

        ch = [base_channels * 2**lvl for lvl in range(depth)]
        if adaptive:
            self.adaptive = AdaptiveConv3d(ch[0], ch[1], side_dim, fmn_hidden)
        else:
            self.adaptive = nn.Conv3d(ch[0], ch[1], 3, padding=1, bias=False)
        down = []
        for lvl in range(depth):
            cin = in_channels if lvl == 0 else ch[lvl - 1]
            if lvl == 1:  # its first convolution is self.adaptive
                first = [nn.BatchNorm3d(ch[1]), nn.ELU()]
            else:
                first = _conv_bn_elu(cin, ch[lvl])
            down.append(nn.Sequential(*first, *_conv_bn_elu(ch[lvl], ch[lvl])))
        self.down = nn.ModuleList(down)
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(ch[lvl + 1], ch[lvl], 2, stride=2) for lvl in range(depth - 1)
        )
        self.dec = nn.ModuleList(
            nn.Sequential(*_conv_bn_elu(2 * ch[lvl], ch[lvl]), *_conv_bn_elu(ch[lvl], ch[lvl]))
            for lvl in range(depth - 1)
        )
        self.head = nn.Conv3d(ch[0], out_channels, 1)

    @property
    def config(self) -> dict:
        """Every constructor argument, JSON-serialisable (scales in ppm)."""
        return {
            **self._config,
            "fmn_hidden": list(self._config["fmn_hidden"]),
            "field_scale": _short_float(self.field_scale),
            "chi_scale": _short_float(self.chi_scale),
        }

    @classmethod
    def from_config(cls, cfg: dict) -> AdaptiveUNet3d:
        """Rebuild a model (fresh weights) from :attr:`config`."""
        unknown = set(cfg) - set(inspect.signature(cls).parameters)
        if unknown:
            raise ValueError(f"unknown AdaptiveUNet3d config keys: {sorted(unknown)}")
        return cls(**cfg)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (``2**(depth-1)``)."""
        return 2 ** (self.depth - 1)

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the upsampling path (transposed convolutions and decoder blocks)."""
        return [*self.up.parameters(), *self.dec.parameters()]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder, bottleneck and output convolution (not ``adaptive``)."""
        return [*self.down.parameters(), *self.head.parameters()]

    def _check(self, field: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor | None:
        n_in = self._config["in_channels"]
        if field.dim() != 5 or field.shape[1] != n_in:
            raise ValueError(f"field must be (N, {n_in}, X, Y, Z), got {tuple(field.shape)}")
        m = self.size_multiple
        if any(s % m for s in field.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(field.shape[2:])} is not a multiple of {m}; pad the input"
            )
        if not self.is_adaptive and self.input_transform == "none":
            return None
        if side is None:
            raise ValueError("this model needs side information (N, 6)")
        d = self._config["side_dim"]
        side = side.to(field.dtype)
        if side.dim() == 1:
            side = side[None]
        if side.dim() != 2 or side.shape[1] != d or side.shape[0] not in (1, field.shape[0]):
            raise ValueError(
                f"side must be ({field.shape[0]}, {d}) or ({d},), got {tuple(side.shape)}"
            )
        return side.expand(field.shape[0], d)

    def transform_input(self, field_ppm: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """The network's input (ppm) from the field: the field itself, or its TKD."""
        if self.input_transform == "none":
            return field_ppm
        side = self._check(field_ppm, side)
        return physics.tkd(field_ppm, side, self._config["tkd_threshold"]).to(field_ppm.dtype)

    def refine(self, x_ppm: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net on an input made by :meth:`transform_input`; chi (ppm)."""
        return self.decode_from(*self.features(x_ppm, side, self.depth - 1))

    def features(
        self, x_ppm: torch.Tensor, side: torch.Tensor | None, level: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The network run up to decoder ``level``: ``(x, skips, h)``.

        ``x`` is the normalised input, ``skips`` the encoder outputs of levels
        ``0..level-1`` and ``h`` the decoder's output at ``level`` (the bottleneck for
        ``level = depth - 1``). :meth:`decode_from` finishes the pass; the two together
        are :meth:`refine`. Per-subject fine-tuning of the upper decoder levels computes
        these once and optimises only what follows.
        """
        if not 0 <= level <= self.depth - 1:
            raise ValueError(f"level must be in 0..{self.depth - 1}, got {level}")
        side = self._check(x_ppm, side)
        x = x_ppm / self.field_scale
        skips: list[torch.Tensor] = []
        h = x
        fmt = _memory_format_of(x)
        for lvl, block in enumerate(self.down):
            if lvl > 0:  # pooling loses channels-last on CPU; the convolutions need it back
                h = F.max_pool3d(h, 2).contiguous(memory_format=fmt)
            if lvl == 1:
                h = self.adaptive(h, side) if self.is_adaptive else self.adaptive(h)
            h = block(h).contiguous(memory_format=fmt)
            if lvl < self.depth - 1:
                skips.append(h)
        for lvl in reversed(range(level, self.depth - 1)):
            h = self.dec[lvl](torch.cat([skips[lvl], self.up[lvl](h)], dim=1))
        return x, skips[:level], h

    def decode_from(
        self, x: torch.Tensor, skips: Sequence[torch.Tensor], h: torch.Tensor
    ) -> torch.Tensor:
        """Chi (ppm) from :meth:`features`: the decoder levels below ``len(skips)``, the
        output convolution and the residual."""
        for lvl in reversed(range(len(skips))):
            h = self.dec[lvl](torch.cat([skips[lvl], self.up[lvl](h)], dim=1))
        out = self.head(h)
        if self.residual:
            out = out + x
        return out * self.chi_scale

    def forward(self, field_ppm: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.refine(self.transform_input(field_ppm, side), side)

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())
