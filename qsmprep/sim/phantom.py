"""Head phantom from nilearn's bundled MNI152 (ICBM 2009) maps.

The phantom is defined on a native 1 mm grid of 180 x 220 x 180 voxels in MNI space
(x -90..89, y -125..94, z -72..107 mm), which holds the whole head:

- brain: the MNI brain mask, with susceptibility, PD and R2* mixed voxel-wise from the
  grey matter, white matter and CSF probability maps (CSF = 1 - GM - WM);
- deep grey nuclei: ellipsoids at MNI coordinates (:data:`qsmprep.sim.tissues.NUCLEI`);
- veins: superior sagittal, straight and transverse sinuses laid on the brain surface,
  internal cerebral veins, and cortical veins drawn along the surface by the seed;
- a calcification: a small sphere (radius 2-3 mm) at a white-matter location drawn by
  the seed;
- outside the brain: CSF/dura, skull and scalp shells around a smoothed brain envelope,
  soft tissue of the face, and air-filled sinuses and mastoid cells in bony walls;
- air around the head.

Every structure has a one-voxel soft edge, so a coarser copy made by box averaging
(:meth:`HeadPhantom.resample`) has partial-volume values rather than staircase edges.
Seeds change the cortical veins, their susceptibility and the calcification; the rest of
the anatomy is fixed, so metrics ROIs are comparable across seeds.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import tissues as T
from .geometry import Grid, ShellProjector, ellipsoid, smooth_curve, tube
from .resample import box_average, box_mode, resampled_affine

#: The native grid: 1 mm, MNI coordinates of voxel 0 and shape.
NATIVE_GRID = Grid(
    shape=(180, 220, 180), origin=(-90.0, -125.0, -72.0), voxel_size=(1.0, 1.0, 1.0)
)

#: Where the native grid starts inside nilearn's 1 mm MNI152 arrays (origin -98, -134, -72).
_MNI_OFFSET = (8, 9, 0)

#: The neck continues below the field of view: the field simulation extends the bottom
#: slice this far (mm) so the head is not a cut-off block of tissue in air.
NECK_MM = 60.0

#: Radius (mm) of the morphological closing that turns the brain mask into an envelope.
_ENVELOPE_CLOSING_MM = 6.0


@dataclass
class HeadPhantom:
    """A susceptibility phantom on a voxel grid (all arrays ``(X, Y, Z)``, NIfTI order).

    Attributes
    ----------
    chi : float32, ppm relative to water (CSF = 0).
    labels : uint8 tissue labels, names in ``label_names``.
    brain_mask : bool, the brain (the region whose sources make the local field).
    pd : float32 proton density relative to water.
    r2star : float32 R2* in 1/s at ``r2star_field`` tesla.
    voxel_size : mm.
    affine : axial 4x4 voxel-to-world (MNI mm) affine of the grid.
    chi_outside : ppm, susceptibility of the medium beyond the field of view (the field
        simulation zero-pads ``chi - chi_outside``); air for the head.
    extend_inferior_mm : the bottom slice is repeated this far below the grid for the
        field simulation (the body goes on below a head scan); 0 for a closed object.
    seed : the seed the phantom was drawn with, if any.
    """

    chi: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    pd: np.ndarray
    r2star: np.ndarray
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    label_names: dict[int, str] = field(default_factory=lambda: dict(T.LABEL_NAMES))
    chi_outside: float = T.CHI_AIR
    extend_inferior_mm: float = 0.0
    r2star_field: float = T.R2STAR_REFERENCE_T
    seed: int | None = None

    def __post_init__(self) -> None:
        shape = np.shape(self.chi)
        if len(shape) != 3:
            raise ValueError(f"chi must be 3-D, got shape {shape}")
        for name in ("labels", "brain_mask", "pd", "r2star"):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"{name} has shape {np.shape(getattr(self, name))}, chi {shape}")
        self.voxel_size = tuple(float(v) for v in self.voxel_size)
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be 3 positive values (mm), got {self.voxel_size}")
        if np.shape(self.affine) != (4, 4):
            raise ValueError("affine must be 4x4")
        self.chi = np.asarray(self.chi, np.float32)
        self.pd = np.asarray(self.pd, np.float32)
        self.r2star = np.asarray(self.r2star, np.float32)
        self.brain_mask = np.asarray(self.brain_mask, bool)
        self.labels = np.asarray(self.labels)
        self.affine = np.asarray(self.affine, float)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.chi.shape)

    def label(self, name: str) -> int:
        """Label value of tissue ``name``."""
        for value, n in self.label_names.items():
            if n == name:
                return value
        raise ValueError(f"unknown tissue {name!r}; known: {sorted(self.label_names.values())}")

    def roi(self, name: str) -> np.ndarray:
        """Boolean mask of tissue ``name`` (e.g. ``"globus_pallidus"``)."""
        return self.labels == self.label(name)

    def copy(self) -> HeadPhantom:
        return replace(
            self,
            chi=self.chi.copy(),
            labels=self.labels.copy(),
            brain_mask=self.brain_mask.copy(),
            pd=self.pd.copy(),
            r2star=self.r2star.copy(),
            affine=self.affine.copy(),
            label_names=dict(self.label_names),
        )

    def resample(self, voxel_size: Sequence[float]) -> HeadPhantom:
        """Box-averaged copy on coarser voxels (mm): chi, PD and R2* averaged, labels by
        majority, the brain mask where more than half of the coarse voxel is brain."""
        vs = tuple(float(v) for v in voxel_size)
        if np.allclose(vs, self.voxel_size):
            return self.copy()
        return replace(
            self,
            chi=box_average(self.chi, self.voxel_size, vs),
            labels=box_mode(self.labels, self.voxel_size, vs),
            brain_mask=box_average(self.brain_mask, self.voxel_size, vs) > 0.5,
            pd=box_average(self.pd, self.voxel_size, vs),
            r2star=box_average(self.r2star, self.voxel_size, vs),
            voxel_size=vs,
            affine=resampled_affine(self.affine, self.voxel_size, vs),
            label_names=dict(self.label_names),
        )


def make_head_phantom(voxel_size: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 0) -> HeadPhantom:
    """The MNI152 head phantom for ``seed``, box-averaged from 1 mm onto ``voxel_size`` (mm).

    Deterministic for a seed; the 1 mm build is cached per process (the two latest
    seeds), and each call returns fresh arrays.
    """
    vs = np.asarray(voxel_size, float)
    if vs.shape != (3,) or np.any(vs < 1.0 - 1e-6):
        raise ValueError(
            f"voxel_size must be 3 values >= 1 mm (the phantom is built at 1 mm), got {voxel_size}"
        )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return _native_phantom(int(seed)).resample(tuple(vs))


# --------------------------------------------------------------------------------------
# construction


@dataclass(frozen=True)
class _Anatomy:
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    sd: np.ndarray  # signed distance (mm) to the smoothed brain envelope, > 0 outside
    shell: ShellProjector


def _upsample2(x: np.ndarray) -> np.ndarray:
    """Linear 2x upsampling with voxel edges aligned (fine voxel 2j+1/2 sits at j+1/4, j+3/4)."""
    for axis in range(x.ndim):
        lo = np.concatenate([x.take([0], axis), x.take(range(x.shape[axis] - 1), axis)], axis)
        hi = np.concatenate([x.take(range(1, x.shape[axis]), axis), x.take([-1], axis)], axis)
        even = 0.75 * x + 0.25 * lo
        odd = 0.75 * x + 0.25 * hi
        x = np.stack([even, odd], axis=axis + 1).reshape(
            *x.shape[:axis], 2 * x.shape[axis], *x.shape[axis + 1 :]
        )
    return x


#: The 2 mm grid on which the brain envelope is computed.
_COARSE_GRID = Grid(
    shape=tuple(n // 2 for n in NATIVE_GRID.shape),
    origin=tuple(o + 0.5 for o in NATIVE_GRID.origin),
    voxel_size=(2.0, 2.0, 2.0),
)


def _envelope_distance(brain: np.ndarray) -> np.ndarray:
    """Signed distance (mm, > 0 outside) to the closed, hole-filled brain envelope on the
    2 mm grid :data:`_COARSE_GRID` (the envelope is smooth; 1 mm would cost 8x)."""
    nx, ny, nz = _COARSE_GRID.shape
    coarse = brain[: 2 * nx, : 2 * ny, : 2 * nz].reshape(nx, 2, ny, 2, nz, 2).mean((1, 3, 5)) > 0.5
    r = _ENVELOPE_CLOSING_MM
    dilated = ndimage.distance_transform_edt(~coarse, sampling=2.0) <= r
    closed = ndimage.distance_transform_edt(dilated, sampling=2.0) > r
    env = ndimage.binary_fill_holes(closed | coarse)
    out = ndimage.distance_transform_edt(~env, sampling=2.0) - 1.0
    inside = ndimage.distance_transform_edt(env, sampling=2.0) - 1.0
    return np.where(env, -inside, out).astype(np.float32)


#: nilearn's bundled ICBM152 2009a maps (the files behind ``nilearn.datasets.load_mni152_*``).
_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: nilearn's brain mask threshold on the T1 template scaled to [0, 1].
_BRAIN_THRESHOLD = 0.2


def _mni_maps() -> dict[str, np.ndarray]:
    """T1, GM and WM maps scaled to [0, 1] and the brain mask, as nilearn's
    ``load_mni152_template`` / ``_gm_template`` / ``_wm_template`` / ``_brain_mask`` give them
    at 1 mm, cropped to the native grid. Read straight from nilearn's package data:
    importing ``nilearn.datasets`` costs seconds (scikit-learn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "nilearn is not installed; the head phantom needs its MNI152 maps "
            "(pip install 'qsmprep[sim]')"
        )
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    sl = tuple(slice(o, o + n) for o, n in zip(_MNI_OFFSET, NATIVE_GRID.shape, strict=True))
    out = {}
    for key, name in _MNI_FILES.items():
        img = nib.load(data / name)
        expected = np.diag([1.0, 1.0, 1.0, 1.0])
        expected[:3, 3] = [-98.0, -134.0, -72.0]
        if not np.allclose(img.affine, expected):
            raise ValueError(f"unexpected geometry of nilearn's {name}: {img.affine.tolist()}")
        arr = np.asarray(img.dataobj, np.float32)
        out[key] = arr[sl] / arr.max()
    out["brain"] = out.pop("t1") > _BRAIN_THRESHOLD
    return out


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    maps = _mni_maps()
    brain = maps["brain"]
    gm = maps["gm"] * brain
    wm = maps["wm"] * brain
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    sd2 = _envelope_distance(brain)
    fine = _upsample2(sd2)
    sd = np.pad(fine, [(0, n - f) for n, f in zip(brain.shape, fine.shape, strict=True)], "edge")
    return _Anatomy(gm, wm, brain, sd, ShellProjector(_COARSE_GRID, sd2))


