"""Whole-pipeline benchmark: wall time, peak memory and accuracy of a participant run.

    python benchmarks/bench_pipeline.py [--preset 1mm] [--nprocs 2] [--variants all]
        [--phantom-seed 2000]

1. Writes the simulated head phantom (``qsmprep.sim``, one participant, 4 echoes) as a
   BIDS dataset in ``--dir`` (reused when it is there).
2. Runs ``qsmprep BIDS OUT participant`` with the default methods in a subprocess, with a
   fresh work directory, and measures its wall time and peak memory: the resident set
   of the whole process tree (qsmprep and its nipype workers), sampled every 0.2 s from
   /proc, and the largest single process's ``ru_maxrss``.
3. Scores the outputs against the phantom's truth: NRMSE (%) of the total field (Hz),
   the local field (ppm) and chi (ppm), inside the output mask (both maps demeaned).
4. With ``--variants``, re-runs with one stage changed at a time (e.g. ``--inversion
   tv``) in a shared work directory, so the unchanged upstream steps come from the cache:
   their times are incremental, the NRMSE is the point.
5. Runs the peer, QSM.rs (QSMxT 9's library, with its stage defaults) on the same
   dataset, measured the same way (``--no-peer`` skips it; so does its absence), and
   sets the stage times side by side: qsmprep's from its log ("... done in X s"), the
   peer's from its output; what is left of each wall time is start-up, reading,
   bookkeeping and writing (for qsmprep also the report).

Prints markdown tables (and writes them as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nb
import numpy as np
from _common import PEER, PEER_NAME

from qsmprep.qsm.metrics import nrmse

#: Stage groups of the side-by-side table: name -> (qsmprep log labels, peer output labels).
STAGES = {
    "field mapping": (
        ("phase-offset removal", "phase unwrapping", "echo fit"),
        ("field mapping",),
    ),
    "mask": (("masking", "field reliability"), ("mask",)),
    "background removal": (("background field removal",), ("background removal",)),
    "dipole inversion": (("dipole inversion",), ("dipole inversion",)),
}

#: One-at-a-time variants of the defaults: name -> extra qsmprep options.
VARIANTS = {
    "unwrapping laplacian": ["--unwrapping", "laplacian"],  # auto masking: threshold
    "no MCPC-3D-S": ["--no-mcpc3ds"],
    "masking threshold": ["--masking", "threshold"],
    "bf-removal vsharp": ["--bf-removal", "vsharp"],
    "bf-removal lbv": ["--bf-removal", "lbv"],
    "bf-removal ismv": ["--bf-removal", "ismv"],
    "inversion tkd": ["--inversion", "tkd"],
    "inversion rts": ["--inversion", "rts"],
    "inversion ilsqr": ["--inversion", "ilsqr"],
    "inversion adaptive-unet": ["--inversion", "adaptive-unet"],  # score on --phantom-seed 2000+
    "two-pass": ["--two-pass"],
}


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/*/stat)."""
    parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parent.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = parent.get(p, [])
        out += kids
        todo += kids
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], interval: float = 0.2) -> dict:
    """Run ``cmd``; return its exit code, wall time (s), peak memory (GB) and its output
    (``stderr``: stdout and stderr together).

    ``peak_tree_gb``: the largest sum of resident sets over the process tree, sampled every
    ``interval`` s. ``peak_process_gb``: the largest single process (``ru_maxrss`` from
    ``wait4``, which covers the reaped nipype workers too).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, err = [0], []
    done = threading.Event()

    def sample():
        while not done.is_set():
            total = sum(_rss_bytes(p) for p in [proc.pid, *_children(proc.pid)])
            peak[0] = max(peak[0], total)
            done.wait(interval)

    threads = [
        threading.Thread(target=sample, daemon=True),
        threading.Thread(target=lambda: err.append(proc.stdout.read()), daemon=True),
    ]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "code": proc.returncode,
        "wall_s": wall,
        "peak_tree_gb": peak[0] / 1e9,
        "peak_process_gb": usage.ru_maxrss * 1024 / 1e9,
        "stderr": "".join(err),
    }


def stage_times(log: str, peer: bool) -> dict[str, float]:
    """Seconds per stage group of :data:`STAGES`, from qsmprep's log or the peer's output."""
    if peer:  # e.g. "mask: 2672813 voxels (2.83s)", "background removal Vsharp: 15.53s"
        found = re.findall(r"^([a-z ]+?)(?: [A-Z]\w*)?: .*?([\d.]+)s\)?$", log, re.M)
    else:  # e.g. "04:05:59 qsmprep sub_01: dipole inversion (tv) done in 20.4 s"
        found = re.findall(r"qsmprep \S+: (.+?) done in ([\d.]+) s$", log, re.M)
    times = {}
    for group, labels in STAGES.items():
        names = labels[1] if peer else labels[0]
        hits = [float(t) for label, t in found if label.startswith(names)]
        if hits:
            times[group] = sum(hits)
    return times


def stage_table(ours: dict, peer: dict | None) -> list[str]:
    """Markdown rows: each stage group, the rest of the wall time, the wall and memory."""
    cols = [ours] + ([peer] if peer else [])
    head = "| stage | qsmprep (s) |" + (f" {PEER_NAME} (s) |" if peer else "")
    lines = [head, "| --- |" + " ---: |" * len(cols)]
    for group in STAGES:
        cells = [f"{c['stages'][group]:.1f}" if group in c["stages"] else "-" for c in cols]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    rest = [c["wall_s"] - sum(c["stages"].values()) for c in cols]
    lines.append(
        "| the rest: start-up, reading, bookkeeping, writing (qsmprep: and the report) | "
        + " | ".join(f"{r:.1f}" for r in rest)
        + " |"
    )
    lines.append("| wall | " + " | ".join(f"{c['wall_s']:.1f}" for c in cols) + " |")
    lines.append(
        "| peak RSS, process tree (GB) | "
        + " | ".join(f"{c['peak_tree_gb']:.2f}" for c in cols)
        + " |"
    )
    return lines


def score(out: Path, run) -> dict:
    """NRMSE of the total field, local field and chi of ``run`` against its truth."""
    anat = out / f"sub-{run.subject}" / "anat"

    def load(name):
        return nb.load(anat / f"{run.prefix}_{name}.nii.gz").get_fdata(dtype=np.float32)

    mask = (load("desc-brain_mask") > 0) & run.load_truth("mask")
    return {
        "nrmse_total": nrmse(load("totalfield"), run.load_truth("total_field"), mask),
        "nrmse_local": nrmse(load("localfield"), run.load_truth("local_field"), mask),
        "nrmse_chi": nrmse(load("Chimap"), run.load_truth("chi"), mask),
        "mask_voxels": int(mask.sum()),
    }


def dataset(base: Path, preset: str, seed: int = 0):
    from qsmprep.sim import SubjectSpec, load_dataset_info, write_bids_dataset

    name = preset if seed == 0 else f"{preset}-seed{seed}"
    bids, truth = base / f"bids-{name}", base / f"bids-{name}-truth"
    if (truth / "runs.json").is_file():
        return load_dataset_info(truth)
    t0 = time.perf_counter()
    info = write_bids_dataset(bids, [SubjectSpec("01", seed=seed)], preset=preset, truth_dir=truth)
    print(f"dataset ({preset}) written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1mm", choices=("small", "2mm", "1mm"))
    parser.add_argument("--dir", type=Path, default=Path("bench-pipeline"), help="scratch dir")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        help=f"'all' or names among: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--phantom-seed",
        type=int,
        default=0,
        help="head phantom seed; the adaptive U-Net was trained on 0-3 and validated on "
        "1000-1003, so score it on a test seed (2000-2999)",
    )
    parser.add_argument(
        "--no-peer", dest="peer", action="store_false", help=f"do not run {PEER_NAME}"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {unknown}")

    base = args.dir.absolute()
    info = dataset(base, args.preset, args.phantom_seed)
    run = info.runs[0]
    shape = nb.load(run.mag_files[0]).shape
    qsmprep = [sys.executable, "-m", "qsmprep.cli.run"]
    common = ["participant", "--nprocs", str(args.nprocs)]
    rows = []
    todo = [("defaults", [])] + [(n, VARIANTS[n]) for n in names]
    for i, (name, extra) in enumerate(todo):
        tag = args.preset if args.phantom_seed == 0 else f"{args.preset}-seed{args.phantom_seed}"
        out = base / f"out-{tag}-{i}"
        fresh = f"work-{tag}-defaults-{time.time_ns()}"
        work = base / (fresh if i == 0 else f"work-{tag}-variants")
        cmd = [*qsmprep, str(info.root), str(out), *common, "-w", str(work), *extra]
        if i > 0:
            cmd.append("--skip-bids-validation")
        res = run_measured(cmd)
        if res["code"] != 0:
            tail = res["stderr"][-2000:]
            print(f"{name}: qsmprep exited {res['code']}\n{tail}", file=sys.stderr)
            continue
        stages = stage_times(res.pop("stderr"), peer=False)
        rows.append({"run": name, "options": " ".join(extra), **res, **score(out, run)})
        rows[-1]["stages"] = stages
    peer = None
    if args.peer and not (PEER / "run-bids").exists():
        print(f"{PEER_NAME} is not at {PEER}: qsmprep alone", file=sys.stderr)
    elif args.peer and rows and rows[0]["run"] == "defaults":
        out = base / f"out-peer-{args.preset}"
        peer = run_measured([str(PEER / "run-bids"), str(info.root), run.subject, str(out)])
        if peer["code"] != 0:
            print(f"{PEER_NAME} exited {peer['code']}\n{peer['stderr'][-2000:]}", file=sys.stderr)
            return 1
        peer["stages"] = stage_times(peer.pop("stderr"), peer=True)

    dims = "x".join(map(str, shape[:3]))
    lines = [
        f"qsmprep on the {args.preset} phantom (seed {args.phantom_seed}; {dims}, "
        f"{len(run.echo_times)} echoes), --nprocs {args.nprocs}",
        "",
        "| run | wall (s) | peak RSS tree / largest process (GB) | NRMSE total field (%) "
        "| NRMSE local field (%) | NRMSE chi (%) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        note = "" if r["run"] == "defaults" else " (cached upstream)"
        lines.append(
            f"| {r['run']} | {r['wall_s']:.0f}{note} "
            f"| {r['peak_tree_gb']:.2f} / {r['peak_process_gb']:.2f} "
            f"| {r['nrmse_total']:.1f} | {r['nrmse_local']:.1f} | {r['nrmse_chi']:.1f} |"
        )
    if rows and rows[0]["run"] == "defaults":
        lines += ["", "Stages of the defaults' run" + (f" and of {PEER_NAME}" if peer else "")]
        lines += ["", *stage_table(rows[0], peer)]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "peer": peer}, indent=2))
    return 0 if rows and rows[0]["run"] == "defaults" else 1


if __name__ == "__main__":
    sys.exit(main())
