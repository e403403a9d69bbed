"""Benchmark background field removal on the simulated head: V-SHARP, PDF, LBV, iSMV.

    python benchmarks/bench_bgremove.py [--preset 1mm|2mm|small] [--threads N]
        [--b0-tilt-deg TX TY] [--methods vsharp pdf lbv ismv] [--json results.json]

The phantom (``qsmprep.sim``) gives the total field (ppm, 2nd-order shimmed) and the true
local field (the field of the sources inside the brain mask). Every method gets the same
total field inside the brain mask, in its own subprocess, with its default parameters,
and reports its wall time and peak resident memory (``VmHWM``), also as the part above
the resident memory once libraries and inputs are loaded ("extra"). LBV's numba code is
compiled (or loaded from its cache) by a warm-up call on a small grid before the timed
call; the warm-up is reported separately.

Accuracy: NRMSE (%) of the local field against the truth, both demeaned, (a) inside the
mask each method returns (they erode by different amounts) and (b) inside the
intersection of all returned masks, where the methods compare like for like. The
share of the background field left in the result (least-squares coefficient; 1 = none
removed) is shown as well.

Oblique B0 (``--b0-tilt-deg``): the phantom's fields come from qsmprep's discrete
dipole kernel, whose fields outside the sources are harmonic on the grid for any B0
direction (``benchmarks/bench_dipole_kernel.py``), so the SMV/Laplacian methods can be
compared on tilted data too.

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

METHODS = ("vsharp", "pdf", "lbv", "ismv")


def _simulate(preset: str, seed: int, tilt: tuple[float, float]) -> dict:
    phantom, b0, total, local = head_fields(preset, seed, tilt)
    mask = phantom.brain_mask
    return {
        "total": np.where(mask, total, 0).astype(np.float32),
        "local": np.where(mask, local, 0).astype(np.float32),
        "mask": mask,
        "voxel_size": np.asarray(phantom.voxel_size),
        "b0_dir": np.asarray(b0),
    }


def _worker(method: str, workdir: Path, threads: int) -> None:
    """Run ``method`` on the saved inputs; save its output; print a JSON line."""
    from qsmprep.qsm.bgremove import remove_background

    total, mask, vs, b0 = load_inputs(workdir, "total")
    noise, small = warmup_volume(32)
    (local, used), stats = timed(
        lambda: remove_background(total, mask, vs, method, b0_dir=b0),
        lambda: remove_background(noise, small, vs, method, b0_dir=b0),
        threads,
    )
    np.save(workdir / f"{method}_local.npy", local)
    np.save(workdir / f"{method}_mask.npy", used)
    print(json.dumps(stats))


def _background_left(est: np.ndarray, background: np.ndarray, m: np.ndarray) -> float:
    e = est[m] - est[m].mean()
    b = background[m] - background[m].mean()
    return float(np.dot(e, b) / np.dot(b, b))


def main(argv: list[str] | None = None) -> int:
    from qsmprep.qsm.metrics import nrmse

    p = stage_parser(__doc__.split("\n")[0], METHODS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]), args.threads)
        return 0

    t0 = time.perf_counter()
    data = _simulate(args.preset, args.seed, tuple(args.b0_tilt_deg))
    sim_s = time.perf_counter() - t0
    mask, truth = data["mask"], data["local"]
    background = data["total"] - truth
    results = run_methods(
        __file__, data, "total", args.methods, args.threads, outputs=("local", "mask")
    )
    common = np.logical_and.reduce([r["mask"] for r in results.values()])

    grid = grid_text(mask.shape, data["voxel_size"], data["b0_dir"])
    print(
        f"\nBackground removal on the {args.preset} head phantom ({grid}, "
        f"{int(mask.sum())} brain voxels; simulated in {sim_s:.1f} s), "
        f"{args.threads} FFT thread(s), {os.cpu_count()} CPU(s)\n"
    )
    print(
        "| method | wall (s) | warm-up (s) | peak RSS (MB) | extra (MB) | mask (% of brain) "
        "| NRMSE own mask (%) | NRMSE common mask (%) | background left |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = {}
    for method, r in results.items():
        row = {
            "wall_s": r["wall_s"],
            "warmup_s": r["warmup_s"],
            "peak_mb": r["peak_mb"],
            "extra_mb": r["extra_mb"],
            "mask_pct": 100 * r["mask"].sum() / mask.sum(),
            "nrmse_own": nrmse(r["local"], truth, r["mask"]),
            "nrmse_common": nrmse(r["local"], truth, common),
            "background_left": _background_left(r["local"], background, common),
        }
        table[method] = row
        print(
            f"| {method} | {row['wall_s']:.2f} | {row['warmup_s']:.2f} | {row['peak_mb']:.0f} "
            f"| {row['extra_mb']:.0f} | {row['mask_pct']:.1f} | {row['nrmse_own']:.1f} "
            f"| {row['nrmse_common']:.1f} | {row['background_left']:+.4f} |"
        )
    print(f"\nCommon mask: {100 * common.sum() / mask.sum():.1f} % of the brain.")
    if args.json:
        meta = {"preset": args.preset, "shape": list(mask.shape), "threads": args.threads}
        args.json.write_text(json.dumps({"meta": meta, "methods": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
