"""The synthetic training-pair generator: physics of its kernels, draws, determinism."""

import numpy as np
import pytest
import torch

from qsmprep.nn.synth import (
    SPLIT_PHANTOM_SEEDS,
    SynthConfig,
    SyntheticQSMDataset,
    make_pair,
    pair_rng,
    random_b0_direction,
    random_shapes_chi,
    random_voxel_size,
    simulate_local_field,
)

SHAPES_ONLY = SynthConfig(patch_size=(32, 32, 32), head_prob=0.0)


def _sphere_case(voxel_size, radius_mm=7.0, shape=(64, 64, 48)):
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel_size, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    return (x, y, z), r, r <= radius_mm


def _analytic_sphere(coords, r, b0, chi0, volume_mm3):
    """Field (ppm) outside a uniformly magnetised sphere: chi V/(4 pi r^3) (3 cos^2 - 1)."""
    b = np.asarray(b0) / np.linalg.norm(b0)
    cos = sum(c * bi for c, bi in zip(coords, b, strict=True)) / np.maximum(r, 1e-9)
    return chi0 * volume_mm3 / (4 * np.pi * r**3) * (3 * cos**2 - 1)


def test_sphere_field_matches_analytic_for_oblique_anisotropic_grid():
    vs = (0.8, 1.0, 1.6)
    b0 = np.array([0.3, -0.4, 0.86])
    b0 /= np.linalg.norm(b0)
    chi0, radius = 0.4, 7.0
    coords, r, inside = _sphere_case(vs, radius)
    chi = np.where(inside, chi0, 0).astype(np.float32)
    volume = inside.sum() * np.prod(vs)  # the voxelised sphere's volume
    ana = _analytic_sphere(coords, r, b0, chi0, volume)
    shell = (r > 1.5 * radius) & (r < 3 * radius)

    def rel_err(field):
        return np.linalg.norm(field[shell] - ana[shell]) / np.linalg.norm(ana[shell])

    everywhere = np.ones(chi.shape, bool)
    field = simulate_local_field(chi, everywhere, vs, b0, pad_factor=2.0)
    assert rel_err(field) < 0.04  # staircase sphere, discrete kernel: ~1.6 % measured
    # Lorentz-corrected convention: a uniform sphere has no field at its centre.
    assert abs(field[r < radius / 2].mean()) < 0.01 * chi0
    # The kernel must use the pair's own geometry: axial B0 or wrong voxel sizes fail.
    assert rel_err(simulate_local_field(chi, everywhere, vs, (0, 0, 1), 2.0)) > 0.5
    assert rel_err(simulate_local_field(chi, everywhere, (1.0, 1.0, 1.0), b0, 2.0)) > 0.2


def test_local_field_is_zero_outside_mask_and_sees_only_masked_sources():
    rng = np.random.default_rng(0)
    chi = rng.normal(0, 0.1, (24, 24, 24)).astype(np.float32)
    mask = np.zeros(chi.shape, bool)
    mask[4:20, 4:20, 4:20] = True
    f = simulate_local_field(chi, mask, (1, 1, 1), (0, 0, 1))
    assert f.dtype == np.float32
    assert np.all(f[~mask] == 0)
    chi_out = chi.copy()
    chi_out[~mask] = 5.0  # sources outside the mask are not part of the local field
    np.testing.assert_array_equal(simulate_local_field(chi_out, mask, (1, 1, 1), (0, 0, 1)), f)
    with pytest.raises(ValueError, match="differ in shape"):
        simulate_local_field(chi, mask[:-1], (1, 1, 1), (0, 0, 1))


def test_acquisition_draws_cover_the_requested_ranges():
    rng = np.random.default_rng(1)
    sizes = np.array([random_voxel_size(rng, (0.5, 3.0), 0.5) for _ in range(400)])
    assert sizes.min() >= 0.5 and sizes.max() <= 3.0
    aniso = np.ptp(sizes, axis=1) > 1e-6
    assert 0.35 < aniso.mean() < 0.65
    assert sizes.min() < 0.6 and sizes.max() > 2.6
    dirs = np.array([random_b0_direction(rng, 45.0, 0.2) for _ in range(400)])
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1, atol=1e-6)
    tilt = np.degrees(np.arccos(np.clip(dirs[:, 2], -1, 1)))
    assert tilt.max() <= 45 + 1e-6 and tilt.max() > 40
    assert 0.1 < np.mean(tilt == 0) < 0.3
    assert np.all(random_b0_direction(rng, 0.0) == np.array([0, 0, 1]))


def test_random_shapes_have_strong_sources_and_physical_shapes():
    rng = np.random.default_rng(3)
    strong = 0
    for _ in range(10):
        chi, mask = random_shapes_chi((32, 32, 32), (1.0, 1.0, 2.0), rng)
        assert chi.dtype == np.float32 and mask.dtype == bool
        assert np.all(chi[~mask] == 0) and mask.mean() > 0.05
        strong += np.abs(chi).max() >= 0.5
    assert strong >= 4  # ~70 % of patches carry a +-0.5..2 ppm source


def test_pair_field_uses_its_own_side_information():
    cfg = SynthConfig(patch_size=(32, 32, 32), head_prob=0.0, noise_range=(0.0, 0.0))
    for i in range(4):
        p = make_pair(cfg, pair_rng("train", 0, i))
        np.testing.assert_array_equal(p.side[:3], np.float32(p.voxel_size))
        np.testing.assert_array_equal(p.side[3:], np.float32(p.b0_dir))
        expected = simulate_local_field(p.chi, p.mask, p.voxel_size, p.b0_dir, cfg.pad_factor)
        np.testing.assert_allclose(p.field, expected, atol=1e-7)


