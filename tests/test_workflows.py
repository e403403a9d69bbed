"""Workflow factories and interfaces: embedding, phase scaling, grid checks, the sink."""

import json

import nibabel as nb
import numpy as np
import pytest

from qsmprep.qsm.dipole import forward_field
from qsmprep.qsm.phase import ppm_to_hz

TES = (0.005, 0.010, 0.015)


def _sphere_phantom(folder, n=40, vs=2.0, b0=3.0, seed=0):
    """Ellipsoidal 'brain' with a +0.2 and a -0.1 ppm sphere and an air box outside it.

    Writes one magnitude and one phase NIfTI per echo; returns the files and the truth.
    """
    g = (np.arange(n) - n / 2 + 0.5) * vs
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    brain = (x / 30) ** 2 + (y / 34) ** 2 + (z / 28) ** 2 < 1
    chi = np.zeros((n, n, n), np.float32)
    chi[(x - 10) ** 2 + y**2 + z**2 < 8**2] = 0.2
    chi[(x + 10) ** 2 + (y - 6) ** 2 + z**2 < 6**2] = -0.1
    air = (np.abs(x) < 12) & (y < -36) & (np.abs(z) < 12)
    field_hz = ppm_to_hz(forward_field(chi + 9.0 * air, (vs,) * 3, (0, 0, 1)), b0)
    affine = np.diag([vs, vs, vs, 1.0])
    affine[:3, 3] = -n * vs / 2
    rng = np.random.default_rng(seed)
    mags, phases = [], []
    for i, te in enumerate(TES, 1):
        signal = brain * np.exp(-te * 25.0)
        phase = 2 * np.pi * field_hz * te + 0.4 * np.sin(x / 40)  # smooth phase offset
        noise = rng.standard_normal((2, *signal.shape)) * 0.01
        zc = signal * np.exp(1j * phase) + noise[0] + 1j * noise[1]
        for part, data, out in (("mag", np.abs(zc), mags), ("phase", np.angle(zc), phases)):
            path = folder / f"echo-{i}_part-{part}.nii.gz"
            nb.save(nb.Nifti1Image(data.astype(np.float32), affine), path)
            out.append(str(path))
    return mags, phases, chi, affine


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return _sphere_phantom(tmp_path_factory.mktemp("phantom"))


def test_embed_init_qsm_wf_in_a_user_workflow(phantom, tmp_path):
    mags, phases, chi_true, affine = phantom
    # --- the embedding shown in README.md ---
    from nipype.interfaces.io import DataSink
    from nipype.pipeline import engine as pe

    from qsmprep.workflows import init_qsm_wf

    wf = pe.Workflow(name="my_pipeline", base_dir=str(tmp_path / "work"))
    qsm_wf = init_qsm_wf()  # qsmprep's defaults
    qsm_wf.inputs.inputnode.mag_files = mags  # ordered by echo
    qsm_wf.inputs.inputnode.phase_files = phases
    qsm_wf.inputs.inputnode.echo_times = [0.005, 0.010, 0.015]  # seconds
    qsm_wf.inputs.inputnode.field_strength = 3.0  # tesla
    sink = pe.Node(DataSink(base_directory=str(tmp_path / "results")), name="sink")
    wf.connect(qsm_wf, "outputnode.chi_map", sink, "qsm.@chi")
    wf.connect(qsm_wf, "outputnode.mask", sink, "qsm.@mask")
    wf.run()
    # --- end of the embedding ---
    (chi_file,) = (tmp_path / "results" / "qsm").glob("chi_ppm.nii")
    (mask_file,) = (tmp_path / "results" / "qsm").glob("mask_chi.nii")
    img = nb.load(chi_file)
    assert img.shape == chi_true.shape
    np.testing.assert_allclose(img.affine, affine)
    chi = img.get_fdata()
    mask = nb.load(mask_file).get_fdata() > 0
    assert mask.sum() > 0.3 * (chi_true.size * np.pi / 6 * 0.8)  # most of the ellipsoid
    assert np.all(chi[~mask] == 0)
    assert abs(chi[mask].mean()) < 1e-5  # referenced to the mean in the mask
    # The map follows the truth: strong correlation, and both spheres with the right sign
    # and at least half their contrast (2 mm voxels, 4-voxel radius spheres).
    assert np.corrcoef(chi[mask], chi_true[mask])[0, 1] > 0.75
    g = (np.arange(40) - 20 + 0.5) * 2.0
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    pos = (x - 10) ** 2 + y**2 + z**2 < 5**2
    neg = (x + 10) ** 2 + (y - 6) ** 2 + z**2 < 4**2
    ref = chi_true[mask].mean()
    assert chi[pos].mean() > 0.5 * (0.2 - ref)
    assert chi[neg].mean() < 0.5 * (-0.1 - ref)


def _run_node(interface, tmp_path):
    """Run an interface in its own folder; its exceptions propagate unwrapped."""
    import os

    tmp_path.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return interface.run().outputs
    finally:
        os.chdir(cwd)


