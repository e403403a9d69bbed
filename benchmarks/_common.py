"""What the benchmark scripts share: the QSM.rs peer, grid presets, memory readings, the
head phantom's fields, the timed call, the worker subprocess, and the options and method
loop of the per-stage benchmarks.

The scripts import it as ``from _common import ...``: ``python benchmarks/bench_x.py``
puts this folder first on ``sys.path`` (for the script and for its worker subprocesses).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: The peer: QSM.rs's driver and BIDS runner (see their README), next to the repository.
PEER = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "qsmrs"
PEER_NAME = "QSM.rs (d2a6920), QSMxT 9 stage defaults"

#: Voxel sizes (mm) of the head phantom's grid by preset name.
PRESETS = {"1mm": (1.0, 1.0, 1.0), "2mm": (2.0, 2.0, 2.0), "small": (4.0, 4.0, 4.0)}


def status_mb(key: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident memory of this process, MB.

    Unlike ``ru_maxrss``, which keeps the forking parent's peak across ``exec``, these
    belong to this process's own address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def head_fields(preset: str, seed: int, tilt: Sequence[float] = (0.0, 0.0)):
    """The head phantom on the preset grid, its B0 direction (voxel axes) with the image
    tilted by ``tilt`` (deg about x, y), and its total and local fields (ppm).

    Returns ``(phantom, b0_dir, total, local)`` (see ``qsmprep.sim.simulate_fields``).
    """
    from qsmprep.qsm.sideinfo import b0_direction
    from qsmprep.sim import make_head_phantom, simulate_fields, tilted_affine

    phantom = make_head_phantom(PRESETS[preset], seed=seed)
    b0 = b0_direction(tilted_affine(phantom.affine, phantom.shape, tilt))
    total, local = simulate_fields(phantom, b0)
    return phantom, b0, total, local


def grid_text(shape: Sequence[int], voxel_size: Sequence[float], b0_dir: Sequence[float]):
    """``"45x55x45, 4x4x4 mm, B0 (0.000, 0.000, 1.000)"`` for a table's caption."""
    size = "x".join(str(n) for n in shape)
    vs = "x".join(f"{v:g}" for v in voxel_size)
    b0 = ", ".join(f"{v:.3f}" for v in b0_dir)
    return f"{size}, {vs} mm, B0 ({b0})"


def warmup_volume(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded float32 noise on an ``n^3`` grid and a cube mask 4 voxels in from its faces,
    for the warm-up call that compiles (or loads) numba code before the timed one."""
    mask = np.zeros((n, n, n), bool)
    mask[4 : n - 4, 4 : n - 4, 4 : n - 4] = True
    return np.random.default_rng(0).standard_normal(mask.shape).astype(np.float32), mask


#: What a bgremove/inversion worker gets besides its field: mask, voxel size, B0 direction.
_GRID_KEYS = ("mask", "voxel_size", "b0_dir")


def save_inputs(workdir: Path, data: dict, field: str) -> None:
    """Save ``data[field]`` and the grid entries for a worker as ``workdir/KEY.npy``."""
    for key in (field, *_GRID_KEYS):
        np.save(workdir / f"{key}.npy", data[key])


def load_inputs(workdir: Path, field: str) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """The worker's side of :func:`save_inputs`: field, mask, voxel size and B0 direction."""
    mask, vs, b0 = (np.load(workdir / f"{key}.npy") for key in _GRID_KEYS)
    return np.load(workdir / f"{field}.npy"), mask, tuple(vs), tuple(b0)


def timed(call: Callable[[], object], warmup: Callable[[], object], threads: int):
    """``warmup()``, then ``call()`` timed, with ``threads`` numba and FFT threads.

    Returns ``call()``'s result and ``{"warmup_s", "wall_s", "peak_mb", "extra_mb"}``:
    wall times (s), the process's peak resident memory and its part above the resident
    memory before the timed call (MB).
    """
    import numba
    import scipy.fft as sfft

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    with sfft.set_workers(threads):
        t0 = time.perf_counter()
        warmup()
        warm = time.perf_counter() - t0
        base = status_mb("VmRSS")
        t0 = time.perf_counter()
        out = call()
        wall = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    return out, {"warmup_s": warm, "wall_s": wall, "peak_mb": peak, "extra_mb": peak - base}


def run_worker(script: str, *args: str, what: str) -> dict:
    """Run ``python script *args`` (a worker); return the JSON object on its last stdout
    line. On failure its stderr is printed and the benchmark exits, naming ``what``."""
    run = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        print(run.stderr, file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {run.returncode})")
    return json.loads(run.stdout.strip().splitlines()[-1])


def stage_parser(description: str, methods: Sequence[str]) -> argparse.ArgumentParser:
    """The options of a per-stage benchmark that runs each of ``methods`` in a worker."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1mm")
    p.add_argument("--methods", nargs="+", choices=methods, default=list(methods))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--b0-tilt-deg", nargs=2, type=float, default=(0.0, 0.0))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    return p


def run_methods(
    script: str,
    data: dict,
    field: str,
    methods: Sequence[str],
    threads: int,
    outputs: Sequence[str],
) -> dict[str, dict]:
    """Save ``data`` once (:func:`save_inputs`), run ``script --worker METHOD DIR`` for each
    method in its own subprocess, and return ``{method: its stats}`` with each array that
    the worker saved as ``DIR/{method}_{name}.npy`` for ``name`` in ``outputs``."""
    results = {}
    with tempfile.TemporaryDirectory(prefix=f"{Path(script).stem}_") as tmp:
        workdir = Path(tmp)
        save_inputs(workdir, data, field)
        for method in methods:
            stats = run_worker(
                script, "--worker", method, tmp, "--threads", str(threads), what=method
            )
            for name in outputs:
                stats[name] = np.load(workdir / f"{method}_{name}.npy")
            results[method] = stats
    return results
