"""Heads that qsmprep did not make: the anatomy of ``bench_external.py``, simulated with
another group's physics (qsm-forward, GPL-3, imported only here, never by qsmprep).

The anatomy is built here, independently of ``qsmprep.sim``: nilearn's ICBM152 2009 grey
and white matter maps and brain mask, deformed by a random smooth warp and a random
affine of this module's own, with deep grey nuclei (qsm-ci's labels 1-7), veins, a
calcification, a CSF shell, bone around the brain, scalp, a neck, air sinuses, nasal
cavity and mastoid air, and air around the head. Every draw (warp, thicknesses, nuclei
positions, sizes and values, veins, calcification) comes from the head's seed.

The physics is qsm-forward's public functions only, on a 1 mm grid:
``generate_field`` (total and local field, ppm), ``generate_shimmed_field`` (2nd-order shim
in the brain: its residual is what the scanner sees), ``generate_phase_offset``,
``generate_signal`` (complex multi-echo GRE) and ``add_noise``. The complex signal is
averaged from 1 mm into the acquisition voxels (a 1 mm case is simulated on the 1 mm grid
itself), so the field of sharp air/bone edges carries no voxel-scale ringing. The truth on
the acquisition grid is the block average of chi, of the local and total fields and of the
brain mask (kept where half a voxel is brain), and the majority label.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

#: qsm-ci's segmentation labels (qsm_ci.qsm_eval.DSEG_LABELS).
CAUDATE, PALLIDUM, PUTAMEN, RED_NUCLEUS, DENTATE, NIGRA, THALAMUS = 1, 2, 3, 4, 5, 6, 7
WM, GM, CSF, BLOOD, BONE, AIR, SOFT, CALC = 8, 9, 10, 11, 13, 14, 15, 16

#: Deep grey nuclei: label, MNI centre of the right one (mm; mirrored in x), radii (mm),
#: susceptibility (ppm) and R2* at 3 T (1/s). Positions, radii and values are jittered
#: per head.
NUCLEI = (
    (CAUDATE, (13.0, 11.0, 11.0), (4.5, 10.0, 7.0), 0.060, 28.0),
    (PUTAMEN, (25.0, 2.0, 1.0), (6.0, 13.0, 8.0), 0.050, 30.0),
    (PALLIDUM, (19.0, -3.0, -1.0), (3.5, 7.5, 4.5), 0.150, 50.0),
    (THALAMUS, (11.0, -18.0, 7.0), (7.0, 12.0, 7.0), 0.020, 24.0),
    (NIGRA, (11.0, -18.0, -11.0), (3.0, 6.0, 2.5), 0.130, 45.0),
    (RED_NUCLEUS, (5.0, -20.0, -9.0), (3.0, 3.5, 3.0), 0.110, 40.0),
    (DENTATE, (15.0, -56.0, -34.0), (5.0, 7.0, 5.0), 0.100, 40.0),
)

#: Air cavities: MNI centre (mm), radii (mm). Frontal and sphenoid sinus, nasal cavity,
#: and the mastoid air cells with the ear canals (mirrored in x).
CAVITIES = (
    ((0.0, 66.0, 4.0), (13.0, 6.0, 9.0), False),
    ((0.0, 12.0, -34.0), (11.0, 11.0, 9.0), False),
    ((0.0, 48.0, -46.0), (11.0, 18.0, 13.0), False),
    ((58.0, -26.0, -38.0), (9.0, 11.0, 8.0), True),
)

#: Susceptibility (ppm, relative to water/CSF), proton density and R2* at 3 T (1/s) and
#: R1 (1/s) of the tissue classes outside the nuclei.
TISSUE = {
    #        chi     M0    R2*    R1
    WM: (-0.035, 0.70, 22.0, 1.10),
    GM: (0.030, 0.85, 17.0, 0.70),
    CSF: (0.000, 1.00, 4.0, 0.25),
    BLOOD: (0.350, 0.80, 45.0, 0.60),
    CALC: (-1.000, 0.40, 150.0, 1.00),
    BONE: (-2.000, 0.05, 300.0, 1.00),
    SOFT: (0.000, 0.75, 35.0, 1.00),
    AIR: (9.200, 0.00, 0.0, 1.00),
}

#: Padding below the MNI box (mm): the neck goes on below the brain.
NECK_MM = 40


@dataclass
class Head:
    """A head on the 1 mm grid (arrays ``(X, Y, Z)``).

    ``labels`` in qsm-ci's scheme, ``chi`` ppm, ``m0`` proton density, ``r2star3t`` 1/s
    at 3 T, ``r1`` 1/s, ``brain`` the brain mask.
    """

    labels: np.ndarray
    chi: np.ndarray
    m0: np.ndarray
    r2star3t: np.ndarray
    r1: np.ndarray
    brain: np.ndarray


def _mni_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM and WM probabilities, brain mask and affine of nilearn's 1 mm ICBM152 2009,
    padded by :data:`NECK_MM` below."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    affine = gm.affine.copy()
    pad = ((0, 0), (0, 0), (NECK_MM, 0))
    affine[:3, 3] -= affine[:3, :3] @ np.array([0, 0, NECK_MM])
    maps = [np.pad(a, pad) for a in (gm.get_fdata(dtype=np.float32), wm, brain)]
    return maps[0], maps[1], maps[2], affine


def _smooth_noise(rng, shape, sigma_vox: float, coarse: int = 6) -> np.ndarray:
    """Smooth random field of unit maximum magnitude: Gaussian-smoothed white noise on a
    grid ``coarse`` times coarser, interpolated to ``shape``."""
    small = [max(4, math.ceil(n / coarse)) for n in shape]
    noise = ndimage.gaussian_filter(rng.standard_normal(small), sigma_vox / coarse)
    big = ndimage.zoom(noise, [n / s for n, s in zip(shape, small, strict=True)], order=1)
    big = big[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    return big / np.abs(big).max()


def _warp_coords(rng, shape, affine, centre_mm, warp_mm: float) -> np.ndarray:
    """Source voxel coordinates for a random affine (rotation up to 6 deg, scaling 0.92-1.08
    per axis, about ``centre_mm``) plus a smooth displacement of up to ``warp_mm``."""
    angles = np.deg2rad(rng.uniform(-6, 6, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    lin = rot @ np.diag(rng.uniform(0.92, 1.08, 3))
    inv = np.linalg.inv(lin)
    vox = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ vox + affine[:3, 3:4]
    src_world = inv @ (world - np.asarray(centre_mm)[:, None]) + np.asarray(centre_mm)[:, None]
    src = np.linalg.solve(affine[:3, :3], src_world - affine[:3, 3:4]).reshape(3, *shape)
    for axis in range(3):
        src[axis] += warp_mm * _smooth_noise(rng, shape, sigma_vox=18.0)
    return src.astype(np.float32)


def _ellipsoid(coords_mm: np.ndarray, centre, radii) -> np.ndarray:
    q = sum(((coords_mm[a] - centre[a]) / radii[a]) ** 2 for a in range(3))
    return q <= 1.0


def _tube(shape, points_vox: np.ndarray, radius_vox: float) -> np.ndarray:
    """Voxels within ``radius_vox`` of a polyline through ``points_vox`` ``(N, 3)``."""
    out = np.zeros(shape, bool)
    steps = []
    for a, b in zip(points_vox[:-1], points_vox[1:], strict=True):
        n = max(2, int(np.linalg.norm(b - a) * 2))
        steps.append(a + (b - a) * np.linspace(0, 1, n)[:, None])
    pts = np.round(np.concatenate(steps)).astype(int)
    keep = np.all((pts >= 0) & (pts < np.array(shape)), axis=1)
    out[tuple(pts[keep].T)] = True
    return ndimage.distance_transform_edt(~out) <= radius_vox


def build_head(seed: int, warp_mm: float = 5.0) -> tuple[Head, np.ndarray]:
    """A random head on a 1 mm grid and its affine (MNI-like world, mm)."""
    rng = np.random.default_rng(seed)
    gm, wm, brain_p, affine = _mni_maps()
    shape = gm.shape
    vox = np.indices(shape, dtype=np.float32).reshape(3, -1)
    mm = (affine[:3, :3] @ vox + affine[:3, 3:4]).reshape(3, *shape)

    # labels on the undeformed grid, then one warp for all of them
    brain = brain_p > 0.5
    labels = np.zeros(shape, np.uint8)
    csf_p = np.clip(1 - gm - wm, 0, 1)
    tissue = np.argmax(np.stack([wm, gm, csf_p]), axis=0)
    labels[brain] = np.array([WM, GM, CSF], np.uint8)[tissue[brain]]
    for label, centre, radii, _, _ in NUCLEI:
        for side in (1, -1):
            c = np.array(centre) * (side, 1, 1) + rng.normal(0, 1.5, 3)
            r = np.array(radii) * rng.uniform(0.85, 1.15, 3)
            labels[_ellipsoid(mm, c, r) & brain] = label
    # veins: internal cerebral veins, straight sinus, and cortical veins on the surface
    dist_in = ndimage.distance_transform_edt(brain)
    inv_aff = np.linalg.inv(affine)

    def to_vox(points_mm):
        p = np.asarray(points_mm, float)
        return (inv_aff[:3, :3] @ p.T + inv_aff[:3, 3:4]).T

    for side in (1, -1):
        icv = [(2 * side, 10, 12), (2 * side, -10, 14), (3 * side, -30, 10), (2 * side, -40, 4)]
        labels[_tube(shape, to_vox(icv) + rng.normal(0, 1, (4, 3)), 1.2) & brain] = BLOOD
    shell = (dist_in > 1) & (dist_in <= 4)
    cand = np.argwhere(shell & (labels == GM))
    for _ in range(10):
        start = cand[rng.integers(len(cand))].astype(float)
        walk = [start]
        direction = rng.normal(0, 1, 3)
        for _ in range(6):
            direction = direction / np.linalg.norm(direction) * 6 + rng.normal(0, 2, 3)
            nxt = walk[-1] + direction
            near = cand[np.argmin(((cand - nxt) ** 2).sum(axis=1))]  # stay on the surface
            walk.append(0.5 * nxt + 0.5 * near)
        labels[_tube(shape, np.array(walk), rng.uniform(0.8, 1.4)) & brain] = BLOOD
    wm_vox = np.argwhere((labels == WM) & (dist_in > 15))
    calc_at = wm_vox[rng.integers(len(wm_vox))]
    calc = np.zeros(shape, bool)
    calc[tuple(calc_at)] = True
    labels[ndimage.distance_transform_edt(~calc) <= rng.uniform(1.8, 2.8)] = CALC

    # outside the brain: CSF, bone and scalp shells of varying thickness, a neck, cavities
    closed = ndimage.binary_closing(brain, ndimage.generate_binary_structure(3, 1), 6)
    dist_out = ndimage.distance_transform_edt(~closed)
    vary = 1 + 0.3 * _smooth_noise(rng, shape, sigma_vox=20.0)
    csf_t, bone_t, scalp_t = 2.5 * vary, 7.0 * vary, 6.0 * vary
    outside = ~brain
    labels[outside & (dist_out <= csf_t)] = CSF
    labels[outside & (dist_out > csf_t) & (dist_out <= csf_t + bone_t)] = BONE
    head = dist_out <= csf_t + bone_t + scalp_t
    labels[outside & (dist_out > csf_t + bone_t) & head] = SOFT
    neck = (((mm[0] / 55) ** 2 + ((mm[1] + 20) / 60) ** 2) <= 1) & (mm[2] < -40)
    labels[neck & outside & (labels == 0)] = SOFT
    labels[(labels == 0)] = AIR
    near_brain = ndimage.distance_transform_edt(~brain) <= 3
    for centre, radii, mirrored in CAVITIES:
        for side in (1, -1) if mirrored else (1,):
            c = np.array(centre) * (side, 1, 1) + rng.normal(0, 2, 3)
            r = np.array(radii) * rng.uniform(0.85, 1.2, 3)
            labels[_ellipsoid(mm, c, r) & ~near_brain] = AIR

    src = _warp_coords(rng, shape, affine, (0.0, -18.0, 10.0), warp_mm)
    labels = ndimage.map_coordinates(labels, src, order=0, mode="nearest")
    gm_w = ndimage.map_coordinates(gm, src, order=1, mode="nearest")
    wm_w = ndimage.map_coordinates(wm, src, order=1, mode="nearest")
    brain = ndimage.map_coordinates(brain.astype(np.float32), src, order=1) > 0.5
    del src

    # continuous maps: partial-volume mix in tissue, class values elsewhere
    chi = np.zeros(shape, np.float32)
    m0 = np.zeros(shape, np.float32)
    r2s = np.zeros(shape, np.float32)
    r1 = np.ones(shape, np.float32)
    for label, (c, m, r, t1) in TISSUE.items():
        sel = labels == label
        chi[sel], m0[sel], r2s[sel], r1[sel] = c, m, r, t1
    scale = rng.uniform(0.8, 1.2)  # this head's contrast
    tissue = (labels == WM) | (labels == GM)
    p_gm, p_wm = gm_w[tissue], wm_w[tissue]
    total = np.maximum(p_gm + p_wm, 1e-3)
    chi[tissue] = scale * (0.030 * p_gm - 0.035 * p_wm) / total
    texture = 0.006 * _smooth_noise(rng, shape, sigma_vox=3.0)
    chi[tissue] += texture[tissue]
    blood = labels == BLOOD
    chi[blood] = rng.uniform(0.25, 0.45)
    for label, _, _, value, r2 in NUCLEI:
        sel = labels == label
        chi[sel] = value * rng.uniform(0.8, 1.2) + texture[sel]
        m0[sel], r2s[sel], r1[sel] = 0.8, r2, 0.9
    return Head(labels, chi, m0, r2s, r1, brain), affine


def rotation_to_b0(b0_dir) -> np.ndarray:
    """A rotation ``R`` with ``R b = e_z``: the voxel axes of an acquisition whose B0 (the
    world z axis) lies along ``b`` in voxel axes are the columns of ``R``."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    z = np.array([0.0, 0.0, 1.0])
    v, c = np.cross(b, z), float(b @ z)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def tilted_b0(tilt_deg: float, azimuth_deg: float = 35.0) -> np.ndarray:
    """Unit B0 in voxel axes, ``tilt_deg`` from the third axis towards azimuth ``azimuth_deg``."""
    t, a = np.deg2rad(tilt_deg), np.deg2rad(azimuth_deg)
    return np.array([np.sin(t) * np.cos(a), np.sin(t) * np.sin(a), np.cos(t)])


