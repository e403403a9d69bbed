"""Model files: save/load round trip, fp16 storage, sha256 check, clear errors."""

import json

import numpy as np
import pytest
import torch

from qsmprep.nn import weights
from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.nn.weights import ModelLoadError, load_card, load_model, save_model

CARD = {"training": {"recipe": "test"}, "data": "none", "metrics": {}}


@pytest.fixture
def model() -> AdaptiveUNet3d:
    torch.manual_seed(0)
    m = AdaptiveUNet3d(base_channels=4, depth=3, field_scale=0.03, chi_scale=0.2)
    for mod in m.modules():  # trained-looking batch-norm statistics
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def outputs(m: AdaptiveUNet3d) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 1, 8, 8, 12) * 0.03
    side = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0], [0.8, 0.8, 2.0, 0.3, 0.0, 0.954]])
    with torch.no_grad():
        return m.eval()(x, side)


def test_round_trip_fp32(tmp_path, model):
    path = tmp_path / "m.pt"
    sha = save_model(model, path, CARD)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["sha256"] == sha == weights.file_sha256(path)
    assert card["architecture"]["config"] == model.config
    assert card["training"] == CARD["training"] and card["storage_dtype"] == "float32"
    loaded = load_model(path)
    assert not loaded.training and loaded.config == model.config
    assert torch.equal(outputs(loaded), outputs(model))
    assert load_card(path) == card


def test_round_trip_fp16_loads_as_fp32(tmp_path, model):
    path = tmp_path / "m16.pt"
    save_model(model, path, CARD, dtype=torch.float16)
    full = tmp_path / "m32.pt"
    save_model(model, full, CARD)
    assert path.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.config == model.config  # the scales stay exact
    ref = outputs(model)
    err = (outputs(loaded) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 5e-3  # half precision rounding (2**-11 relative per weight)


def test_tampered_file_is_rejected(tmp_path, model):
    path = tmp_path / "m.pt"
    save_model(model, path, CARD)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match=r"m\.pt has sha256 .* corrupt or was changed"):
        load_model(path)


def test_expected_sha256_overrides_the_card(tmp_path, model):
    path = tmp_path / "m.pt"
    sha = save_model(model, path, CARD)
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelLoadError, match="no model card"):
        load_model(path)
    assert load_model(path, expected_sha256=sha.upper()).config == model.config
    with pytest.raises(ModelLoadError, match="the expected sha256"):
        load_model(path, expected_sha256="0" * 64)


def test_corrupt_file_with_matching_sha_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file")
    sha = weights.file_sha256(path)
    with pytest.raises(ModelLoadError, match=r"cannot read .*junk\.pt as a torch file"):
        load_model(path, expected_sha256=sha)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelLoadError, match="not a qsmprep model"):
        load_model(other, expected_sha256=weights.file_sha256(other))


def test_mismatched_state_dict(tmp_path, model):
    path = tmp_path / "m.pt"
    bad = {"config": {**model.config, "base_channels": 8}, "state_dict": model.state_dict()}
    torch.save(bad, path)
    with pytest.raises(ModelLoadError, match="does not fit AdaptiveUNet3d"):
        load_model(path, expected_sha256=weights.file_sha256(path))


def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"model file .*nope\.pt does not exist"):
        load_model(tmp_path / "nope.pt")
    monkeypatch.setattr(weights, "BUNDLED_MODEL", tmp_path / "adaptive_unet.pt")
    with pytest.raises(ModelLoadError, match="no bundled adaptive U-Net model.*--model PATH"):
        load_model(None)


def test_save_model_rejects_bad_arguments(tmp_path, model):
    with pytest.raises(ValueError, match="card must be a dict"):
        save_model(model, tmp_path / "m.pt", card=None)
    with pytest.raises(ValueError, match="float32 or torch.float16"):
        save_model(model, tmp_path / "m.pt", CARD, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="json suffix"):
        save_model(model, tmp_path / "m.json", CARD)


