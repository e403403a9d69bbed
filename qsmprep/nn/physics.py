"""Dipole physics in torch: per-sample kernels, forward convolution and TKD.

Every sample of a batch carries its own side information ``(vx, vy, vz, bx, by, bz)``
(voxel size in mm, unit B0 direction in voxel axes), so each gets its own kernel from
:func:`qsmprep.qsm.dipole.dipole_kernel` (the same discrete kernel as the numerical
core). Arrays are ``(N, 1, X, Y, Z)`` in ppm, zero padded by ``pad_factor`` against the
FFT's wrap-around.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qsmprep.qsm.dipole import DEFAULT_PAD_FACTOR, dipole_kernel, padded_shape

_DIMS = (-3, -2, -1)


def dipole_kernels(
    shape: Sequence[int], side: torch.Tensor, pad_factor: float = DEFAULT_PAD_FACTOR
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Half-spectrum dipole kernels ``(N, 1, *rfft shape)`` for each row of ``side``.

    ``side`` is ``(N, 6)``: voxel size (mm) and B0 direction (voxel axes). Kernels are
    built on the grid padded by ``pad_factor``, which is returned too.
    """
    pshape = padded_shape(shape, pad_factor)
    s = side.detach().cpu().double().numpy()
    ks = [dipole_kernel(pshape, row[:3], row[3:]) for row in s]
    return torch.from_numpy(np.stack(ks))[:, None], pshape


def apply_kernel(x: torch.Tensor, kern: torch.Tensor, pshape: Sequence[int]) -> torch.Tensor:
    """``x`` (float32, ``(N, 1, X, Y, Z)``) convolved with the half-spectrum ``kern`` of
    :func:`dipole_kernels` on the padded grid ``pshape``, cropped back; differentiable.

    Callers that convolve many times with one kernel build it once and call this.
    """
    spec = torch.fft.rfftn(x, s=pshape, dim=_DIMS) * kern.to(x.device)
    out = torch.fft.irfftn(spec, s=pshape, dim=_DIMS)
    return out[..., : x.shape[2], : x.shape[3], : x.shape[4]]


def dipole_convolve(
    chi: torch.Tensor, side: torch.Tensor, pad_factor: float = DEFAULT_PAD_FACTOR
) -> torch.Tensor:
    """Field (ppm) of ``chi`` (ppm, ``(N, 1, X, Y, Z)``), each sample with its own kernel.

    Differentiable; float32.
    """
    kern, pshape = dipole_kernels(chi.shape[2:], side, pad_factor)
    return apply_kernel(chi.float(), kern, pshape)


def tkd(
    field: torch.Tensor,
    side: torch.Tensor,
    threshold: float = 0.15,
    pad_factor: float = DEFAULT_PAD_FACTOR,
) -> torch.Tensor:
    """Truncated k-space division of ``field`` (ppm, ``(N, 1, X, Y, Z)``): chi (ppm).

    ``1/D`` where ``|D| > threshold``, ``sign(D)/threshold`` elsewhere, 0 at k = 0 (the
    mean is not determined), as :func:`qsmprep.qsm.inversion.tkd`; each sample with its
    own kernel. Not masked: the caller masks.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"TKD threshold must be in (0, 1), got {threshold}")
    kern, pshape = dipole_kernels(field.shape[2:], side, pad_factor)
    inv = torch.where(kern.abs() > threshold, 1 / kern, torch.sign(kern) / threshold)
    inv[..., 0, 0, 0] = 0
    return apply_kernel(field.float(), inv, pshape)
