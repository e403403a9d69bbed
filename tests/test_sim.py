"""Tests of the phantom generator qsmprep.sim against analytic and synthetic cases."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmprep.qsm.dipole import forward_field
from qsmprep.qsm.phase import ppm_to_hz, scale_phase, wrap
from qsmprep.qsm.sideinfo import b0_direction, voxel_size
from qsmprep.sim import (
    DEEP_GREY,
    TISSUES,
    HeadPhantom,
    SubjectSpec,
    load_dataset_info,
    make_head_phantom,
    simulate_fields,
    simulate_megre,
    tilt_rotation,
    write_bids_dataset,
)
from qsmprep.sim.__main__ import main as sim_main
from qsmprep.sim.bids import siemens_phase
from qsmprep.sim.geometry import Grid, ellipsoid, smooth_curve, tube
from qsmprep.sim.resample import box_average, box_mode
from qsmprep.sim.tissues import BY_NAME, CHI_AIR, CORTICAL_VEIN_CHI

TE = (0.004, 0.008, 0.012, 0.016)


@pytest.fixture(scope="module")
def native():
    return make_head_phantom((1.0, 1.0, 1.0), seed=0)


@pytest.fixture(scope="module")
def ph4():
    return make_head_phantom((4.0, 4.0, 4.0), seed=0)


def test_phantom_labels_and_values(native):
    ph = native
    assert ph.shape == (180, 220, 180)
    assert ph.chi.dtype == np.float32 and ph.labels.dtype == np.uint8
    assert ph.brain_mask.dtype == bool
    assert set(np.unique(ph.labels)) == {t.label for t in TISSUES}
    # structures painted whole keep their table value in their core
    for name in (*DEEP_GREY, "calcification"):
        core = ndimage.binary_erosion(ph.roi(name))
        assert core.sum() > 5, name
        assert np.allclose(ph.chi[core], BY_NAME[name].chi, atol=1e-5), name
        assert np.allclose(ph.r2star[core], BY_NAME[name].r2star, atol=1e-3), name
    # deep grey nuclei and the calcification lie in the brain
    for name in (*DEEP_GREY, "calcification"):
        assert ph.brain_mask[ph.roi(name)].mean() > 0.99, name
    assert np.median(ph.chi[ph.roi("bone")]) == BY_NAME["bone"].chi
    air = ph.chi[ndimage.binary_erosion(ph.roi("air"))]
    assert np.mean(air == np.float32(CHI_AIR)) > 0.999
    assert np.allclose(ph.chi[ndimage.binary_erosion(ph.roi("sinus_air"))], CHI_AIR)
    # brain tissue from the GM/WM/CSF mixture
    assert abs(np.median(ph.chi[ph.roi("wm")]) - BY_NAME["wm"].chi) < 0.01
    assert 0.0 < np.median(ph.chi[ph.roi("gm")]) <= BY_NAME["gm"].chi + 1e-6
    veins = ph.chi[ndimage.binary_erosion(ph.roi("vein"))]
    assert veins.size > 500
    assert CORTICAL_VEIN_CHI[0] - 1e-4 <= np.median(veins) <= CORTICAL_VEIN_CHI[1] + 1e-4
    # the head is wrapped in skull and scalp: air never touches the brain
    near_brain = ndimage.binary_dilation(ph.brain_mask, iterations=3)
    assert not ph.roi("air")[near_brain].any()
    assert np.all((ph.pd >= 0) & (ph.pd <= 1)) and np.all(ph.r2star >= 0)


def test_phantom_deterministic_and_seeds_differ(native):
    again = make_head_phantom(seed=0)
    assert np.array_equal(again.chi, native.chi)
    again.chi[0, 0, 0] = 0  # a fresh copy: the cache is not touched
    assert make_head_phantom(seed=0).chi[0, 0, 0] == CHI_AIR
    other = make_head_phantom(seed=1)
    differ = native.chi != other.chi
    assert differ.sum() > 200  # cortical veins and the calcification move
    moved = [BY_NAME["vein"].label, BY_NAME["calcification"].label]
    either = np.isin(native.labels, moved) | np.isin(other.labels, moved)
    near = ndimage.binary_dilation(either, np.ones((3, 3, 3), bool), iterations=2)
    assert np.all(near[differ])  # nothing else changes
    for name in DEEP_GREY:
        assert np.array_equal(native.roi(name), other.roi(name))


def test_box_average_and_mode():
    x = np.arange(12, dtype=np.float32)[:, None, None] * np.ones((1, 4, 3), np.float32)
    y = box_average(x, (1, 1, 1), (3, 2, 1))
    assert y.shape == (4, 2, 3)
    assert np.allclose(y[:, 0, 0], [1, 4, 7, 10])  # means of 0-2, 3-5, ...
    z = box_average(x, (1, 1, 1), (1.5, 1, 1))  # non-integer ratio: overlap weights
    assert z.shape == (8, 4, 3)
    assert np.allclose(z[:2, 0, 0], [(0 + 0.5 * 1) / 1.5, (0.5 * 1 + 2) / 1.5])
    assert np.isclose(z.sum() * 1.5, x.sum())
    c = np.exp(1j * np.linspace(0, np.pi, 8))[:, None, None] * np.ones((1, 2, 2))
    assert np.allclose(
        box_average(c, (1, 1, 1), (2, 1, 1))[:, 0, 0], (c[::2, 0, 0] + c[1::2, 0, 0]) / 2
    )
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[:2, :2, :2] = 3
    lab[0, 0, 0] = 5
    mode = box_mode(lab, (1, 1, 1), (2, 2, 2))
    assert mode[0, 0, 0] == 3 and mode[1, 1, 1] == 0
    with pytest.raises(ValueError, match="finer"):
        box_average(x, (2, 2, 2), (1, 1, 1))


def test_soft_shapes_have_their_analytic_volume():
    grid = Grid(shape=(60, 60, 60), origin=(-30.0, -30.0, -30.0), voxel_size=(1.0, 1.0, 1.0))
    box, w = ellipsoid(grid, (0.3, -0.2, 0.1), (10.0, 6.0, 4.0), yaw_deg=30.0)
    assert w.sum() == pytest.approx(4 / 3 * np.pi * 10 * 6 * 4, rel=0.02)
    box, w = ellipsoid(grid, (0, 0, 0), (5.0, 5.0, 5.0), grow_mm=2.0)
    assert w.sum() == pytest.approx(4 / 3 * np.pi * 7**3, rel=0.02)
    line = smooth_curve(np.array([[-15.0, 0.3, 0.2], [15.0, 0.3, 0.2]]))
    box, w = tube(grid, line, 2.0)
    # a cylinder of length 30 plus two hemispherical caps
    assert w.sum() == pytest.approx(np.pi * 2**2 * 30 + 4 / 3 * np.pi * 2**3, rel=0.03)
    assert w.max() == 1.0 and w.min() == 0.0


def test_fields_are_forward_fields_of_chi(ph4):
    tilt = (20.0, -10.0)
    sim = simulate_megre(ph4, echo_times=TE, b0_tilt_deg=tilt, snr=None, shim_order=None)
    b = np.asarray(sim.b0_dir)
    local = forward_field(np.where(ph4.brain_mask, ph4.chi, 0), ph4.voxel_size, b)
    assert np.allclose(sim.local_field_ppm, local, atol=1e-7)
    # total: the whole head in air, the neck continued below the field of view
    n = round(ph4.extend_inferior_mm / ph4.voxel_size[2])
    rel = ph4.chi - np.float32(CHI_AIR)
    rel = np.concatenate([np.repeat(rel[:, :, :1], n, axis=2), rel], axis=2)
    total = forward_field(rel, ph4.voxel_size, b)[:, :, n:]
    assert np.allclose(sim.total_field_ppm, total, atol=2e-5)
    assert np.allclose(
        sim.total_field_hz, ppm_to_hz(sim.total_field_ppm, 3.0), rtol=1e-5, atol=1e-3
    )
    assert np.array_equal(sim.chi, ph4.chi)


def test_shim_removes_only_a_harmonic_field(ph4):
    kw = dict(echo_times=(0.01,), snr=None, phase_offset=False)
    raw = simulate_megre(ph4, shim_order=None, **kw)
    shimmed = simulate_megre(ph4, shim_order=2, **kw)
    assert np.array_equal(raw.local_field_ppm, shimmed.local_field_ppm)
    diff = raw.background_field_ppm - shimmed.background_field_ppm
    # a 2nd-order solid harmonic: its discrete Laplacian vanishes, and it is not zero
    assert np.abs(diff).max() > 0.1
    assert np.abs(ndimage.laplace(diff.astype(np.float64))[2:-2, 2:-2, 2:-2]).max() < 1e-4
    m = shimmed.mask
    assert abs(shimmed.total_field_hz[m].mean()) < 1.0  # frequency adjusted on the brain
    assert shimmed.background_field_ppm[m].std() < raw.background_field_ppm[m].std()


def test_sphere_field_matches_analytic():
    n, a = 64, 8.0
    idx = np.indices((n, n, n)) - n // 2
    r = np.sqrt((idx**2).sum(0))
    chi = np.where(r <= a, 1.0, 0.0).astype(np.float32)
    ph = HeadPhantom(
        chi=chi,
        labels=np.zeros_like(chi, np.uint8),
        brain_mask=r <= a,
        pd=np.ones_like(chi),
        r2star=np.zeros_like(chi),
        voxel_size=(1, 1, 1),
        affine=np.eye(4),
        chi_outside=0.0,
    )
    total, local = simulate_fields(ph, (0, 0, 1), shim_order=None, pad_factor=2.0)
    assert np.allclose(total, local, atol=1e-6)  # nothing outside the sphere
    c = n // 2
    for d in (20, 24):  # outside: dipole field chi/3 (a/r)^3 (3 cos^2 - 1)
        assert total[c, c, c + d] == pytest.approx(2 / 3 * (a / d) ** 3, rel=0.06)
        assert total[c + d, c, c] == pytest.approx(-1 / 3 * (a / d) ** 3, rel=0.06)
    assert abs(total[c, c, c]) < 0.02  # inside a uniform sphere: zero (Lorentz-corrected)


def test_oblique_affine_gives_requested_b0(ph4):
    tx, ty = 25.0, -15.0
    sim = simulate_megre(ph4, echo_times=(0.01,), b0_tilt_deg=(tx, ty), snr=None)
    axial = simulate_megre(ph4, echo_times=(0.01,), snr=None)
    rx, ry = np.deg2rad(tx), np.deg2rad(ty)
    expected = [-np.sin(ry) * np.cos(rx), np.sin(rx), np.cos(ry) * np.cos(rx)]
    assert np.allclose(b0_direction(sim.affine), expected, atol=1e-9)
    assert np.allclose(sim.b0_dir, expected, atol=1e-9)
    assert np.allclose(voxel_size(sim.affine), (4, 4, 4))
    assert np.allclose(tilt_rotation((tx, ty)).T @ [0, 0, 1], expected)
    assert np.allclose(axial.b0_dir, (0, 0, 1))
    # same grid centre, same truth chi; the field changes with the orientation
    centre = (np.array(sim.mag.shape[:3]) - 1) / 2
    assert np.allclose(
        sim.affine[:3, :3] @ centre + sim.affine[:3, 3],
        axial.affine[:3, :3] @ centre + axial.affine[:3, 3],
    )
    assert np.array_equal(sim.chi, axial.chi)
    assert np.abs(sim.local_field_ppm - axial.local_field_ppm)[sim.mask].max() > 0.01


def test_magnitude_decays_with_r2star(ph4):
    sim = simulate_megre(ph4, echo_times=TE, field_strength=7.0, snr=None)
    assert np.allclose(sim.r2star, ph4.r2star * 7.0 / 3.0, rtol=1e-6)
    signal = ph4.pd > 0.3
    rate = np.log(sim.mag[..., 0][signal] / sim.mag[..., 3][signal]) / (TE[3] - TE[0])
    assert np.allclose(rate, sim.r2star[signal], rtol=1e-3, atol=0.05)
    assert not sim.mag[ph4.pd == 0].any()


def test_phase_wraps_near_air(ph4):
    sim = simulate_megre(ph4, echo_times=TE, snr=None, phase_offset=False)
    true_phase = 2 * np.pi * sim.total_field_hz[..., None] * np.asarray(TE)
    head = sim.mag[..., 0] > 0
    # stored phase is the true phase wrapped into [-pi, pi)
    assert sim.phase.min() >= -np.pi and sim.phase.max() < np.pi
    err = wrap(sim.phase - true_phase)[head]
    assert np.abs(err).max() < 1e-3
    # and it really wraps: the true phase spans many cycles near the air cavities
    last = true_phase[..., -1][head]
    assert last.max() - last.min() > 4 * np.pi
    near_air = ndimage.binary_dilation(np.isin(sim.labels, [0, 15]), iterations=1) & head
    jumps = np.abs(np.diff(sim.phase[..., -1], axis=2))[near_air[:, :, :-1]]
    assert (jumps > np.pi).sum() > 10


def test_complex_averaging_dephases(ph4):
    kw = dict(echo_times=(0.02,), snr=None, phase_offset=False)
    fine = simulate_megre(ph4, **kw)
    coarse = simulate_megre(ph4, voxel_size=(4.0, 8.0, 12.0), **kw)
    assert coarse.mag.shape[:3] == (45, 27, 15)
    assert np.allclose(voxel_size(coarse.affine), (4, 8, 12))
    assert np.allclose(coarse.chi, box_average(ph4.chi, (4, 4, 4), (4, 8, 12)))
    assert np.allclose(
        coarse.local_field_ppm, box_average(fine.local_field_ppm, (4, 4, 4), (4, 8, 12))
    )
    mean_mag = box_average(fine.mag[..., 0], (4, 4, 4), (4, 8, 12))
    # |mean of complex| <= mean of |.|, strictly where the field varies inside a voxel
    assert np.all(coarse.mag[..., 0] <= mean_mag * (1 + 1e-4) + 1e-3)
    assert (coarse.mag[..., 0] < 0.8 * mean_mag)[coarse.mask].sum() > 5


def test_noise_level_matches_snr(ph4):
    clean = simulate_megre(ph4, echo_times=(0.004,), snr=None, seed=3)
    noisy = simulate_megre(ph4, echo_times=(0.004,), snr=20.0, seed=3)
    air = ph4.pd == 0
    ref = clean.mag[..., 0][clean.mask].mean()
    assert noisy.noise_sigma == pytest.approx(ref / 20.0, rel=1e-6)
    # magnitude in air is Rayleigh: mean sigma * sqrt(pi / 2)
    assert noisy.mag[..., 0][air].mean() == pytest.approx(
        noisy.noise_sigma * np.sqrt(np.pi / 2), rel=0.05
    )


def test_siemens_phase_round_trips_through_scale_phase():
    rng = np.random.default_rng(0)
    phase = rng.uniform(-np.pi, np.pi, (20, 20, 20)).astype(np.float32)
    phase[0, 0, :2] = (-np.pi, np.nextafter(np.float32(np.pi), 0))
    stored = siemens_phase(phase)
    assert stored.dtype == np.int16 and stored.min() >= -4096 and stored.max() <= 4095
    back, how = scale_phase(stored, "arbitrary")
    assert "4096" in how
    assert np.abs(wrap(back - phase)).max() <= np.pi / 4096 + 1e-6


def _validator() -> str | None:
    local = Path(sys.executable).parent / "bids-validator-deno"
    return str(local) if local.exists() else shutil.which("bids-validator-deno")


def test_written_dataset_is_valid_bids_with_truth_aside(tmp_path):
    root = tmp_path / "bids"
    specs = [
        SubjectSpec("01", session="pre"),
        SubjectSpec(
            "01",
            session="pre",
            acq="tilt",
            run=2,
            b0_tilt_deg=(15.0, 5.0),
            echo_times=(0.012,),
            phase_units="siemens",
            write_field_strength=False,
        ),
    ]
    info = write_bids_dataset(root, specs, preset="small", seed=4)
    assert info.truth_dir == tmp_path / "bids-truth"
    assert {p.name for p in root.iterdir()} == {
        "dataset_description.json",
        "participants.tsv",
        "participants.json",
        "README",
        "sub-01",
    }
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw"
    assert (root / "participants.tsv").read_text().splitlines()[0].startswith("participant_id")

    axial, tilted = info.runs
    assert [p.name for p in tilted.phase_files] == [
        "sub-01_ses-pre_acq-tilt_run-2_echo-1_part-phase_MEGRE.nii.gz"
    ]
    assert len(axial.mag_files) == len(axial.phase_files) == 4
    meta = json.loads(axial.phase_files[1].with_suffix("").with_suffix(".json").read_text())
    assert meta["EchoTime"] == 0.008 and meta["Units"] == "rad"
    assert meta["MagneticFieldStrength"] == 3.0
    meta = json.loads(tilted.phase_files[0].with_suffix("").with_suffix(".json").read_text())
    assert meta["Units"] == "arbitrary" and meta["EchoTime"] == 0.012
    assert "MagneticFieldStrength" not in meta

    # the Siemens phase is int16 and scales back to the simulated phase
    img = nib.load(tilted.phase_files[0])
    assert img.get_data_dtype() == np.int16
    rad, _ = scale_phase(np.asarray(img.dataobj), meta["Units"])
    params = tilted.params
    assert np.allclose(b0_direction(img.affine), params["B0Direction"], atol=1e-6)
    assert params["B0TiltDeg"] == [15.0, 5.0]
    # truth beside the dataset: chi the same for both orientations
    assert all(p.is_relative_to(info.truth_dir) for p in tilted.truth.values())
    assert np.array_equal(axial.load_truth("chi"), tilted.load_truth("chi"))
    mask = tilted.load_truth("mask")
    assert mask.dtype == bool and mask.shape == rad.shape == (45, 55, 45)
    total = tilted.load_truth("total_field")
    parts = tilted.load_truth("local_field") + tilted.load_truth("background_field")
    assert np.allclose(total, ppm_to_hz(parts, 3.0), atol=1e-2)

    again = load_dataset_info(info.truth_dir)
    assert [r.prefix for r in again.runs] == [r.prefix for r in info.runs]
    assert again.run("sub-01_ses-pre_acq-tilt_run-2").mag_files == [
        p.resolve() for p in tilted.mag_files
    ]

    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed")
    out = subprocess.run([exe, str(root), "--format", "json"], capture_output=True, text=True)
    issues = json.loads(out.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert errors == []
    assert out.returncode == 0


def test_bad_inputs_raise_clear_errors(tmp_path, ph4):
    with pytest.raises(ValueError, match="seconds"):
        simulate_megre(ph4, echo_times=(4.0, 8.0))
    with pytest.raises(ValueError, match="increase"):
        simulate_megre(ph4, echo_times=(0.008, 0.004))
    with pytest.raises(ValueError, match="finer"):
        simulate_megre(ph4, voxel_size=(2, 2, 2))
    with pytest.raises(ValueError, match="1 mm"):
        make_head_phantom((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="alphanumeric"):
        write_bids_dataset(tmp_path / "a", [SubjectSpec("sub_01")])
    with pytest.raises(ValueError, match="outside"):
        write_bids_dataset(tmp_path / "b", truth_dir=tmp_path / "b" / "truth")
    with pytest.raises(ValueError, match="phase_units"):
        write_bids_dataset(tmp_path / "c", [SubjectSpec("01", phase_units="deg")])
    with pytest.raises(ValueError, match="twice"):
        write_bids_dataset(tmp_path / "d", [SubjectSpec("01"), SubjectSpec("01")])
    with pytest.raises(ValueError, match="seconds"):  # before anything is written
        write_bids_dataset(tmp_path / "g", [SubjectSpec("01"), SubjectSpec("02", echo_times=(8,))])
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match="preset"):
        write_bids_dataset(tmp_path / "e", preset="huge")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty"):
        write_bids_dataset(tmp_path / "f")


def test_command_line_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = sim_main(
        [
            str(out),
            "--oblique",
            "10",
            "--echo-times",
            "0.01",
            "--snr",
            "0",
            "--no-field-strength",
            "--phase-units",
            "siemens",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "cli-truth") in printed
    info = load_dataset_info(tmp_path / "cli-truth")
    (run,) = info.runs
    meta = json.loads(run.phase_files[0].with_suffix("").with_suffix(".json").read_text())
    assert "MagneticFieldStrength" not in meta and meta["Units"] == "arbitrary"
    assert np.isclose(np.rad2deg(np.arccos(run.params["B0Direction"][2])), 10.0)


@pytest.mark.slow
def test_mni_maps_are_nilearns():
    from nilearn import datasets

    from qsmprep.sim.phantom import _MNI_OFFSET, NATIVE_GRID, _mni_maps

    maps = _mni_maps()
    sl = tuple(slice(o, o + n) for o, n in zip(_MNI_OFFSET, NATIVE_GRID.shape, strict=True))
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()[sl]
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata()[sl] > 0.5
    assert np.allclose(maps["gm"], gm, atol=1e-6)
    assert np.array_equal(maps["brain"], mask)