def test_bundled_model_loads_and_is_documented():
    card = load_card(None)
    for key in ("command", "training", "data", "metrics", "hardware", "sha256", "architecture"):
        assert key in card, f"bundled model card lacks {key!r}"
    assert card["weights_file"] == weights.BUNDLED_MODEL.name
    assert card["metrics"]["test"]["1mm"]["mean_by_case"].keys() == {
        "axial", "oblique", "anisotropic"
    }  # fmt: skip
    assert weights.BUNDLED_MODEL.stat().st_size < 35e6
    assert load_model(None).config == card["architecture"]["config"]


def test_bundled_model_beats_tkd_on_held_out_pairs():
    """The shipped weights invert unseen synthetic pairs (test split) better than TKD."""
    from qsmprep.nn.inference import invert_adaptive_unet
    from qsmprep.nn.synth import SynthConfig, make_pair, pair_rng
    from qsmprep.qsm.inversion import tkd
    from qsmprep.qsm.metrics import nrmse

    cfg = SynthConfig(patch_size=(48, 48, 48), head_prob=0.0)
    model = load_model(None)
    ours, classical = [], []
    for i in range(4):
        p = make_pair(cfg, pair_rng("test", 0, i), "test")
        chi = invert_adaptive_unet(p.field, p.mask, p.side, model, device="cpu", nthreads=1)
        ours.append(nrmse(chi, p.chi, p.mask))
        classical.append(nrmse(tkd(p.field, p.mask, p.voxel_size, p.b0_dir), p.chi, p.mask))
    assert np.mean(ours) < 0.95 * np.mean(classical), (ours, classical)


def test_export_with_side_as_input(tmp_path, model):
    from qsmprep.nn.export import export_model, load_exported

    path = export_model(model, tmp_path / "m.pt2")
    exported, meta = load_exported(path)
    assert meta["config"] == model.config and meta["side"] is None
    # Another batch size and spatial size than the export example, mixed side vectors.
    torch.manual_seed(2)
    x = torch.randn(3, 1, 12, 8, 16) * 0.03
    side = torch.tensor([[1.0, 1, 1, 0, 0, 1], [0.7, 0.7, 2, 0.6, 0, 0.8], [1.0, 1, 1, 0, 0, 1]])
    with torch.no_grad():
        ref = model.eval()(x, side)
        out = exported(x, side)
        one = exported(x[1:2], side[1:2])  # a batch of one takes another code path in eager
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * ref.abs().max())
    assert torch.allclose(one, ref[1:2], rtol=0, atol=1e-5 * ref.abs().max())


def test_export_with_side_baked_in(tmp_path, model):
    from qsmprep.nn.export import export_model, load_exported

    side = [1.0, 1.0, 2.0, 0.2, -0.7, 0.6]
    exported, meta = load_exported(export_model(model, tmp_path / "m.pt2", side=side))
    assert meta["side"] == side
    x = torch.randn(1, 1, 8, 8, 8) * 0.03
    with torch.no_grad():
        ref = model.eval()(x, torch.tensor(side))
        assert torch.allclose(exported(x), ref, rtol=0, atol=1e-5 * ref.abs().max())
    with pytest.raises(ValueError, match="6 finite numbers"):
        export_model(model, tmp_path / "bad.pt2", side=[1.0, 1.0])


def test_export_of_a_tkd_input_model_takes_the_tkd(tmp_path):
    from qsmprep.nn.export import export_model, load_exported
    from qsmprep.nn.physics import tkd

    torch.manual_seed(3)
    m = AdaptiveUNet3d(base_channels=4, depth=3, input_transform="tkd").eval()
    exported, meta = load_exported(export_model(m, tmp_path / "tkd.pt2"))
    assert meta["config"]["input_transform"] == "tkd"
    x = torch.randn(2, 1, 8, 12, 8) * 0.03
    side = torch.tensor([[1.0, 1, 1, 0, 0, 1], [0.7, 0.7, 2, 0.6, 0, 0.8]])
    with torch.no_grad():
        ref = m(x, side)
        out = exported(tkd(x, side, meta["config"]["tkd_threshold"]), side)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * ref.abs().max())
