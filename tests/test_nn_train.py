"""Pre-training and transfer learning of the adaptive U-Net on tiny problems."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qsmprep.cli.train import main as train_main
from qsmprep.nn.physics import dipole_convolve
from qsmprep.nn.synth import (
    SynthConfig,
    SyntheticQSMDataset,
    random_shapes_chi,
    simulate_local_field,
)
from qsmprep.nn.train import (
    CHECKPOINT,
    HISTORY,
    TrainConfig,
    batch_nrmse,
    build_model,
    compute_loss,
    load_checkpoint,
    make_optimizer,
    pretrain,
)
from qsmprep.nn.transfer import (
    TransferConfig,
    discover_pairs,
    load_pair,
    random_patch,
    transfer_learn,
)
from qsmprep.nn.weights import file_sha256, load_card, load_model, save_model
from qsmprep.qsm.sideinfo import SideInformation

TINY_SYNTH = SynthConfig(patch_size=(16, 16, 16), head_prob=0.0)


def tiny_config(out_dir, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir),
        steps=4,
        batch_size=2,
        base_channels=4,
        depth=3,
        lr=3e-3,
        restart_steps=3,
        val_every=2,
        val_pairs=2,
        checkpoint_every=2,
        log_every=1,
        device="cpu",
        synth=TINY_SYNTH,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions gain nothing from threads, and OpenMP threads stall badly on a
    # loaded 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_torch_dipole_convolution_matches_numpy_per_sample():
    rng = np.random.default_rng(0)
    chi = rng.normal(0, 0.1, (2, 1, 16, 16, 16)).astype(np.float32)
    side = np.array([[1, 1, 1, 0, 0, 1], [0.7, 1.1, 2.0, 0.3, -0.4, 0.866]], np.float32)
    got = dipole_convolve(torch.from_numpy(chi), torch.from_numpy(side)).numpy()
    ones = np.ones((16, 16, 16), bool)
    for i in range(2):
        want = simulate_local_field(chi[i, 0], ones, side[i, :3], side[i, 3:])
        np.testing.assert_allclose(got[i, 0], want, atol=1e-6)
    assert np.abs(got[0, 0] - got[1, 0]).max() > 0.01  # each sample used its own kernel


def test_batch_nrmse_definition():
    t = torch.randn(1, 1, 8, 8, 8)
    mask = torch.ones_like(t, dtype=torch.bool)
    assert float(batch_nrmse(t, t, mask)[0]) == pytest.approx(0, abs=1e-9)
    assert float(batch_nrmse(t + 3.0, t, mask)[0]) == pytest.approx(0, abs=1e-4)  # demeaned
    assert float(batch_nrmse(torch.zeros_like(t), t, mask)[0]) == pytest.approx(100, rel=1e-6)
    assert float(batch_nrmse(0.5 * t, t, mask)[0]) == pytest.approx(50, rel=1e-6)


def test_a_few_steps_lower_the_loss_on_a_tiny_problem():
    cfg = tiny_config("unused", dc_weight=0.1)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt, _ = make_optimizer(model.parameters(), cfg)
    batch = next(iter(SyntheticQSMDataset(TINY_SYNTH, "train", 0, batch_size=2)))
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss, parts = compute_loss(model, batch, cfg.dc_weight)
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
        assert set(parts) == {"chi_l1", "dc_l1", "loss"}
    assert losses[-1] < 0.7 * losses[0]


def test_pretrain_writes_loadable_weights_and_card(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    res = pretrain(cfg, progress=False, command="qsmprep-train pretrain --tiny")
    assert res is not None and res.step == 4 and res.weights.is_file()
    model = load_model(res.weights)
    assert model.config["base_channels"] == 4 and model.config["adaptive"] is True
    card = load_card(res.weights)
    assert card["command"] == "qsmprep-train pretrain --tiny"
    assert card["training"]["steps"] == 4 and card["training"]["optimizer"]["name"] == "AdamW"
    assert card["hardware"]["device"] == "cpu"
    assert 0 < card["metrics"]["validation"]["nrmse"] < 1000
    assert 10 < card["metrics"]["validation_tkd_reference"]["nrmse"] < 150  # TKD on the pairs
    lines = [json.loads(x) for x in (tmp_path / "run" / HISTORY).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert "val" in lines[1] and "val" in lines[3]
    # The restart schedule: lr back at its maximum after restart_steps steps.
    assert lines[2]["lr"] == pytest.approx(cfg.lr)


def test_resume_continues_from_the_saved_step_and_reproduces_the_run(tmp_path):
    straight = pretrain(tiny_config(tmp_path / "a"), progress=False)
    hist_a = [json.loads(x) for x in (tmp_path / "a" / HISTORY).read_text().splitlines()]

    cfg_b = tiny_config(tmp_path / "b", workers=1)  # a data worker gives the same batches
    assert pretrain(cfg_b, progress=False, stop_after=2) is None  # interrupted
    ck = load_checkpoint(tmp_path / "b" / CHECKPOINT)
    assert ck["step"] == 2 and "optimizer" in ck and "scheduler" in ck and "rng" in ck
    with open(tmp_path / "b" / HISTORY, "a") as f:  # as if killed after a later log line
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    resumed = pretrain(replace(cfg_b, workers=0), progress=False)
    hist_b = [json.loads(x) for x in (tmp_path / "b" / HISTORY).read_text().splitlines()]
    assert [r["step"] for r in hist_b] == [1, 2, 3, 4]  # no step repeated or skipped
    for ra, rb in zip(hist_a, hist_b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7)
        assert rb["lr"] == pytest.approx(ra["lr"])
    a, b = load_model(straight.weights), load_model(resumed.weights)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6, msg=k)


def test_resume_refuses_changed_settings(tmp_path):
    pretrain(tiny_config(tmp_path / "c"), progress=False, stop_after=1)
    with pytest.raises(ValueError, match="different settings.*lr"):
        pretrain(tiny_config(tmp_path / "c", lr=1e-2), progress=False)


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_config(tmp_path, depth=6)
    with pytest.raises(ValueError, match="steps"):
        tiny_config(tmp_path, steps=0)
    with pytest.raises(ValueError, match="device"):
        pretrain(tiny_config(tmp_path, device="tpu"), progress=False)


# ------------------------------------------------------------------ transfer learning


def _write_nifti(path, data, affine, meta=None):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    if meta is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))


def _oblique_affine(voxel_size, tilt_deg):
    t = np.radians(tilt_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(voxel_size)
    return aff


@pytest.fixture
def derivatives(tmp_path):
    """Three subjects: local field, COSMOS-like reference, qsmprep's own Chimap, mask."""
    root = tmp_path / "derivatives"
    vs = (1.0, 1.0, 2.0)
    aff = _oblique_affine(vs, 20.0)
    b0 = SideInformation.from_affine(aff).b0_direction
    for i, sub in enumerate(("01", "02", "03")):
        chi, mask = random_shapes_chi((24, 24, 16), vs, np.random.default_rng(i))
        field = simulate_local_field(chi, mask, vs, b0, pad_factor=3.0)  # ~no wrap-around
        anat = root / f"sub-{sub}" / "anat"
        _write_nifti(anat / f"sub-{sub}_localfield.nii.gz", field, aff, {"Units": "ppm"})
        _write_nifti(anat / f"sub-{sub}_desc-COSMOS_Chimap.nii.gz", chi, aff, {"Units": "ppm"})
        _write_nifti(anat / f"sub-{sub}_Chimap.nii.gz", 0 * chi, aff, {"Units": "ppm"})
        _write_nifti(anat / f"sub-{sub}_desc-brain_mask.nii.gz", mask.astype(np.uint8), aff)
    return root


