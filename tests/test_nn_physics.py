import numpy as np
import pytest
import scipy.fft as sfft
import scipy.ndimage as ndi
import torch

from qsmprep.nn import physics
from qsmprep.nn.inference import invert_adaptive_unet
from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.qsm.dipole import dipole_kernel, forward_field, padded_shape
from qsmprep.qsm.sideinfo import SideInformation

SIDES = np.array(
    [[1.0, 1.0, 1.0, 0.0, 0.0, 1.0], [0.8, 1.0, 2.0, 0.0, 0.5, 0.8660254]], dtype=np.float32
)


def _chi(shape, seed):
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.standard_normal(shape), 1.5).astype(np.float32)


def _numpy_tkd(field, side, threshold):
    pshape = padded_shape(field.shape, 1.5)
    d = dipole_kernel(pshape, side[:3], side[3:]).astype(np.float64)
    with np.errstate(divide="ignore"):
        inv = np.where(np.abs(d) > threshold, 1 / d, np.sign(d) / threshold)
    inv[0, 0, 0] = 0
    spec = sfft.rfftn(field.astype(np.float64), s=pshape) * inv
    return sfft.irfftn(spec, s=pshape)[: field.shape[0], : field.shape[1], : field.shape[2]]


def test_convolve_matches_the_numerical_core_per_sample():
    chis = np.stack([_chi((20, 18, 16), s) for s in range(2)])
    got = physics.dipole_convolve(torch.from_numpy(chis[:, None]), torch.from_numpy(SIDES))
    for i in range(2):
        want = forward_field(chis[i], SIDES[i, :3], SIDES[i, 3:])
        np.testing.assert_allclose(got[i, 0].numpy(), want, atol=1e-5 * np.abs(want).max())


def test_tkd_per_sample_matches_numpy_and_inverts_the_well_conditioned_part():
    chis = np.stack([_chi((24, 20, 16), s) for s in range(2)])
    fields = physics.dipole_convolve(torch.from_numpy(chis[:, None]), torch.from_numpy(SIDES))
    est = physics.tkd(fields, torch.from_numpy(SIDES), threshold=0.15).numpy()
    for i in range(2):
        want = _numpy_tkd(fields[i, 0].numpy(), SIDES[i], 0.15)
        np.testing.assert_allclose(est[i, 0], want, atol=1e-5 * np.abs(want).max())
        # TKD recovers chi up to its cone and mean: clearly better than the field itself
        # (measured 0.62 and 0.56 against 1.03 and 0.89)
        c = chis[i] - chis[i].mean()
        err = np.linalg.norm(est[i, 0] - est[i, 0].mean() - c) / np.linalg.norm(c)
        f = fields[i, 0].numpy()
        err_field = np.linalg.norm(f - f.mean() - c) / np.linalg.norm(c)
        assert err < 0.7 and err < 0.8 * err_field
    # each sample used its own kernel: swapping the side vectors changes the result
    swapped = physics.tkd(fields, torch.from_numpy(SIDES[::-1].copy()), threshold=0.15)
    assert not np.allclose(swapped.numpy(), est, atol=1e-3 * np.abs(est).max())
    with pytest.raises(ValueError, match="threshold"):
        physics.tkd(fields, torch.from_numpy(SIDES), threshold=0)


def _tkd_model(adaptive: bool) -> AdaptiveUNet3d:
    torch.manual_seed(0)
    return AdaptiveUNet3d(
        base_channels=4, depth=3, adaptive=adaptive, input_transform="tkd"
    ).eval()


@pytest.mark.parametrize("adaptive", [True, False])
def test_tkd_input_model(adaptive):
    m = _tkd_model(adaptive)
    assert m.config["input_transform"] == "tkd"
    again = AdaptiveUNet3d.from_config(m.config)
    again.load_state_dict(m.state_dict())
    field = torch.from_numpy(_chi((16, 16, 16), 3))[None, None] * 0.05
    side = torch.from_numpy(SIDES)
    with torch.no_grad():
        y = m(field, side[1])
        np.testing.assert_allclose(y, again.eval()(field, side[1]), atol=1e-6)
        np.testing.assert_allclose(y, m.refine(m.transform_input(field, side[1]), side[1]))
        # even the plain U-Net needs the side information here: it sets the TKD kernel
        assert not torch.allclose(y, m(field, side[0]), atol=1e-4 * float(y.abs().max()))
    with pytest.raises(ValueError, match="side information"):
        m(field)
    with pytest.raises(ValueError, match="input_transform"):
        AdaptiveUNet3d(input_transform="tikhonov")


def test_tiled_inference_transforms_the_whole_volume_first():
    m = _tkd_model(True)
    side = SideInformation((1.0, 1.0, 1.5), (0.0, 0.6, 0.8))
    field = 0.05 * _chi((64, 30, 20), 4)
    mask = np.ones(field.shape, bool)
    whole = invert_adaptive_unet(field, mask, side, m, device="cpu")
    # the TKD of the whole volume, then the U-Net tile by tile (depth 3 reaches about 20
    # voxels: a 40-voxel overlap leaves only the blend's float rounding)
    tiled = invert_adaptive_unet(
        field, mask, side, m, device="cpu", tile_shape=(48, 32, 32), overlap=40
    )
    assert np.linalg.norm(tiled - whole) / np.linalg.norm(whole) < 1e-4
