"""The group level on conftest's phantom study: QC table, ROI statistics, group report.

The template folder is built by ``tfhome.make_templateflow_home`` from nilearn's MNI152 T1
and the phantom's deep grey nuclei, so each ROI's chi can be checked against the phantom's
tissue table (docs/phantom.md).
"""

import csv
import os
import shutil
import sys

import nibabel as nb
import numpy as np
import pytest

from qsmprep.group.templates import FILES, TEMPLATE, TemplateError, main, template_files
from qsmprep.sim.tissues import BY_NAME

#: atlas ROI -> phantom nucleus
ROI_NUCLEUS = {"thalamus": "thalamus", "caudate": "caudate", "putamen": "putamen",
               "pallidum": "globus_pallidus"}  # fmt: skip


@pytest.fixture(scope="session")
def tf_home(tmp_path_factory):
    from tfhome import make_templateflow_home

    return make_templateflow_home(tmp_path_factory.mktemp("templateflow"))


def _read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def group(phantom_study, tf_home, run_cli):
    old = os.environ.get("TEMPLATEFLOW_HOME")
    os.environ["TEMPLATEFLOW_HOME"] = str(tf_home)
    try:
        code, err = run_cli([phantom_study["root"], phantom_study["out"], "group",
                             "--participant-label", "01", "02", "03",
                             "--template-chimaps"])  # fmt: skip
    finally:
        if old is None:
            os.environ.pop("TEMPLATEFLOW_HOME")
        else:
            os.environ["TEMPLATEFLOW_HOME"] = old
    return {**phantom_study, "group_code": code, "group_err": err}


def test_group_tables(group):
    out = group["out"]
    assert group["group_code"] == 0, group["group_err"]
    qc = {r["run"]: r for r in _read_tsv(out / "group" / "group_qc.tsv")}
    assert sorted(qc) == ["sub-01", "sub-02", "sub-03"]
    assert all(qc[r]["flags"] == "" for r in qc)
    assert qc["sub-01"]["outliers"] == ""  # three runs are too few for robust z-scores
    assert float(qc["sub-01"]["mask_volume_ml"]) > 1000
    rois = _read_tsv(out / "group" / "group_rois.tsv")
    assert len(rois) == 3 * 8
    assert {r["roi"] for r in rois} == {f"{side}_{roi}" for side in ("left", "right")
                                        for roi in ROI_NUCLEUS}  # fmt: skip
    per_run = _read_tsv(out / "sub-02" / "anat" / "sub-02_seg-HOSPA_rois.tsv")
    assert [r["chi_mean_ppm"] for r in per_run] == [
        r["chi_mean_ppm"] for r in rois if r["run"] == "sub-02"
    ]
    warped = nb.load(out / "sub-01" / "anat" / f"sub-01_space-{TEMPLATE}_Chimap.nii.gz")
    assert warped.shape == (49, 58, 47)  # the template on the run's (4 mm) grid
    assert np.abs(warped.get_fdata()).max() > 0.1


def test_deep_grey_roi_means_match_the_phantom(group):
    """ROI means of the three normal runs against the phantom's nucleus values.

    Expected: the tissue table's chi minus the mean of the true chi in the run's brain mask
    (the Chimap is referenced to that mean). Tolerance at 4 mm: 0.035 ppm for thalamus,
    caudate and putamen, 70 % for the globus pallidus (3.5 x 8 x 5 mm semi-axes: its ROI
    is about ten 4 mm voxels, mostly partial volumes with white matter; measured 0.06-0.10
    ppm against 0.18). The order of the nuclei must hold in every run.
    """
    rois = _read_tsv(group["out"] / "group" / "group_rois.tsv")
    for subject in ("01", "02", "03"):
        run = group["info"].run(f"sub-{subject}")
        mask = nb.load(group["out"] / f"sub-{subject}" / "anat" /
                       f"sub-{subject}_desc-brain_mask.nii.gz").get_fdata() > 0  # fmt: skip
        reference = float(run.load_truth("chi")[mask].mean())
        means = {}
        for roi, nucleus in ROI_NUCLEUS.items():
            values = [float(r["chi_mean_ppm"]) for r in rois
                      if r["run"] == f"sub-{subject}" and r["roi"].endswith(roi)]  # fmt: skip
            assert len(values) == 2
            means[roi] = np.mean(values)
            expected = BY_NAME[nucleus].chi - reference
            if roi == "pallidum":
                assert abs(means[roi] - expected) < 0.7 * expected, (subject, roi, means)
            else:
                assert abs(means[roi] - expected) < 0.035, (subject, roi, means)
        assert means["pallidum"] > max(means["caudate"], means["putamen"]) > means["thalamus"]


def test_group_qc_flags_the_inverted_phase(group):
    from qsmprep.group.level import qc_table
    from qsmprep.reports.outputs import find_runs

    rows, errors = qc_table(find_runs(group["out"]))
    flagged = {r["run"]: r["flags"] for r in rows}
    assert errors == [] and flagged["sub-04"] == ["sign_index"] and flagged["sub-01"] == []


