"""Synthetic training pairs (local field, chi) for the adaptive U-Net, made on the fly.

Every pair is a patch of ``patch_size`` voxels with its own voxel size (mm, possibly
anisotropic) and B0 direction (unit vector in voxel axes), so that the side information
``(vx, vy, vz, bx, by, bz)`` changes what the network must do. Two sources of chi (ppm):

- **random shapes**: ellipsoids, boxes and cylinders at random positions, sizes and
  orientations (in mm, so a sphere stays a sphere on anisotropic grids) over a smooth
  texture, with occasional strong para- and diamagnetic sources (+-0.5 to 2 ppm), inside a
  random smooth "brain" mask (or the whole patch);
- **head patches**: the brain of :func:`qsmprep.sim.make_head_phantom` resampled onto the
  patch grid through a random rotation, flips and an elastic warp (one trilinear
  interpolation), then a random monotone contrast change of chi (linear, gamma, log or
  sigmoid on its normalised range, as in QSMInvNet), a random susceptibility scale and,
  sometimes, added strong sources.

The field is simulated with the pair's own dipole kernel
(:func:`qsmprep.qsm.dipole.forward_field`, zero padded by ``pad_factor`` against wrap-around)
from ``chi * mask`` only: the local field is the field of the sources inside the mask, the
same definition that background removal aims at. Head patches are simulated on a region
``head_context`` times the patch and cut from its centre, so the brain around the patch
contributes its field as in a whole-brain local field; random-shape patches hold all
their sources. Gaussian noise (a random fraction of the field's standard
deviation in the mask) is added inside the mask; field and chi are zero outside it.

Pairs are deterministic functions of ``(split, seed, index)``; the splits use disjoint
random streams and disjoint phantom seeds (:data:`SPLIT_PHANTOM_SEEDS`), so validation and
test phantoms are never seen in training.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from qsmprep.qsm.dipole import DEFAULT_PAD_FACTOR, forward_field

#: Index of each split in the random streams.
SPLITS = {"train": 0, "val": 1, "test": 2}

#: First phantom seed of each split; a split's pool uses ``first .. first + pool_size - 1``.
SPLIT_PHANTOM_SEEDS = {"train": 0, "val": 1000, "test": 2000}


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic pair generator (lengths in mm, chi and field in ppm)."""

    patch_size: tuple[int, int, int] = (64, 64, 64)
    #: Voxel sizes are drawn log-uniformly from this range (mm).
    voxel_size_range: tuple[float, float] = (0.5, 3.0)
    #: Probability that the three voxel sizes are drawn independently (else isotropic).
    anisotropic_prob: float = 0.5
    #: Largest angle (degrees) between B0 and the third voxel axis.
    max_tilt_deg: float = 60.0
    #: Probability of an exactly axial B0 (0, 0, 1).
    axial_prob: float = 0.2
    #: Probability that a pair is a head patch (else random shapes).
    head_prob: float = 0.5
    #: Number of head phantoms (distinct seeds) in each split's pool.
    pool_size: int = 4
    #: Voxel size (mm) of the pooled head phantoms.
    head_voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: Largest elastic displacement (mm) of the head patches.
    warp_mm: float = 4.0
    #: Range of the random susceptibility scale factor (drawn log-uniformly).
    chi_scale_range: tuple[float, float] = (0.5, 2.0)
    #: Noise standard deviation as a fraction of the field's std in the mask (uniform).
    noise_range: tuple[float, float] = (0.0, 0.1)
    #: Zero-padding factor of the field simulation.
    pad_factor: float = DEFAULT_PAD_FACTOR
    #: Head patches: the field is simulated on a region this many times the patch (per
    #: axis) and the patch cut from its centre, so that brain just outside the patch adds
    #: its field as it does in a whole-brain local field (1: the patch's sources only).
    head_context: float = 1.5

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 8:
            raise ValueError(f"patch_size must be 3 sizes >= 8, got {self.patch_size}")
        lo, hi = self.voxel_size_range
        if not 0 < lo <= hi:
            raise ValueError(f"voxel_size_range must satisfy 0 < lo <= hi, got {lo}, {hi}")
        if not 0 <= self.max_tilt_deg <= 90:
            raise ValueError(f"max_tilt_deg must be in [0, 90], got {self.max_tilt_deg}")
        for name in ("anisotropic_prob", "axial_prob", "head_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.head_prob > 0 and self.pool_size < 1:
            raise ValueError("pool_size must be >= 1 when head patches are drawn")
        if self.head_context < 1:
            raise ValueError(f"head_context must be >= 1, got {self.head_context}")

    def to_dict(self) -> dict:
        """JSON-serialisable form (for model cards and checkpoints)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class Pair:
    """One training pair on a ``patch_size`` grid."""

    field: np.ndarray  #: local field (ppm), float32, zero outside ``mask``
    chi: np.ndarray  #: susceptibility (ppm), float32, zero outside ``mask``
    mask: np.ndarray  #: bool
    voxel_size: tuple[float, float, float]  #: mm
    b0_dir: tuple[float, float, float]  #: unit vector in voxel axes
    kind: str = "shapes"  #: "shapes" or "head"
    info: dict = field(default_factory=dict)  #: the random draws, for inspection

    @property
    def side(self) -> np.ndarray:
        """``(vx, vy, vz, bx, by, bz)`` float32, as :meth:`SideInformation.as_vector`."""
        return np.array(self.voxel_size + self.b0_dir, dtype=np.float32)


# --------------------------------------------------------------------------- acquisition


def random_voxel_size(
    rng: np.random.Generator,
    size_range: tuple[float, float] = (0.5, 3.0),
    anisotropic_prob: float = 0.5,
) -> tuple[float, float, float]:
    """Voxel size (mm), log-uniform in ``size_range``: isotropic, or per axis."""
    lo, hi = np.log(size_range[0]), np.log(size_range[1])
    n = 3 if rng.random() < anisotropic_prob else 1
    v = np.exp(rng.uniform(lo, hi, size=n))
    v = np.broadcast_to(v, 3)
    return tuple(float(x) for x in np.round(v, 4))


def random_b0_direction(
    rng: np.random.Generator, max_tilt_deg: float = 60.0, axial_prob: float = 0.2
) -> tuple[float, float, float]:
    """Unit B0 direction in voxel axes, tilted from +z by up to ``max_tilt_deg`` degrees.

    The tilt is uniform in angle, the azimuth uniform; ``axial_prob`` of the draws are
    exactly ``(0, 0, 1)``.
    """
    if rng.random() < axial_prob or max_tilt_deg == 0:
        return (0.0, 0.0, 1.0)
    theta = np.radians(rng.uniform(0, max_tilt_deg))
    phi = rng.uniform(0, 2 * np.pi)
    b = np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
    return tuple(float(x) for x in b / np.linalg.norm(b))


def simulate_local_field(
    chi: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    pad_factor: float = DEFAULT_PAD_FACTOR,
) -> np.ndarray:
    """Local field (ppm) of the susceptibility ``chi * mask`` (ppm), zero outside ``mask``.

    The sources are ``chi`` inside ``mask`` only; the dipole kernel uses ``voxel_size`` (mm)
    and ``b0_dir`` (voxel axes) on a grid zero padded by ``pad_factor``.
    """
    if chi.shape != mask.shape:
        raise ValueError(f"chi {chi.shape} and mask {mask.shape} differ in shape")
    m = mask.astype(bool)
    src = np.where(m, chi, 0).astype(np.float32)
    return np.where(m, forward_field(src, voxel_size, b0_dir, pad_factor), 0).astype(np.float32)


# ------------------------------------------------------------------------- random shapes


def _grid_mm(shape: Sequence[int], voxel_size: Sequence[float]) -> list[np.ndarray]:
    """Broadcastable voxel-centre coordinates (mm) with the origin at the patch centre."""
    out = []
    for axis, (n, v) in enumerate(zip(shape, voxel_size, strict=True)):
        c = ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(v)).reshape(
            [-1 if a == axis else 1 for a in range(3)]
        )
        out.append(c)
    return out


def _rotated(coords: list[np.ndarray], centre: np.ndarray, rot: np.ndarray) -> list[np.ndarray]:
    """Coordinates relative to ``centre`` in the frame of rotation matrix ``rot``."""
    d = [c - np.float32(o) for c, o in zip(coords, centre, strict=True)]
    return [sum(np.float32(rot[j, i]) * d[j] for j in range(3)) for i in range(3)]


def _shape_mask(kind: str, u: list[np.ndarray], semi: np.ndarray) -> np.ndarray:
    """Inside test for a shape of semi-axes ``semi`` (mm) in its own frame ``u``."""
    if kind == "ellipsoid":
        return sum((ui / np.float32(s)) ** 2 for ui, s in zip(u, semi, strict=True)) <= 1
    if kind == "box":
        return np.logical_and.reduce(
            [np.abs(ui) <= np.float32(s) for ui, s in zip(u, semi, strict=True)]
        )
    if kind == "cylinder":  # axis along u[2]
        r = (u[0] / np.float32(semi[0])) ** 2 + (u[1] / np.float32(semi[1])) ** 2
        return (r <= 1) & (np.abs(u[2]) <= np.float32(semi[2]))
    raise ValueError(f"unknown shape kind {kind!r}")


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation (float32)."""
    x = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return x / max(float(x.std()), 1e-12)


def _random_mask(
    rng: np.random.Generator, coords: list[np.ndarray], extent: np.ndarray
) -> np.ndarray:
    """A rotated ellipsoid with a smoothly perturbed surface, filling much of the patch."""
    shape = tuple(len(c.ravel()) for c in coords)
    semi = extent * rng.uniform(0.35, 0.6, size=3)
    u = _rotated(
        coords, rng.uniform(-0.05, 0.05, 3) * extent, Rotation.random(rng=rng).as_matrix()
    )
    r = np.sqrt(sum((ui / np.float32(s)) ** 2 for ui, s in zip(u, semi, strict=True)))
    wobble = 0.12 * _smooth_noise(rng, shape, max(shape) / 8)
    return r <= 1 + wobble


def random_shapes_chi(
    shape: Sequence[int], voxel_size: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random-shape susceptibility map (ppm, float32) and its mask (bool) on ``shape``.

    Background: a smooth texture (std 0.005 to 0.05 ppm); 4 to 20 ellipsoids, boxes and
    cylinders (semi-axes 1.5 voxels to a quarter of the patch, random orientation) with
    values N(0, 0.1) ppm replacing what is under them; with probability 0.7, 1 to 4 small
    strong sources of +-0.5 to 2 ppm. Sizes are in mm, so shapes are physical on
    anisotropic grids. The mask is a perturbed ellipsoid (80 %) or the whole patch.
    """
    shape = tuple(int(n) for n in shape)
    vs = np.asarray(voxel_size, dtype=float)
    coords = _grid_mm(shape, vs)
    extent = np.asarray(shape) * vs
    chi = rng.uniform(0.005, 0.05) * _smooth_noise(rng, shape, rng.uniform(1.0, 4.0))
    chi += rng.normal(0, 0.02)
    kinds = ("ellipsoid", "box", "cylinder")
    min_semi = 1.5 * vs.max()
    for _ in range(int(rng.integers(4, 21))):
        semi = rng.uniform(min_semi, max(min_semi * 1.01, extent.min() / 4), size=3)
        u = _rotated(
            coords, rng.uniform(-0.45, 0.45, 3) * extent, Rotation.random(rng=rng).as_matrix()
        )
        inside = _shape_mask(kinds[int(rng.integers(3))], u, semi)
        chi[inside] = rng.normal(0, 0.1) + rng.uniform(0, 0.01) * chi[inside]
    if rng.random() < 0.7:
        for _ in range(int(rng.integers(1, 5))):
            semi = rng.uniform(min_semi, max(min_semi * 1.01, extent.min() / 10), size=3)
            u = _rotated(
                coords, rng.uniform(-0.35, 0.35, 3) * extent, Rotation.random(rng=rng).as_matrix()
            )
            inside = _shape_mask(kinds[int(rng.integers(3))], u, semi)
            chi[inside] = rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 2.0)
    mask = _random_mask(rng, coords, extent) if rng.random() < 0.8 else np.ones(shape, bool)
    return np.where(mask, chi, 0).astype(np.float32), mask


# --------------------------------------------------------------------------- head patches


@dataclass(frozen=True)
class _HeadVolume:
    chi: np.ndarray  # brain chi (ppm), NaN outside the brain, cropped to the brain (+1 voxel)
    brain_idx: np.ndarray  # (K, 3) indices of brain voxels (patch centres are drawn here)
    voxel_size: tuple[float, float, float]


@functools.lru_cache(maxsize=16)
def _head_volume(seed: int, voxel_size: tuple[float, float, float]) -> _HeadVolume:
    """The brain of head phantom ``seed``, cropped, cached per process."""
    from qsmprep.sim import make_head_phantom

    ph = make_head_phantom(voxel_size=voxel_size, seed=seed)
    mask = np.asarray(ph.brain_mask, dtype=bool)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
    m = mask[box]
    chi = np.where(m, np.asarray(ph.chi, dtype=np.float32)[box], np.nan).astype(np.float32)
    idx = np.argwhere(m)[::7].astype(np.int32)  # a thinned set of centres is plenty
    return _HeadVolume(chi, idx, tuple(float(v) for v in voxel_size))


def _contrast_change(chi: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random monotone remapping (linear/gamma/log/sigmoid) of chi's tissue range in ``mask``.

    The range is the 1st to 99th percentile inside the mask; values in it are remapped
    onto the same range, so the tissue contrast changes but no offset appears, and values
    beyond it (veins, calcifications) are kept.
    """
    vals = chi[mask]
    if vals.size == 0:
        return chi
    lo, hi = (float(v) for v in np.percentile(vals, (1, 99)))
    if hi - lo < 1e-6:
        return chi
    u = (chi - np.float32(lo)) / np.float32(hi - lo)
    inside = mask & (u >= 0) & (u <= 1)
    u = np.clip(u, 0, 1)
    how = ("linear", "gamma", "log", "sigmoid")[int(rng.integers(4))]
    if how == "gamma":
        u = u ** np.float32(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    elif how == "log":
        a = np.float32(rng.uniform(1, 20))
        u = np.log1p(a * u) / np.log1p(a)
    elif how == "sigmoid":
        g, c = np.float32(rng.uniform(3, 10)), np.float32(rng.uniform(0.3, 0.7))

        def s(x):
            return 1 / (1 + np.exp(-g * (x - c)))

        u = (s(u) - s(0)) / (s(1) - s(0))
    return np.where(inside, lo + (hi - lo) * u, chi).astype(np.float32)


def _elastic_displacement(
    rng: np.random.Generator, shape: Sequence[int], amp_mm: float
) -> list[np.ndarray]:
    """Smooth random displacement (mm) per axis, largest magnitude ``amp_mm``.

    A random combination of 5 x 5 x 5 separable Gaussian bumps (width a fifth of the
    patch) per axis: cheap, smooth, and small against the bump width, so it never folds.
    """
    basis = []
    for n in shape:
        i = np.arange(n, dtype=np.float32)[:, None]
        c = np.linspace(0, n - 1, 5, dtype=np.float32)[None, :]
        basis.append(np.exp(-0.5 * ((i - c) / np.float32(n / 5)) ** 2))
    bx, by, bz = basis
    out = []
    for _ in range(3):
        coef = rng.standard_normal((5, 5, 5)).astype(np.float32)
        d = (bx @ (coef.reshape(5, 25))).reshape(-1, 5, 5)  # (X, 5, 5)
        d = d @ bz.T  # (X, 5, Z)
        d = np.einsum("xbz,yb->xyz", d, by)
        out.append(d * np.float32(amp_mm / max(float(np.abs(d).max()), 1e-12)))
    return out


def head_patch_chi(
    head: _HeadVolume,
    shape: Sequence[int],
    voxel_size: Sequence[float],
    rng: np.random.Generator,
    warp_mm: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Brain chi (ppm) and mask resampled onto a ``shape`` patch of ``voxel_size`` (mm).

    The patch is centred on a random brain voxel and samples the phantom through a
    random rotation with random flips and an elastic warp of up to ``warp_mm``, by
    trilinear interpolation of chi. Outside the brain chi is NaN, so the patch's mask is
    where all eight neighbours are brain: no tissue is blended with the outside at the rim.
    """
    shape = tuple(int(n) for n in shape)
    coords = _grid_mm(shape, voxel_size)
    flips = np.where(rng.random(3) < 0.5, -1.0, 1.0)
    rot = Rotation.random(rng=rng).as_matrix() * flips[None, :]
    disp = _elastic_displacement(rng, shape, rng.uniform(0, warp_mm))
    centre = head.brain_idx[int(rng.integers(len(head.brain_idx)))].astype(float)
    src_vs = np.asarray(head.voxel_size)
    sample = [
        np.float32(centre[i])
        + (sum(np.float32(rot[i, j]) * coords[j] for j in range(3)) + disp[i])
        / np.float32(src_vs[i])
        for i in range(3)
    ]
    sample = np.stack(np.broadcast_arrays(*sample))
    chi = ndimage.map_coordinates(head.chi, sample, order=1, mode="constant", cval=np.nan)
    mask = np.isfinite(chi)
    return np.where(mask, chi, 0).astype(np.float32), mask


def _add_strong_sources(
    chi: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """1 to 3 small ellipsoids of +-0.5 to 2 ppm centred on random mask voxels."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return chi
    coords = _grid_mm(chi.shape, voxel_size)
    vs = np.asarray(voxel_size)
    centre_shift = (np.asarray(chi.shape) - 1) / 2
    for _ in range(int(rng.integers(1, 4))):
        c = (idx[int(rng.integers(len(idx)))] - centre_shift) * vs
        semi = rng.uniform(1.5, 3.0, size=3) * vs.max()
        u = _rotated(coords, c, Rotation.random(rng=rng).as_matrix())
        inside = _shape_mask("ellipsoid", u, semi) & mask
        chi[inside] = rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 2.0)
    return chi


# ---------------------------------------------------------------------------- generator


def make_pair(config: SynthConfig, rng: np.random.Generator, split: str = "train") -> Pair:
    """Draw one synthetic pair with ``rng`` (head phantoms from ``split``'s pool)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    vs = random_voxel_size(rng, config.voxel_size_range, config.anisotropic_prob)
    b0 = random_b0_direction(rng, config.max_tilt_deg, config.axial_prob)
    info: dict = {}
    if rng.random() < config.head_prob:
        kind = "head"
        pseed = SPLIT_PHANTOM_SEEDS[split] + int(rng.integers(config.pool_size))
        head = _head_volume(pseed, tuple(float(v) for v in config.head_voxel_size))
        region = tuple(int(round(n * config.head_context)) for n in config.patch_size)
        crop = tuple(
            slice((r - n) // 2, (r - n) // 2 + n)
            for r, n in zip(region, config.patch_size, strict=True)
        )
        for _ in range(10):  # keep patches with a usable amount of brain
            chi, mask = head_patch_chi(head, region, vs, rng, config.warp_mm)
            if mask[crop].mean() > 0.1:
                break
        chi = _contrast_change(chi, mask, rng)
        if rng.random() < 0.3:
            chi = _add_strong_sources(chi, mask, vs, rng)
        info["phantom_seed"] = pseed
    else:
        kind = "shapes"
        chi, mask = random_shapes_chi(config.patch_size, vs, rng)
        crop = (slice(None),) * 3
    lo, hi = np.log(config.chi_scale_range[0]), np.log(config.chi_scale_range[1])
    scale = float(np.exp(rng.uniform(lo, hi)))
    chi = (chi * np.float32(scale)).astype(np.float32)
    local = simulate_local_field(chi, mask, vs, b0, config.pad_factor)
    chi, mask, local = (np.ascontiguousarray(a[crop]) for a in (chi, mask, local))
    noise_frac = float(rng.uniform(*config.noise_range))
    if mask.any() and noise_frac > 0:
        sigma = noise_frac * float(local[mask].std())
        noise = rng.standard_normal(local.shape).astype(np.float32) * np.float32(sigma)
        local = np.where(mask, local + noise, 0).astype(np.float32)
    info.update(chi_scale=scale, noise_frac=noise_frac)
    return Pair(local, chi, mask, vs, b0, kind, info)


def pair_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of pair ``index`` of ``split`` for ``seed`` (independent streams)."""
    return np.random.default_rng([SPLITS[split], int(seed), int(index)])


def pair_to_tensors(pair: Pair) -> dict[str, torch.Tensor]:
    """``field``, ``chi`` (1, X, Y, Z) float32, ``mask`` (1, X, Y, Z) bool, ``side`` (6,)."""
    return {
        "field": torch.from_numpy(pair.field[None]),
        "chi": torch.from_numpy(pair.chi[None]),
        "mask": torch.from_numpy(pair.mask[None]),
        "side": torch.from_numpy(pair.side),
    }


class SyntheticQSMDataset(torch.utils.data.IterableDataset):
    """Endless (or ``length``-long) stream of synthetic pairs as tensors.

    Pair ``i`` depends only on ``(split, seed, i)``, so the stream is reproducible and can
    start at any pair (``start``, for resuming). With ``batch_size`` the stream yields
    stacked batches (pairs ``start + k*B .. start + (k+1)*B - 1`` for batch ``k``; ``length``
    then counts batches); use it with ``DataLoader(batch_size=None)``: worker ``w`` of ``W``
    makes batches ``w, w + W, ...`` and the DataLoader interleaves them back in order, so
    the batches are the same with any number of workers.
    """

    def __init__(
        self,
        config: SynthConfig | None = None,
        split: str = "train",
        seed: int = 0,
        start: int = 0,
        length: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if start < 0 or (length is not None and length < 0):
            raise ValueError("start and length must be non-negative")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config or SynthConfig()
        self.split = split
        self.seed = int(seed)
        self.start = int(start)
        self.length = length
        self.batch_size = batch_size

    def pair(self, index: int) -> Pair:
        """Pair number ``index`` of this split and seed."""
        return make_pair(self.config, pair_rng(self.split, self.seed, index), self.split)

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch ``k`` of the stream (``batch_size`` pairs stacked along a new axis 0)."""
        b = self.batch_size or 1
        items = [pair_to_tensors(self.pair(self.start + k * b + i)) for i in range(b)]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}

    def warm_up(self) -> None:
        """Build the cached head phantoms of this split (before forking workers)."""
        if self.config.head_prob > 0:
            vs = tuple(float(v) for v in self.config.head_voxel_size)
            first = SPLIT_PHANTOM_SEEDS[self.split]
            for k in range(self.config.pool_size):
                _head_volume(first + k, vs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        k = wid
        while self.length is None or k < self.length:
            if self.batch_size is None:
                yield pair_to_tensors(self.pair(self.start + k))
            else:
                yield self.batch(k)
            k += nw
