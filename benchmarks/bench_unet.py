"""Benchmark adaptive U-Net inference on the 1 mm head: wall time and peak memory, tiled.

    python benchmarks/bench_unet.py [--preset 1mm|2mm|small] [--channels 16 8] [--mem-gb 6 2]
        [--threads N] [--device cpu|cuda] [--overlap 32] [--model FILE] [--json FILE]

Input is the phantom's true local field (``qsmprep.sim.simulate_fields``, ppm) inside
its brain mask, axial B0. Unless ``--model`` gives a weights file, the networks are
randomly initialised (seeded): inference time and memory do not depend on the weight
values, accuracy does, so none is reported here (see bench_dl_vs_classical.py).

Every (channels, memory budget) case runs in its own subprocess through
:func:`qsmprep.nn.inference.invert_adaptive_unet` and reports the tiling the budget
led to, wall and CPU time, and peak resident memory (``VmHWM``), also as the part
above the resident memory once torch, the model and the inputs are loaded ("extra").
A warm-up call on a 32^3 volume comes first (oneDNN primitive creation). On CUDA the
peak GPU memory is reported too.

Prints a markdown table. Timings depend on the machine and its load; compare cases
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import PRESETS, head_fields, run_worker, status_mb


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def simulate(preset: str, seed: int) -> dict:
    """The phantom's local field (ppm), brain mask and side information on the preset grid."""
    from qsmprep.qsm.sideinfo import SideInformation

    phantom, _, _, local = head_fields(preset, seed)
    side = SideInformation.from_affine(phantom.affine)
    mask = phantom.brain_mask
    return {"local": np.where(mask, local, 0).astype(np.float32), "mask": mask, "side": side}


def _worker(workdir: Path, case: dict) -> None:
    """Run one case on the saved field; print a JSON line of stats."""
    import torch

    from qsmprep.nn.inference import invert_adaptive_unet, plan_inference
    from qsmprep.nn.unet import AdaptiveUNet3d
    from qsmprep.nn.weights import load_model
    from qsmprep.qsm.sideinfo import SideInformation

    local = np.load(workdir / "local.npy")
    mask = np.load(workdir / "mask.npy")
    side = SideInformation.from_dict(json.loads((workdir / "side.json").read_text()))
    if case["model"]:
        model = load_model(case["model"])
    else:
        torch.manual_seed(0)
        model = AdaptiveUNet3d(base_channels=case["channels"]).eval()
    kw = {"device": case["device"], "mem_gb": case["mem_gb"], "nthreads": case["threads"]}
    small = np.zeros((32, 32, 32), np.float32)
    invert_adaptive_unet(small, small == 0, side, model, overlap=case["overlap"], **kw)
    if case["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = status_mb("VmRSS")
    t0, c0 = time.perf_counter(), _cpu_s()
    chi = invert_adaptive_unet(local, mask, side, model, overlap=case["overlap"], **kw)
    if case["device"] == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    tile, starts = plan_inference(
        model, local.shape, case["device"], case["mem_gb"], case["overlap"]
    )
    stats = {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mb": status_mb("VmHWM"),
        "extra_mb": status_mb("VmHWM") - base,
        "tiles": int(np.prod([len(s) for s in starts])),
        "tile": list(tile),
        "finite": bool(np.isfinite(chi).all()),
        "n_parameters": model.n_parameters(),
    }
    if case["device"] == "cuda":
        stats["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(stats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="1mm")
    p.add_argument("--channels", nargs="+", type=int, default=[16, 8])
    p.add_argument("--mem-gb", nargs="+", type=float, default=[6.0, 2.0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--model", type=Path, help="time this weights file instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(Path(args.worker[1]), json.loads(args.worker[0]))
        return 0

    t0 = time.perf_counter()
    data = simulate(args.preset, args.seed)
    sim_s = time.perf_counter() - t0
    channels = [None] if args.model else args.channels
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_unet_") as tmp:
        workdir = Path(tmp)
        np.save(workdir / "local.npy", data["local"])
        np.save(workdir / "mask.npy", data["mask"])
        (workdir / "side.json").write_text(json.dumps(data["side"].to_dict()))
        for ch in channels:
            for mem in args.mem_gb:
                case = {
                    "channels": ch,
                    "mem_gb": mem,
                    "threads": args.threads,
                    "device": args.device,
                    "overlap": args.overlap,
                    "model": str(args.model) if args.model else None,
                }
                stats = run_worker(
                    __file__, "--worker", json.dumps(case), tmp, what=f"case {case}"
                )
                rows.append({**case, **stats})

    shape = "x".join(str(n) for n in data["mask"].shape)
    load = os.getloadavg()[0]
    print(
        f"\nAdaptive U-Net inference on the {args.preset} head phantom ({shape}; simulated in "
        f"{sim_s:.1f} s), device {args.device}, {args.threads} thread(s), {os.cpu_count()} "
        f"CPU(s), tile overlap {args.overlap}, load average {load:.1f} at the end; "
        + ("weights from " + str(args.model) if args.model else "random-initialised weights")
        + "\n"
    )
    gpu = args.device == "cuda"
    print(
        "| channels | parameters | mem budget (GB) | tiles | tile | wall (s) | CPU (s) "
        "| peak RSS (MB) | extra (MB) |" + (" GPU peak (MB) |" if gpu else "")
    )
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
    for r in rows:
        ch = r["channels"] if r["channels"] else "model"
        print(
            f"| {ch} | {r['n_parameters'] / 1e6:.2f} M | {r['mem_gb']:g} | {r['tiles']} "
            f"| {'x'.join(map(str, r['tile']))} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} "
            f"| {r['peak_mb']:.0f} | {r['extra_mb']:.0f} |"
            + (f" {r['gpu_peak_mb']:.0f} |" if gpu else "")
        )
    if args.json:
        meta = {"preset": args.preset, "shape": list(data["mask"].shape), "load": load}
        args.json.write_text(json.dumps({"meta": meta, "cases": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
