"""Multi-echo gradient-echo (GRE) signal of a :class:`~qsmprep.sim.phantom.HeadPhantom`.

Per voxel of the phantom's grid and echo time ``TE`` (s)::

    S(TE) = M0 * PD * C * exp(-R2* TE) * exp(i (phi0 + 2 pi f TE))

with ``f = ppm_to_hz(total_field_ppm, B0)`` (Hz), ``C`` a smooth receive-sensitivity
profile (about +-20 %), ``phi0`` a smooth echo-independent phase offset, and R2* scaled
linearly from its 3 T value to ``B0``. The total field is the dipole field of the whole
phantom (:func:`simulate_fields`).

Oblique acquisitions keep the object on the image grid and rotate the affine,
``A[:3, :3] = R @ diag(voxel_size)``; the field is simulated with the B0 direction that
this affine implies in voxel axes (:func:`qsmprep.qsm.sideinfo.b0_direction`), so the true
susceptibility map is the same for every orientation.

Coarser output voxels (``voxel_size``) are made by simulating on the phantom's finer grid
and box-averaging the *complex* signal, so intravoxel dephasing and partial volumes are
real and the truth (chi, fields) is box-averaged the same way; noise is added afterwards
on the output grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qsmprep.qsm.dipole import DEFAULT_PAD_FACTOR, forward_field
from qsmprep.qsm.phase import ppm_to_hz
from qsmprep.qsm.sideinfo import b0_direction

from .phantom import HeadPhantom
from .resample import box_average, box_mode, resampled_affine, resampled_shape

#: Signal scale: the magnitude of a voxel with PD = 1 at TE = 0 (before sensitivity).
SIGNAL_SCALE = 1000.0

#: Highest supported order of the simulated shim (spherical harmonics).
MAX_SHIM_ORDER = 2

#: Mask voxels used for the shim fit (a regular subsample of larger masks).
_SHIM_SAMPLES = 50_000


def tilt_rotation(b0_tilt_deg: Sequence[float]) -> np.ndarray:
    """Rotation ``R = Rx(tx) @ Ry(ty)`` of the image axes for ``b0_tilt_deg = (tx, ty)`` (deg).

    With ``A[:3, :3] = R @ diag(voxel_size)`` the B0 direction in voxel axes is
    ``R.T @ (0, 0, 1) = (-sin ty cos tx, sin tx, cos ty cos tx)``: the angle between B0
    and the third image axis is ``arccos(cos tx cos ty)``.
    """
    t = np.asarray(b0_tilt_deg, float)
    if t.shape != (2,) or not np.all(np.isfinite(t)):
        raise ValueError(f"b0_tilt_deg must be two finite angles in degrees, got {b0_tilt_deg}")
    cx, sx = np.cos(np.deg2rad(t[0])), np.sin(np.deg2rad(t[0]))
    cy, sy = np.cos(np.deg2rad(t[1])), np.sin(np.deg2rad(t[1]))
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return rx @ ry


def tilted_affine(
    affine: np.ndarray, shape: Sequence[int], b0_tilt_deg: Sequence[float]
) -> np.ndarray:
    """``affine`` with its axes rotated by :func:`tilt_rotation` about the grid centre.

    ``affine`` must be axis-aligned (an axial grid); the voxel sizes are kept.
    """
    a = np.asarray(affine, float)
    vs = np.linalg.norm(a[:3, :3], axis=0)
    if not np.allclose(a[:3, :3], np.diag(vs), atol=1e-6 * vs.max()):
        raise ValueError("tilted_affine needs an axis-aligned (axial, unflipped) affine")
    out = np.eye(4)
    out[:3, :3] = tilt_rotation(b0_tilt_deg) @ np.diag(vs)
    centre = (np.asarray(shape, float) - 1) / 2
    out[:3, 3] = a[:3, :3] @ centre + a[:3, 3] - out[:3, :3] @ centre
    return out


def _shim_basis(shape: Sequence[int], voxel_size: Sequence[float], centre: np.ndarray):
    """Solid harmonics up to order 2 on the grid (coordinates in units of 100 mm)."""
    x, y, z = (
        ((np.arange(n) - c) * v / 100.0).reshape([-1 if i == ax else 1 for i in range(3)])
        for ax, (n, v, c) in enumerate(zip(shape, voxel_size, centre, strict=True))
    )
    one = np.ones((1, 1, 1))
    return [
        [one],
        [x, y, z],
        [x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y],
    ]


def shim_field(field_ppm: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float], order: int):
    """Least-squares fit over ``mask`` of solid harmonics up to ``order`` (0..2).

    Returns the fitted field (ppm) on the whole grid: what a scanner's frequency
    adjustment (order 0) and linear/second-order shims remove. It is harmonic, so it
    belongs to the background field.
    """
    if order not in range(MAX_SHIM_ORDER + 1):
        raise ValueError(f"shim order must be 0..{MAX_SHIM_ORDER} or None, got {order!r}")
    if not mask.any():
        raise ValueError("cannot shim over an empty mask")
    idx = np.nonzero(mask)
    centre = np.array([i.mean() for i in idx])
    terms = [
        t for level in _shim_basis(field_ppm.shape, voxel_size, centre)[: order + 1] for t in level
    ]
    # a regular subsample of the mask is plenty for 9 coefficients
    step = max(1, idx[0].size // _SHIM_SAMPLES)
    idx = tuple(i[::step] for i in idx)
    design = np.stack([np.broadcast_to(t, field_ppm.shape)[idx] for t in terms], axis=1)
    coef, *_ = np.linalg.lstsq(design, field_ppm[idx].astype(np.float64), rcond=None)
    fit = np.zeros(field_ppm.shape, np.float32)
    for c, t in zip(coef, terms, strict=True):
        fit += np.float32(c) * t.astype(np.float32)
    return fit


def simulate_fields(
    phantom: HeadPhantom,
    b0_dir: Sequence[float],
    shim_order: int | None = 2,
    pad_factor: float = DEFAULT_PAD_FACTOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Total and local field (ppm) of ``phantom`` for the unit ``b0_dir`` in voxel axes.

    - local: ``forward_field(chi * brain_mask)``, the field of the sources inside the brain
      (chi relative to water);
    - total: ``forward_field(chi - chi_outside)`` (the object in an infinite medium of
      ``chi_outside``, with the bottom slice repeated ``extend_inferior_mm`` below the
      grid), minus the shim fit of order ``shim_order`` over the brain (None: no shim).

    ``total - local`` is the background field: harmonic inside the brain.
    """
    b = np.asarray(b0_dir, float)
    if b.shape != (3,) or not np.isfinite(b).all() or np.linalg.norm(b) < 1e-6:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir}")
    vs = phantom.voxel_size
    rel = phantom.chi - np.float32(phantom.chi_outside)
    n_ext = int(round(phantom.extend_inferior_mm / vs[2]))
    if n_ext > 0:
        rel = np.concatenate([np.repeat(rel[:, :, :1], n_ext, axis=2), rel], axis=2)
    total = forward_field(rel, vs, b, pad_factor)[:, :, n_ext:]
    local = forward_field(np.where(phantom.brain_mask, phantom.chi, 0), vs, b, pad_factor)
    if shim_order is not None:
        total -= shim_field(total, phantom.brain_mask, vs, shim_order)
    return np.ascontiguousarray(total), local


