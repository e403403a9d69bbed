"""Adaptive U-Net vs plain U-Net vs TKD, RTS and TV on the same held-out phantoms, in one run.

Each case simulates a head phantom of the *test* split (phantom seeds from
``qsmprep.nn.synth.SPLIT_PHANTOM_SEEDS["test"]``, never used in training or validation)
with :func:`qsmprep.sim.simulate_megre` (built at 1 mm, box-averaged onto the case's
grid, B0 tilt written into the affine) and inverts its true local field (ppm) plus
Gaussian noise inside the brain mask. Every method sees the same field, mask, voxel size
and B0 direction; NRMSE (%), HFEN (%) and XSIM are computed inside the mask against the
box-averaged truth chi (:mod:`qsmprep.qsm.metrics`, both maps demeaned).

Cases (``--voxel-size V`` scales them):

- ``axial``: V x V x V mm, B0 along the third axis;
- ``oblique``: V x V x V mm, image tilted (25, 10) deg about (x, y): B0 ~27 deg off-axis;
- ``anisotropic``: V x V x 2V mm, axial.

Usage::

    python benchmarks/bench_dl_vs_classical.py --adaptive RUN_A/model.pt \\
        --plain RUN_P/model.pt [--voxel-size 1.0] [--phantom-seeds 2000 2001] \\
        [--noise-ppm 0.001] [--threads 2] [--out table.md] [--json results.json]

Without ``--adaptive``/``--plain`` the U-Net rows are left out. Prints a Markdown table,
then whether the adaptive U-Net beats RTS and TV (qsmprep's default inversion) on every
case and the plain U-Net on the oblique and anisotropic cases (the paper's claim).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft

from qsmprep.nn.synth import SPLIT_PHANTOM_SEEDS
from qsmprep.qsm import metrics
from qsmprep.qsm.inversion import invert
from qsmprep.qsm.sideinfo import SideInformation

CASES = {
    "axial": ((1.0, 1.0, 1.0), (0.0, 0.0)),
    "oblique": ((1.0, 1.0, 1.0), (25.0, 10.0)),
    "anisotropic": ((1.0, 1.0, 2.0), (0.0, 0.0)),
}
CLASSICAL = ("tkd", "rts", "tv")


def make_case(phantom, name: str, scale: float, noise_ppm: float, seed: int) -> dict:
    """Local field (+ noise), mask, truth and side information of one case."""
    from qsmprep.sim import simulate_megre

    vs, tilt = CASES[name]
    vs = tuple(v * scale for v in vs)
    sim = simulate_megre(
        phantom, echo_times=(0.02,), b0_tilt_deg=tilt, snr=None, voxel_size=vs, seed=seed
    )
    side = SideInformation.from_affine(sim.affine)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(sim.local_field_ppm.shape).astype(np.float32) * noise_ppm
    local = np.where(sim.mask, sim.local_field_ppm + noise, 0).astype(np.float32)
    return {"local": local, "mask": sim.mask, "truth": sim.chi, "side": side}


def score(chi: np.ndarray, case: dict) -> dict:
    """NRMSE (%), HFEN (%) and XSIM inside the case's mask."""
    t, m = case["truth"], case["mask"]
    return {
        "nrmse": metrics.nrmse(chi, t, m),
        "hfen": metrics.hfen(chi, t, m),
        "xsim": metrics.xsim(chi, t, m),
    }


