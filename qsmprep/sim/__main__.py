"""Command line: ``python -m qsmprep.sim OUT_BIDS [options]`` writes a simulated dataset.

Prints the BIDS root, the truth directory and the runs written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .bids import PRESETS, SubjectSpec, write_bids_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qsmprep.sim",
        description="Write a simulated multi-echo GRE BIDS dataset of the qsmprep head "
        "phantom; the ground truth goes to a separate directory.",
    )
    p.add_argument("out", help="BIDS root to create (must be absent or empty)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--subjects", type=int, default=1, help="number of subjects (default 1)")
    p.add_argument("--truth-dir", help="truth directory (default OUT-truth beside OUT)")
    tilt = p.add_mutually_exclusive_group()
    tilt.add_argument(
        "--oblique", type=float, metavar="DEG", help="tilt the image axes DEG about x"
    )
    tilt.add_argument(
        "--tilt", type=float, nargs=2, metavar=("TX", "TY"), help="tilts about x and y (deg)"
    )
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("X", "Y", "Z"), help="mm")
    p.add_argument("--echo-times", type=float, nargs="+", metavar="TE", help="seconds")
    p.add_argument("--field-strength", type=float, default=3.0, help="tesla (default 3)")
    p.add_argument(
        "--no-field-strength",
        action="store_true",
        help="leave MagneticFieldStrength out of the sidecars",
    )
    p.add_argument("--phase-units", choices=("rad", "siemens"), default="rad")
    p.add_argument("--snr", type=float, default=50.0, help="0 for no noise (default 50)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.subjects < 1:
        print("error: --subjects must be at least 1", file=sys.stderr)
        return 64
    tilt = (args.oblique, 0.0) if args.oblique is not None else tuple(args.tilt or (0.0, 0.0))
    specs = [
        SubjectSpec(
            label=f"{i + 1:02d}",
            voxel_size=tuple(args.voxel_size) if args.voxel_size else None,
            b0_tilt_deg=tilt,
            echo_times=tuple(args.echo_times) if args.echo_times else None,
            field_strength=args.field_strength,
            write_field_strength=not args.no_field_strength,
            phase_units=args.phase_units,
            snr=args.snr if args.snr > 0 else None,
        )
        for i in range(args.subjects)
    ]
    start = time.perf_counter()
    try:
        info = write_bids_dataset(
            args.out, specs, preset=args.preset, truth_dir=args.truth_dir, seed=args.seed
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"BIDS dataset: {info.root}")
    print(f"ground truth: {info.truth_dir}  (index: {info.truth_dir / 'runs.json'})")
    for r in info.runs:
        print(f"  {r.prefix}: {len(r.echo_times)} echo(es)")
    print(f"written in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
