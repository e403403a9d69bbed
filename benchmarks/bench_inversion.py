"""Benchmark dipole inversion on the simulated head: TKD, RTS, TV-ADMM, iLSQR side by side.

    python benchmarks/bench_inversion.py [--preset 1mm|2mm|small] [--threads N]
        [--b0-tilt-deg TX TY] [--noise PPM] [--methods tkd rts tv ilsqr] [--json FILE]

Input is the phantom's true local field (``qsmprep.sim.simulate_fields``: the field of
the sources inside the brain mask, ppm), optionally with Gaussian noise of ``--noise``
ppm, inside the brain mask. Every method runs in its own subprocess with its default
parameters and reports wall time and peak resident memory (``VmHWM``), also as the part
above the resident memory once libraries and inputs are loaded ("extra"). Numba code is
compiled (or loaded from its cache) by a warm-up call on a small grid first; the warm-up
is reported separately.

Accuracy against the true chi inside the brain mask, both maps demeaned
(:mod:`qsmprep.qsm.metrics`): NRMSE and HFEN (%), XSIM, deep-grey-matter linearity
``|1 - slope|`` over the nuclei, and the calcification streak metric.

Prints a markdown table. Timings depend on the machine and its load; compare methods
within one run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from _common import (
    grid_text,
    head_fields,
    load_inputs,
    run_methods,
    stage_parser,
    timed,
    warmup_volume,
)

METHODS = ("tkd", "rts", "tv", "ilsqr")


def simulate(preset: str, seed: int, tilt: tuple[float, float], noise: float) -> dict:
    """The phantom's local field (ppm) and truth on the preset grid."""
    from qsmprep.sim import DEEP_GREY

    phantom, b0, _, local = head_fields(preset, seed, tilt)
    mask = phantom.brain_mask
    if noise > 0:
        local = local + noise * np.random.default_rng(seed).standard_normal(local.shape)
    labels = np.zeros(phantom.shape, np.int16)
    for i, name in enumerate(DEEP_GREY, start=1):
        labels[phantom.roi(name) & mask] = i
    return {
        "local": np.where(mask, local, 0).astype(np.float32),
        "chi": np.where(mask, phantom.chi, 0).astype(np.float32),
        "mask": mask,
        "dgm": labels,
        "calc": phantom.roi("calcification") & mask,
        "voxel_size": np.asarray(phantom.voxel_size),
        "b0_dir": np.asarray(b0),
    }


def _worker(method: str, workdir: Path, threads: int) -> None:
    """Invert the saved field with ``method``; save chi; print a JSON line of stats."""
    from qsmprep.qsm.inversion import invert

    local, mask, vs, b0 = load_inputs(workdir, "local")
    noise, small = warmup_volume(24)
    chi, stats = timed(
        lambda: invert(local, mask, vs, b0, method),
        lambda: invert(noise, small, vs, b0, method),
        threads,
    )
    np.save(workdir / f"{method}_chi.npy", chi)
    print(json.dumps(stats))


def accuracy(chi: np.ndarray, data: dict) -> dict:
    """NRMSE, HFEN, XSIM, DGM linearity and calcification streak of ``chi``."""
    from qsmprep.qsm import metrics

    truth, mask = data["chi"], data["mask"]
    row = {
        "nrmse": metrics.nrmse(chi, truth, mask),
        "hfen": metrics.hfen(chi, truth, mask),
        "xsim": metrics.xsim(chi, truth, mask),
        "dgm": metrics.dgm_linearity(chi, truth, data["dgm"]),
        "calc_streak": float("nan"),
    }
    if data["calc"].any():
        row["calc_streak"] = metrics.calc_streak(chi, truth, data["calc"], mask)
    return row


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__.split("\n")[0], METHODS)
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise (ppm) on the field")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]), args.threads)
        return 0

    t0 = time.perf_counter()
    data = simulate(args.preset, args.seed, tuple(args.b0_tilt_deg), args.noise)
    sim_s = time.perf_counter() - t0
    table = run_methods(__file__, data, "local", args.methods, args.threads, outputs=("chi",))
    for stats in table.values():
        stats.update(accuracy(stats.pop("chi"), data))

    mask = data["mask"]
    grid = grid_text(mask.shape, data["voxel_size"], data["b0_dir"])
    print(
        f"\nDipole inversion on the {args.preset} head phantom ({grid}, "
        f"{int(mask.sum())} brain voxels, field noise {args.noise:g} ppm; simulated in "
        f"{sim_s:.1f} s), {args.threads} thread(s), {os.cpu_count()} CPU(s)\n"
    )
    print(
        "| method | wall (s) | warm-up (s) | peak RSS (MB) | extra (MB) | NRMSE (%) "
        "| HFEN (%) | XSIM | DGM |1-slope| | calc streak |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, r in table.items():
        print(
            f"| {method} | {r['wall_s']:.2f} | {r['warmup_s']:.2f} | {r['peak_mb']:.0f} "
            f"| {r['extra_mb']:.0f} | {r['nrmse']:.1f} | {r['hfen']:.1f} | {r['xsim']:.3f} "
            f"| {r['dgm']:.3f} | {r['calc_streak']:.3f} |"
        )
    if args.json:
        meta = {
            "preset": args.preset,
            "shape": list(mask.shape),
            "threads": args.threads,
            "noise_ppm": args.noise,
            "b0_dir": data["b0_dir"].tolist(),
        }
        args.json.write_text(json.dumps({"meta": meta, "methods": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
