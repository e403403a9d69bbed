"""The front end's defences against a wrong total field: MCPC-3D-S's correction of the
evolution's 2 pi slips, the field's reliability weights, the mask's unreliable border,
and the weighted TV inversion that trusts the field only where it is reliable."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm import inversion, masking
from qsmprep.qsm import phase as ph
from qsmprep.qsm.dipole import forward_field

TES = np.array([0.004, 0.010, 0.016, 0.022])  # s
VS = (2.0, 2.0, 2.0)  # mm


def _grid(shape=(40, 44, 36)):
    return np.meshgrid(
        *[(np.arange(n) - n / 2) * v for n, v in zip(shape, VS, strict=True)], indexing="ij"
    )


def _smooth_field(x, y, z):
    """A smooth total field (Hz) of a few tens of Hz."""
    return 30 * np.exp(-((x - 6) ** 2 + y**2 + z**2) / 300) + 0.5 * y - 0.3 * z


def test_mcpc3ds_corrects_an_island_of_the_evolution(monkeypatch):
    """ROMEO leaves a region of the echo-1-to-2 evolution off by 2 pi: without the
    correction that region's offset is off by 2 pi TE1 / (TE2 - TE1) and so is every
    echo; the correction puts it right."""
    x, y, z = _grid()
    mask = (x / 30) ** 2 + (y / 34) ** 2 + (z / 28) ** 2 < 1
    field = _smooth_field(x, y, z)
    offset = 0.9 * np.sin(x / 25) + 0.6 * np.cos(y / 20)
    phases = ph.wrap(2 * np.pi * field[..., None] * TES + offset[..., None])
    mag = np.where(mask, 1.0, 0.0)[..., None] * np.exp(-TES / 0.05)
    island = ((x - 8) ** 2 + (y + 6) ** 2 + z**2) < 8**2  # 16 mm across
    true_evolution = 2 * np.pi * field * (TES[1] - TES[0])
    slipped = (true_evolution - 2 * np.pi * island).astype(np.float32)

    def fake_romeo(hip, mag=None, mask=None):
        return slipped.copy(), None

    monkeypatch.setattr(ph, "romeo_unwrap", fake_romeo)
    expected = ph.wrap(2 * np.pi * field[..., None] * TES)  # the phase without offset
    inner = ndimage.binary_erosion(mask, iterations=3)
    for corrections, bad in ((0, True), (4, False)):
        out = ph.mcpc3ds(phases.astype(np.float32), mag, TES, VS, corrections=corrections)
        err = np.abs(ph.wrap(out - expected))[..., 0]
        if bad:  # the island is 2 pi TE1 / (TE2 - TE1) = 4.2 rad (wrapped 2.1 rad) off
            assert np.median(err[island & inner]) > 1.0
        else:
            assert np.percentile(err[inner], 99) < 0.05
    assert np.median(err[island]) < 0.02


def test_reliability_flags_a_two_pi_slip_and_weighs_by_noise():
    x, y, z = _grid()
    mask = (x / 30) ** 2 + (y / 34) ** 2 + (z / 28) ** 2 < 1
    field = _smooth_field(x, y, z).astype(np.float32)
    slip = ((x + 10) ** 2 + (y - 4) ** 2 + (z - 2) ** 2) < 4**2  # 8 mm across
    wrong = np.where(slip, field + 1 / TES[0], field)  # echo 1 off by 2 pi: +1/TE1 Hz
    low = mask & (x > 16)  # half the signal there: twice the field's noise
    mag = np.where(low, 0.5, 1.0)[..., None] * np.exp(-TES / 0.05) * np.ones_like(x)[..., None]
    w = ph.field_reliability(wrong, mag, TES, mask, VS)
    assert w.dtype == np.float32 and np.all(w[~mask] == 0)
    assert np.all(w[slip & mask] == 0)
    clean = mask & ~ndimage.binary_dilation(slip, iterations=3)
    assert np.all(w[clean & ~low] == pytest.approx(1.0))
    assert np.allclose(w[clean & low], 0.5, atol=1e-3)  # sd ~ 1 / magnitude
    # a real local field of 0.15 ppm (19 Hz at 3 T) is not an outlier
    vein = ((x - 2) ** 2 + z**2 < 2**2) & mask
    w2 = ph.field_reliability(field + 19 * vein, None, TES, mask, VS)
    assert np.all(w2[mask] == 1)


def test_peel_takes_only_unreliable_border_voxels():
    """At a steep edge the outer layers are wrong: they leave the mask, layer by layer;
    a zero-weight voxel inside stays (the data terms ignore it)."""
    x, y, z = _grid()
    mask = (x / 30) ** 2 + (y / 34) ** 2 + (z / 28) ** 2 < 1
    weight = np.ones(mask.shape, np.float32)
    depth = ndimage.distance_transform_edt(mask, sampling=VS)
    edge = mask & (z > 12) & (depth <= 4)  # two voxels deep at the top
    weight[edge] = 0
    weight[20, 22, 18] = 0  # a voxel deep inside
    out = masking.peel_unreliable(mask, weight)
    assert not np.any(out & edge) and out[20, 22, 18]
    assert np.array_equal(out | edge, mask)
    once = masking.peel_unreliable(mask, weight, rounds=1)
    assert np.any(once & edge) and once.sum() > out.sum()


def _sphere_case(b0=(0.0, 0.0, 1.0)):
    x, y, z = _grid((36, 36, 36))
    mask = x**2 + y**2 + z**2 < 26**2
    chi = np.where(mask, 0.01, 0.0).astype(np.float32)
    chi[((x - 6) ** 2 + y**2 + z**2) < 6**2] = 0.1
    chi[((x + 8) ** 2 + (y - 6) ** 2 + (z + 4) ** 2) < 4**2] = -0.05
    for cx, cy, cz in ((0, 0, 23), (23, 0, 0), (0, -23, 0)):  # veins in the rim
        chi[((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 3**2) & mask] = 0.3
    local = forward_field(chi, VS, b0).astype(np.float32)
    return chi, local, mask


def _err(chi, truth, m):
    a, b = chi[m] - chi[m].mean(), truth[m] - truth[m].mean()
    return 100 * np.linalg.norm(a - b) / np.linalg.norm(b)


def test_weighted_tv_fills_voxels_without_data():
    """With weight 0 on the outer 4 mm (as a peeled background removal leaves it) the rim
    still gets its susceptibility from its neighbours' fields; TV on the peeled mask
    alone has nothing there."""
    chi, local, mask = _sphere_case()
    depth = ndimage.distance_transform_edt(mask, sampling=VS)
    inner = mask & (depth > 4)
    rim = mask & ~inner
    b0 = (0.0, 0.0, 1.0)
    full = inversion.tv(np.where(inner, local, 0), mask, VS, b0, weight=inner.astype(np.float32))
    peeled = inversion.tv(local, inner, VS, b0)
    assert np.all(peeled[rim] == 0) and np.count_nonzero(full[rim]) > 0.9 * rim.sum()
    # measured: 54 % (rim from TV) against 87 % for the peeled mask's zero rim
    assert _err(full, chi, mask) < 0.75 * _err(np.where(inner, peeled, 0), chi, mask)


def test_weighted_tv_trusts_the_field_only_inside_the_mask():
    """The local field of the brain's sources goes on outside the brain; a data term that
    reads zero field there (the unweighted closed form) biases the rim. Weighted, the
    field outside the mask is unknown, not zero."""
    chi, local, mask = _sphere_case((0.3, -0.2, 0.93))
    b0 = (0.3, -0.2, 0.93)
    chi_tv = inversion.tv(local, mask, VS, b0)
    assert _err(chi_tv, chi, mask) < 15  # measured 5.7 %
    uniform = inversion.tv(local, mask, VS, b0, weight=np.full(mask.shape, 1.0, np.float32))
    np.testing.assert_allclose(uniform, chi_tv, atol=1e-6)
    with pytest.raises(ValueError, match="zero everywhere"):
        inversion.tv(local, mask, VS, b0, weight=np.zeros(mask.shape, np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        inversion.tv(local, mask, VS, b0, weight=-np.ones(mask.shape, np.float32))