def run(args: argparse.Namespace) -> list[dict]:
    """Every method on every case and phantom; one result dict per (phantom, case, method)."""
    from qsmprep.nn.inference import invert_adaptive_unet
    from qsmprep.nn.weights import load_model
    from qsmprep.sim import make_head_phantom

    models = {}
    if args.adaptive:
        models["adaptive-unet"] = load_model(args.adaptive)
    if args.plain:
        models["plain-unet"] = load_model(args.plain)
    for name, m in models.items():
        want = name == "adaptive-unet"
        if m.config["adaptive"] is not want:
            raise ValueError(f"the {name} model file has adaptive={m.config['adaptive']}")
    rows = []
    for pseed in args.phantom_seeds:
        phantom = make_head_phantom((1.0, 1.0, 1.0), seed=pseed)
        for case_name in args.cases:
            case = make_case(phantom, case_name, args.voxel_size, args.noise_ppm, pseed)
            vs, b0 = case["side"].voxel_size, case["side"].b0_direction
            shape = case["local"].shape
            print(
                f"phantom {pseed} {case_name}: {shape} voxels of {np.round(vs, 2)} mm, "
                f"B0 {case['side'].b0_angle_deg:.1f} deg off-axis",
                file=sys.stderr,
            )
            methods = [(m, None) for m in args.methods] + list(models.items())
            for method, model in methods:
                t0 = time.perf_counter()
                if model is None:
                    chi = invert(case["local"], case["mask"], vs, b0, method)
                else:
                    chi = invert_adaptive_unet(
                        case["local"], case["mask"], case["side"], model=model,
                        device=args.device, nthreads=args.threads,
                    )  # fmt: skip
                dt = time.perf_counter() - t0
                rec = {"phantom": pseed, "case": case_name, "method": method, "time_s": dt}
                rec.update(score(chi, case))
                rows.append(rec)
                print(
                    f"  {method:14s} NRMSE {rec['nrmse']:6.1f}  HFEN {rec['hfen']:6.1f}  "
                    f"XSIM {rec['xsim']:.3f}  {dt:6.1f} s",
                    file=sys.stderr,
                )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table, one row per (phantom, case, method)."""
    lines = [
        "| phantom | case | method | NRMSE % | HFEN % | XSIM | time s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['phantom']} | {r['case']} | {r['method']} | {r['nrmse']:.1f} | "
            f"{r['hfen']:.1f} | {r['xsim']:.3f} | {r['time_s']:.1f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """Does the adaptive U-Net beat RTS and TV (the CLI default) everywhere and the plain
    U-Net off-axis (NRMSE)?"""
    by = {(r["phantom"], r["case"], r["method"]): r["nrmse"] for r in rows}
    keys = sorted({(p, c) for p, c, _ in by})
    out = []
    for other, cases in (
        ("rts", None),
        ("tv", None),
        ("plain-unet", ("oblique", "anisotropic")),
    ):
        pairs = [
            (p, c)
            for p, c in keys
            if (p, c, "adaptive-unet") in by
            and (p, c, other) in by
            and (cases is None or c in cases)
        ]
        if not pairs:
            continue
        wins = [by[(p, c, "adaptive-unet")] < by[(p, c, other)] for p, c in pairs]
        detail = ", ".join(
            f"{c}@{p}: {by[(p, c, 'adaptive-unet')]:.1f} vs {by[(p, c, other)]:.1f}"
            for p, c in pairs
        )
        out.append(
            f"- adaptive U-Net beats {other} (NRMSE) on {sum(wins)}/{len(wins)} cases ({detail})"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adaptive", help="adaptive U-Net weights (model.pt)")
    parser.add_argument("--plain", help="plain U-Net weights (trained with --no-adaptive)")
    parser.add_argument("--voxel-size", type=float, default=1.0, help="case voxel scale (mm)")
    first = SPLIT_PHANTOM_SEEDS["test"]
    parser.add_argument("--phantom-seeds", type=int, nargs="+", default=[first])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="*", default=list(CLASSICAL), choices=CLASSICAL)
    parser.add_argument("--noise-ppm", type=float, default=0.001, help="field noise std (ppm)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch and FFT threads")
    parser.add_argument("--out", help="also write the Markdown table here")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    test_seeds = range(first, first + 1000)
    if any(s not in test_seeds for s in args.phantom_seeds):
        parser.error(f"phantom seeds must be test-split seeds ({first}..{first + 999})")
    with scipy.fft.set_workers(args.threads or 1):
        rows = run(args)
    text = table(rows)
    v = verdict(rows)
    text = f"{text}\n\n{v}\n" if v else f"{text}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
