"""Benchmark phase unwrapping on the simulated head: ROMEO vs scikit-image vs Laplacian.

    python benchmarks/bench_unwrap.py [--preset 1mm|2mm|small] [--snr 50] [--threads N]

The phantom (``qsmprep.sim``) is simulated without a phase offset, so the true unwrapped
phase of echo ``e`` is ``2 pi f TE_e``. Each method runs in its own subprocess on the
same wrapped phase, magnitude and brain mask, and reports its wall time and peak
resident memory (``VmHWM``) and the part of it above the resident memory once the
libraries and inputs are loaded ("extra").
A voxel counts as unwrapped right when ``|unwrapped - truth - 2 pi k| < pi``, with ``k``
the most common multiple over the brain for that echo (one global 2 pi k per echo is not
an error). ROMEO's numba compilation (or cache load) runs before the timed call and is
reported separately.

Prints a markdown table. Timings depend on the machine and its load; compare methods
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import PRESETS, run_worker, status_mb

METHODS = ("romeo", "skimage", "laplacian")
ECHO_TIMES = (0.004, 0.008, 0.012, 0.016)


def _simulate(preset: str, snr: float, seed: int, field_strength: float) -> dict:
    from qsmprep.sim.phantom import make_head_phantom
    from qsmprep.sim.signal import simulate_megre

    phantom = make_head_phantom(PRESETS[preset], seed=seed)
    sim = simulate_megre(
        phantom,
        echo_times=ECHO_TIMES,
        field_strength=field_strength,
        snr=snr,
        seed=seed,
        phase_offset=False,
    )
    tes = np.asarray(sim.echo_times)
    truth = (2 * np.pi * sim.total_field_hz[..., None] * tes).astype(np.float32)
    return {
        "phase": sim.phase.astype(np.float32),
        "mag": sim.mag.astype(np.float32),
        "mask": sim.mask,
        "echo_times": tes,
        "voxel_size": np.asarray(sim.voxel_size),
        "truth": truth,
    }


def _run_method(method: str, data: dict, threads: int) -> tuple[np.ndarray, float, float]:
    """Unwrap all echoes; return (unwrapped, warm-up s, wall s)."""
    import numba
    import scipy.fft as sfft

    from qsmprep.qsm.unwrap import unwrap_echoes

    numba.set_num_threads(threads)
    phase, mag, mask = data["phase"], data["mag"], data["mask"]
    tes, vs = data["echo_times"], data["voxel_size"]
    warm = 0.0
    if method == "romeo":
        small = (slice(0, 8),) * 3
        t0 = time.perf_counter()
        unwrap_echoes(phase[small], mag[small], tes, None, vs, "romeo")
        warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    if method == "skimage":
        from skimage.restoration import unwrap_phase

        out = np.zeros(phase.shape, np.float32)
        for e in range(phase.shape[-1]):
            masked = np.ma.masked_array(phase[..., e].astype(np.float64), mask=~mask)
            out[..., e] = np.ma.filled(unwrap_phase(masked), 0)
    else:
        with sfft.set_workers(threads):
            out = unwrap_echoes(phase, mag, tes, mask, vs, method).unwrapped
    return out, warm, time.perf_counter() - t0


def _worker(method: str, folder: Path, threads: int) -> None:
    import numba  # noqa: F401  (libraries load before the baseline is taken)
    import scipy.fft  # noqa: F401
    import skimage.restoration  # noqa: F401

    import qsmprep.qsm.unwrap  # noqa: F401

    data = {k: np.load(folder / f"{k}.npy") for k in ("phase", "mag", "mask", "echo_times")}
    data["voxel_size"] = np.load(folder / "voxel_size.npy")
    before = status_mb("VmRSS")
    out, warm, wall = _run_method(method, data, threads)
    np.save(folder / f"out_{method}.npy", out)
    print(
        json.dumps(
            {"warm_s": warm, "wall_s": wall, "peak_mb": status_mb("VmHWM"), "inputs_mb": before}
        )
    )


def fraction_right(unwrapped: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per echo, the fraction of mask voxels within pi of the truth up to one global 2 pi k."""
    out = []
    for e in range(truth.shape[-1]):
        d = (unwrapped[..., e] - truth[..., e])[mask]
        ks, counts = np.unique(np.round(d / (2 * np.pi)), return_counts=True)
        k = ks[counts.argmax()]
        out.append(np.mean(np.abs(d - 2 * np.pi * k) < np.pi))
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1mm")
    parser.add_argument("--snr", type=float, default=50.0, help="first-echo SNR in the brain")
    parser.add_argument("--field-strength", type=float, default=3.0, help="B0 (T)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.data, args.threads)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")

    t0 = time.perf_counter()
    data = _simulate(args.preset, args.snr, args.seed, args.field_strength)
    sim_s = time.perf_counter() - t0
    truth, mask = data.pop("truth"), data["mask"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_unwrap_") as tmp:
        folder = Path(tmp)
        for key, value in data.items():
            np.save(folder / f"{key}.npy", value)
        threads = str(args.threads)
        for method in methods:
            stats = run_worker(
                __file__, "--worker", method, "--data", tmp, "--threads", threads, what=method
            )
            right = fraction_right(np.load(folder / f"out_{method}.npy"), truth, mask)
            rows.append((method, stats, right))

    shape = data["phase"].shape
    print(f"## Phase unwrapping, preset {args.preset}\n")
    print(
        f"Head phantom {shape[0]}x{shape[1]}x{shape[2]} voxels of "
        f"{'x'.join(f'{v:g}' for v in data['voxel_size'])} mm, {shape[3]} echoes "
        f"(TE {', '.join(f'{1e3 * t:g}' for t in data['echo_times'])} ms), "
        f"{args.field_strength:g} T, SNR {args.snr:g}, {int(mask.sum())} brain voxels; "
        f"{args.threads} thread(s) on {os.cpu_count()} CPU(s); simulation {sim_s:.1f} s.\n"
    )
    print(
        "| method | wall time (s) | warm-up (s) | peak RSS (MB) | extra (MB) "
        "| voxels right, all echoes (%) | worst echo (%) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method, st, right in rows:
        extra = st["peak_mb"] - st["inputs_mb"]
        print(
            f"| {method} | {st['wall_s']:.2f} | {st['warm_s']:.2f} | {st['peak_mb']:.0f} "
            f"| {extra:.0f} | {100 * right.mean():.3f} | {100 * right.min():.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