def test_discover_pairs_follows_the_naming_convention(derivatives):
    pairs = discover_pairs(derivatives)
    assert [p.key for p in pairs] == ["sub-01", "sub-02", "sub-03"]
    assert [p.subject for p in pairs] == ["01", "02", "03"]
    assert all(p.chi.name.endswith("_desc-COSMOS_Chimap.nii.gz") for p in pairs)  # not our own
    assert all(p.mask is not None for p in pairs)
    anat = derivatives / "sub-01" / "anat"
    (anat / "sub-01_desc-iLSQR_Chimap.nii.gz").write_bytes(
        (anat / "sub-01_desc-COSMOS_Chimap.nii.gz").read_bytes()
    )
    with pytest.raises(ValueError, match="several reference Chimap.*--reference-desc"):
        discover_pairs(derivatives)
    assert len(discover_pairs(derivatives, reference_desc="COSMOS")) == 3
    with pytest.raises(ValueError, match="no \\(local field, reference chi\\) pairs"):
        discover_pairs(derivatives, reference_desc="STI")


def test_load_pair_side_information_and_units(derivatives):
    files = discover_pairs(derivatives)[0]
    pair = load_pair(files)
    assert pair.field.dtype == np.float32 and pair.mask.dtype == bool
    assert pair.side_info.voxel_size == pytest.approx((1.0, 1.0, 2.0))
    assert np.degrees(np.arccos(pair.side_info.b0_direction[2])) == pytest.approx(20.0)
    # A SideInformation entry in the sidecar wins over the affine.
    meta = {"Units": "ppm", "SideInformation": {"VoxelSize": [1, 1, 2], "B0Direction": [0, 0, 1]}}
    files.field.with_name("sub-01_localfield.json").write_text(json.dumps(meta))
    assert load_pair(files).side_info.b0_direction == (0.0, 0.0, 1.0)
    files.field.with_name("sub-01_localfield.json").write_text(json.dumps({"Units": "Hz"}))
    with pytest.raises(ValueError, match="sub-01_localfield.nii.gz: Units is 'Hz'"):
        load_pair(files)


