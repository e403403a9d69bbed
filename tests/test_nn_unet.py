"""AdaptiveUNet3d: architecture, per-sample adaptive kernels, residual, config round trip."""

import json

import numpy as np
import pytest
import torch

from qsmprep.nn.inference import invert_adaptive_unet
from qsmprep.nn.unet import (
    AdaptiveConv3d,
    AdaptiveUNet3d,
    adaptive_side_override,
    canonical_side,
)

AXIAL = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
TILTED = [1.0, 1.0, 2.0, 0.2, -0.7, 0.6]  # the paper's anisotropic, tilted example


def small(**kw) -> AdaptiveUNet3d:
    torch.manual_seed(0)
    return AdaptiveUNet3d(**{"base_channels": 4, "depth": 3, **kw}).eval()


def test_default_config_matches_the_paper():
    m = AdaptiveUNet3d()
    # 16 base channels, 5 levels: 16..256 channels; about 8.3 M parameters.
    assert [blk[-3].out_channels for blk in m.down] == [16, 32, 64, 128, 256]
    assert 8.2e6 < m.n_parameters() < 8.4e6
    last = m.adaptive.fmn.last
    assert (last.in_features, last.out_features) == (192, 32 * 16 * 27)
    assert 2.6e6 < sum(p.numel() for p in last.parameters()) < 2.75e6
    fc = [mod for mod in m.adaptive.fmn.net if isinstance(mod, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fc][:3] == [(6, 12), (12, 48), (48, 192)]
    # The plain U-Net differs only by the adaptive layer: one 32x16x3x3x3 kernel.
    plain = AdaptiveUNet3d(adaptive=False)
    adaptive_layer = sum(p.numel() for p in m.adaptive.parameters())
    assert plain.n_parameters() == m.n_parameters() - adaptive_layer + 32 * 16 * 27


def test_parameter_groups_partition_the_model():
    m = AdaptiveUNet3d(base_channels=4, depth=4)
    groups = [list(m.adaptive.parameters()), m.encoder_parameters(), m.decoder_parameters()]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters()}
    assert all(len(g) > 0 for g in groups)
    # The decoder group is the upsampling path; the output conv is in the encoder group.
    assert {id(p) for p in m.head.parameters()} <= {id(p) for p in m.encoder_parameters()}


def test_output_shape_and_size_check():
    m = small()
    y = m(torch.zeros(2, 1, 8, 12, 16), torch.tensor([AXIAL, TILTED]))
    assert y.shape == (2, 1, 8, 12, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        m(torch.zeros(1, 1, 8, 10, 8), torch.tensor(AXIAL))
    with pytest.raises(ValueError, match="side must be"):
        m(torch.zeros(2, 1, 8, 8, 8), torch.zeros(3, 6))


@pytest.mark.parametrize("shape", [(17, 23, 9), (5, 31, 20)])
def test_odd_sizes_through_inference_padding(shape):
    m = small(residual=False)
    rng = np.random.default_rng(1)
    field = rng.normal(0, 0.05, shape).astype(np.float32)
    mask = rng.random(shape) > 0.3
    chi = invert_adaptive_unet(field, mask, AXIAL, m, device="cpu")
    assert chi.shape == shape and chi.dtype == np.float32
    assert np.all(chi[~mask] == 0)
    assert np.abs(chi[mask]).min() > 0  # the network output reaches every masked voxel


def test_fmn_kernel_depends_on_side_information():
    layer = AdaptiveConv3d(4, 8)
    with torch.no_grad():
        k = layer.kernels(torch.tensor([AXIAL, TILTED, AXIAL]))
    assert k.shape == (3, 8, 4, 3, 3, 3)
    # Equal side information, equal kernels: to float rounding, since a CPU's matrix
    # kernels may round each row of a batch differently (AVX-512/AMX do).
    tol = 1e-6 * float(k[0].abs().max())
    torch.testing.assert_close(k[0], k[2], rtol=0, atol=tol)
    torch.testing.assert_close(layer.kernels(torch.tensor([AXIAL]))[0], k[0], rtol=0, atol=tol)
    rel = (k[0] - k[1]).norm() / k[0].norm()
    assert 0.02 < rel < 0.5  # a modulation, neither negligible nor dominant
    # At initialisation the kernel has an ordinary convolution's scale (Kaiming-uniform).
    bound = 1 / np.sqrt(4 * 27)
    assert 0.3 * bound < k[0].std() < bound


def test_side_information_changes_the_output():
    m = small(residual=False)
    x = torch.randn(1, 1, 16, 16, 16) * 0.05
    y_ax, y_tilt = m(x, torch.tensor(AXIAL)), m(x, torch.tensor(TILTED))
    assert (y_ax - y_tilt).abs().max() > 5e-4 * y_ax.abs().max()
    plain = small(adaptive=False)
    assert torch.equal(plain(x, torch.tensor(AXIAL)), plain(x, torch.tensor(TILTED)))


def test_mixed_batch_equals_single_runs():
    m = small(residual=False)
    # Non-trivial batch-norm statistics so that eval mode is not an identity.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 16, 12, 8) * 0.05
    side = torch.tensor([AXIAL, TILTED])
    with torch.no_grad():
        batch = m(x, side)
        singles = torch.cat([m(x[i : i + 1], side[i : i + 1]) for i in range(2)])
    assert torch.allclose(batch, singles, rtol=0, atol=1e-6 * batch.abs().max())
    # ... and the two samples really used different kernels.
    h = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        y, y_swapped = m.adaptive(h, side), m.adaptive(h, side.flip(0))
    assert (y - y_swapped).norm() > 0.02 * y.norm()


def test_mixed_batch_gradients_match_single_runs():
    m = small()  # eval mode: batch norm uses running statistics, samples are independent
    x = torch.randn(2, 1, 8, 8, 8) * 0.05
    side = torch.tensor([AXIAL, TILTED])
    w = m.adaptive.fmn.last.weight

    def grad(xb, sb):
        m.zero_grad()
        m(xb, sb).square().sum().backward()
        return w.grad.clone()

    g_batch = grad(x, side)
    g_single = grad(x[:1], side[:1]) + grad(x[1:], side[1:])
    assert g_batch.abs().max() > 0
    assert torch.allclose(g_batch, g_single, rtol=1e-4, atol=1e-6 * g_batch.abs().max())


def test_residual_flag():
    x = torch.randn(1, 1, 8, 8, 8) * 0.05
    side = torch.tensor(AXIAL)
    with_res, without = small(residual=True), small(residual=False)
    without.load_state_dict(with_res.state_dict())
    # Same weights: the residual model adds exactly its (scaled) input.
    scale = float(with_res.chi_scale / with_res.field_scale)
    with torch.no_grad():
        diff = with_res(x, side) - without(x, side)
    assert torch.allclose(diff, scale * x, atol=1e-6)
    with pytest.raises(ValueError, match="bools"):
        AdaptiveUNet3d(residual="True")


def test_normalisation_is_inside_the_model():
    m = small(field_scale=0.02, chi_scale=0.3)
    ref = small(field_scale=1.0, chi_scale=1.0)
    ref.load_state_dict(
        {**m.state_dict(), "field_scale": ref.field_scale, "chi_scale": ref.chi_scale}
    )
    x = torch.randn(1, 1, 8, 8, 8) * 0.02
    side = torch.tensor(AXIAL)
    with torch.no_grad():
        assert torch.allclose(m(x, side), 0.3 * ref(x / 0.02, side), rtol=1e-5, atol=1e-6)


def test_config_and_state_dict_round_trip():
    m = small(field_scale=0.05, chi_scale=0.15, fmn_hidden=(8, 16, 32))
    cfg = json.loads(json.dumps(m.config))
    assert cfg["field_scale"] == 0.05 and cfg["fmn_hidden"] == [8, 16, 32]
    m2 = AdaptiveUNet3d.from_config(cfg)
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())
    m2.eval()
    x, side = torch.randn(1, 1, 8, 8, 8), torch.tensor(TILTED)
    with torch.no_grad():
        assert torch.equal(m(x, side), m2(x, side))
    with pytest.raises(ValueError, match="unknown"):
        AdaptiveUNet3d.from_config({**cfg, "dropout": 0.1})