class _Canvas:
    """Chi, PD, R2* and labels being painted; ``paint`` blends a tissue in with a weight."""

    def __init__(self, shape: tuple[int, int, int]):
        air = T.BY_NAME["air"]
        self.chi = np.full(shape, air.chi, np.float32)
        self.pd = np.full(shape, air.pd, np.float32)
        self.r2 = np.full(shape, air.r2star, np.float32)
        self.labels = np.zeros(shape, np.uint8)

    def paint(self, box, weight: np.ndarray, tissue: str, chi: float | None = None) -> None:
        if box is None:
            return
        t = T.BY_NAME[tissue]
        c = t.chi if chi is None else chi
        for arr, value in ((self.chi, c), (self.pd, t.pd), (self.r2, t.r2star)):
            sub = arr[box]
            sub += weight * (np.float32(value) - sub)
        lab = self.labels[box]
        lab[weight >= 0.5] = t.label

    def paint_shape(self, shape_result, tissue: str, chi: float | None = None) -> None:
        if shape_result is not None:
            self.paint(shape_result[0], shape_result[1], tissue, chi)


_FULL = (slice(None), slice(None), slice(None))


def _paint_head(canvas: _Canvas, anat: _Anatomy) -> None:
    """Scalp, face, skull, air sinuses and the CSF layer around the brain envelope."""
    grid = NATIVE_GRID
    edge = min(grid.voxel_size)
    sd = anat.sd
    outer = T.CSF_MM + T.BONE_MM + T.SCALP_MM
    canvas.paint(_FULL, np.clip(0.5 - (sd - outer) / edge, 0, 1), "soft_tissue")
    face = T.FACE
    canvas.paint_shape(ellipsoid(grid, face.centre, face.radii), "soft_tissue")
    canvas.paint(_FULL, np.clip(0.5 - (sd - T.CSF_MM - T.BONE_MM) / edge, 0, 1), "bone")
    sinuses = [e for s in T.SINUSES for e in _mirrored(s)]
    for s in sinuses:
        canvas.paint_shape(ellipsoid(grid, s.centre, s.radii, s.yaw_deg, T.SINUS_WALL_MM), "bone")
    for s in sinuses:
        canvas.paint_shape(ellipsoid(grid, s.centre, s.radii, s.yaw_deg), "sinus_air")
    canvas.paint(_FULL, np.clip(0.5 - (sd - T.CSF_MM) / edge, 0, 1), "csf")