def test_flipped_patches_stay_physically_consistent(derivatives):
    pair = load_pair(discover_pairs(derivatives)[1])
    rng = np.random.default_rng(5)
    flipped = 0
    for _ in range(4):
        p = random_patch(pair, (48, 48, 32), rng)  # twice the volume: all sources inside
        b = p["side"][3:]
        flipped += not np.allclose(b, pair.side_info.b0_direction)
        want = simulate_local_field(p["chi"], p["mask"], p["side"][:3], b, pad_factor=3.0)
        err = np.abs(p["field"] - want).max() / np.abs(want).max()
        assert err < 0.01, err  # an unflipped B0 component would give errors of ~50 %
    assert flipped >= 1


@pytest.mark.parametrize("input_transform", ["none", "tkd"])
def test_transfer_learning_freezes_the_adaptive_layer(derivatives, tmp_path, input_transform):
    base = build_model(tiny_config("unused", input_transform=input_transform))
    base_path = tmp_path / "base.pt"
    save_model(base, base_path, {"description": "tiny test base"})
    before = {k: v.clone() for k, v in load_model(base_path).state_dict().items()}
    cfg = TransferConfig(
        out=str(tmp_path / "tl.pt"),
        steps=3,
        batch_size=2,
        patch_size=(16, 16, 16),
        val_subjects=("03",),
        val_patches=2,
        device="cpu",
    )
    res = transfer_learn(base_path, discover_pairs(derivatives), cfg, progress=False)
    after = load_model(res.weights)
    names = dict(after.named_parameters())

    def max_change(prefix):
        return max(
            float((names[k].detach() - before[k]).abs().max())
            for k in names
            if k.startswith(prefix)
        )

    assert max_change("adaptive.") == 0  # frozen
    assert max_change("up.") > 5e-4 and max_change("dec.") > 5e-4  # lr 1e-3
    assert 0 < max_change("down.") < 1e-4 and max_change("head.") < 1e-4  # lr 1e-5
    card = load_card(res.weights)
    assert card["base_model"]["sha256"] == file_sha256(base_path)
    assert card["data"]["train_pairs"] == ["sub-01", "sub-02"]
    assert card["data"]["validation_pairs"] == ["sub-03"]
    assert {"validation_before", "validation"} <= set(card["metrics"])
    with pytest.raises(ValueError, match="validation subjects not found"):
        transfer_learn(base_path, discover_pairs(derivatives), replace(cfg, val_subjects=("9",)))


# ------------------------------------------------------------------------ command line

TINY_CLI = ["--base-channels", "4", "--depth", "3", "--patch-size", "16", "--head-prob", "0",
            "--batch-size", "2", "--val-pairs", "2", "--val-every", "2", "--device", "cpu",
            "--threads", "1", "--no-progress"]  # fmt: skip


def test_cli_pretrain_stops_cleanly_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["pretrain", "--out", out, "--steps", "3", *TINY_CLI]
    assert train_main([*args, "--time-limit", "0"]) == 0
    assert "stopped with a checkpoint" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 0
    assert train_main(args) == 0
    assert "after 3 steps" in capsys.readouterr().out
    card = load_card(tmp_path / "run" / "model.pt")
    assert card["command"].startswith("qsmprep-train pretrain --out")
    assert "--steps 3" in card["command"]


