"""Phantom generator: an MNI152 head phantom, multi-echo GRE simulation, BIDS writer.

>>> from qsmprep.sim import make_head_phantom, simulate_megre, write_bids_dataset, SubjectSpec
>>> ph = make_head_phantom(voxel_size=(1.0, 1.0, 1.0), seed=0)       # doctest: +SKIP
>>> sig = simulate_megre(ph, echo_times=(0.004, 0.008), b0_tilt_deg=(20, 0))  # doctest: +SKIP
>>> info = write_bids_dataset("/tmp/ds", [SubjectSpec("01")], preset="small")  # doctest: +SKIP

Units follow docs/architecture.md: chi and local/background fields in ppm (chi relative
to water), total field in Hz, phase in rad, echo times in s, R2* in 1/s, voxel sizes in
mm. See docs/phantom.md for the tissue table and how oblique and anisotropic data are made.
"""

from .bids import (
    PRESETS,
    DatasetInfo,
    RunInfo,
    SubjectSpec,
    load_dataset_info,
    simulation_voxel_size,
    write_bids_dataset,
)
from .phantom import HeadPhantom, make_head_phantom
from .signal import MegreSimulation, simulate_fields, simulate_megre, tilt_rotation, tilted_affine
from .tissues import DEEP_GREY, LABEL_NAMES, TISSUES

__all__ = [
    "DEEP_GREY",
    "LABEL_NAMES",
    "PRESETS",
    "TISSUES",
    "DatasetInfo",
    "HeadPhantom",
    "MegreSimulation",
    "RunInfo",
    "SubjectSpec",
    "load_dataset_info",
    "make_head_phantom",
    "simulate_fields",
    "simulate_megre",
    "simulation_voxel_size",
    "tilt_rotation",
    "tilted_affine",
    "write_bids_dataset",
]