def test_group_report_in_a_browser(group, tmp_path):
    from browser import chromium, open_page

    if chromium() is None:
        if os.environ.get("QSMPREP_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (QSMPREP_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "group.png"
    page = open_page(group["out"] / "group" / "group.html", shot)
    assert page.errors == [] and page.remote_requests == []
    assert len(page.images) == 1 + 3  # histograms, and the ROIs of each run
    assert all(width > 0 for _, width in page.images), page.images
    assert "sub-03" in page.text and shot.stat().st_size > 10_000
    assert "Harvard-Oxford" in page.text and "DIPY" in page.text
    rois = _read_tsv(group["out"] / "group" / "group_rois.tsv")
    thalamus = float(next(r["chi_mean_ppm"] for r in rois if r["roi"] == "left_thalamus"))
    assert f"{thalamus:.4g}" in page.text  # the ROI table is filled


def test_missing_template_is_one_line_and_the_rest_is_written(group, tmp_path, run_cli):
    out = tmp_path / "out"
    shutil.copytree(group["out"], out)
    shutil.rmtree(out / "group")
    empty = tmp_path / "tf"
    with pytest.raises(TemplateError, match="pre-fetch") as e:
        template_files(empty)
    assert "\n" not in str(e.value) and "python -m qsmprep.group.templates fetch" in str(e.value)
    old = os.environ.get("TEMPLATEFLOW_HOME")
    os.environ["TEMPLATEFLOW_HOME"] = str(empty)
    try:
        code, err = run_cli([group["root"], out, "group", "--participant-label", "01"])
    finally:
        os.environ.pop("TEMPLATEFLOW_HOME")
        if old is not None:
            os.environ["TEMPLATEFLOW_HOME"] = old
    assert code == 1
    lines = [ln for ln in err.splitlines() if "pre-fetch" in ln]
    assert len(lines) == 1 and FILES["T1w"][0] in lines[0]
    assert (out / "group" / "group_qc.tsv").is_file() and (out / "group" / "group.html").is_file()
    assert len(_read_tsv(out / "group" / "group_qc.tsv")) == 1


def test_fetch_asks_templateflow_for_each_file(tmp_path, monkeypatch, capsys):
    """The build-time fetch calls TemplateFlow's API once per file (a stand-in API writes
    them, as the real one downloads them into TEMPLATEFLOW_HOME)."""
    import types

    asked = []

    def get(template, **query):
        asked.append((template, query))
        name = next(n for n, q in FILES.values() if q == query)
        path = tmp_path / f"tpl-{template}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return path

    package = types.ModuleType("templateflow")
    package.api = types.SimpleNamespace(get=get)
    monkeypatch.setitem(sys.modules, "templateflow", package)
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    assert main(["check", "--home", str(tmp_path)]) == 1
    assert main(["fetch", "--home", str(tmp_path)]) == 0
    assert [t for t, _ in asked] == [TEMPLATE] * 3
    assert os.environ["TEMPLATEFLOW_HOME"] == str(tmp_path)
    assert main(["check", "--home", str(tmp_path)]) == 0
    assert "atlas-HOSPA" in capsys.readouterr().out


def test_registration_recovers_a_known_transform(tf_home):
    """A rotated and shifted copy of the template (8 mm) registers back within a voxel."""
    from scipy.spatial.transform import Rotation

    from qsmprep.group.level import Template
    from qsmprep.group.registration import register

    tpl = Template.load(tf_home)
    static, mask, affine = tpl.registration_grid(8.0)  # small and fast
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_euler("xz", [8, -6], degrees=True).as_matrix()
    turn[:3, 3] = [5.0, -7.0, 4.0]
    moving_affine = turn @ affine  # same voxels, placed elsewhere in the world
    reg = register(static, moving_affine, static, affine, moving_mask=mask, static_mask=mask,
                   method="affine")  # fmt: skip
    coords, valid = reg.template_coordinates()
    ijk = np.indices(static.shape).reshape(3, -1).T
    truth = ijk @ affine[:3, :3].T + affine[:3, 3]  # where each moving voxel came from
    err = np.linalg.norm(coords.reshape(-1, 3) - truth, axis=1)[mask.ravel()]
    assert np.median(err) < 4.0 and valid[mask].mean() > 0.95


@pytest.mark.slow
def test_deep_grey_at_2mm(tmp_path, tf_home, run_cli):
    """The same check at 2 mm, tighter: 0.02 ppm for thalamus, caudate and putamen, 35 % for
    the globus pallidus (measured: within 0.015 ppm, and 22-28 % low)."""
    from qsmprep.sim import SubjectSpec, write_bids_dataset

    root = tmp_path / "bids"
    info = write_bids_dataset(root, [SubjectSpec("01", seed=0),
                                     SubjectSpec("02", b0_tilt_deg=(20.0, 10.0), seed=1)],
                              preset="2mm")  # fmt: skip
    out = tmp_path / "out"
    code, err = run_cli([root, out, "participant", "-w", tmp_path / "work", "--nprocs", "1",
                         "--skip-bids-validation"])  # fmt: skip
    assert code == 0, err
    os.environ["TEMPLATEFLOW_HOME"] = str(tf_home)
    try:
        code, err = run_cli([root, out, "group"])
    finally:
        os.environ.pop("TEMPLATEFLOW_HOME")
    assert code == 0, err
    rois = _read_tsv(out / "group" / "group_rois.tsv")
    for subject in ("01", "02"):
        mask = nb.load(out / f"sub-{subject}" / "anat" /
                       f"sub-{subject}_desc-brain_mask.nii.gz").get_fdata() > 0  # fmt: skip
        reference = float(info.run(f"sub-{subject}").load_truth("chi")[mask].mean())
        for roi, nucleus in ROI_NUCLEUS.items():
            run_rows = [r for r in rois if r["run"] == f"sub-{subject}"]
            value = np.mean([float(r["chi_mean_ppm"]) for r in run_rows if r["roi"].endswith(roi)])
            expected = BY_NAME[nucleus].chi - reference
            limit = 0.35 * expected if roi == "pallidum" else 0.02
            assert abs(value - expected) < limit, (subject, roi, value, expected)
