"""Rasterising analytic shapes with a one-voxel soft edge on an axis-aligned grid.

A :class:`Grid` maps voxel indices to world millimetres (``world = origin + index *
voxel_size``). Shapes return a bounding-box slice and a weight in [0, 1] per voxel of
that box: 1 inside, 0 outside, linear across one voxel at the surface, so a structure
thinner than a voxel still gets its partial-volume share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import interpolate, ndimage, spatial

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """Axis-aligned grid: ``shape``, ``origin`` (mm, centre of voxel 0), ``voxel_size`` (mm)."""

    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    voxel_size: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.voxel_size, 1.0])
        a[:3, 3] = self.origin
        return a

    def to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """World points ``(N, 3)`` (mm) to fractional voxel indices ``(N, 3)``."""
        return (np.asarray(points_mm, float) - self.origin) / self.voxel_size

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> Box | None:
        """Voxel slices covering the world box ``[lo_mm, hi_mm]``; None if it misses the grid."""
        lo = np.floor(self.to_index(lo_mm)).astype(int)
        hi = np.ceil(self.to_index(hi_mm)).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable world coordinates (mm) of the voxels in ``box``."""
        axes = []
        for ax, s in enumerate(box):
            c = self.origin[ax] + np.arange(s.start, s.stop) * self.voxel_size[ax]
            shape = [1, 1, 1]
            shape[ax] = c.size
            axes.append(c.reshape(shape))
        return axes[0], axes[1], axes[2]


def soft_edge(signed_distance_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Weight 1 inside, 0 outside, linear over ``edge_mm`` centred on the surface."""
    return np.clip(0.5 - signed_distance_mm / edge_mm, 0.0, 1.0).astype(np.float32)


def ellipsoid(
    grid: Grid,
    centre: Sequence[float],
    radii: Sequence[float],
    yaw_deg: float = 0.0,
    grow_mm: float = 0.0,
) -> tuple[Box, np.ndarray] | None:
    """Soft-edged ellipsoid (semi-axes ``radii`` mm, rotated by ``yaw_deg`` about z).

    ``grow_mm`` offsets the surface outward (approximately: the signed distance is the
    first-order estimate ``(rho - 1) / |grad rho|``).
    """
    c = np.asarray(centre, float)
    r = np.asarray(radii, float)
    reach = r.max() + grow_mm + 2 * max(grid.voxel_size)
    box = grid.box(c - reach, c + reach)
    if box is None:
        return None
    x, y, z = grid.coords(box)
    a = np.deg2rad(yaw_deg)
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    u = (np.cos(a) * dx + np.sin(a) * dy) / r[0]
    v = (-np.sin(a) * dx + np.cos(a) * dy) / r[1]
    w = dz / r[2]
    rho = np.sqrt(u * u + v * v + w * w)
    grad = np.sqrt((u / r[0]) ** 2 + (v / r[1]) ** 2 + (w / r[2]) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(rho > 1e-6, (rho - 1.0) * rho / grad, -r.min())
    return box, soft_edge(dist - grow_mm, min(grid.voxel_size))


def smooth_curve(points_mm: np.ndarray, step_mm: float = 0.25) -> np.ndarray:
    """Points every ``step_mm`` along a smooth (cubic if possible) curve through ``points_mm``."""
    p = np.asarray(points_mm, float)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) < 2:
        raise ValueError("a curve needs at least two 3-D points")
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 1e-6])
    p = p[keep]
    t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
    if len(p) < 2:
        raise ValueError("a curve needs at least two distinct points")
    spline = interpolate.make_interp_spline(t, p, k=min(3, len(p) - 1))
    n = max(int(np.ceil(t[-1] / step_mm)) + 1, 2)
    return spline(np.linspace(0.0, t[-1], n))


def tube(grid: Grid, centreline_mm: np.ndarray, radius_mm: float) -> tuple[Box, np.ndarray] | None:
    """Soft-edged tube of ``radius_mm`` around a densely sampled centreline ``(N, 3)`` (mm)."""
    pts = np.asarray(centreline_mm, float)
    reach = radius_mm + 2 * max(grid.voxel_size)
    box = grid.box(pts.min(0) - reach, pts.max(0) + reach)
    if box is None:
        return None
    x, y, z = grid.coords(box)
    shape = (x.size, y.size, z.size)
    xyz = np.stack(np.broadcast_arrays(x, y, z), axis=-1).reshape(-1, 3)
    d, _ = spatial.cKDTree(pts).query(xyz, distance_upper_bound=reach)
    d = np.where(np.isfinite(d), d, reach).reshape(shape)
    return box, soft_edge(d - radius_mm, min(grid.voxel_size))


class ShellProjector:
    """Moves points onto an iso-surface of a signed distance map (mm, > 0 outside).

    Used to lay veins on (or just under) the brain's outer surface.
    """

    def __init__(self, grid: Grid, signed_distance_mm: np.ndarray):
        self.grid = grid
        self.sd = np.asarray(signed_distance_mm, np.float32)
        self.grad = [g.astype(np.float32) for g in np.gradient(self.sd, *grid.voxel_size)]

    def _sample(self, arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(arr, idx.T, order=1, mode="nearest")

    def project(self, points_mm: np.ndarray, level_mm: float, iterations: int = 8) -> np.ndarray:
        """Newton steps along the distance gradient to the ``level_mm`` iso-surface."""
        p = np.array(np.atleast_2d(points_mm), float)
        for _ in range(iterations):
            idx = self.grid.to_index(p)
            d = self._sample(self.sd, idx) - level_mm
            g = np.stack([self._sample(gi, idx) for gi in self.grad], axis=1)
            gn = np.linalg.norm(g, axis=1, keepdims=True)
            g = np.where(gn > 1e-3, g / np.maximum(gn, 1e-3), 0.0)
            p -= d[:, None] * g
        return p
