"""Tiled inference: tiling plan, blending, equality with a whole-volume pass, devices."""

import logging
import re

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from qsmprep.nn import inference
from qsmprep.nn.inference import invert_adaptive_unet, plan_tiles, prepare_model, resolve_device
from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.qsm.sideinfo import SideInformation

SIDE = SideInformation((1.0, 1.0, 1.5), (0.0, 0.6, 0.8))


def model(depth: int, residual: bool = False) -> AdaptiveUNet3d:
    torch.manual_seed(depth)
    m = AdaptiveUNet3d(base_channels=4, depth=depth, residual=residual)
    with torch.no_grad():  # trained-looking batch norm, so that folding it is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm3d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


def smooth_field(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * ndi.gaussian_filter(rng.standard_normal(shape), 2)).astype(np.float32)


def direct(m: AdaptiveUNet3d, field: np.ndarray) -> np.ndarray:
    """Plain forward pass on the volume zero-padded to the model's size multiple."""
    k = m.size_multiple
    padded = np.zeros([-(-n // k) * k for n in field.shape], dtype=np.float32)
    padded[tuple(slice(0, n) for n in field.shape)] = field
    with torch.no_grad():
        y = m(torch.from_numpy(padded)[None, None], torch.from_numpy(SIDE.as_vector()))
    return y[0, 0].numpy()[tuple(slice(0, n) for n in field.shape)]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b - b.mean()))


def test_single_tile_equals_the_plain_forward_pass():
    m = model(3, residual=True)
    field = smooth_field((30, 26, 21))
    mask = np.ones(field.shape, bool)
    chi = invert_adaptive_unet(field, mask, SIDE, m, device="cpu")
    # Only batch-norm folding separates the two: float32 rounding.
    assert rel(chi, direct(m, field)) < 1e-5
    assert m.training is False and isinstance(m.down[0][1], torch.nn.BatchNorm3d)  # untouched


def test_tiles_equal_the_whole_volume_when_context_fits_the_margin():
    # Depth 2 reaches 9 voxels (measured). Tiles of 64 over 96 voxels overlap by 48: the
    # blend ignores the outer 12 voxels of every overlap, beyond the reach of the tile
    # border, and tiles start on the pooling grid, so only float rounding remains.
    m = model(2)
    field = smooth_field((96, 30, 20))
    mask = np.ones(field.shape, bool)
    whole = invert_adaptive_unet(field, mask, SIDE, m, device="cpu")
    tiled = invert_adaptive_unet(
        field, mask, SIDE, m, device="cpu", tile_shape=(64, 32, 32), overlap=40
    )
    assert rel(tiled, whole) < 1e-5
    # The same tiles with a 16-voxel overlap (margin 4 < reach 9) are visibly worse.
    short = invert_adaptive_unet(
        field, mask, SIDE, m, device="cpu", tile_shape=(32, 32, 32), overlap=16
    )
    assert rel(short, whole) > 1e-4


def test_deep_model_tiling_error_is_small():
    # The default depth reaches across any tile, so tiles cannot be exact; the blend keeps
    # the difference to a fraction of a percent of the output's variation (random weights).
    m = model(5)
    field = smooth_field((40, 48, 36))
    mask = np.ones(field.shape, bool)
    whole = invert_adaptive_unet(field, mask, SIDE, m, device="cpu")
    tiled = invert_adaptive_unet(
        field, mask, SIDE, m, device="cpu", tile_shape=(32, 32, 32), overlap=16
    )
    assert 0 < rel(tiled, whole) < 3e-3


@pytest.mark.parametrize("shape", [(180, 220, 180), (64, 64, 64), (17, 200, 33), (250, 90, 40)])
@pytest.mark.parametrize("max_voxels", [10**9, 3_000_000, 300_000])
def test_plan_tiles_covers_the_volume_within_budget(shape, max_voxels):
    tshape, starts = plan_tiles(shape, max_voxels, overlap=32, multiple=16)
    assert np.prod(tshape) <= max_voxels
    for n, t, st in zip(shape, tshape, starts, strict=True):
        extent = -(-n // 16) * 16
        assert t % 16 == 0 and all(s % 16 == 0 for s in st)  # on the pooling grid
        assert st[0] == 0 and st[-1] + t == extent
        assert all(b - a <= t - 32 for a, b in zip(st, st[1:], strict=False))  # overlap
        # The blending weights along the axis sum to one everywhere.
        total = np.zeros(extent)
        for s, w in zip(st, inference._ramps(t, st), strict=True):
            total[s : s + t] += w
        np.testing.assert_allclose(total, 1, atol=1e-6)
    if max_voxels == 10**9:
        assert all(len(st) == 1 for st in starts)  # one whole-volume tile


def test_plan_tiles_prefers_less_work_and_rejects_tiny_budgets():
    tshape, starts = plan_tiles((180, 220, 180), 4_000_000, overlap=32)
    work = np.prod(tshape) * np.prod([len(s) for s in starts])
    assert work < 2.0 * 192 * 224 * 192  # overlap costs less than a second pass
    with pytest.raises(ValueError, match="raise the memory budget"):
        plan_tiles((180, 220, 180), 50_000, overlap=32)


def test_memory_budget_sets_the_tiling_and_logs_progress(caplog):
    m = model(3)
    field = smooth_field((48, 40, 24))
    mask = np.ones(field.shape, bool)
    per_voxel = inference.activation_bytes_per_voxel(m)
    weights = 2 * sum(p.numel() * 4 for p in m.parameters())
    volume = 3 * 4 * field.size  # input, blended output and result, float32
    mem_gb = (weights + volume + 32 * 32 * 24 * per_voxel) / 1e9
    with caplog.at_level(logging.INFO, logger="qsmprep"):
        chi = invert_adaptive_unet(field, mask, SIDE, m, device="cpu", mem_gb=mem_gb, overlap=8)
    found = re.search(r"(\d+) tile\(s\) of \((\d+), (\d+), (\d+)\)", caplog.text)
    n_tiles, tile = int(found[1]), [int(found[i]) for i in (2, 3, 4)]
    assert n_tiles > 1 and np.prod(tile) <= 32 * 32 * 24
    assert f"tile {n_tiles}/{n_tiles} done" in caplog.text
    assert rel(chi, invert_adaptive_unet(field, mask, SIDE, m, device="cpu")) < 0.05


def test_mask_nan_and_determinism():
    m = model(3, residual=True)
    field = smooth_field((20, 24, 16))
    mask = np.zeros(field.shape, bool)
    mask[4:16, 5:20, 3:13] = True
    field[~mask] = np.nan  # outside the mask the field is undefined and must be ignored
    threads = torch.get_num_threads()
    a = invert_adaptive_unet(field, mask, SIDE, m, device="cpu", nthreads=1)
    b = invert_adaptive_unet(field, mask, SIDE, m, device="cpu", nthreads=1)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert np.array_equal(a, b) and np.all(a[~mask] == 0) and np.isfinite(a).all()
    field[8, 8, 8] = np.inf
    with pytest.raises(ValueError, match="inside the mask"):
        invert_adaptive_unet(field, mask, SIDE, m, device="cpu")


def test_bad_arguments():
    m = model(2)
    f, mask = np.zeros((8, 8, 8), np.float32), np.ones((8, 8, 8), bool)
    with pytest.raises(ValueError, match="3D array"):
        invert_adaptive_unet(f[0], mask[0], SIDE, m, device="cpu")
    with pytest.raises(ValueError, match="mask shape"):
        invert_adaptive_unet(f, mask[:4], SIDE, m, device="cpu")
    with pytest.raises(ValueError, match="6 finite numbers"):
        invert_adaptive_unet(f, mask, [1.0, 1.0, 1.0], m, device="cpu")
    with pytest.raises(ValueError, match="multiples of 2"):
        invert_adaptive_unet(f, mask, SIDE, m, device="cpu", tile_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="mem_gb must be positive"):
        invert_adaptive_unet(f, mask, SIDE, m, device="cpu", mem_gb=0)
    with pytest.raises(ValueError, match="AdaptiveUNet3d"):
        invert_adaptive_unet(f, mask, SIDE, torch.nn.Linear(2, 2), device="cpu")


def test_model_from_a_path(tmp_path):
    from qsmprep.nn.weights import save_model

    m = model(2, residual=True)
    save_model(m, tmp_path / "m.pt", {"training": "test"})
    f, mask = smooth_field((16, 16, 16)), np.ones((16, 16, 16), bool)
    np.testing.assert_array_equal(
        invert_adaptive_unet(f, mask, SIDE, tmp_path / "m.pt", device="cpu"),
        invert_adaptive_unet(f, mask, SIDE, m, device="cpu"),
    )


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    m = model(3, residual=True)
    f, mask = smooth_field((40, 36, 28)), np.ones((40, 36, 28), bool)
    cpu = invert_adaptive_unet(f, mask, SIDE, m, device="cpu")
    gpu = invert_adaptive_unet(f, mask, SIDE, m, device="cuda")
    assert rel(gpu, cpu) < 1e-3  # TF32 convolutions on recent GPUs


def test_prepare_model_folds_batch_norm():
    m = model(3)
    net = prepare_model(m, torch.device("cpu"))
    assert not any(isinstance(mod, torch.nn.BatchNorm3d) for mod in net.down[0])
    # Level 1 keeps the batch norm after the adaptive convolution (its kernel varies).
    assert isinstance(net.down[1][0], torch.nn.BatchNorm3d)