def _smooth_maps(shape: Sequence[int], rng: np.random.Generator, phase: bool):
    """Random smooth phase offset (rad) and receive sensitivity on the grid."""
    u = [
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape(
            [-1 if i == ax else 1 for i in range(3)]
        )
        for ax, n in enumerate(shape)
    ]
    quad = [u[0] * u[0], u[1] * u[1], u[2] * u[2], u[0] * u[1], u[0] * u[2], u[1] * u[2]]

    def poly(c0: float, lin: np.ndarray, q: np.ndarray) -> np.ndarray:
        out = np.full(shape, c0, np.float32)
        for c, t in zip(lin, u, strict=True):
            out += np.float32(c) * t
        for c, t in zip(q, quad, strict=True):
            out += np.float32(c) * t
        return out

    phi0 = poly(rng.uniform(-np.pi, np.pi), rng.normal(0, 0.6, 3), rng.normal(0, 0.4, 6))
    sens = np.exp(poly(0.0, rng.normal(0, 0.1, 3), rng.normal(0, 0.08, 6)))
    if not phase:
        phi0 = np.zeros(shape, np.float32)
    return phi0, sens


def _angle(z: np.ndarray) -> np.ndarray:
    """Phase (rad) in [-pi, pi): ``np.angle`` gives (-pi, pi], so +pi is moved to -pi."""
    a = np.angle(z).astype(np.float32)
    a[a >= np.float32(np.pi)] = -np.float32(np.pi)
    return a


