"""Dipole inversion: local field (ppm) to magnetic susceptibility chi (ppm).

Every method solves ``field = ifft(D * fft(chi))`` for ``chi`` inside a brain mask,
with the project's dipole kernel ``D`` (:func:`qsmprep.qsm.dipole.dipole_kernel`, by
default the finite-difference form of ``1/3 - (k.b)^2/|k|^2``) built from the run's
voxel size (mm) and B0 direction (unit vector in voxel axes).

Shared steps: the field is zeroed outside the mask, cropped to the mask's bounding
box, zero padded to :func:`~qsmprep.qsm.dipole.padded_shape` (``next_fast_len``
sizes) and transformed with half-spectrum real FFTs in float32. Results are chi in
ppm, float32, zero outside the mask and *not referenced* (see :func:`reference`).

Methods (``METHODS``; dispatcher :func:`invert`):

- ``tkd``: thresholded k-space division (Shmueli et al. 2009; Wharton et al. 2010).
- ``rts``: rapid two-step (Kames et al. 2018).
- ``tv``: total-variation regularised inversion by ADMM with a closed-form FFT solve
  per iteration (Bilgic et al. 2014).
- ``ilsqr``: LSQR with streaking-artifact estimation (Li et al. 2015).

:func:`invert_two_pass` combines a pass on a reliable mask with a pass on the filled
mask (Stewart et al. 2022).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import scipy.fft as sfft
from scipy import ndimage
from scipy.sparse.linalg import LinearOperator, lsmr, lsqr

from .dipole import (
    check_field_mask,
    dipole_kernel,
    kspace_grid,
    pad,
    padded_shape,
    sphere_kernel,
)
from .sideinfo import check_voxel_size

LOG = logging.getLogger("qsmprep")

Progress = Callable[[int, int], None]

#: Zero padding of the mask's bounding box. The field is cropped to the box first, so
#: 1.25 leaves a margin of 1/8 of the box on each side. Every method's NRMSE is within
#: 1 percentage point of its value at 2 (test phantom and 2 mm head, oblique B0), on
#: 1.7x fewer voxels than a padding of 1.5.
PAD_FACTOR = 1.25


# --------------------------------------------------------------------------------------
# Shared set-up: validation, crop, padding, kernels
# --------------------------------------------------------------------------------------


@dataclass
class _Problem:
    """A field cropped to the mask's bounding box and zero padded for FFTs."""

    field: np.ndarray  # padded local field (ppm), float32, zero outside the mask
    mask: np.ndarray  # padded mask, bool
    kernel: np.ndarray  # half-spectrum dipole kernel of the padded shape, float32
    box: tuple[slice, ...]  # the bounding box within the input arrays
    in_shape: tuple[int, ...]
    voxel_size: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.field.shape

    def rfft(self, x: np.ndarray) -> np.ndarray:
        return sfft.rfftn(x)

    def irfft(self, x: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rfft`; overwrites ``x`` (always a temporary here)."""
        return sfft.irfftn(x, s=self.shape, overwrite_x=True)

    def result(self, x: np.ndarray) -> np.ndarray:
        """Crop the padded solution back to the input grid; zero outside the mask."""
        crop = tuple(slice(0, s.stop - s.start) for s in self.box)
        out = np.zeros(self.in_shape, np.float32)
        out[self.box] = np.where(self.mask[crop], x[crop], 0)
        return out


def _check_geometry(voxel_size: Sequence[float], b0_dir: Sequence[float]) -> tuple:
    vs = check_voxel_size(voxel_size)
    b = np.asarray(b0_dir, dtype=float)
    if b.shape != (3,) or not np.all(np.isfinite(b)) or np.linalg.norm(b) == 0:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    return vs, tuple(float(v) for v in b / np.linalg.norm(b))


def _setup(
    local: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    pad_factor: float,
) -> _Problem:
    local, mask = check_field_mask(local, mask, "local field")
    vs, b = _check_geometry(voxel_size, b0_dir)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    m = mask[box]
    f = np.where(m, local[box], 0).astype(np.float32)
    shape = padded_shape(f.shape, pad_factor)
    return _Problem(
        field=pad(f, shape),
        mask=pad(m, shape),
        kernel=dipole_kernel(shape, vs, b),
        box=box,
        in_shape=local.shape,
        voxel_size=vs,
    )


def _laplace_kernel(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """Half-spectrum eigenvalues of ``grad^T grad`` for periodic forward differences (1/mm^2).

    ``sum_i (2 - 2 cos(2 pi k_i v_i)) / v_i^2`` with ``k_i`` in cycles/mm.
    """
    ks = kspace_grid(shape, voxel_size, dtype=np.float64)
    lap = sum(
        (2.0 - 2.0 * np.cos(2 * np.pi * k * v)) / (v * v)
        for k, v in zip(ks, voxel_size, strict=True)
    )
    return lap.astype(np.float32)


# --------------------------------------------------------------------------------------
# Numba kernels for the TV-ADMM iterations (periodic forward differences, in 1/mm)
# --------------------------------------------------------------------------------------


@numba.njit(parallel=True, fastmath=True, cache=True)
def _shrink_step(x, x_prev, u, v, thresh, h0, h1, h2):  # pragma: no cover - compiled
    """One z/u update of scaled ADMM for ``||grad x||_1``, in place.

    ``s = u + grad x``; ``z = soft(s, thresh)``; ``u <- s - z``; ``v <- z - u`` (the
    right-hand side of the next x-update). Returns the primal residual
    ``sum |grad x - z|_2``, ``||x - x_prev||^2`` and ``||x||^2``.
    """
    nx, ny, nz = x.shape
    total = 0.0
    d2 = 0.0
    n2 = 0.0
    for i in numba.prange(nx):
        ip = i + 1 if i + 1 < nx else 0
        acc = 0.0
        for j in range(ny):
            jp = j + 1 if j + 1 < ny else 0
            for k in range(nz):
                kp = k + 1 if k + 1 < nz else 0
                xc = x[i, j, k]
                dx = xc - x_prev[i, j, k]
                d2 += dx * dx
                n2 += xc * xc
                r = 0.0
                for a in range(3):
                    if a == 0:
                        d = (x[ip, j, k] - xc) * h0
                    elif a == 1:
                        d = (x[i, jp, k] - xc) * h1
                    else:
                        d = (x[i, j, kp] - xc) * h2
                    s = u[a, i, j, k] + d
                    if s > thresh:
                        z = s - thresh
                    elif s < -thresh:
                        z = s + thresh
                    else:
                        z = 0.0
                    un = s - z
                    u[a, i, j, k] = un
                    v[a, i, j, k] = z - un
                    r += (d - z) * (d - z)
                acc += np.sqrt(r)
        total += acc
    return total, d2, n2


@numba.njit(parallel=True, fastmath=True, cache=True)
def _grad_adjoint(v, h0, h1, h2, out):  # pragma: no cover - compiled
    """``out = grad^T v`` for periodic forward differences (a negative divergence)."""
    nx, ny, nz = out.shape
    for i in numba.prange(nx):
        im = i - 1 if i > 0 else nx - 1
        for j in range(ny):
            jm = j - 1 if j > 0 else ny - 1
            for k in range(nz):
                km = k - 1 if k > 0 else nz - 1
                out[i, j, k] = (
                    h0 * (v[0, im, j, k] - v[0, i, j, k])
                    + h1 * (v[1, i, jm, k] - v[1, i, j, k])
                    + h2 * (v[2, i, j, km] - v[2, i, j, k])
                )
    return out


@numba.njit(parallel=True, fastmath=True, cache=True)
def _gradient(x, h0, h1, h2, out):  # pragma: no cover - compiled
    """``out[a] = `` periodic forward difference of ``x`` along axis ``a`` (1/mm)."""
    nx, ny, nz = x.shape
    for i in numba.prange(nx):
        ip = i + 1 if i + 1 < nx else 0
        for j in range(ny):
            jp = j + 1 if j + 1 < ny else 0
            for k in range(nz):
                kp = k + 1 if k + 1 < nz else 0
                xc = x[i, j, k]
                out[0, i, j, k] = (x[ip, j, k] - xc) * h0
                out[1, i, j, k] = (x[i, jp, k] - xc) * h1
                out[2, i, j, k] = (x[i, j, kp] - xc) * h2
    return out


@numba.njit(parallel=True, fastmath=True, cache=True)
def _x_update(X, fhat, ia):  # pragma: no cover - compiled
    """``X <- fhat + ia * X`` on a half spectrum (the closed-form x-update)."""
    flat = X.reshape(-1)
    f = fhat.reshape(-1)
    g = ia.reshape(-1)
    for n in numba.prange(flat.size):
        flat[n] = f[n] + g[n] * flat[n]
    return X


def _x_system(
    rhs: np.ndarray, lhs: np.ndarray, lap: np.ndarray, rho: float
) -> tuple[np.ndarray, np.ndarray]:
    """``fhat = rhs / (lhs + rho lap)`` and ``ia = rho / (lhs + rho lap)``, both 0 where
    the denominator is 0; the x-update is then ``X <- fhat + ia X``."""
    den = lhs + np.float32(rho) * lap
    ia = np.divide(np.float32(rho), den, out=np.zeros_like(den), where=den > 0)
    return rhs * (ia / np.float32(rho)), ia


def _tv_admm(
    p: _Problem,
    rhs: np.ndarray,
    lhs: np.ndarray,
    lam: float,
    rho: float,
    tol: float,
    max_iter: int,
    v: np.ndarray,
    balance: tuple[float, float] | None,
    progress: Progress | None,
    name: str,
) -> np.ndarray:
    """Scaled ADMM for ``data(x) + lam ||grad x||_1`` whose data term has the diagonal
    k-space normal equations ``lhs * fft(x) = rhs``.

    With ``z = grad x`` and scaled dual ``u``, each iteration is
    ``x = ifft((rhs + rho fft(grad^T (z - u))) / (lhs + rho L))`` (two real FFTs),
    then ``z = soft(grad x + u, lam/rho)`` and ``u += grad x - z``. Stops when
    ``||x - x_prev|| < tol ||x||`` or after ``max_iter`` x-updates. ``v`` holds
    ``z - u``, shape ``(3, *p.shape)``, on entry. ``balance = (tau, gamma)``: multiply
    ``rho`` by ``gamma`` (and rescale ``u``) whenever the primal residual
    ``sum |grad x - z|`` falls by less than a factor ``tau``.
    """
    h = [np.float32(1.0 / s) for s in p.voxel_size]
    lap = _laplace_kernel(p.shape, p.voxel_size)
    fhat, ia = _x_system(rhs, lhs, lap, rho)
    if balance is None:  # the system never changes: free its parts
        del rhs, lhs, lap
    u = np.zeros_like(v)
    work = np.empty(p.shape, np.float32)
    x_prev = np.zeros(p.shape, np.float32)
    residual = np.inf
    for it in range(1, max_iter + 1):
        x = p.irfft(_x_update(p.rfft(_grad_adjoint(v, *h, work)), fhat, ia))
        if progress is not None:
            progress(it, max_iter)
        if it == max_iter:
            break
        previous = residual
        residual, d2, n2 = _shrink_step(x, x_prev, u, v, np.float32(lam / rho), *h)
        rel = float(np.sqrt(d2 / n2)) if n2 > 0 else 0.0
        LOG.debug("%s iteration %d/%d: relative change %.3e", name, it, max_iter, rel)
        if it > 1 and rel < tol:
            break
        if balance is not None and residual > balance[0] * previous:
            gamma = balance[1]
            rho *= gamma
            fhat, ia = _x_system(rhs, lhs, lap, rho)
            v += u * np.float32(1.0 - 1.0 / gamma)  # keep v = z - u with u <- u / gamma
            u *= np.float32(1.0 / gamma)
            LOG.debug("%s: rho -> %g", name, rho)
        x_prev = x
    LOG.info("%s: %d iterations", name, it)
    return x


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def tkd(
    local: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    threshold: float = 0.15,
    pad_factor: float = PAD_FACTOR,
) -> np.ndarray:
    """Thresholded k-space division: ``chi = ifft(fft(field) / D)``, ``sign(D)/threshold``
    where ``|D| < threshold``.

    ``local`` in ppm, ``voxel_size`` in mm, ``b0_dir`` in voxel axes; returns chi (ppm)
    zero outside ``mask``. No correction factor is applied, so TKD underestimates chi
    by roughly the fraction of k-space energy under the threshold.
    """
    if not 0 < threshold <= 2 / 3:
        raise ValueError(f"TKD threshold must be in (0, 2/3], got {threshold}")
    p = _setup(local, mask, voxel_size, b0_dir, pad_factor)
    d = p.kernel
    inv = np.sign(d) / np.float32(threshold)
    np.divide(1, d, out=inv, where=np.abs(d) >= threshold)
    return p.result(p.irfft(p.rfft(p.field) * inv))


def _hermitian_weight(shape: Sequence[int]) -> np.ndarray:
    """How often each bin of a real FFT's half spectrum (last axis) occurs in the full one."""
    n = shape[-1]
    w = np.full(n // 2 + 1, 2.0, np.float32)
    w[0] = 1
    if n % 2 == 0:
        w[-1] = 1
    return w


def _lsmr_filter(
    d: np.ndarray, energy: np.ndarray, n_iter: int, bins: int = 1 << 16
) -> np.ndarray:
    """Filter ``g(D)`` such that ``n_iter`` LSMR iterations on the diagonal system
    ``D X = B`` (zero start) return ``X = g(D) B``.

    On a diagonal system LSMR sees ``B`` only through how its energy ``|B|^2``
    (``energy``, same shape as ``d``) is distributed over the values of ``D``. LSMR
    (scipy) is run on that distribution, binned into ``bins`` values of ``D`` (each the
    energy-weighted mean of its bin), and ``g`` is interpolated at every ``D``.
    """
    lo, hi = -2.0 / 3.0, 1.0 / 3.0
    idx = np.clip(((d - lo) * (bins / (hi - lo))).astype(np.intp), 0, bins - 1).reshape(-1)
    mass = np.bincount(idx, weights=energy.reshape(-1), minlength=bins)
    moment = np.bincount(idx, weights=(energy * d).reshape(-1), minlength=bins)
    keep = mass > 0
    dk = moment[keep] / mass[keep]
    r = np.sqrt(mass[keep])
    op = LinearOperator(
        (dk.size, dk.size), matvec=lambda z: dk * z, rmatvec=lambda z: dk * z, dtype=np.float64
    )
    g = lsmr(op, r, atol=0, btol=0, conlim=0, maxiter=n_iter)[0] / r
    return np.interp(d, dk, g).astype(np.float32)


def rts(
    local: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    delta: float = 0.15,
    mu: float = 1e5,
    rho: float = 10.0,
    tol: float = 1e-2,
    max_iter: int = 20,
    lsmr_iter: int = 4,
    tau: float = 0.7,
    gamma: float = 5.0,
    pad_factor: float = PAD_FACTOR,
    progress: Progress | None = None,
) -> np.ndarray:
    """Rapid two-step inversion (Kames, Wiggermann & Rauscher, NeuroImage 2018).

    Step 1 (well-conditioned frequencies): ``lsmr_iter`` LSMR iterations on
    ``D X = fft(field)``; the early stop is the regularisation. The system is diagonal,
    so LSMR acts as a filter ``g(D)`` computed from the field's spectrum without further
    FFTs (:func:`_lsmr_filter`). The result is masked.
    Step 2 (ill-conditioned frequencies): ADMM on
    ``mu/2 ||M (fft(x) - X_1)||^2 + ||grad x||_1`` with ``M = |D| > delta``: the
    well-conditioned spectrum is kept and total variation fills the cone. Stops after
    ``max_iter`` iterations or when the relative change of ``x`` drops below ``tol``;
    the penalty ``rho`` grows by ``gamma`` when the primal residual falls by less than
    ``tau`` per iteration.

    ``local`` in ppm, ``voxel_size`` in mm (gradients in 1/mm), ``b0_dir`` in voxel
    axes; returns chi (ppm), zero outside ``mask``.
    """
    if lsmr_iter < 1 or max_iter < 1:
        raise ValueError("rts needs lsmr_iter >= 1 and max_iter >= 1")
    if delta <= 0 or mu <= 0 or rho <= 0 or gamma <= 1 or not 0 < tau <= 1:
        raise ValueError("rts needs delta, mu, rho > 0, gamma > 1 and 0 < tau <= 1")
    p = _setup(local, mask, voxel_size, b0_dir, pad_factor)
    d = p.kernel

    # Step 1: LSMR on the diagonal k-space system, as a filter g(D).
    X = p.rfft(p.field)
    energy = (X.real**2 + X.imag**2) * _hermitian_weight(p.shape)
    X *= _lsmr_filter(d, energy, lsmr_iter)
    del energy
    x1 = np.where(p.mask, p.irfft(X), np.float32(0))
    LOG.info("rts: step 1 (%d LSMR iterations) done", lsmr_iter)

    # Step 2: keep the well-conditioned spectrum of x1, fill the cone by TV-ADMM.
    well = np.abs(d) > delta
    del d
    X = p.rfft(x1)
    rhs = np.where(well, np.float32(mu) * X, np.complex64(0))
    del X
    lhs = np.where(well, np.float32(mu), np.float32(0))
    del well
    v = _gradient(
        x1, *[np.float32(1 / s) for s in p.voxel_size], np.empty((3, *p.shape), np.float32)
    )
    del x1
    x = _tv_admm(p, rhs, lhs, 1.0, rho, tol, max_iter, v, (tau, gamma), progress, "rts")
    return p.result(x)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _spectra_step(A, B, a, b, d, X, DX):  # pragma: no cover - compiled
    """``X = a A + b B`` and ``DX = d X`` on a half spectrum (the weighted TV x-update)."""
    # one statement per view: numba's parfor pass miscompiles tuple-unpacked reshapes
    fa = A.reshape(-1)
    fb = B.reshape(-1)
    ga = a.reshape(-1)
    gb = b.reshape(-1)
    gd = d.reshape(-1)
    fx = X.reshape(-1)
    fdx = DX.reshape(-1)
    for n in numba.prange(fx.size):
        xn = ga[n] * fa[n] + gb[n] * fb[n]
        fx[n] = xn
        fdx[n] = gd[n] * xn
    return X, DX


@numba.njit(parallel=True, fastmath=True, cache=True)
def _data_step(dx, u, w2, w2f, rho, v):  # pragma: no cover - compiled
    """One update of the data split ``z = D x`` of weighted TV, in place.

    ``t = D x + u``; ``z = (w^2 f + rho t) / (w^2 + rho)`` (the pointwise weighted least
    squares); ``u <- t - z``; ``v <- z - u`` (the right-hand side of the next x-update).
    """
    fd = dx.reshape(-1)
    fu = u.reshape(-1)
    fw = w2.reshape(-1)
    fwf = w2f.reshape(-1)
    fv = v.reshape(-1)
    for n in numba.prange(fd.size):
        t = fd[n] + fu[n]
        z = (fwf[n] + rho * t) / (fw[n] + rho)
        un = t - z
        fu[n] = un
        fv[n] = z - un


def tv(
    local: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    lam: float = 3e-4,
    weight: np.ndarray | None = None,
    rho: float | None = None,
    rho_data: float = 1.0,
    max_iter: int = 25,
    tol: float = 3e-3,
    pad_factor: float = PAD_FACTOR,
    progress: Progress | None = None,
) -> np.ndarray:
    """Total-variation inversion with a weighted data term, by ADMM.

    Minimises ``1/2 ||W (D x - field)||^2 + lam ||grad x||_1``, where ``D x`` is the
    dipole convolution of ``x`` and ``W`` the data weight: ``weight`` inside ``mask`` (1
    where ``weight`` is None) and 0 elsewhere. The field is trusted only where ``W > 0``
    (outside it the local field of the brain's sources is unknown, not zero), and ``x``
    is free over the whole padded box, so a voxel of ``mask`` whose field is unreliable
    (``W = 0``) still gets a susceptibility, from its neighbours' fields and the total
    variation. With the splits ``z1 = grad x`` and ``z2 = D x`` (the weighted-L2 form of
    Milovic et al., MRM 2018) each iteration is one closed-form division in k-space,
    ``(rho L + rho_data D^2) x = rho grad^T (z1 - u1) + rho_data D (z2 - u2)``, a soft
    threshold and a pointwise weighted average: four real FFTs.

    Defaults (``lam = 3e-4``, ``rho = 300 lam``, ``rho_data = 1``, 25 iterations, ``tol``
    3e-3) were chosen on the external heads of ``benchmarks/bench_external.py``
    (docs/benchmarks.md): ``lam`` from 1.5e-4 to 8e-4 from the raw phase (worst case
    67.5 % at 3e-4), the iterations within half a point of 50 (25: 26.1 %, 50: 25.9 %
    on the true local field of the axial head); from the raw phase, 25 iterations
    against 35 change chi's NRMSE by -1.2 to +0.6 points on the 1 mm, axial, oblique,
    2 x 2 x 3, 7 T and qsmprep's 1 x 1 x 2 heads (worst case 67.1 % instead of 67.6 %)
    and take 30 % less time. Stops after ``max_iter`` iterations or
    when the relative change of ``x`` drops below ``tol``.

    ``local`` in ppm (only read where ``W > 0``), ``voxel_size`` in mm (gradients in 1/mm,
    so ``lam`` is in ppm * mm), ``b0_dir`` in voxel axes, ``weight`` ``(X, Y, Z)`` >= 0
    (e.g. a reliability map in [0, 1]); returns chi (ppm), zero outside ``mask``.
    """
    rho = 300 * lam if rho is None else rho
    if lam <= 0 or rho <= 0 or rho_data <= 0 or max_iter < 1:
        raise ValueError("tv needs lam > 0, rho > 0, rho_data > 0 and max_iter >= 1")
    w = _data_weight(weight, mask)
    p = _setup(np.where(w > 0, local, 0), mask, voxel_size, b0_dir, pad_factor)
    w2 = pad(w[p.box] ** 2, p.shape)
    w2f = w2 * p.field
    d = p.kernel
    den = np.float32(rho) * _laplace_kernel(p.shape, p.voxel_size) + np.float32(rho_data) * d * d
    a = np.divide(np.float32(rho), den, out=np.zeros_like(den), where=den > 0)
    b = np.divide(np.float32(rho_data) * d, den, out=np.zeros_like(den), where=den > 0)
    del den
    h = [np.float32(1.0 / s) for s in p.voxel_size]
    v1 = np.zeros((3, *p.shape), np.float32)  # z1 - u1
    u1 = np.zeros_like(v1)
    v2 = p.field.copy()  # z2 - u2, starting from z2 = field
    u2 = np.zeros(p.shape, np.float32)
    work = np.empty(p.shape, np.float32)
    x_prev = np.zeros(p.shape, np.float32)
    X = np.empty(d.shape, np.complex64)
    DX = np.empty_like(X)
    thresh = np.float32(lam / rho)
    for it in range(1, max_iter + 1):
        _spectra_step(p.rfft(_grad_adjoint(v1, *h, work)), p.rfft(v2), a, b, d, X, DX)
        x = p.irfft(X)
        if progress is not None:
            progress(it, max_iter)
        if it == max_iter:
            break
        _, d2, n2 = _shrink_step(x, x_prev, u1, v1, thresh, *h)
        _data_step(p.irfft(DX), u2, w2, w2f, np.float32(rho_data), v2)
        rel = float(np.sqrt(d2 / n2)) if n2 > 0 else 0.0
        LOG.debug("tv iteration %d/%d: relative change %.3e", it, max_iter, rel)
        if it > 1 and rel < tol:
            break
        x_prev = x
    LOG.info("tv: %d iterations", it)
    return p.result(x)


def _data_weight(weight: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """The data weight of :func:`tv`: ``weight`` (1 if None) inside ``mask``, 0 outside."""
    m = np.asarray(mask).astype(bool, copy=False)
    if weight is None:
        return m.astype(np.float32)
    w = np.asarray(weight, dtype=np.float32)
    if w.shape != m.shape:
        raise ValueError(f"weight shape {w.shape} does not match mask {m.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weight must be finite and non-negative")
    w = np.where(m, w, np.float32(0))
    if not np.any(w > 0):
        raise ValueError("weight is zero everywhere in the mask")
    return w


def _ramp_weights(values: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    """1 below the ``lo_pct`` percentile of ``values``, 0 above ``hi_pct``, linear between."""
    lo, hi = np.percentile(values, [lo_pct, hi_pct])
    if hi <= lo:
        return (values <= lo).astype(np.float32)
    return np.clip((hi - values) / (hi - lo), 0, 1).astype(np.float32)


def ilsqr(
    local: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    tol: float = 0.01,
    max_iter: int = 50,
    threshold: float = 0.1,
    pad_factor: float = PAD_FACTOR,
    progress: Progress | None = None,
) -> np.ndarray:
    """LSQR inversion with streaking-artifact removal (after Li et al., NeuroImage 2015).

    What is implemented:

    1. Weighted least squares ``min ||W (ifft(D fft(x)) - field)||`` by LSQR
       (``atol = btol = tol``, at most ``max_iter`` iterations) over the padded grid;
       ``W`` is 0 outside the mask and, inside, 1 below the 60th and 0 above the 99.9th
       percentile of the field's Laplacian magnitude (down-weights vessels, edges and
       phase errors).
    2. A fast estimate for structure: ``sign(D) fft(field)``, blended towards its
       3 mm spherical mean where ``|D|`` is small (ramp in ``log |D|`` between its 1st
       and 30th percentiles), masked, and filtered twice.
    3. The streaking artifact ``s``, restricted to the ill-conditioned frequencies
       ``|D| < threshold``, by LSMR (``atol = btol = tol``, ``max_iter``) on
       ``min ||W_g (grad s - grad x_lsqr)||`` where ``W_g`` (per axis) is 1 below the
       50th and 0 above the 70th percentile of the fast estimate's gradient magnitude:
       gradients of the LSQR map where the tissue is smooth are taken as streaks.
    4. ``chi = x_lsqr - s``.

    The fast estimate is used only through percentiles, so the paper's rescaling of it
    against TKD is not needed. ``local`` in ppm, ``voxel_size`` in mm, ``b0_dir`` in
    voxel axes; returns chi (ppm), zero outside ``mask``.
    """
    if tol <= 0 or max_iter < 1 or not 0 < threshold < 2 / 3:
        raise ValueError("ilsqr needs tol > 0, max_iter >= 1 and 0 < threshold < 2/3")
    p = _setup(local, mask, voxel_size, b0_dir, pad_factor)
    d = p.kernel
    vs = p.voxel_size
    inside = np.flatnonzero(p.mask)
    calls = {"n": 0}

    def tick() -> None:  # one adjoint product per LSQR/LSMR iteration (and one to start)
        calls["n"] += 1
        if progress is not None:
            progress(min(calls["n"], 2 * max_iter), 2 * max_iter)

    def embed(values: np.ndarray) -> np.ndarray:
        out = np.zeros(p.shape, np.float32)
        out.reshape(-1)[inside] = values
        return out

    def conv(x: np.ndarray, k: np.ndarray) -> np.ndarray:
        return p.irfft(p.rfft(x) * k)

    # Step 1: weighted LSQR over the padded grid (residuals count inside the mask only).
    lap = sum(
        ndimage.correlate1d(p.field, np.array([1, -2, 1], np.float32), axis=a, mode="wrap")
        / np.float32(v * v)
        for a, v in enumerate(vs)
    )
    w = _ramp_weights(np.abs(lap.reshape(-1)[inside]), 60, 99.9)
    del lap

    def a_data(x: np.ndarray) -> np.ndarray:
        return (w * conv(x.reshape(p.shape).astype(np.float32), d).reshape(-1)[inside]).astype(
            np.float64
        )

    def a_data_t(y: np.ndarray) -> np.ndarray:
        tick()
        return conv(embed(w * y), d).reshape(-1).astype(np.float64)

    op = LinearOperator((inside.size, p.field.size), matvec=a_data, rmatvec=a_data_t, dtype=float)
    rhs = (w * p.field.reshape(-1)[inside]).astype(np.float64)
    sol = lsqr(op, rhs, atol=tol, btol=tol, iter_lim=max_iter)
    x_lsqr = sol[0].reshape(p.shape).astype(np.float32)
    LOG.info("ilsqr: LSQR stopped after %d iterations (istop %d)", sol[2], sol[1])

    # Step 2: fast structural estimate for the gradient weights.
    absd = np.abs(d)
    lo, hi = np.percentile(absd[absd > 0], [1, 30])
    blend = np.clip(np.log(np.maximum(absd, lo) / lo) / np.log(hi / lo), 0, 1)
    filt = (blend + (1 - blend) * sphere_kernel(p.shape, vs, 3.0)).astype(np.float32)
    del blend
    fast = np.where(p.mask, conv(p.field, np.sign(d) * filt), np.float32(0))
    fast = np.where(p.mask, conv(fast, filt), np.float32(0))
    del filt
    h = [np.float32(1 / v) for v in vs]
    grad = _gradient(fast, *h, np.empty((3, *p.shape), np.float32))
    del fast
    wg = np.stack([_ramp_weights(np.abs(g.reshape(-1)[inside]), 50, 70) for g in grad])

    # Step 3: streaks = ill-conditioned component whose gradients explain those of
    # x_lsqr where the tissue is smooth.
    ill = (absd < threshold).astype(np.float32)
    del absd

    def a_mat(s: np.ndarray) -> np.ndarray:
        g = _gradient(conv(s.reshape(p.shape).astype(np.float32), ill), *h, grad)
        return (wg * g.reshape(3, -1)[:, inside]).reshape(-1).astype(np.float64)

    def a_rmat(y: np.ndarray) -> np.ndarray:
        tick()
        grad[:] = 0
        grad.reshape(3, -1)[:, inside] = wg * y.reshape(3, -1)
        out = conv(_grad_adjoint(grad, *h, np.empty(p.shape, np.float32)), ill)
        return out.reshape(-1).astype(np.float64)

    rhs = (wg * _gradient(x_lsqr, *h, grad).reshape(3, -1)[:, inside]).reshape(-1).astype(float)
    op = LinearOperator((rhs.size, x_lsqr.size), matvec=a_mat, rmatvec=a_rmat, dtype=np.float64)
    sol = lsmr(op, rhs, atol=tol, btol=tol, maxiter=max_iter)
    LOG.info("ilsqr: streak LSMR stopped after %d iterations (istop %d)", sol[2], sol[1])
    streak = conv(sol[0].reshape(p.shape).astype(np.float32), ill)
    return p.result(x_lsqr - streak)


#: Inversion methods by name; every one takes ``(local, mask, voxel_size, b0_dir, **params)``.
METHODS: dict[str, Callable[..., np.ndarray]] = {"tkd": tkd, "rts": rts, "tv": tv, "ilsqr": ilsqr}

#: Methods that take data weights (``weight=``): they trust the field only where the
#: weight is positive and still solve for chi on the whole mask.
WEIGHTED = frozenset({"tv"})


def invert(
    local_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    method: str,
    **params,
) -> np.ndarray:
    """Dispatch to ``METHODS[method]``: local field (ppm) to chi (ppm), zero outside ``mask``,
    not referenced. ``voxel_size`` in mm, ``b0_dir`` a unit vector in voxel axes."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown inversion method {method!r}; choose from {sorted(METHODS)}"
        ) from None
    try:
        inspect.signature(fn).bind(local_ppm, mask, voxel_size, b0_dir, **params)
    except TypeError as err:
        raise ValueError(f"inversion method {method!r}: {err}") from None
    return fn(local_ppm, mask, voxel_size, b0_dir, **params)


def invert_two_pass(
    local: np.ndarray,
    reliable_mask: np.ndarray,
    filled_mask: np.ndarray,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    method: str,
    **params,
) -> np.ndarray:
    """Two-pass inversion against rim and strong-source streaks (Stewart et al., MRM 2022).

    Pass 1 inverts the field on ``reliable_mask`` only (e.g. a quality-thresholded mask
    without hole filling, which leaves out strong sources and unreliable rim voxels), so
    their inconsistent field cannot streak into the rest of the brain. Pass 2 inverts on
    ``filled_mask``. The map takes pass 1 inside the reliable mask and pass 2 in
    ``filled_mask & ~reliable_mask``; pass 2 is shifted by the mean difference of the two
    passes over the reliable mask, as each pass has its own arbitrary offset.

    ``local`` in ppm, ``voxel_size`` in mm, ``b0_dir`` in voxel axes; returns chi (ppm),
    zero outside ``filled_mask``, not referenced.
    """
    local, filled = check_field_mask(local, filled_mask, "local field")
    reliable = np.asarray(reliable_mask)
    if reliable.shape != filled.shape:
        raise ValueError(
            f"reliable mask shape {reliable.shape} does not match filled mask {filled.shape}"
        )
    reliable = reliable.astype(bool, copy=False)
    if not reliable.any():
        raise ValueError("reliable mask is empty")
    if np.any(reliable & ~filled):
        raise ValueError("reliable mask must lie inside the filled mask")
    chi1 = invert(local, reliable, voxel_size, b0_dir, method, **params)
    chi2 = invert(local, filled, voxel_size, b0_dir, method, **params)
    offset = np.float32(chi1[reliable].mean() - chi2[reliable].mean())
    return np.where(reliable, chi1, np.where(filled, chi2 + offset, np.float32(0)))


def reference(
    chi: np.ndarray, mask: np.ndarray, how: str = "mean", roi: np.ndarray | None = None
) -> np.ndarray:
    """Reference chi (ppm): subtract its mean (``how="mean"``) or median (``"median"``)
    over ``roi`` (default: ``mask``, e.g. a CSF ROI when given) inside ``mask``;
    ``"none"`` only masks. Returns float32 chi in ppm, zero outside ``mask``."""
    chi = np.asarray(chi)
    mask = np.asarray(mask)
    if mask.shape != chi.shape:
        raise ValueError(f"mask shape {mask.shape} does not match chi shape {chi.shape}")
    mask = mask.astype(bool, copy=False)
    region = mask if roi is None else np.asarray(roi).astype(bool, copy=False)
    if region.shape != chi.shape:
        raise ValueError(f"roi shape {region.shape} does not match chi shape {chi.shape}")
    if not region.any():
        raise ValueError("reference region is empty")
    if how == "mean":
        ref = float(np.mean(chi[region], dtype=np.float64))
    elif how == "median":
        ref = float(np.median(chi[region]))
    elif how == "none":
        ref = 0.0
    else:
        raise ValueError(f"unknown referencing {how!r}; choose from 'mean', 'median', 'none'")
    return np.where(mask, chi - ref, 0).astype(np.float32)