def block_mean(x: np.ndarray, block) -> np.ndarray:
    """Mean over ``block`` voxels along each axis (the grid is trimmed to multiples)."""
    bx, by, bz = block
    nx, ny, nz = (n // b for n, b in zip(x.shape[:3], block, strict=True))
    x = x[: nx * bx, : ny * by, : nz * bz]
    return x.reshape(nx, bx, ny, by, nz, bz, *x.shape[3:]).mean(axis=(1, 3, 5))


def block_mode(labels: np.ndarray, block) -> np.ndarray:
    """Majority label of each block."""
    values = np.unique(labels)
    fractions = np.stack([block_mean((labels == v).astype(np.float32), block) for v in values])
    return values[np.argmax(fractions, axis=0)].astype(labels.dtype)


@dataclass(frozen=True)
class Case:
    """One acquisition of the benchmark."""

    name: str
    seed: int  # the head's
    voxel_size: tuple[int, int, int]  # mm, multiples of the 1 mm grid
    tilt_deg: float  # B0 from the third voxel axis
    field_strength: float  # T
    echo_times: tuple[float, ...]  # s
    peak_snr: float = 100.0
    timing_only: bool = False  # simulated on its own grid, not averaged from a finer one


TE_3T = (0.004, 0.010, 0.016, 0.022, 0.028)
TE_7T = (0.003, 0.007, 0.011, 0.015, 0.019)

#: The benchmark's cases.
CASES = {
    "axial": Case("axial", 101, (2, 2, 2), 0.0, 3.0, TE_3T),
    "oblique": Case("oblique", 102, (2, 2, 2), 25.0, 3.0, TE_3T),
    "aniso": Case("aniso", 103, (2, 2, 3), 20.0, 3.0, TE_3T),
    "7t": Case("7t", 104, (2, 2, 2), 0.0, 7.0, TE_7T),
    "1mm": Case("1mm", 105, (1, 1, 1), 0.0, 3.0, TE_3T[:4], timing_only=True),
}

#: TR (s) and flip angle (deg) of the GRE.
TR, FLIP = 0.035, 15.0


def simulate(case: Case, out: Path, log=print) -> Path:
    """Simulate ``case`` into ``out/case.name`` (cached): a BIDS dataset ``bids/`` and the
    truth ``truth.npz`` on the acquisition grid. Returns the case folder."""
    import qsm_forward as qf

    folder = out / case.name
    done = folder / "truth.npz"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{case.name}: building head {case.seed} ...")
    head, affine = build_head(case.seed)
    b0 = tilted_b0(case.tilt_deg) if case.tilt_deg else np.array([0.0, 0.0, 1.0])
    log(f"{case.name}: fields (qsm-forward, 1 mm, B0 {np.round(b0, 3).tolist()}) ...")
    total = qf.generate_field(head.chi, voxel_size=[1, 1, 1], B0_dir=list(b0)).astype(np.float32)
    _, shimmed, _ = qf.generate_shimmed_field(total, head.brain, order=2)
    shimmed = shimmed.astype(np.float32)
    del total
    local = qf.generate_field(head.chi * head.brain, voxel_size=[1, 1, 1], B0_dir=list(b0))
    local = local.astype(np.float32)
    offset = qf.generate_phase_offset(head.m0, head.brain, head.chi.shape).astype(np.float32)
    r2s = head.r2star3t * (case.field_strength / 3.0)
    block = case.voxel_size
    signal = []
    for te in case.echo_times:
        s = qf.generate_signal(
            shimmed,
            B0=case.field_strength,
            TR=TR,
            TE=te,
            flip_angle=FLIP,
            phase_offset=offset,
            R1=head.r1,
            R2star=r2s,
            M0=head.m0,
        )
        signal.append(block_mean(s.astype(np.complex64), block))
    signal = np.stack(signal, axis=-1)
    rng = np.random.default_rng(case.seed + 7)
    noisy = qf.add_noise(signal, peak_snr=case.peak_snr, rng=rng).astype(np.complex64)

    rot = rotation_to_b0(b0)
    acq = np.eye(4)
    acq[:3, :3] = rot @ np.diag(block)  # R^T e_z = b: B0 lies along b in voxel axes
    centre = np.array(noisy.shape[:3]) / 2
    acq[:3, 3] = -acq[:3, :3] @ centre
    bids = folder / "bids"
    _write_bids(bids, case, noisy, acq)
    brain_frac = block_mean(head.brain.astype(np.float32), block)
    np.savez_compressed(
        done,
        chi=block_mean(head.chi, block),
        local=block_mean(local, block),
        total=block_mean(shimmed, block),
        brain=brain_frac >= 0.5,
        brain_fraction=brain_frac,
        labels=block_mode(head.labels, block),
        b0_dir=b0,
        voxel_size=np.asarray(block, float),
        affine=acq,
    )
    return folder


def _write_bids(bids: Path, case: Case, signal: np.ndarray, affine: np.ndarray) -> None:
    """The raw dataset: magnitude and phase (rad) per echo with their sidecars."""
    anat = bids / "sub-01" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    description = {
        "Name": f"qsmprep external benchmark, case {case.name}",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "qsm-forward (physics); qsmprep benchmarks (anatomy)"}],
    }
    (bids / "dataset_description.json").write_text(json.dumps(description, indent=2))
    (bids / "participants.tsv").write_text("participant_id\nsub-01\n")
    for e, te in enumerate(case.echo_times, start=1):
        for part, data in (("mag", np.abs(signal[..., e - 1])), ("phase", None)):
            if data is None:
                data = np.angle(signal[..., e - 1])
            img = nib.Nifti1Image(data.astype(np.float32), affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            stem = anat / f"sub-01_echo-{e}_part-{part}_MEGRE"
            nib.save(img, f"{stem}.nii.gz")
            meta = {
                "EchoTime": te,
                "MagneticFieldStrength": case.field_strength,
                "RepetitionTime": TR,
                "FlipAngle": FLIP,
            }
            if part == "phase":
                meta["Units"] = "rad"
            Path(f"{stem}.json").write_text(json.dumps(meta, indent=2))


def load_truth(folder: Path) -> dict[str, np.ndarray]:
    """The truth saved by :func:`simulate`."""
    with np.load(folder / "truth.npz") as f:
        return {k: f[k] for k in f.files}


def simulate_cylinders(out: Path, log=print) -> Path:
    """qsm-forward's own cylinder phantom (``generate_susceptibility_phantom``: a weak
    large cylinder holding four small ones of 0.05-0.5 ppm, in a 160 mm cube of 0 ppm),
    simulated like :func:`simulate` at 1 mm and averaged into 2 mm voxels with B0 30 deg
    off the cylinders' axis. The object (the large cylinder) is the mask; there are no
    outside sources, so the total field is the local field."""
    import qsm_forward as qf

    case = CYLINDERS
    folder = out / case.name
    done = folder / "truth.npz"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{case.name}: qsm-forward cylinder phantom ...")
    chi = qf.generate_susceptibility_phantom(
        resolution=[160, 160, 160],
        background=0,
        large_cylinder_val=0.005,
        small_cylinder_radii=[4, 4, 4, 7],
        small_cylinder_vals=[0.05, 0.1, 0.2, 0.5],
    ).astype(np.float32)
    obj = chi != 0
    b0 = tilted_b0(case.tilt_deg)
    field = qf.generate_field(chi, voxel_size=[1, 1, 1], B0_dir=list(b0)).astype(np.float32)
    m0 = obj.astype(np.float32)
    block = case.voxel_size
    signal = []
    for te in case.echo_times:
        s = qf.generate_signal(
            field,
            B0=case.field_strength,
            TR=TR,
            TE=te,
            flip_angle=FLIP,
            R1=1.0,
            R2star=20.0,
            M0=m0,
        )
        signal.append(block_mean(s.astype(np.complex64), block))
    signal = np.stack(signal, axis=-1)
    noisy = qf.add_noise(signal, peak_snr=case.peak_snr, rng=np.random.default_rng(9))
    acq = np.eye(4)
    acq[:3, :3] = rotation_to_b0(b0) @ np.diag(block)
    acq[:3, 3] = -acq[:3, :3] @ (np.array(noisy.shape[:3]) / 2)
    _write_bids(folder / "bids", case, noisy.astype(np.complex64), acq)
    frac = block_mean(obj.astype(np.float32), block)
    labels = np.where(frac >= 0.5, WM, AIR).astype(np.uint8)
    np.savez_compressed(
        done,
        chi=block_mean(chi, block),
        local=block_mean(field, block),
        total=block_mean(field, block),
        brain=frac >= 0.5,
        brain_fraction=frac,
        labels=labels,
        b0_dir=b0,
        voxel_size=np.asarray(block, float),
        affine=acq,
    )
    return folder


#: The cylinder phantom's acquisition (its seed is unused).
CYLINDERS = Case("cylinders", 0, (2, 2, 2), 30.0, 3.0, TE_3T)