def test_noise_is_a_fraction_of_the_field_inside_the_mask():
    clean = SynthConfig(patch_size=(32, 32, 32), head_prob=0.0, noise_range=(0.0, 0.0))
    noisy = SynthConfig(patch_size=(32, 32, 32), head_prob=0.0, noise_range=(0.1, 0.1))
    a = make_pair(clean, pair_rng("train", 0, 5))
    b = make_pair(noisy, pair_rng("train", 0, 5))
    np.testing.assert_array_equal(a.chi, b.chi)
    resid = (b.field - a.field)[a.mask]
    assert resid.std() == pytest.approx(0.1 * a.field[a.mask].std(), rel=0.05)
    assert np.all(b.field[~b.mask] == 0)


def test_stream_is_deterministic_split_dependent_and_worker_independent():
    ds = SyntheticQSMDataset(SHAPES_ONLY, split="train", seed=7, length=3, batch_size=2)
    b0 = list(ds)
    assert len(b0) == 3
    assert b0[0]["field"].shape == (2, 1, 32, 32, 32) and b0[0]["side"].shape == (2, 6)
    assert b0[0]["mask"].dtype == torch.bool
    again = list(SyntheticQSMDataset(SHAPES_ONLY, split="train", seed=7, length=3, batch_size=2))
    for x, y in zip(b0, again, strict=True):
        assert torch.equal(x["field"], y["field"])
    # Starting later (resume) continues the same stream.
    later = next(iter(SyntheticQSMDataset(SHAPES_ONLY, "train", 7, start=2, batch_size=2)))
    assert torch.equal(later["chi"], b0[1]["chi"])
    # Two workers give the same batches in the same order.
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for x, y in zip(loader, b0, strict=True):
        assert torch.equal(x["chi"], y["chi"])
    val = next(iter(SyntheticQSMDataset(SHAPES_ONLY, split="val", seed=7, batch_size=2)))
    assert not torch.equal(val["chi"], b0[0]["chi"])


def test_splits_use_disjoint_phantom_seeds():
    pools = {
        s: set(range(first, first + SynthConfig().pool_size))
        for s, first in SPLIT_PHANTOM_SEEDS.items()
    }
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"]
    assert not pools["val"] & pools["test"]


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="patch_size"):
        SynthConfig(patch_size=(4, 32, 32))
    with pytest.raises(ValueError, match="max_tilt_deg"):
        SynthConfig(max_tilt_deg=120)
    with pytest.raises(ValueError, match="head_prob"):
        SynthConfig(head_prob=1.5)
    with pytest.raises(ValueError, match="split"):
        SyntheticQSMDataset(SHAPES_ONLY, split="holdout")
    cfg = SynthConfig(patch_size=(48, 48, 32), max_tilt_deg=30)
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg


def _noise_free_heads(head_context: float) -> SynthConfig:
    """Head patches only, 32³ at 2 mm, from one phantom, without noise."""
    return SynthConfig(
        patch_size=(32, 32, 32),
        head_prob=1.0,
        pool_size=1,
        head_voxel_size=(2.0, 2.0, 2.0),
        noise_range=(0.0, 0.0),
        head_context=head_context,
    )


def test_head_patches_come_from_the_split_s_own_phantoms():
    cfg = _noise_free_heads(head_context=1.0)
    ds = SyntheticQSMDataset(cfg, split="test", seed=0)  # one 1 mm phantom build (~5 s)
    for i in range(4):
        p = ds.pair(i)
        assert p.kind == "head" and p.info["phantom_seed"] == SPLIT_PHANTOM_SEEDS["test"]
        assert p.mask.mean() > 0.1
        assert np.all(p.chi[~p.mask] == 0) and np.all(p.field[~p.mask] == 0)
        assert np.isfinite(p.chi).all() and np.isfinite(p.field).all()
        # brain tissue values, scaled by at most 2 (plus strong sources of <= 2 ppm)
        assert np.abs(p.chi).max() <= 2 * 2.0 + 1e-6
        assert 0.002 < np.median(np.abs(p.chi[p.mask])) < 0.2
        want = simulate_local_field(p.chi, p.mask, p.voxel_size, p.b0_dir, cfg.pad_factor)
        np.testing.assert_allclose(p.field, want, atol=1e-7)


def test_head_context_adds_the_field_of_the_surrounding_brain():
    cfg = _noise_free_heads(head_context=1.5)
    p = SyntheticQSMDataset(cfg, split="test", seed=0).pair(0)
    own = simulate_local_field(p.chi, p.mask, p.voxel_size, p.b0_dir, cfg.pad_factor)
    outside = p.field - own  # the field of the brain around the patch
    assert np.abs(outside[p.mask]).mean() > 0.05 * np.abs(p.field[p.mask]).mean()
    # its sources are all outside the patch: with the discrete dipole kernel it is harmonic
    # for the grid Laplacian wherever a voxel and its six neighbours are in the mask
    inner = p.mask.copy()
    for a in range(3):
        inner &= np.roll(p.mask, 1, a) & np.roll(p.mask, -1, a)
    inner[[0, -1], :, :] = inner[:, [0, -1], :] = inner[:, :, [0, -1]] = False
    vs = p.voxel_size
    lap = sum(
        (np.roll(outside, 1, a) + np.roll(outside, -1, a) - 2 * outside) / vs[a] ** 2
        for a in range(3)
    )
    scale = np.abs(outside[inner]).max() / min(vs) ** 2
    assert np.abs(lap[inner]).max() < 1e-3 * scale
