"""Per-subject refinement (qsmprep.nn.refine): losses, early stopping, finetune and DIP."""

import numpy as np
import pytest
import torch

from qsmprep.nn import refine as R
from qsmprep.nn.unet import AdaptiveUNet3d
from qsmprep.qsm.dipole import forward_field
from qsmprep.qsm.inversion import PAD_FACTOR

VS = (2.0, 2.0, 2.0)
B0 = np.array([0.3, -0.25, 0.92]) / np.linalg.norm([0.3, -0.25, 0.92])
SIDE = np.r_[VS, B0].astype(np.float32)


def phantom(shape=(28, 30, 26), seed=0):
    """A noiseless phantom: chi (ppm) of a few ellipsoids in a sphere, its local field (ppm)
    by the numerical core's forward model, and the mask."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij"))
    mask = (g**2).sum(0) < (0.42 * min(shape)) ** 2
    chi = np.zeros(shape, np.float32)
    for _ in range(5):
        c, r = rng.uniform(-5, 5, 3), rng.uniform(2, 5, 3)
        chi += rng.uniform(-0.1, 0.1) * ((((g - c[:, None, None, None]) / r[:, None, None, None])
                                           ** 2).sum(0) < 1)  # fmt: skip
    chi = np.where(mask, chi, 0).astype(np.float32)
    return chi, forward_field(chi, VS, B0).astype(np.float32), mask


def tiny_model(seed=0, **kw) -> AdaptiveUNet3d:
    torch.manual_seed(seed)
    return AdaptiveUNet3d(**{"base_channels": 4, "depth": 3, "input_transform": "tkd", **kw})


# --------------------------------------------------------------------------- losses


def test_data_consistency_is_zero_for_the_true_chi_of_a_noiseless_phantom():
    chi, _, mask = phantom()
    crop = R._Crop.of(mask, 4)
    # the field of the true chi by the numerical core's forward model on the loss's own
    # padded grid (the refinement crops to the mask's box and pads by PAD_FACTOR)
    box_chi = crop.take(chi, torch.device("cpu"))[0, 0].numpy()
    field = forward_field(box_chi, VS, B0, pad_factor=PAD_FACTOR)
    full = np.zeros(mask.shape, np.float32)
    sizes = [s.stop - s.start for s in crop.box]
    full[crop.box] = field[: sizes[0], : sizes[1], : sizes[2]]
    w = R.data_weight(mask)
    prob = R._problem(crop, np.where(mask, full, 0), mask, w, SIDE, torch.device("cpu"))
    truth = crop.take(chi, torch.device("cpu"))
    fwd = prob.forward_field(truth)
    r = R.rad_per_ppm(0.02, 3.0)
    assert float(R.phase_consistency(fwd, prob.field, prob.weight, r)) < 1e-9
    assert float(R.l1_consistency(fwd, prob.field, prob.weight)) < 1e-6
    wrong = prob.forward_field(truth * 0.8)
    assert float(R.phase_consistency(wrong, prob.field, prob.weight, r)) > 1e-4
    assert float(R.l1_consistency(wrong, prob.field, prob.weight)) > 1e-4
    # the phase loss is blind to whole turns of phase, as the measured phase is
    turn = prob.field + 2 * np.pi / r * (prob.mask > 0)
    assert float(R.phase_consistency(fwd, turn, prob.weight, r)) < 1e-9


def test_total_variation_of_a_ramp_and_the_data_weight():
    x = torch.arange(10.0)[:, None, None].expand(10, 6, 4)[None, None] * 0.01
    mask = torch.ones_like(x)
    # a ramp of 0.01 ppm per voxel along x, 2 mm voxels: 0.005 ppm/mm, nothing along y, z
    assert float(R.total_variation(x, mask, (2.0, 1.0, 1.0))) == pytest.approx(0.005)
    m = np.zeros((4, 4, 4), bool)
    m[1:3, 1:3, 1:3] = True
    np.testing.assert_array_equal(R.data_weight(m), m.astype(np.float32))
    mag = np.full((4, 4, 4, 2), 3.0, np.float32)
    assert R.data_weight(m, magnitude=mag)[m].min() == pytest.approx(1.0)
    w = R.data_weight(m, weight=np.full((4, 4, 4), 0.5, np.float32))
    assert w[m].max() == 0.5 and w[~m].max() == 0
    with pytest.raises(ValueError, match="zero everywhere"):
        R.data_weight(m, weight=np.zeros((4, 4, 4)))


def test_early_stopping_rule():
    s = R._Stopper(tol=0.1, patience=3)
    for step, loss in enumerate([1.0, 0.8, 0.79, 0.78, 0.77]):
        s.update(step, loss)
    # 0.8 was the last drop of more than 10 %; three steps later the run stops
    assert s.ref_step == 1 and s.best_step == 4 and s.done(4) and not s.done(3)


# ---------------------------------------------------------------------------- methods


def test_finetune_lowers_the_loss_and_keeps_the_adaptive_layer_frozen():
    chi, field, mask = phantom()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    res = R.finetune(
        field, mask, SIDE, model=model, steps=6, lr=1e-3, tv_weight=0.0, levels=1,
        device="cpu", progress=lambda step, total, loss: seen.append((step, total)),
    )  # fmt: skip
    rec = res.record
    assert rec["Method"] == "finetune" and rec["Steps"] == 6 and seen[-1] == (6, 6)
    assert rec["FinalLoss"]["loss"] < rec["InitialLoss"]["loss"]
    assert res.chi.shape == mask.shape and np.all(res.chi[~mask] == 0)
    # the caller's model is untouched; in the tuned copy the adaptive layer and the encoder
    # are frozen and unchanged, the output convolution learned
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tuned = res.model
    assert not any(p.requires_grad for p in tuned.adaptive.parameters())
    adaptive = {k: v for k, v in tuned.state_dict().items() if k.startswith("adaptive.")}
    assert adaptive and all(torch.equal(v, before[k]) for k, v in adaptive.items())
    assert not any(p.requires_grad for p in tuned.down.parameters())
    assert not torch.equal(tuned.head.weight, model.head.weight)


def test_deep_image_prior_lowers_the_loss_and_is_deterministic_for_a_seed():
    chi, field, mask = phantom()
    kw = {"steps": 5, "base_channels": 4, "depth": 3, "device": "cpu"}
    a = R.deep_image_prior(field, mask, SIDE, **kw)
    assert a.record["FinalLoss"]["loss"] < a.record["InitialLoss"]["loss"]
    assert a.record["Settings"]["Input"] == "tkd"
    b = R.deep_image_prior(field, mask, SIDE, **kw)
    np.testing.assert_array_equal(a.chi, b.chi)
    c = R.deep_image_prior(field, mask, SIDE, **{**kw, "net_input": "noise", "seed": 1})
    d = R.deep_image_prior(field, mask, SIDE, **{**kw, "net_input": "noise", "seed": 2})
    assert not np.array_equal(c.chi, d.chi)


def test_stops_on_the_tolerance():
    _, field, mask = phantom()
    res = R.deep_image_prior(
        field, mask, SIDE, steps=50, tol=0.5, patience=2, base_channels=4, depth=3,
        device="cpu",
    )  # fmt: skip
    assert res.record["StoppedBy"] == "tolerance" and res.record["Steps"] < 50


def test_bad_arguments():
    _, field, mask = phantom()
    with pytest.raises(ValueError, match="net_input"):
        R.deep_image_prior(field, mask, SIDE, net_input="zeros")
    with pytest.raises(ValueError, match="levels"):
        R.finetune(field, mask, SIDE, model=tiny_model(), levels=5)
    with pytest.raises(ValueError, match="steps"):
        R.finetune(field, mask, SIDE, model=tiny_model(), steps=0)
    with pytest.raises(ValueError, match="empty"):
        R.refine("dip", field, np.zeros_like(mask), SIDE)
    with pytest.raises(ValueError, match="finetune or dip"):
        R.refine("none", field, mask, SIDE)


def test_refine_choices_match_the_workflow():
    from qsmprep.workflows.qsm import REFINE_METHODS

    assert REFINE_METHODS == R.REFINE_METHODS


def test_the_workflow_describes_and_cites_its_refinement():
    from qsmprep.reports.boilerplate import cited_keys
    from qsmprep.workflows.qsm import init_qsm_wf

    for refine, key in (("finetune", "liu2019qsminvnet"), ("dip", "ulyanov2018")):
        text = init_qsm_wf(inversion="adaptive-unet", refine=refine).visit_desc()
        assert key in cited_keys(text) and "reliability" in text.split("U-Net")[-1]
    assert "ulyanov2018" not in cited_keys(init_qsm_wf(inversion="adaptive-unet").visit_desc())
