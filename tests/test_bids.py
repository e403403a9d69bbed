"""BIDS discovery: grouping, ordering, metadata and the errors for broken runs."""

import json

import nibabel as nb
import numpy as np
import pytest

from qsmprep.bids import (
    DERIVATIVE_ENTITIES,
    NAME_ENTITIES,
    SUFFIXES,
    BIDSError,
    bids_uri,
    check_filters,
    collect_runs,
    field_strength,
    load_layout,
    other_gre_suffixes,
    read_metadata,
    select_participants,
)


def _write(root, name, shape=(4, 5, 6), affine=None, meta=None, sub="01", ses=None):
    folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    img = nb.Nifti1Image(np.zeros(shape, np.float32), np.eye(4) if affine is None else affine)
    nb.save(img, folder / f"{name}.nii.gz")
    if meta is not None:
        (folder / f"{name}.json").write_text(json.dumps(meta))


def _dataset(tmp_path, echoes=(1, 2, 3), tes=(0.004, 0.008, 0.012), b0=3.0, **kw):
    root = tmp_path / "bids"
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.10.0"})
    )
    for e, te in zip(echoes, tes, strict=True):
        for part in ("mag", "phase"):
            meta = {"EchoTime": te}
            if b0 is not None:
                meta["MagneticFieldStrength"] = b0
            if part == "phase":
                meta["Units"] = "rad"
            _write(root, f"sub-01_echo-{e}_part-{part}_MEGRE", meta=meta, **kw)
    return root


def test_runs_are_grouped_and_ordered_by_echo(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
                    tes=tuple(0.003 * k for k in range(1, 11)))  # fmt: skip
    layout = load_layout(root)
    (run,) = collect_runs(layout, "01")
    assert run.echo_times == pytest.approx(tuple(0.003 * k for k in range(1, 11)))
    # echo-10 sorts after echo-9, not after echo-1
    assert run.mag_files[-1].endswith("echo-10_part-mag_MEGRE.nii.gz")
    assert all("part-phase" in p for p in run.phase_files)
    assert run.field_strength == 3.0 and run.phase_units == "rad"
    assert run.prefix == "sub-01" and run.anat_dir == "sub-01/anat"
    assert run.shape == (4, 5, 6)


def test_sessions_acq_runs_make_separate_runs(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t"}))
    for ses in ("a", "b"):
        for run in (1, 2):
            for part in ("mag", "phase"):
                _write(root, f"sub-01_ses-{ses}_acq-hr_run-{run}_echo-1_part-{part}_MEGRE",
                       meta={"EchoTime": 0.01}, ses=ses)  # fmt: skip
    layout = load_layout(root)
    runs = collect_runs(layout, "01")
    assert [r.prefix for r in runs] == [
        "sub-01_ses-a_acq-hr_run-1", "sub-01_ses-a_acq-hr_run-2",
        "sub-01_ses-b_acq-hr_run-1", "sub-01_ses-b_acq-hr_run-2",
    ]  # fmt: skip
    assert runs[2].anat_dir == "sub-01/ses-b/anat"
    assert [r.prefix for r in collect_runs(layout, "01", sessions=["b"])][0].startswith(
        "sub-01_ses-b"
    )
    only = collect_runs(layout, "01", filters={"run": 2})
    assert [r.prefix for r in only] == ["sub-01_ses-a_acq-hr_run-2", "sub-01_ses-b_acq-hr_run-2"]


def test_single_echo_without_echo_entity(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t"}))
    for part in ("mag", "phase"):
        _write(root, f"sub-01_part-{part}_T2starw", meta={"EchoTime": 0.02})
    (run,) = collect_runs(load_layout(root), "01")
    assert run.echo_times == (0.02,) and run.suffix == "T2starw"
    assert len(run.mag_files) == len(run.phase_files) == 1


def test_missing_echo_names_the_run(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2, 4), tes=(0.004, 0.008, 0.016))
    with pytest.raises(BIDSError, match=r"echo\(es\) 3 missing .*sub-01_echo-1_part-mag"):
        collect_runs(load_layout(root), "01")


def test_phase_without_magnitude(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2), tes=(0.004, 0.008))
    (root / "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz").unlink()
    with pytest.raises(BIDSError, match="no magnitude image matches sub-01_echo-2_part-phase"):
        collect_runs(load_layout(root), "01")


def test_missing_echo_time_names_the_file(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2), tes=(0.004, 0.008))
    for part in ("mag", "phase"):
        (root / f"sub-01/anat/sub-01_echo-2_part-{part}_MEGRE.json").write_text("{}")
    with pytest.raises(BIDSError, match="EchoTime missing .*sub-01_echo-2_part-phase_MEGRE"):
        collect_runs(load_layout(root), "01")


