"""Tissue table of the head phantom: labels, susceptibility, proton density and R2*.

Susceptibility ``chi`` is in ppm relative to water (CSF = 0), SI units. Proton density
``pd`` is relative to water (1.0). ``r2star`` is in 1/s at the reference field
:data:`R2STAR_REFERENCE_T` (3 T); :func:`qsmprep.sim.simulate_megre` scales it linearly
with field strength. Values are typical adult figures from the QSM and relaxometry
literature (e.g. the QSM challenge 2.0 head model, Deistung et al. 2013, Li et al. 2014),
rounded; see docs/phantom.md.

Deep grey nuclei are ellipsoids at MNI152 coordinates (mm, right hemisphere; mirrored to
the left), checked against the ICBM 2009 template that nilearn ships.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Field strength (T) at which the R2* values below hold.
R2STAR_REFERENCE_T = 3.0

#: Susceptibility of air relative to water (ppm, SI): +9.4.
CHI_AIR = 9.4


@dataclass(frozen=True)
class Tissue:
    """One tissue class: label, name, chi (ppm rel. water), PD (water = 1), R2* (1/s, 3 T)."""

    label: int
    name: str
    chi: float
    pd: float
    r2star: float


TISSUES: tuple[Tissue, ...] = (
    Tissue(0, "air", CHI_AIR, 0.0, 0.0),
    Tissue(1, "soft_tissue", 0.0, 0.75, 30.0),
    Tissue(2, "bone", -2.0, 0.05, 400.0),
    Tissue(3, "csf", 0.0, 1.0, 4.0),
    Tissue(4, "gm", 0.02, 0.8, 17.0),
    Tissue(5, "wm", -0.03, 0.7, 21.0),
    Tissue(6, "caudate", 0.06, 0.8, 20.0),
    Tissue(7, "putamen", 0.05, 0.8, 24.0),
    Tissue(8, "globus_pallidus", 0.18, 0.75, 40.0),
    Tissue(9, "thalamus", 0.01, 0.75, 20.0),
    Tissue(10, "red_nucleus", 0.12, 0.75, 33.0),
    Tissue(11, "substantia_nigra", 0.16, 0.75, 38.0),
    Tissue(12, "dentate_nucleus", 0.10, 0.75, 30.0),
    Tissue(13, "vein", 0.40, 0.8, 45.0),
    Tissue(14, "calcification", -1.5, 0.1, 200.0),
    Tissue(15, "sinus_air", CHI_AIR, 0.0, 0.0),
)

BY_NAME: dict[str, Tissue] = {t.name: t for t in TISSUES}

#: Label value -> tissue name.
LABEL_NAMES: dict[int, str] = {t.label: t.name for t in TISSUES}

#: The deep grey nuclei, in the order metrics report them.
DEEP_GREY: tuple[str, ...] = (
    "caudate",
    "putamen",
    "globus_pallidus",
    "thalamus",
    "red_nucleus",
    "substantia_nigra",
    "dentate_nucleus",
)

#: Range (ppm) from which each cortical vein's chi is drawn; dural sinuses use the table.
CORTICAL_VEIN_CHI = (0.30, 0.45)

#: Deep and internal cerebral veins (ppm).
DEEP_VEIN_CHI = 0.35


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoidal structure: centre (MNI mm), semi-axes (mm, x y z) and yaw about z (deg).

    ``bilateral`` structures are given for the right hemisphere (x > 0) and mirrored.
    """

    tissue: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    yaw_deg: float = 0.0
    bilateral: bool = True


#: Deep grey nuclei, painted in this order (later ones win where they touch).
NUCLEI: tuple[Ellipsoid, ...] = (
    Ellipsoid("thalamus", (11.0, -18.0, 7.0), (8.0, 13.0, 8.0)),
    Ellipsoid("caudate", (13.0, 12.0, 10.0), (4.5, 10.0, 8.0)),
    Ellipsoid("putamen", (25.0, 2.0, 0.0), (5.0, 14.0, 9.0)),
    Ellipsoid("globus_pallidus", (18.0, -4.0, 0.0), (3.5, 8.0, 5.0)),
    Ellipsoid("substantia_nigra", (11.0, -17.0, -11.0), (3.0, 7.0, 2.5), yaw_deg=35.0),
    Ellipsoid("red_nucleus", (5.0, -19.0, -8.0), (3.5, 3.5, 3.5)),
    Ellipsoid("dentate_nucleus", (14.0, -57.0, -34.0), (6.0, 8.0, 5.0)),
)

#: Air-filled cavities (label ``sinus_air``), each inside a bony wall of
#: :data:`SINUS_WALL_MM`: frontal, sphenoid, ethmoid and maxillary sinuses, mastoid cells.
SINUSES: tuple[Ellipsoid, ...] = (
    Ellipsoid("sinus_air", (0.0, 80.0, 8.0), (13.0, 5.0, 9.0), bilateral=False),
    Ellipsoid("sinus_air", (0.0, 14.0, -38.0), (10.0, 11.0, 8.0), bilateral=False),
    Ellipsoid("sinus_air", (0.0, 42.0, -30.0), (6.0, 15.0, 7.0), bilateral=False),
    Ellipsoid("sinus_air", (27.0, 40.0, -52.0), (11.0, 14.0, 13.0)),
    Ellipsoid("sinus_air", (55.0, -32.0, -42.0), (7.0, 9.0, 8.0)),
)

#: Bone wall around each air cavity (mm).
SINUS_WALL_MM = 3.0

#: Soft tissue of the face (below and in front of the frontal lobes), MNI mm.
FACE = Ellipsoid("soft_tissue", (0.0, 38.0, -52.0), (56.0, 54.0, 42.0), bilateral=False)

#: Layers outside the brain envelope (mm): CSF/dura, skull, scalp.
CSF_MM = 2.5
BONE_MM = 6.0
SCALP_MM = 5.5