def test_prepare_echoes_scales_integer_phase_and_writes_side_info(tmp_path):
    from qsmprep.interfaces import PrepareEchoes

    rng = np.random.default_rng(1)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([1.0, 1.0, 2.0])
    rad = rng.uniform(-np.pi, np.pi, (2, 6, 6, 4)).astype(np.float32)
    mags, phases = [], []
    for e in range(2):
        stored = np.round(rad[e] * 4096 / np.pi).clip(-4096, 4095).astype(np.int16)
        for name, data, out in (("mag", np.ones((6, 6, 4), np.float32), mags),
                                ("phase", stored, phases)):  # fmt: skip
            path = tmp_path / f"e{e}_{name}.nii.gz"
            nb.save(nb.Nifti1Image(data, affine), path)
            out.append(str(path))
    res = _run_node(
        PrepareEchoes(
            mag_files=mags, phase_files=phases, echo_times=[0.004, 0.008], phase_units="arbitrary"
        ),
        tmp_path,
    )
    phase = nb.load(res.out_phase).get_fdata()
    assert phase.shape == (6, 6, 4, 2)
    np.testing.assert_allclose(np.moveaxis(phase, -1, 0), rad, atol=np.pi / 4096 + 1e-6)
    assert "4096" in res.phase_scaling
    side = json.loads(open(res.side_info).read())
    assert side == {"VoxelSize": [1.0, 1.0, 2.0], "B0Direction": [0.0, 0.0, 1.0]}
    np.testing.assert_allclose(nb.load(res.out_mag).affine, affine)


def test_prepare_echoes_refuses_mismatched_grids(tmp_path):
    from qsmprep.interfaces import PrepareEchoes

    a = tmp_path / "a.nii.gz"
    b = tmp_path / "b.nii.gz"
    nb.save(nb.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), a)
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 5), np.float32), np.eye(4)), b)
    node = PrepareEchoes(mag_files=[str(a)], phase_files=[str(b)], echo_times=[0.01])
    with pytest.raises(ValueError, match=r"b.nii.gz has shape \(4, 4, 5\) but a.nii.gz"):
        _run_node(node, tmp_path)
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([1, 1, 1.5, 1])), b)
    with pytest.raises(ValueError, match="different affines"):
        _run_node(node, tmp_path / "2")
    node = PrepareEchoes(mag_files=[str(a)], phase_files=[str(a)], echo_times=[0.01, 0.02])
    with pytest.raises(ValueError, match="one of each per echo"):
        _run_node(node, tmp_path / "3")


def test_sink_writes_atomically_and_overwrites(tmp_path):
    from qsmprep.interfaces import DerivativesSink

    src = tmp_path / "in.nii.gz"
    nb.save(nb.Nifti1Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4)), src)
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"VoxelSize": [1, 1, 1], "B0Direction": [0, 0, 1]}))
    out_dir = tmp_path / "out"
    for units in ("ppm", "Hz"):
        res = _run_node(
            DerivativesSink(
                in_file=str(src),
                base_directory=str(out_dir),
                out_path="sub-01/anat/sub-01_Chimap.nii.gz",
                metadata={"Units": units},
                side_info=str(side),
            ),
            tmp_path / units,
        )
    meta = json.loads(open(res.out_meta).read())
    assert meta == {"Units": "Hz", "SideInformation": {"VoxelSize": [1, 1, 1],
                                                       "B0Direction": [0, 0, 1]}}  # fmt: skip
    np.testing.assert_array_equal(nb.load(res.out_file).get_fdata(), nb.load(src).get_fdata())
    assert sorted(p.name for p in (out_dir / "sub-01" / "anat").iterdir()) == [
        "sub-01_Chimap.json",
        "sub-01_Chimap.nii.gz",
    ]  # no temporary files left behind
    bad = DerivativesSink(in_file=str(src), base_directory=str(out_dir), out_path="../x.nii.gz")
    with pytest.raises(ValueError, match="relative .nii.gz path"):
        _run_node(bad, tmp_path / "bad")


def test_method_record_lists_the_defaults():
    from qsmprep.workflows.base import method_record

    rec = method_record("inversion", "tkd")
    assert rec == {"Method": "tkd", "Parameters": {**rec["Parameters"], "threshold": 0.15}}
    json.dumps(method_record("bf_removal", "vsharp"))  # serialisable
    threshold = method_record("masking", "threshold")["Parameters"]
    assert threshold["erode"] == 1 and threshold["factor"] == 8.0
    assert method_record("masking", "quality")["Parameters"]["threshold"] is None  # Otsu


def test_quality_masking_runs_after_romeo():
    from qsmprep.workflows import init_qsm_wf

    with pytest.raises(ValueError, match="unwrapping romeo"):
        init_qsm_wf(unwrapping="laplacian", masking="quality", bf_removal="vsharp",
                    inversion="tkd")  # fmt: skip
    wf = init_qsm_wf(unwrapping="romeo", masking="quality", bf_removal="vsharp", inversion="tkd")
    edges = {(u.name, v.name) for u, v in wf._graph.edges()}
    assert ("field_map", "brain_mask") in edges and ("brain_mask", "field_map") not in edges
    wf = init_qsm_wf(unwrapping="romeo", masking="threshold", bf_removal="vsharp", inversion="tkd")
    edges = {(u.name, v.name) for u, v in wf._graph.edges()}
    assert ("brain_mask", "field_map") in edges
