"""Reading images: the one-shot gzip reader and parallel loading."""

from __future__ import annotations

import gzip

import nibabel as nb
import numpy as np
import pytest

from qsmprep.interfaces._io import ImageReadError, load, load_many, read_image


def _image(seed: int = 0, scaled: bool = False) -> nb.Nifti1Image:
    data = np.random.default_rng(seed).normal(size=(7, 6, 5)).astype(np.float32)
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    affine[:3, 3] = (-3, 4, 5)
    img = nb.Nifti1Image(data if not scaled else (data * 1000).astype(np.int16), affine)
    if scaled:
        img.header.set_slope_inter(0.001, 0.5)
    return img


@pytest.mark.parametrize("scaled", [False, True])
def test_read_image_matches_nibabel(tmp_path, scaled):
    path = tmp_path / "a.nii.gz"
    nb.save(_image(scaled=scaled), path)
    ours, theirs = read_image(path), nb.load(path)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    assert ours.header.get_data_dtype() == theirs.header.get_data_dtype()


def test_read_image_several_gzip_members_and_other_formats(tmp_path):
    plain = tmp_path / "a.nii"
    nb.save(_image(), plain)
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"  # as bgzip or `cat a.gz b.gz` write them
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    nifti2 = tmp_path / "b.nii.gz"
    nb.save(nb.Nifti2Image(np.asarray(_image().dataobj), _image().affine), nifti2)
    expected = np.asarray(_image().dataobj)
    for path in (plain, multi, nifti2):
        np.testing.assert_array_equal(np.asarray(read_image(path).dataobj), expected)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "sub-01_echo-1_part-mag_MEGRE.nii.gz"
    nb.save(_image(), path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageReadError, match="sub-01_echo-1_part-mag_MEGRE.nii.gz cannot be read"):
        load(str(path))


def test_load_many_in_threads_keeps_the_order(tmp_path):
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.nii.gz"))
        nb.save(_image(seed=i), paths[-1])
    one = load_many(paths, threads=1)
    two = load_many(paths, threads=2)
    for (a, _), (b, _), i in zip(one, two, range(5), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, np.asarray(_image(seed=i).dataobj))


def test_report_images_are_read_once_while_unchanged(tmp_path):
    import os

    from qsmprep.reports.outputs import load_image, preload

    path = tmp_path / "a.nii.gz"
    nb.save(_image(seed=1), path)
    preload([path, None, tmp_path / "missing.nii.gz"])
    assert load_image(path) is load_image(path)
    nb.save(_image(seed=2), path)
    os.utime(path, ns=(0, 10**18))  # a new mtime even on a coarse clock
    np.testing.assert_array_equal(
        np.asarray(load_image(path).dataobj), np.asarray(_image(seed=2).dataobj)
    )