# ------------------------------------------------------------------ B0 sign, ablation hooks


def test_b_and_minus_b_give_the_same_output():
    side = torch.tensor([TILTED, [1, 1, 2, 0.2, -0.7, 0], [1, 1, 1, -1, 0, 0]])
    flipped = side.clone()
    flipped[:, 3:] *= -1
    canon = canonical_side(side)
    torch.testing.assert_close(canonical_side(flipped), canon, rtol=0, atol=0)
    assert (canon[:, 5] >= 0).all() and canon[1, 4] > 0 and canon[2, 3] > 0
    m = small(input_transform="tkd")
    x = torch.randn(3, 1, 16, 16, 12) * 0.05
    with torch.no_grad():
        torch.testing.assert_close(m(x, side), m(x, flipped), rtol=0, atol=0)
        torch.testing.assert_close(
            m.adaptive.kernels(side), m.adaptive.kernels(flipped), rtol=0, atol=0
        )
    field, mask = x[0, 0].numpy(), np.ones((16, 16, 12), bool)
    minus = [*TILTED[:3], *(-v for v in TILTED[3:])]
    np.testing.assert_array_equal(
        invert_adaptive_unet(field, mask, TILTED, m, device="cpu"),
        invert_adaptive_unet(field, mask, minus, m, device="cpu"),
    )


def test_features_then_decode_is_the_forward_pass():
    m = small(depth=4)
    x = torch.randn(2, 1, 16, 8, 16) * 0.05
    side = torch.tensor([AXIAL, TILTED])
    with torch.no_grad():
        full = m(x, side)
        for level in range(4):
            xn, skips, h = m.features(x, side, level)
            assert len(skips) == level
            torch.testing.assert_close(m.decode_from(xn, skips, h), full)
    with pytest.raises(ValueError, match="level"):
        m.features(x, side, 4)


def test_adaptive_side_override_changes_only_the_adaptive_kernel():
    m = small(input_transform="tkd")
    x = torch.randn(1, 1, 16, 16, 16) * 0.05
    right, wrong = torch.tensor([TILTED]), torch.tensor([AXIAL])
    with torch.no_grad():
        base = m(x, right)
        with adaptive_side_override(m, AXIAL):
            torch.testing.assert_close(m.adaptive.kernels(right), m.adaptive.kernels(wrong))
            overridden = m(x, right)
        # the TKD input still uses the right kernel: not the same as the wrong side everywhere
        assert not torch.allclose(overridden, base) and not torch.allclose(overridden, m(x, wrong))
        torch.testing.assert_close(m(x, right), base)  # restored