def check_echo_times(echo_times: Sequence[float]) -> tuple[float, ...]:
    """Echo times as a tuple of seconds; ValueError unless positive, increasing and < 1 s."""
    te = np.asarray(echo_times, float).ravel()
    if te.size == 0:
        raise ValueError("at least one echo time is needed")
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise ValueError(f"echo times must be positive seconds, got {tuple(te)}")
    if np.any(te > 1.0):
        raise ValueError(f"echo times must be in seconds (got {tuple(te)}; milliseconds?)")
    if np.any(np.diff(te) <= 0):
        raise ValueError(f"echo times must increase strictly, got {tuple(te)}")
    return tuple(float(t) for t in te)


@dataclass
class MegreSimulation:
    """A simulated multi-echo GRE acquisition and its ground truth (all on the output grid).

    Arrays are in NIfTI voxel order, echoes last. Units: ``phase`` rad in [-pi, pi);
    ``mag`` arbitrary; fields as named (Hz or ppm); ``chi`` ppm relative to water;
    ``r2star`` 1/s at ``field_strength``; ``phase_offset`` rad; echo times s.
    """

    mag: np.ndarray
    phase: np.ndarray
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    b0_dir: tuple[float, float, float]
    b0_tilt_deg: tuple[float, float]
    echo_times: tuple[float, ...]
    field_strength: float
    chi: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    total_field_hz: np.ndarray
    local_field_ppm: np.ndarray
    background_field_ppm: np.ndarray
    r2star: np.ndarray
    phase_offset: np.ndarray
    noise_sigma: float
    snr: float | None
    seed: int
    sim_voxel_size: tuple[float, float, float]
    shim_order: int | None
    label_names: dict[int, str] = field(default_factory=dict)
    phantom_seed: int | None = None

    @property
    def total_field_ppm(self) -> np.ndarray:
        """The total field in ppm (``total_field_hz / (gamma_bar * B0)``)."""
        return self.local_field_ppm + self.background_field_ppm

    def params(self) -> dict:
        """The simulation parameters, JSON-serialisable."""
        return {
            "EchoTime": list(self.echo_times),
            "MagneticFieldStrength": self.field_strength,
            "VoxelSize": list(self.voxel_size),
            "SimulationVoxelSize": list(self.sim_voxel_size),
            "B0Direction": [round(float(b), 8) for b in self.b0_dir],
            "B0TiltDeg": list(self.b0_tilt_deg),
            "Affine": np.round(self.affine, 8).tolist(),
            "Shape": list(self.mag.shape[:3]),
            "SNR": self.snr,
            "NoiseSigma": self.noise_sigma,
            "ShimOrder": self.shim_order,
            "Seed": self.seed,
            "PhantomSeed": self.phantom_seed,
            "SignalScale": SIGNAL_SCALE,
            "Labels": {str(k): v for k, v in self.label_names.items()},
        }


