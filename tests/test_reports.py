"""Participant reports, QC numbers and flags, logs, --reports-only and --boilerplate-only.

The study of conftest's ``phantom_study`` (sub-01 normal, sub-04 with an inverted phase
sign, sub-05 failing in a node), and sub-01 again with a user mask that misses half the
brain, in a second output folder.
"""

import json
import os

import nibabel as nb
import numpy as np
import pytest

from qsmprep.config import load_toml
from qsmprep.reports.outputs import find_runs, latest_log_dir
from qsmprep.reports.qc import (
    data_consistency_residual,
    flags,
    head_interior,
    robust_z,
    run_qc,
    sign_index,
)

FIGURES = ("mask", "phase", "fields", "chimap", "histogram")


@pytest.fixture(scope="module")
def processed(phantom_study, run_cli):
    """The shared study, and sub-01 again with a user mask that misses half the brain."""
    base, info = phantom_study["base"], phantom_study["info"]
    half = info.run("sub-01").load_truth("mask").copy()
    half[: half.shape[0] // 2] = False
    ref = nb.load(info.run("sub-01").mag_files[0])
    nb.save(nb.Nifti1Image(half.astype(np.uint8), ref.affine), base / "half_mask.nii.gz")
    out_half = base / "out_half"
    code_half, err_half = run_cli(
        [phantom_study["root"], out_half, "participant", "-w", base / "work_half",
         "--nprocs", "1", "--skip-bids-validation", "--participant-label", "01",
         "--mask-file", base / "half_mask.nii.gz"]
    )  # fmt: skip
    assert code_half == 0, err_half
    return {**phantom_study, "out_half": out_half}


def test_report_figures_and_logs_are_written(processed):
    out = processed["out"]
    assert processed["code"] == 1  # sub-05 and sub-06 failed; the others are complete
    assert (out / "sub-01.html").is_file()
    for name in FIGURES:
        assert (out / "sub-01" / "figures" / f"sub-01_desc-{name}_qc.png").stat().st_size > 1000
    facts = json.loads((out / "sub-01" / "figures" / "sub-01_desc-phase_qc.json").read_text())
    assert facts["Echo"] == 4 and facts["PhaseScaling"].startswith("radians")
    log = latest_log_dir(out, "01")
    assert log is not None and log.parent == out / "sub-01" / "log"
    text = (log / "qsmprep.log").read_text()
    assert "command line: qsmprep" in text and "dipole inversion (tv)" in text
    assert (log / "command.txt").read_text().startswith("qsmprep ")
    timings = json.loads((log / "timings.json").read_text())
    assert timings["sub-01"]["dipole_inversion"]["seconds"] >= 0
    assert "Magnetic susceptibility was computed" in (log / "methods.md").read_text()
    for ext in ("md", "html", "bib"):
        assert (out / "logs" / f"CITATION.{ext}").stat().st_size > 500


def test_resolved_config_is_a_config_file(processed, tmp_path):
    from qsmprep.cli.run import parse_args

    toml = latest_log_dir(processed["out"], "01") / "qsmprep.toml"
    settings = load_toml(toml)
    assert settings["masking"] == "quality"  # "auto" resolved
    assert settings["inversion"] == "tv" and settings["nprocs"] == 1
    cfg = parse_args([str(processed["root"]), str(tmp_path / "o"), "participant",
                      "--config-file", str(toml)])  # fmt: skip
    assert cfg.workflow.masking == "quality" and cfg.resources.nprocs == 1


def test_no_flag_on_a_good_run_and_the_numbers_are_sane(processed):
    (run,) = find_runs(processed["out"], "01")
    qc = run_qc(run)
    assert qc["flags"] == [], qc
    # the phantom's brain is about 1.5 L; measured 1829 ml at 4 mm, whose rim voxels count
    # whole (the quality mask is not eroded)
    assert 1200 < qc["mask_volume_ml"] < 2000
    assert qc["mask_head_share"] > 0.9
    assert 0 < qc["residual"] < 0.5
    assert qc["sign_index"] > 0.1
    assert qc["low_reliability_share"] < 0.05


def test_inverted_phase_sign_is_flagged(processed):
    (run,) = find_runs(processed["out"], "04")
    qc = run_qc(run)
    assert qc["flagged"] == ["sign_index"], qc
    assert qc["sign_index"] < -0.1
    assert "phase sign may be inverted" in (processed["out"] / "sub-04.html").read_text()


def test_mask_missing_half_the_brain_is_flagged(processed):
    (run,) = find_runs(processed["out_half"], "01")
    qc = run_qc(run)
    assert "mask_head_share" in qc["flagged"], qc
    assert qc["mask_head_share"] < 0.6
    assert "it may miss brain" in (processed["out_half"] / "sub-01.html").read_text()


def test_failed_participant_report_shows_error_and_crash_file(processed):
    out = processed["out"]
    log = latest_log_dir(out, "05")
    crashes = sorted(log.glob("crash-*.txt"))
    assert crashes, list(log.iterdir())
    errors = (log / "errors.txt").read_text()
    assert "PhaseScalingError" in errors
    page = (out / "sub-05.html").read_text()
    assert "PhaseScalingError" in page and crashes[0].name in page
    assert not (out / "sub-05" / "anat").exists()


def test_reports_only_writes_the_report_again(processed, run_cli):
    out = processed["out"]
    logs_before = sorted((out / "sub-01" / "log").iterdir())
    (out / "sub-01.html").unlink()
    (out / "sub-01" / "figures" / "sub-01_desc-chimap_qc.png").unlink()
    code, err = run_cli([processed["root"], out, "participant", "--reports-only",
                         "--participant-label", "01"])  # fmt: skip
    assert code == 0, err
    assert (out / "sub-01.html").is_file()
    assert (out / "sub-01" / "figures" / "sub-01_desc-chimap_qc.png").is_file()
    assert sorted((out / "sub-01" / "log").iterdir()) == logs_before
    page = (out / "sub-01.html").read_text()
    assert "Magnetic susceptibility was computed" in page  # methods from the log folder
    assert "dipole_inversion" in page  # stage timings from the log folder


def test_boilerplate_only_writes_citations_and_stops(processed, run_cli, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli([processed["root"], out, "participant", "--boilerplate-only",
                         "--skip-bids-validation", "--participant-label", "01",
                         "--inversion", "adaptive-unet", "--r2star", "arlo"])  # fmt: skip
    assert code == 0, err
    md = (out / "logs" / "CITATION.md").read_text()
    assert "Graf S" in md and "Liu J" in md and "Pei M" in md
    assert not list(out.glob("sub-*"))


@pytest.mark.parametrize("subject", ["01", "05"])
def test_report_in_a_browser(processed, subject, tmp_path):
    from browser import chromium, open_page

    if chromium() is None:
        if os.environ.get("QSMPREP_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (QSMPREP_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / f"sub-{subject}.png"
    page = open_page(processed["out"] / f"sub-{subject}.html", shot)
    assert page.errors == [], page.errors
    assert page.remote_requests == []
    expected = len(FIGURES) if subject == "01" else 0
    assert len(page.images) == expected
    for src, width in page.images:
        assert width > 0, f"{src} did not load"
    assert shot.stat().st_size > 10_000
    assert f"sub-{subject}" in page.title


def test_qc_functions_on_known_arrays():
    from qsmprep.qsm.dipole import forward_field

    rng = np.random.default_rng(0)
    assert abs(sign_index(rng.normal(size=10_000))) < 0.1
    tail = np.r_[rng.normal(0, 0.01, 10_000), np.full(200, 0.4)]
    assert sign_index(tail) > 0.5 and sign_index(-tail) < -0.5
    mask = np.zeros((24, 24, 24), bool)
    mask[6:18, 6:18, 6:18] = True
    chi = np.where(mask, rng.normal(0, 0.05, mask.shape), 0).astype(np.float32)
    field = forward_field(chi, (1.0, 1.0, 1.0), (0, 0, 1.0))
    assert data_consistency_residual(chi, field, mask, (1, 1, 1), (0, 0, 1)) < 1e-5
    assert data_consistency_residual(0 * chi, field, mask, (1, 1, 1), (0, 0, 1)) == pytest.approx(
        1
    )
    # a 30 mm ball of signal in noise: its interior 12 mm deep is the inner ball of 18 mm
    x, y, z = np.indices((40, 40, 40)) - 19.5
    ball = np.sqrt(x * x + y * y + z * z) < 15
    mag = np.where(ball, 100.0, 0) + rng.rayleigh(1.0, ball.shape)
    inner = head_interior(mag, (1.0, 1.0, 1.0))
    assert inner.sum() == pytest.approx(4 / 3 * np.pi * 3**3, rel=0.5)
    assert not (inner & ~ball).any()
    assert [r.column for r in flags({"chi_std_ppm": 0.2, "residual": 0.1})] == ["chi_std_ppm"]


def test_robust_z_marks_the_outlier_only():
    z = robust_z(np.array([1.0, 1.1, 0.9, 1.05, 0.95, 3.0, np.nan]))
    assert abs(z[5]) > 3 and np.all(np.abs(z[:5]) < 3) and np.isnan(z[6])
    assert np.all(robust_z(np.array([1.0, 5.0, 9.0])) == 0)  # too few runs for a z-score
