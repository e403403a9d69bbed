"""The whole-pipeline benchmark reads the stage times of qsmprep's log and the peer's output."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import bench_pipeline  # noqa: E402

QSMPREP_LOG = """\
04:04:56 qsmprep sub_01: phase-offset removal (MCPC-3D-S) ...
04:04:59 qsmprep sub_01: phase-offset removal (MCPC-3D-S) done in 2.8 s
04:05:01 qsmprep sub_01: phase unwrapping (romeo, 4 echoes) done in 2.0 s
04:05:02 qsmprep sub_01: echo fit done in 0.7 s
04:05:05 qsmprep sub_01: masking (quality) done in 0.4 s
04:05:09 qsmprep sub_01: field reliability done in 2.9 s
04:05:37 qsmprep sub_01: background field removal (pdf) done in 27.3 s
04:05:59 qsmprep sub_01: dipole inversion (tv) done in 20.4 s
04:06:09 qsmprep sub-01: done in 87 s
"""

PEER_OUTPUT = """\
dims (180, 220, 180) voxel (1.0, 1.0, 1.0) TEs [0.004, 0.008] B0 3 T  b0dir (0.0, 0.0, 1.0)
mask: 2672813 voxels (2.83s)
field mapping: 15.40s
background removal Vsharp: 15.53s
dipole inversion Rts: 14.06s
total: 57.64s -> /tmp/qsmrs-1mm/Chimap.nii
"""


def test_stage_times_group_qsmprep_and_peer_stages_alike():
    ours = bench_pipeline.stage_times(QSMPREP_LOG, peer=False)
    assert ours == {
        "field mapping": 2.8 + 2.0 + 0.7,
        "mask": 0.4 + 2.9,
        "background removal": 27.3,
        "dipole inversion": 20.4,
    }
    peer = bench_pipeline.stage_times(PEER_OUTPUT, peer=True)
    assert peer == {
        "field mapping": 15.40,
        "mask": 2.83,
        "background removal": 15.53,
        "dipole inversion": 14.06,
    }
    table = bench_pipeline.stage_table(
        {"stages": ours, "wall_s": 100.0, "peak_tree_gb": 1.5},
        {"stages": peer, "wall_s": 60.0, "peak_tree_gb": 2.8},
    )
    rest = next(line for line in table if line.startswith("| the rest"))
    assert rest.endswith(f"| {100 - sum(ours.values()):.1f} | {60 - sum(peer.values()):.1f} |")