def _paint_brain(canvas: _Canvas, anat: _Anatomy) -> None:
    """GM/WM/CSF mixture from the MNI probability maps inside the brain mask."""
    b = anat.brain
    gm, wm = anat.gm[b], anat.wm[b]
    csf = 1.0 - gm - wm
    tg, tw, tc = T.BY_NAME["gm"], T.BY_NAME["wm"], T.BY_NAME["csf"]
    canvas.chi[b] = gm * tg.chi + wm * tw.chi + csf * tc.chi
    canvas.pd[b] = gm * tg.pd + wm * tw.pd + csf * tc.pd
    canvas.r2[b] = gm * tg.r2star + wm * tw.r2star + csf * tc.r2star
    labels = np.array([tc.label, tg.label, tw.label], np.uint8)
    canvas.labels[b] = labels[np.argmax(np.stack([csf, gm, wm]), axis=0)]


def _mirrored(e: T.Ellipsoid) -> list[T.Ellipsoid]:
    if not e.bilateral:
        return [e]
    x, y, z = e.centre
    return [e, replace(e, centre=(-x, y, z), yaw_deg=-e.yaw_deg)]


def _sagittal_sinus(shell: ShellProjector) -> np.ndarray:
    """Control points of the superior sagittal sinus: the midline brain surface, frontal
    to occipital, 0.8 mm outside the envelope."""
    centre = np.array([0.0, -18.0, 10.0])
    phi = np.deg2rad(np.linspace(20.0, 195.0, 36))
    dirs = np.stack([np.zeros_like(phi), np.cos(phi), np.sin(phi)], axis=1)
    pts = shell.project(centre + 80.0 * dirs, 0.8)
    pts[:, 0] = 0.0
    return pts


