"""A small TemplateFlow folder for tests, built offline.

- the template T1w and brain mask: nilearn's bundled ICBM152 2009 T1 (1 mm), averaged
  into 2 mm voxels (res-02), and its brain mask (T1 above 0.2 of its maximum, as nilearn's
  ``load_mni152_brain_mask`` makes it);
- the atlas: the deep grey nuclei of qsmprep's head phantom (thalamus, caudate, putamen,
  globus pallidus; MNI coordinates, docs/phantom.md), labelled with the Harvard-Oxford
  subcortical values of :data:`qsmprep.group.templates.DEEP_GREY_LABELS` (left: x < 0).
  Its ROIs are where the phantom's nuclei are, so ROI means can be checked against the
  phantom's known values.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nb
import numpy as np

from qsmprep.group.templates import FILES, TEMPLATE

#: Phantom nucleus -> (left, right) Harvard-Oxford subcortical label.
NUCLEUS_LABELS = {
    "thalamus": (4, 15),
    "caudate": (5, 16),
    "putamen": (6, 17),
    "globus_pallidus": (7, 18),
}


def make_templateflow_home(root: Path) -> Path:
    """Write the group level's three template files under ``root``; return ``root``."""
    from qsmprep.sim import make_head_phantom

    folder = Path(root) / f"tpl-{TEMPLATE}"
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0])
    t1 = nb.load(data / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    a = np.asarray(t1.dataobj, np.float32)
    a = a / a.max()
    shape = tuple(n // 2 for n in a.shape)
    a = a[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]]
    t2 = a.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5))
    affine = t1.affine.copy()
    affine[:3, 3] += 0.5 * np.diag(affine)[:3]
    affine[:3, :3] *= 2
    nb.save(nb.Nifti1Image(t2 * 100, affine), folder / FILES["T1w"][0])
    nb.save(nb.Nifti1Image((t2 > 0.2).astype(np.uint8), affine), folder / FILES["mask"][0])
    ph = make_head_phantom((1.0, 1.0, 1.0), seed=0)
    atlas = np.zeros(ph.shape, np.int16)
    x_mm = ph.affine[0, 0] * np.arange(ph.shape[0]) + ph.affine[0, 3]  # axial grid
    left = (x_mm < 0)[:, None, None]
    for name, (lab_left, lab_right) in NUCLEUS_LABELS.items():
        roi = ph.roi(name)
        atlas[roi & left] = lab_left
        atlas[roi & ~left] = lab_right
    nb.save(nb.Nifti1Image(atlas, ph.affine), folder / FILES["atlas"][0])
    return Path(root)