def simulate_megre(
    phantom: HeadPhantom,
    echo_times: Sequence[float] = (0.004, 0.008, 0.012, 0.016),
    field_strength: float = 3.0,
    b0_tilt_deg: Sequence[float] = (0.0, 0.0),
    snr: float | None = 50.0,
    seed: int = 0,
    voxel_size: Sequence[float] | None = None,
    shim_order: int | None = 2,
    phase_offset: bool = True,
    pad_factor: float = DEFAULT_PAD_FACTOR,
) -> MegreSimulation:
    """Simulate multi-echo GRE magnitude and phase of ``phantom``.

    Parameters
    ----------
    echo_times : s, strictly increasing; one echo is fine.
    field_strength : B0 in tesla.
    b0_tilt_deg : ``(tilt about x, tilt about y)`` of the image axes against B0 (deg),
        written into the affine (see :func:`tilt_rotation`).
    snr : mean first-echo magnitude in the brain over the noise standard deviation of
        each of the real and imaginary parts; None for no noise.
    seed : seeds the phase offset, the sensitivity profile and the noise.
    voxel_size : output voxels (mm), each at least the phantom's; None keeps the
        phantom's grid. The signal is simulated on the phantom's grid and its complex
        value box-averaged into the output voxels.
    shim_order : order (0..2) of the spherical-harmonic shim removed from the total field
        over the brain, as a scanner's frequency adjustment and shim do; None for none.
    phase_offset : add the smooth echo-independent phase offset ``phi0``.
    """
    te = check_echo_times(echo_times)
    if not np.isfinite(field_strength) or field_strength <= 0:
        raise ValueError(f"field_strength must be positive tesla, got {field_strength}")
    if snr is not None and (not np.isfinite(snr) or snr <= 0):
        raise ValueError(f"snr must be positive (or None for no noise), got {snr}")
    tilt = tuple(float(t) for t in b0_tilt_deg)
    src_vs = phantom.voxel_size
    out_vs = src_vs if voxel_size is None else tuple(float(v) for v in voxel_size)
    out_shape = resampled_shape(phantom.shape, src_vs, out_vs)
    axial = resampled_affine(phantom.affine, src_vs, out_vs)
    affine = tilted_affine(axial, out_shape, tilt)
    b0 = b0_direction(affine)

    total_ppm, local_ppm = simulate_fields(phantom, b0, shim_order, pad_factor)
    rng = np.random.default_rng(seed)
    phi0, sens = _smooth_maps(phantom.shape, rng, phase_offset)
    r2s = phantom.r2star * np.float32(field_strength / phantom.r2star_field)
    m0 = np.float32(SIGNAL_SCALE) * phantom.pd * sens
    f_hz = ppm_to_hz(total_ppm, field_strength).astype(np.float32)

    def down(x: np.ndarray) -> np.ndarray:
        return box_average(x, src_vs, out_vs)

    signal = np.empty((*out_shape, len(te)), np.complex64)
    s = np.empty(phantom.shape, np.complex64)
    for e, t in enumerate(te):
        theta = phi0 + np.float32(2 * np.pi * t) * f_hz
        amp = m0 * np.exp(-r2s * np.float32(t))
        s.real = amp * np.cos(theta)
        s.imag = amp * np.sin(theta)
        signal[..., e] = down(s)

    mask = down(phantom.brain_mask) > 0.5
    sigma = 0.0
    if snr is not None:
        ref = np.abs(signal[..., 0][mask]).mean() if mask.any() else np.abs(signal[..., 0]).mean()
        sigma = float(ref / snr)
        for e in range(len(te)):  # one echo at a time: 1 mm data are large
            noise = rng.standard_normal((2, *out_shape), dtype=np.float32)
            signal[..., e] += np.float32(sigma) * (noise[0] + 1j * noise[1])

    local_t = down(local_ppm)
    total_t = down(total_ppm)
    return MegreSimulation(
        mag=np.abs(signal).astype(np.float32),
        phase=_angle(signal),
        affine=affine,
        voxel_size=out_vs,
        b0_dir=tuple(float(v) for v in b0),
        b0_tilt_deg=tilt,
        echo_times=te,
        field_strength=float(field_strength),
        chi=down(phantom.chi),
        mask=mask,
        labels=box_mode(phantom.labels, src_vs, out_vs),
        total_field_hz=ppm_to_hz(total_t, field_strength).astype(np.float32),
        local_field_ppm=local_t,
        background_field_ppm=total_t - local_t,
        r2star=down(r2s),
        phase_offset=down(phi0),
        noise_sigma=sigma,
        snr=None if snr is None else float(snr),
        seed=int(seed),
        sim_voxel_size=tuple(src_vs),
        shim_order=shim_order,
        label_names=dict(phantom.label_names),
        phantom_seed=phantom.seed,
    )
