"""SWI on a simulated vein; minimum-intensity projection shape and values."""

from __future__ import annotations

import numpy as np
import pytest

from qsmprep.qsm import swi
from qsmprep.qsm.dipole import forward_field
from qsmprep.qsm.phase import ppm_to_hz, wrap

VS = (1.0, 1.0, 1.5)
TE = 0.02  # s
B0 = 3.0  # T


@pytest.fixture(scope="module")
def vein():
    """A paramagnetic vein along B0 in a sphere of tissue, wrapped background phase.

    Returns magnitude, wrapped phase, unwrapped phase (rad), brain mask, vein mask and a
    mask of tissue far from the vein.
    """
    shape = (56, 56, 40)
    idx = np.indices(shape, dtype=np.float32)
    x, y, z = [(idx[a] - (shape[a] - 1) / 2) * VS[a] for a in range(3)]
    brain = x**2 + y**2 + z**2 <= 24.0**2
    r_vein = np.sqrt((x - 3) ** 2 + (y + 2) ** 2)
    vein = (r_vein <= 1.6) & brain
    chi = np.where(vein, np.float32(0.4), np.float32(0))
    field_ppm = forward_field(chi, VS, (0, 0, 1))
    local = 2 * np.pi * ppm_to_hz(field_ppm, B0) * TE
    background = 0.25 * x - 0.15 * y + 0.1 * z + 1.0  # ramps wrapping several times (rad)
    unwrapped = (local + background).astype(np.float32)
    mag = np.where(brain, np.float32(100), np.float32(1))
    far = (r_vein > 10) & (x**2 + y**2 + z**2 <= 14.0**2)  # >= 2.5 sigma from the edge
    inner = vein & (np.abs(z) < 15)
    return mag, wrap(unwrapped), unwrapped, brain, inner, far


@pytest.mark.parametrize("unwrapped", [False, True])
def test_vein_is_darkened(vein, unwrapped):
    mag, wrapped, unwrapped_phase, brain, inner, far = vein
    phase = unwrapped_phase if unwrapped else wrapped
    assert np.abs(wrapped).max() > 3  # the background really wraps
    img = swi.swi(mag, phase, brain, VS, unwrapped=unwrapped)
    assert img.shape == mag.shape and img.dtype == np.float32
    # vein phase ~ +2 rad -> mask ((pi - 2) / pi)^4 ~ 0.02; tissue far away unchanged
    assert img[inner].mean() < 0.1 * mag[inner].mean()
    assert img[far].mean() > 0.95 * mag[far].mean()
    np.testing.assert_array_equal(img[~brain], mag[~brain])
    assert np.all(img <= mag + 1e-4)


def test_opposite_sign_spares_the_vein(vein):
    mag, wrapped, _, brain, inner, _ = vein
    img = swi.swi(mag, wrapped, brain, VS, paramagnetic_sign=-1)
    assert img[inner].mean() > 0.9 * mag[inner].mean()


def test_highpass_removes_linear_ramp(vein):
    _, wrapped, unwrapped, brain, inner, far = vein
    for phase, unw in [(wrapped, False), (unwrapped, True)]:
        hp = swi.highpass_phase(phase, brain, VS, unwrapped=unw)
        assert np.abs(hp[far]).max() < 0.05  # the ramp is gone (0.3 rad/mm before)
        assert hp[inner].mean() > 1.0  # the vein's positive phase stays
        assert not hp[~brain].any()


def test_phase_mask_values():
    p = np.array([-1.0, 0.0, np.pi / 2, np.pi, 4.0], dtype=np.float32)
    np.testing.assert_allclose(swi.phase_mask(p, power=1), [1, 1, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(swi.phase_mask(p, power=4), [1, 1, 0.0625, 0, 0], atol=1e-6)
    np.testing.assert_allclose(swi.phase_mask(-p, power=1, paramagnetic_sign=-1)[2], 0.5)


def test_minip_shape_and_values():
    img = np.arange(2 * 3 * 10, dtype=np.float32).reshape(2, 3, 10)[..., ::-1].copy()
    out = swi.minip(img, (1.0, 1.0, 2.0), slab_mm=6.0)  # 3 slices: k-1, k, k+1
    assert out.shape == img.shape
    # values decrease along the last axis, so the minimum is the next slice (or the edge)
    np.testing.assert_array_equal(out[..., :-1], img[..., 1:])
    np.testing.assert_array_equal(out[..., -1], img[..., -1])
    np.testing.assert_array_equal(swi.minip(img, (1, 1, 2), slab_mm=1.0), img)
    along0 = swi.minip(img, (1.0, 1.0, 1.0), slab_mm=2.0, axis=0)
    np.testing.assert_array_equal(along0, np.broadcast_to(img.min(axis=0), img.shape))
    rng = np.random.default_rng(0)
    noise = rng.random((8, 8, 20)).astype(np.float32)
    slab = swi.minip(noise, (1, 1, 1), slab_mm=5.0)
    np.testing.assert_array_equal(slab[..., 10], noise[..., 8:13].min(axis=-1))


def test_bad_input(vein):
    mag, wrapped, _, brain, *_ = vein
    with pytest.raises(ValueError, match="paramagnetic_sign"):
        swi.swi(mag, wrapped, brain, VS, paramagnetic_sign=0)
    with pytest.raises(ValueError, match="same 3D shape"):
        swi.swi(mag, wrapped, brain[:-1], VS)
    with pytest.raises(ValueError, match="voxel_size"):
        swi.swi(mag, wrapped, brain, (1, 1))
    with pytest.raises(ValueError, match="sigma_mm"):
        swi.highpass_phase(wrapped, brain, VS, sigma_mm=0)
    with pytest.raises(ValueError, match="magnitude"):
        swi.swi(mag[:-1], wrapped, brain, VS)
    with pytest.raises(ValueError, match="slab_mm"):
        swi.minip(mag, VS, slab_mm=-1)
    with pytest.raises(ValueError, match="3D"):
        swi.minip(mag[0], VS)
