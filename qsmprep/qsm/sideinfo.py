"""Side information from the NIfTI affine: voxel size and the B0 direction in voxel axes.

The scanner's main field points along world +z (NIfTI scanner/RAS+ coordinates from
dcm2niix), so no resampling is needed: the physics is evaluated on the image's own
grid with the B0 direction expressed in that grid's axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Tolerance on ``R^T R - I`` before an affine is treated as sheared.
SHEAR_TOL = 1e-3


def check_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    """``voxel_size`` (mm) as 3 floats; ValueError unless it is 3 finite positive numbers."""
    vs = tuple(float(v) for v in np.ravel(voxel_size))
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {voxel_size!r}")
    return vs


def voxel_size(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm: the norms of the affine's first three columns."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    return np.linalg.norm(a, axis=0)


def b0_direction(
    affine: np.ndarray, b0_world: tuple[float, float, float] = (0, 0, 1)
) -> np.ndarray:
    """Unit B0 direction expressed in the voxel axes ``(i, j, k)``.

    ``R = A[:3, :3] / column norms``; ``b = R^T b0_world``, normalised. Raises
    ``ValueError`` for a sheared affine, whose voxel axes are not orthogonal.
    """
    a = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    if np.any(norms <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    rot = a / norms
    if np.abs(rot.T @ rot - np.eye(3)).max() > SHEAR_TOL:
        raise ValueError(
            "affine is sheared (voxel axes are not orthogonal); QSM needs an orthogonal grid"
        )
    b = rot.T @ np.asarray(b0_world, dtype=float)
    return b / np.linalg.norm(b)


@dataclass(frozen=True)
class SideInformation:
    """Per-run side information: voxel size (mm) and unit B0 direction in voxel axes."""

    voxel_size: tuple[float, float, float]
    b0_direction: tuple[float, float, float]

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> SideInformation:
        vs = voxel_size(affine)
        b = b0_direction(affine)
        return cls(tuple(float(v) for v in vs), tuple(float(v) for v in b))

    @classmethod
    def from_dict(cls, d: dict) -> SideInformation:
        """Inverse of :meth:`to_dict` (BIDS sidecar keys)."""
        vs = tuple(float(v) for v in d["VoxelSize"])
        b = np.asarray(d["B0Direction"], dtype=float)
        if len(vs) != 3 or b.shape != (3,):
            raise ValueError("SideInformation needs 3 voxel sizes and a 3-vector B0Direction")
        b = b / np.linalg.norm(b)
        return cls(vs, tuple(float(v) for v in b))

    def as_vector(self) -> np.ndarray:
        """``(vx, vy, vz, bx, by, bz)`` as float32, the adaptive U-Net's input."""
        return np.array(self.voxel_size + self.b0_direction, dtype=np.float32)

    def to_dict(self, decimals: int = 6) -> dict:
        """The sidecar form: ``{"VoxelSize": [...], "B0Direction": [...]}``."""
        return {
            "VoxelSize": [round(v, decimals) for v in self.voxel_size],
            "B0Direction": [round(v, decimals) for v in self.b0_direction],
        }

    @property
    def b0_angle_deg(self) -> float:
        """Angle between B0 and the third voxel axis, in degrees."""
        return float(np.degrees(np.arccos(np.clip(abs(self.b0_direction[2]), 0, 1))))