def _cortical_vein(rng: np.random.Generator, shell: ShellProjector) -> np.ndarray:
    """A vein wandering over the convexity, 1 mm under the envelope, drifting upward."""
    centre = np.array([0.0, -18.0, 15.0])
    while True:
        d = rng.normal(size=3)
        d[2] = abs(d[2]) + 0.3
        d /= np.linalg.norm(d)
        if abs(d[0]) > 0.25:
            break
    p = shell.project(centre + 70.0 * d, -1.0)[0]
    heading = rng.normal(size=3)
    pts = [p]
    length = rng.uniform(30.0, 70.0)
    step = 2.0
    for _ in range(int(length / step)):
        normal = p - centre
        normal /= np.linalg.norm(normal)
        heading = heading + 0.35 * rng.normal(size=3) + np.array([0.0, 0.0, 0.4])
        heading -= heading.dot(normal) * normal
        heading /= max(np.linalg.norm(heading), 1e-6)
        q = shell.project(p + step * heading, -1.0)[0]
        if abs(q[0]) < 4.0:  # reached the midline: it drains into the sagittal sinus
            break
        pts.append(q)
        p = q
    if len(pts) < 3:
        pts.append(shell.project(p + step * heading, -1.0)[0])
    return np.asarray(pts)


def _paint_veins(canvas: _Canvas, anat: _Anatomy, rng: np.random.Generator) -> None:
    grid, shell = NATIVE_GRID, anat.shell
    sss = _sagittal_sinus(shell)
    confluence = sss[-1]
    canvas.paint_shape(tube(grid, smooth_curve(sss), 3.5), "vein")
    for side in (1.0, -1.0):
        ctrl = np.array(
            [[20, -98, -6], [40, -88, -12], [52, -70, -18], [52, -52, -26], [45, -42, -38]],
            float,
        )
        ctrl[:, 0] *= side
        ctrl = np.vstack([confluence, shell.project(ctrl, 0.8)])
        canvas.paint_shape(tube(grid, smooth_curve(ctrl), 3.0), "vein")
    galen = np.array([0.0, -48.0, 3.0])
    canvas.paint_shape(tube(grid, smooth_curve(np.stack([galen, confluence])), 2.5), "vein")
    for side in (1.0, -1.0):
        icv = np.array([[3, 2, 15], [3, -15, 17], [2.5, -32, 14], [1, -43, 7], [0, -48, 3]], float)
        icv[:, 0] *= side
        canvas.paint_shape(tube(grid, smooth_curve(icv), 1.3), "vein", T.DEEP_VEIN_CHI)
    for _ in range(12):
        pts = _cortical_vein(rng, shell)
        chi = float(rng.uniform(*T.CORTICAL_VEIN_CHI))
        canvas.paint_shape(tube(grid, smooth_curve(pts), rng.uniform(0.6, 1.2)), "vein", chi)


