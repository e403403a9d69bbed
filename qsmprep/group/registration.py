"""Registration of a run to the template with DIPY, and moving images between the two.

:func:`register` aligns a run's skull-stripped magnitude (moving) to the skull-stripped
template (static): an affine registration that maximises Mattes mutual information
(centre of mass, translation, rigid, then affine, each over a 3-level pyramid), then, with
``method="syn"``, a symmetric diffeomorphic (SyN) registration with the cross-correlation
metric. DIPY does the work; this module only chooses the settings and keeps the maps.

:class:`Registration` moves images both ways: ``to_template`` resamples a run's image on
the template grid; ``template_coordinates`` gives, for every voxel of the run, the
template's world coordinates (mm) that it maps to, so that an atlas on any grid of the
template space can be sampled in the run's space (:func:`sample_labels`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

logger = logging.getLogger("qsmprep")

#: Affine stages, coarse to fine (DIPY's names).
AFFINE_PIPELINE = ("center_of_mass", "translation", "rigid", "affine")

#: Iterations per pyramid level (coarse to fine), smoothing (voxels) and shrink factors.
AFFINE_LEVEL_ITERS = (200, 100, 20)
PYRAMID_SIGMAS = (3.0, 1.0, 0.0)
PYRAMID_FACTORS = (4, 2, 1)

#: SyN iterations per level (coarse to fine) and the cross-correlation radius (voxels).
SYN_LEVEL_ITERS = (30, 20, 5)
SYN_CC_RADIUS = 2


@dataclass
class Registration:
    """Maps between a run's grid (moving) and the template grid (static)."""

    moving_shape: tuple[int, int, int]
    moving_affine: np.ndarray
    static_shape: tuple[int, int, int]
    static_affine: np.ndarray
    affine_map: Any  # dipy.align.imaffine.AffineMap
    diffeo: Any = None  # dipy.align.imwarp.DiffeomorphicMap, prealigned by affine_map
    method: str = "affine"

    @property
    def _map(self):
        return self.diffeo if self.diffeo is not None else self.affine_map

    def to_template(self, image: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """``image`` (on the run's grid) resampled on the template grid."""
        return np.asarray(
            self._map.transform(np.asarray(image, dtype=np.float64), interpolation=interpolation)
        )

    def to_subject(self, image: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """``image`` on the template grid resampled on the run's grid."""
        return np.asarray(
            self._map.transform_inverse(
                np.asarray(image, dtype=np.float64), interpolation=interpolation
            )
        )

    def template_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Template world coordinates (mm) of every voxel of the run, ``(X, Y, Z, 3)``,
        and where they are valid (inside the template grid)."""
        ijk = np.indices(self.static_shape, dtype=np.float64)
        world = np.tensordot(self.static_affine[:3, :3], ijk, axes=1)
        world += self.static_affine[:3, 3][:, None, None, None]
        coords = np.stack([self.to_subject(world[a]) for a in range(3)], axis=-1)
        valid = self.to_subject(np.ones(self.static_shape)) > 0.99
        return coords, valid


def register(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    static: np.ndarray,
    static_affine: np.ndarray,
    *,
    moving_mask: np.ndarray | None = None,
    static_mask: np.ndarray | None = None,
    method: str = "affine",
) -> Registration:
    """Register ``moving`` (a run's magnitude) to ``static`` (the template).

    Intensities are used inside the masks only (zero outside), after scaling each image
    to its 99th percentile. ``method``: ``"affine"`` or ``"syn"`` (affine, then SyN).
    """
    from dipy.align import affine_registration
    from dipy.align.imaffine import AffineMap

    if method not in ("affine", "syn"):
        raise ValueError(f"registration method must be affine or syn, not {method!r}")
    mov = _prepared(moving, moving_mask)
    sta = _prepared(static, static_mask)
    _, matrix = affine_registration(
        mov,
        sta,
        moving_affine=moving_affine,
        static_affine=static_affine,
        pipeline=list(AFFINE_PIPELINE),
        level_iters=list(AFFINE_LEVEL_ITERS),
        sigmas=list(PYRAMID_SIGMAS),
        factors=list(PYRAMID_FACTORS),
    )
    affine_map = AffineMap(
        matrix,
        domain_grid_shape=sta.shape,
        domain_grid2world=static_affine,
        codomain_grid_shape=mov.shape,
        codomain_grid2world=moving_affine,
    )
    reg = Registration(
        tuple(mov.shape), np.asarray(moving_affine), tuple(sta.shape), np.asarray(static_affine),
        affine_map, None, "affine",
    )  # fmt: skip
    if method == "syn":
        from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
        from dipy.align.metrics import CCMetric

        syn = SymmetricDiffeomorphicRegistration(
            CCMetric(3, radius=SYN_CC_RADIUS), level_iters=list(SYN_LEVEL_ITERS)
        )
        reg.diffeo = syn.optimize(
            sta, mov, static_grid2world=static_affine, moving_grid2world=moving_affine,
            prealign=matrix,
        )  # fmt: skip
        reg.method = "syn"
    return reg


def _prepared(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if x.ndim == 4:
        x = x[..., 0]
    if mask is not None:
        x = np.where(mask, x, 0.0)
    scale = np.percentile(x[x > 0], 99) if np.any(x > 0) else 1.0
    return x / scale


def sample_labels(
    labels: np.ndarray, labels_affine: np.ndarray, coords: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour labels of the image ``labels`` (any grid of the template space)
    at world coordinates ``coords`` (``(..., 3)`` mm); 0 where not ``valid`` or outside."""
    inv = np.linalg.inv(labels_affine)
    ijk = coords @ inv[:3, :3].T + inv[:3, 3]
    out = ndimage.map_coordinates(
        np.asarray(labels, dtype=np.int32), np.moveaxis(ijk, -1, 0), order=0, mode="constant",
        cval=0,
    )  # fmt: skip
    return np.where(valid, out, 0).astype(np.int32)