def test_echo_time_in_milliseconds_is_refused(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2), tes=(4.0, 8.0))
    with pytest.raises(BIDSError, match="not in seconds"):
        collect_runs(load_layout(root), "01")


def test_shape_mismatch_names_both_files(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2), tes=(0.004, 0.008))
    _write(root, "sub-01_echo-2_part-phase_MEGRE", shape=(4, 5, 7))
    with pytest.raises(BIDSError, match=r"echo-2_part-phase_MEGRE.nii.gz has shape \(4, 5, 7\)"):
        collect_runs(load_layout(root), "01")


def test_affine_mismatch(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2), tes=(0.004, 0.008))
    _write(root, "sub-01_echo-2_part-mag_MEGRE", affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(BIDSError, match="different affines"):
        collect_runs(load_layout(root), "01")


def test_field_strength_fallback(tmp_path):
    root = _dataset(tmp_path, echoes=(1,), tes=(0.01,), b0=None)
    (run,) = collect_runs(load_layout(root), "01")
    msg = (
        "MagneticFieldStrength missing from sub-01_echo-1_part-phase_MEGRE.json.*--field-strength"
    )
    with pytest.raises(BIDSError, match=msg):
        field_strength(run)
    assert field_strength(run, 7.0) == 7.0
    root2 = _dataset(tmp_path / "b", echoes=(1,), tes=(0.01,), b0=3.0)
    (run2,) = collect_runs(load_layout(root2), "01")
    assert field_strength(run2, 7.0) == 3.0  # the sidecar wins


def test_participant_selection(tmp_path):
    root = _dataset(tmp_path)
    layout = load_layout(root)
    assert select_participants(layout) == ["01"]
    assert select_participants(layout, ["01"]) == ["01"]
    with pytest.raises(BIDSError, match="not found .*: 02"):
        select_participants(layout, ["02"])


def test_not_a_dataset(tmp_path):
    with pytest.raises(BIDSError, match="not found"):
        load_layout(tmp_path / "nope")
    with pytest.raises(BIDSError, match="dataset_description.json is missing"):
        load_layout(tmp_path)


def test_bids_uri(tmp_path):
    f = tmp_path / "sub-01" / "anat" / "x.nii.gz"
    assert bids_uri(f, tmp_path) == "bids:raw:sub-01/anat/x.nii.gz"


def _two_participants(tmp_path):
    root = _dataset(tmp_path, echoes=(1, 2), tes=(0.004, 0.008))
    for e, te in ((1, 0.004), (2, 0.008)):
        for part in ("mag", "phase"):
            _write(root, f"sub-02_echo-{e}_part-{part}_MEGRE", sub="02",
                   meta={"EchoTime": te, "MagneticFieldStrength": 3.0})  # fmt: skip
    return root


BROKEN = {  # what is done to sub-02's echo-2 phase -> what the message must say
    "malformed JSON": (".json", "{bad json", r"phase_MEGRE.json is not valid JSON: .*line 1"),
    "JSON list": (".json", "[1, 2]", "must hold a JSON object, not a list"),
    "EchoTime list": (".json", '{"EchoTime": [0.004, 0.008]}', "EchoTime in .* is a list"),
    "EchoTime text": (".json", '{"EchoTime": "4 ms"}', 'must be a number, not "4 ms"'),
    "EchoTime in ms": (".json", '{"EchoTime": 8}', "EchoTime 8 .* is not in seconds"),
    "Units not text": (".json", '{"EchoTime": 0.008, "Units": 1}', "Units .* must be a string"),
    "zero-byte image": (".nii.gz", "", r"phase_MEGRE.nii.gz cannot be read as a NIfTI image"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_file_fails_only_its_participant(tmp_path, case):
    ext, content, message = BROKEN[case]
    root = _two_participants(tmp_path)
    (root / f"sub-02/anat/sub-02_echo-2_part-phase_MEGRE{ext}").write_text(content)
    layout = load_layout(root)  # one broken sidecar does not stop the indexing
    assert select_participants(layout) == ["01", "02"]
    assert collect_runs(layout, "01")[0].echo_times == (0.004, 0.008)
    with pytest.raises(BIDSError, match=message):
        collect_runs(layout, "02")


def test_sidecars_are_inherited_deeper_and_more_specific_last(tmp_path):
    root = _dataset(tmp_path, echoes=(1,), tes=(0.01,), b0=None)
    (root / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": 7.0, "Units": "x"}))
    (root / "sub-01" / "sub-01_part-phase_MEGRE.json").write_text(json.dumps({"Units": "y"}))
    (run,) = collect_runs(load_layout(root), "01")
    assert run.field_strength == 7.0
    assert run.phase_units == "rad"  # the file's own sidecar is the most specific
    meta = read_metadata(run.mag_files[0], root)
    assert meta["Units"] == "x" and meta.sources["Units"] == "MEGRE.json"
    (root / "MEGRE.json").write_text(json.dumps({"MagneticFieldStrength": "7 T"}))
    with pytest.raises(BIDSError, match=r'MagneticFieldStrength in MEGRE.json .* not "7 T"'):
        collect_runs(load_layout(root), "01")


def test_degenerate_and_non_finite_affines_are_named(tmp_path):
    root = _dataset(tmp_path, echoes=(1,), tes=(0.01,))
    path = root / "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"
    img = nb.load(path)
    hdr = img.header.copy()
    hdr.set_qform(None, code=0)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [4, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]
    hdr["sform_code"] = 1
    nb.Nifti1Image(np.zeros(img.shape, np.float32), None, hdr).to_filename(path)
    with pytest.raises(BIDSError, match=r"part-mag_MEGRE.nii.gz has a degenerate affine"):
        collect_runs(load_layout(root), "01")
    hdr["srow_y"], hdr["srow_z"] = [0, np.nan, 0, 0], [0, 0, 1, 0]
    nb.Nifti1Image(np.zeros(img.shape, np.float32), None, hdr).to_filename(path)
    with pytest.raises(BIDSError, match="non-finite affine"):
        collect_runs(load_layout(root), "01")


def test_broken_dataset_description_and_filters(tmp_path):
    root = _dataset(tmp_path, echoes=(1,), tes=(0.01,))
    layout = load_layout(root)
    check_filters(layout, {"acquisition": ["hr", None], "run": 1})
    with pytest.raises(BIDSError, match="unknown BIDS entity in the filters: colour"):
        check_filters(layout, {"colour": "red"})
    with pytest.raises(BIDSError, match="filter 'run' must be"):
        check_filters(layout, {"run": {"a": 1}})
    (root / "dataset_description.json").write_text("[]")
    with pytest.raises(BIDSError, match="dataset_description.json must hold a JSON object"):
        load_layout(root)


def _gre(root, stem, tes, suffix="MEGRE", sub="01", shared_sidecar=False, b0=3.0):
    """Magnitude and phase per echo of ``stem`` (entities before echo/part); ``tes=(te,)``
    writes a single echo without ``echo-``. ``shared_sidecar``: one sidecar per echo
    without ``part-`` (inherited by both parts, as in the qMRI examples)."""
    for e, te in enumerate(tes, start=1):
        echo = f"_echo-{e}" if len(tes) > 1 else ""
        meta = {"EchoTime": te, "MagneticFieldStrength": b0}
        if shared_sidecar:
            folder = root / f"sub-{sub}" / "anat"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{stem}{echo}_{suffix}.json").write_text(json.dumps(meta))
        for part in ("mag", "phase"):
            _write(root, f"{stem}{echo}_part-{part}_{suffix}",
                   meta=None if shared_sidecar else meta, sub=sub)  # fmt: skip


def _root(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t"}))
    return root


def test_output_names_keep_every_entity_in_bids_order(tmp_path):
    root = _root(tmp_path)
    # entities in a scrambled order in the file name: the output name puts them in BIDS order
    _gre(root, "sub-01_run-2_rec-y_acq-x_task-rest_ce-gd", (0.004, 0.008))
    (run,) = collect_runs(load_layout(root), "01")
    assert run.prefix == "sub-01_task-rest_acq-x_ce-gd_rec-y_run-2"


def test_runs_differing_only_by_task_keep_apart(tmp_path):
    root = _root(tmp_path)
    _gre(root, "sub-01_acq-x_rec-y_task-rest", (0.004, 0.008), suffix="T2starw")
    _gre(root, "sub-01_acq-x_rec-y_task-nback", (0.004, 0.008), suffix="T2starw")
    runs = collect_runs(load_layout(root), "01")
    assert [r.prefix for r in runs] == [
        "sub-01_task-nback_acq-x_rec-y", "sub-01_task-rest_acq-x_rec-y"
    ]  # fmt: skip


def test_two_runs_with_one_output_name_are_refused(tmp_path):
    root = _root(tmp_path)
    _gre(root, "sub-01_acq-x", (0.004, 0.008), suffix="MEGRE")
    _gre(root, "sub-01_acq-x", (0.004, 0.008), suffix="T2starw")
    with pytest.raises(BIDSError, match=r"same outputs sub-01/anat/sub-01_acq-x_\*: "
                       r"sub-01_acq-x_echo-1_part-mag_MEGRE.nii.gz and "
                       r"sub-01_acq-x_echo-1_part-mag_T2starw.nii.gz"):  # fmt: skip
        collect_runs(load_layout(root), "01")
    # selecting one of the suffixes resolves it
    (run,) = collect_runs(load_layout(root), "01", filters={"suffix": ["T2starw"]})
    assert run.suffix == "T2starw" and run.prefix == "sub-01_acq-x"


def test_qmri_qsm_layout_t1w(tmp_path):
    """bids-examples qmri_qsm: one echo as sub-01_part-{mag,phase}_T1w."""
    root = _root(tmp_path)
    _gre(root, "sub-01", (0.0081,), suffix="T1w")
    layout = load_layout(root)
    assert collect_runs(layout, "01") == []  # not a default suffix
    assert other_gre_suffixes(layout, ["01"], list(SUFFIXES)) == ["T1w"]
    (run,) = collect_runs(layout, "01", filters={"suffix": ["T1w"]})
    assert run.prefix == "sub-01" and run.suffix == "T1w" and run.echo_times == (0.0081,)


def test_qmri_mp2rageme_layout_keeps_inv(tmp_path):
    """bids-examples qmri_mp2rageme: inv-1 with one echo, inv-2 with four; one sidecar per
    echo for both parts."""
    root = _root(tmp_path)
    _gre(root, "sub-1_inv-1", (0.003,), suffix="MP2RAGE", sub="1", shared_sidecar=True, b0=7)
    tes = (0.006, 0.0145, 0.023, 0.0315)
    _gre(root, "sub-1_inv-2", tes, suffix="MP2RAGE", sub="1", shared_sidecar=True, b0=7)
    layout = load_layout(root)
    assert collect_runs(layout, "1") == []
    assert other_gre_suffixes(layout, ["1"], list(SUFFIXES)) == ["MP2RAGE"]
    runs = collect_runs(layout, "1", filters={"suffix": ["MP2RAGE"]})
    assert [r.prefix for r in runs] == ["sub-1_inv-1", "sub-1_inv-2"]
    assert runs[1].echo_times == pytest.approx(tes) and runs[1].field_strength == 7
    # a filter on inv keeps the multi-echo inversion only
    (run,) = collect_runs(layout, "1", filters={"suffix": ["MP2RAGE"], "inv": 2})
    assert run.prefix == "sub-1_inv-2" and len(run.mag_files) == 4


def test_t2starw_layout_with_task(tmp_path):
    root = _root(tmp_path)
    _gre(root, "sub-01_task-rest", (0.005, 0.010, 0.015), suffix="T2starw")
    (run,) = collect_runs(load_layout(root), "01")  # T2starw is a default suffix
    assert run.prefix == "sub-01_task-rest" and run.suffix == "T2starw"


def test_derivative_entities_match_the_bids_schema():
    """The entities of NAME_ENTITIES that BIDS allows on both derivative anat maps
    (Chimap, R2starmap, ...) and masks are DERIVATIVE_ENTITIES; the rest go to .bidsignore."""
    schema = pytest.importorskip("bidsschematools.schema").load_schema()
    key_to_schema = {v["name"]: k for k, v in schema.objects.entities.items()}
    rules = schema.rules.files.deriv.imaging
    allowed = set(rules.anat_parametric_volumetric.entities) & set(rules.anat_mask.entities)
    assert "Chimap" in rules.anat_parametric_volumetric.suffixes
    ours = {ent for ent, key in NAME_ENTITIES.items() if key_to_schema[key] in allowed}
    assert ours == set(DERIVATIVE_ENTITIES)
    # NAME_ENTITIES is in the schema's filename order
    order = list(schema.rules.entities)
    positions = [order.index(key_to_schema[key]) for key in NAME_ENTITIES.values()]
    assert positions == sorted(positions)


def test_derived_names_keep_the_bids_entity_order(tmp_path):
    """Run names (NAME_ENTITIES order) and the entities the group level adds (space, seg)
    follow one BIDS order; a template-space Chimap is never taken for a run."""
    from qsmprep.reports.outputs import ENTITY_ORDER, add_entity, find_runs

    keys = list(NAME_ENTITIES.values())
    assert [k for k in ENTITY_ORDER if k in keys] == keys
    assert add_entity("sub-01_inv-2_chunk-1", "space", "MNI") == "sub-01_inv-2_space-MNI_chunk-1"
    assert add_entity("sub-01_task-rest", "space", "MNI") == "sub-01_task-rest_space-MNI"
    assert add_entity("sub-1_recording-x", "seg", "HOSPA") == "sub-1_recording-x_seg-HOSPA"
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for stem in ("sub-01_inv-2_chunk-1", add_entity("sub-01_inv-2_chunk-1", "space", "MNI")):
        (anat / f"{stem}_Chimap.nii.gz").write_bytes(b"")
    assert [r.stem for r in find_runs(tmp_path)] == ["sub-01_inv-2_chunk-1"]