def _calcification_centre(
    anat: _Anatomy, labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A deep white-matter point (corona radiata / centrum semiovale) drawn by the seed,
    at least 6 mm from the nuclei and veins already painted."""
    grid = NATIVE_GRID
    side = rng.choice([-1.0, 1.0])
    lo, hi = np.array([15.0, -30.0, 10.0]), np.array([38.0, 30.0, 35.0])
    if side < 0:
        lo, hi = np.array([-hi[0], lo[1], lo[2]]), np.array([-lo[0], hi[1], hi[2]])
    box = grid.box(lo, hi)
    wm_label = T.BY_NAME["wm"].label
    grown = tuple(slice(max(s.start - 6, 0), s.stop + 6) for s in box)
    painted = (labels[grown] > wm_label) & (labels[grown] != T.BY_NAME["sinus_air"].label)
    near = ndimage.distance_transform_edt(~painted) < 6.0
    inner = tuple(
        slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown, strict=True)
    )
    cand = np.argwhere((anat.wm[box] > 0.9) & ~near[inner])
    i = cand[rng.integers(len(cand))] + [s.start for s in box]
    return np.asarray(grid.origin) + i * np.asarray(grid.voxel_size)


@functools.lru_cache(maxsize=2)
def _native_phantom(seed: int) -> HeadPhantom:
    anat = _anatomy()
    rng = np.random.default_rng(seed)
    canvas = _Canvas(NATIVE_GRID.shape)
    _paint_head(canvas, anat)
    _paint_brain(canvas, anat)
    for nucleus in T.NUCLEI:
        for e in _mirrored(nucleus):
            canvas.paint_shape(ellipsoid(NATIVE_GRID, e.centre, e.radii, e.yaw_deg), e.tissue)
    _paint_veins(canvas, anat, rng)
    calc = _calcification_centre(anat, canvas.labels, rng)
    canvas.paint_shape(ellipsoid(NATIVE_GRID, calc, (rng.uniform(2.0, 3.0),) * 3), "calcification")
    return HeadPhantom(
        chi=canvas.chi,
        labels=canvas.labels,
        brain_mask=anat.brain.copy(),
        pd=canvas.pd,
        r2star=canvas.r2,
        voxel_size=NATIVE_GRID.voxel_size,
        affine=NATIVE_GRID.affine,
        extend_inferior_mm=NECK_MM,
        seed=seed,
    )