def test_cli_plain_unet_and_fp16_weights(tmp_path):
    out = tmp_path / "plain"
    args = ["pretrain", "--out", str(out), "--steps", "1", "--no-adaptive", "--fp16", *TINY_CLI]
    assert train_main(args) == 0
    card = load_card(out / "model.pt")
    assert card["architecture"]["config"]["adaptive"] is False
    assert card["storage_dtype"] == "float16"


def test_cli_transfer_and_errors(derivatives, tmp_path, capsys):
    base = tmp_path / "base.pt"
    save_model(build_model(tiny_config("unused")), base, {"description": "tiny"})
    out = tmp_path / "tl.pt"
    args = ["transfer", str(derivatives), "--base-model", str(base), "--out", str(out),
            "--steps", "1", "--patch-size", "16", "--val-subject", "sub-03", "--device", "cpu",
            "--no-progress", "--reference-desc", "COSMOS"]  # fmt: skip
    assert train_main(args) == 0 and out.is_file()
    assert "3 pairs" in capsys.readouterr().out
    assert train_main([*args[:3], str(tmp_path / "missing.pt"), *args[4:]]) == 1
    assert "missing.pt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_main(["pretrain", "--out", str(out), "--patch-size", "16", "16"])
    assert e.value.code == 64


# ------------------------------------------------------- training in parts, GPU script


def test_checkpoint_outside_the_run_folder_and_finish_by(tmp_path):
    ck = tmp_path / "scratch" / "ck.pt"
    cfg = tiny_config(tmp_path / "run", steps=5)
    assert pretrain(cfg, progress=False, checkpoint=ck, stop_after=2) is None
    assert load_checkpoint(ck)["step"] == 2 and not (tmp_path / "run" / CHECKPOINT).exists()
    # the next part finds its time budget spent at once: it writes the weights of step 2
    res = pretrain(cfg, progress=False, checkpoint=ck, finish_by_s=1e-9)
    card = load_card(res.weights)
    assert res.step == 2 and card["training"]["steps"] == 2
    assert card["training"]["planned_steps"] == 5 and card["training"]["ended_by"] == "time budget"
    assert "nrmse" in card["metrics"]["validation"]
    # and a later part continues the same run to its planned end
    res = pretrain(cfg, progress=False, checkpoint=ck)
    assert res.step == 5 and "planned_steps" not in load_card(res.weights)["training"]
    hist = [json.loads(x) for x in (tmp_path / "run" / HISTORY).read_text().splitlines()]
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5]


def test_training_refuses_to_write_into_the_package(tmp_path):
    import qsmprep

    inside = Path(qsmprep.__file__).parent / "nn" / "weights" / "ck.pt"
    with pytest.raises(ValueError, match="inside the qsmprep package"):
        pretrain(tiny_config(tmp_path / "run"), progress=False, checkpoint=inside)
    assert not inside.exists()


def test_cli_curves_and_ablation(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["pretrain", "--out", str(out), "--steps", "2", *TINY_CLI]) == 0
    assert train_main(["curves", str(out), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    args = ["ablate", str(out / "model.pt"), "--out", str(tmp_path / "a.json"), "--pairs", "3",
            "--device", "cpu"]  # fmt: skip
    assert train_main(args) == 0
    res = json.loads((tmp_path / "a.json").read_text())[str(out / "model.pt")]
    assert res["pairs"] == 3 and {"right", "wrong_adaptive"} <= set(res)
    assert "wrong side" in capsys.readouterr().out
    assert train_main(["curves", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1


@pytest.mark.slow
def test_gpu_training_script_dry_run(tmp_path):
    """workflows/train_gpu.sh end to end on the CPU (its --dry-run path; about a minute on
    the loaded 2-core machine: six processes that each import torch)."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "workflows" / "train_gpu.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(script), str(tmp_path / "out"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "out"
    for run_name in ("adaptive", "plain"):
        card = load_card(out / run_name / "model.pt")
        assert card["architecture"]["config"]["input_transform"] == "none"
        assert card["architecture"]["config"]["adaptive"] is (run_name == "adaptive")
    assert (out / "curves.png").is_file() and (out / "train.log").is_file()
    ablation = json.loads((out / "ablation.json").read_text())
    assert len(ablation) == 2
