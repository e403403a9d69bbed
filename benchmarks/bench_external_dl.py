"""The deep-learning inversions on heads qsmprep did not simulate, and the side-information
ablation of the adaptive layer.

    pip install -e ".[bench]"       # qsm-forward (GPL-3) and qsm-ci, for the benchmarks only
    python benchmarks/bench_external_dl.py [--data bench-external] [--out bench-external-dl]
        [--cases axial oblique aniso 7t cylinders] [--stages truth phase ablation]
        [--methods tkd rts tv unet finetune dip] [--refine-steps N] [--threads 2]
        [--plain MODEL] [--peer] [--json FILE]

The heads are ``bench_external.py``'s (``--data``: its ``--out`` folder; missing cases are
simulated there): anatomy built from nilearn's ICBM152 maps with that script's own warps
and structures, physics by qsm-forward. The bundled U-Net was trained on qsmprep's own
synthetic patches and head phantom only, so every head here is anatomy and physics that
training never saw. Scores are qsm-ci's inside the TRUE brain mask (a voxel a method left
out counts as 0), both maps demeaned. Stages:

- ``truth``: each method inverts the TRUE local field in the TRUE brain mask (data weight
  1 in the mask; ``finetune`` compares the field as phase at the case's mean echo time);
- ``phase``: ``qsmprep BIDS OUT participant`` from the raw phase with each method
  (``--inversion``, ``--refine``); the runs of a case share one work directory, so the
  front end runs once and only the inversion is repeated; the time is the inversion
  node's (the ``dipole inversion ... done in`` line of its log);
- ``ablation``: the bundled model on the true local field with the right side information,
  with an axial 1 mm side vector fed to the adaptive layer only (the TKD input keeps the
  right kernel), with that vector everywhere, and with B0 negated (the same physics); and
  ``--plain MODEL``, a plain U-Net of the same size, when one is given.

The QSM.rs peer is not run again: with ``--peer``, the outputs that ``bench_external.py``
left in the case folders (``peer-inversion-{tv,rts}``, ``peer-pipeline``) are scored in
the same way and listed beside qsmprep's (same heads, same truth; their times are not
re-measured).

Writes into ``--out`` only. Prints markdown tables; ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_external import ACCURACY_CASES, PEER_NAME, case_folder, pivot, score, table, truth_of

#: Methods by name: the classical inversions, the bundled U-Net alone, and its refinements.
METHODS = ("tkd", "rts", "tv", "unet", "finetune", "dip")

#: qsmprep options of each method for the ``phase`` stage.
PIPELINE_OPTIONS = {
    "tkd": "--inversion tkd",
    "rts": "--inversion rts",
    "tv": "--inversion tv",
    "unet": "--inversion adaptive-unet",
    "finetune": "--inversion adaptive-unet --refine finetune",
    "dip": "--inversion adaptive-unet --refine dip",
}
LABELS = {
    "tkd": "TKD",
    "rts": "RTS",
    "tv": "TV (default)",
    "unet": "U-Net alone",
    "finetune": "U-Net + finetune",
    "dip": "DIP",
}
ABLATION_CASES = ("oblique", "aniso")


def acquisition(folder: Path) -> tuple[list[float], float]:
    """Echo times (s) and field strength (T) of a case, from its phase sidecars."""
    metas = [
        json.loads(p.read_text())
        for p in sorted((folder / "bids/sub-01/anat").glob("*_part-phase_MEGRE.json"))
    ]
    return sorted(m["EchoTime"] for m in metas), float(metas[0]["MagneticFieldStrength"])


def invert_truth(method: str, truth: dict, folder: Path, threads: int, steps: int | None):
    """Chi (ppm, mean-referenced in the brain) of ``method`` from the true local field, and
    the refinement's record (or None)."""
    from qsmprep.nn.inference import invert_adaptive_unet
    from qsmprep.nn.refine import deep_image_prior, finetune
    from qsmprep.qsm.inversion import invert, reference

    mask = truth["brain"]
    local = np.where(mask, truth["local"], 0).astype(np.float32)
    side = np.r_[truth["voxel_size"], truth["b0_dir"]]
    cap = {} if steps is None else {"steps": steps}
    record = None
    if method == "unet":
        chi = invert_adaptive_unet(local, mask, side, device="cpu", nthreads=threads)
    elif method == "finetune":
        tes, b0 = acquisition(folder)
        res = finetune(local, mask, side, te_s=float(np.mean(tes)), b0_t=b0, device="cpu",
                       nthreads=threads, **cap)  # fmt: skip
        chi, record = res.chi, res.record
    elif method == "dip":
        res = deep_image_prior(local, mask, side, device="cpu", nthreads=threads, **cap)
        chi, record = res.chi, res.record
    else:
        chi = invert(local, mask, truth["voxel_size"], truth["b0_dir"], method)
    return reference(chi, mask), record


def peer_rows(name: str, folder: Path, truth: dict, runs: dict[str, str]) -> list[dict]:
    """Scores of the peer's outputs that ``bench_external.py`` left in ``folder``
    (``runs``: sub-folder -> label); folders it has not written are skipped."""
    import nibabel as nib

    rows = []
    for sub, label in runs.items():
        path = folder / sub / "Chimap.nii"
        if path.is_file():
            chi = np.asarray(nib.load(path).dataobj, np.float32)
            rows.append({"case": name, "method": label, **score(chi, truth)})
    return rows


def stage_truth(name, folder, truth, methods, threads, steps) -> list[dict]:
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        chi, record = invert_truth(method, truth, folder, threads, steps)
        row = {"case": name, "method": LABELS[method], "time_s": time.perf_counter() - t0}
        row.update(score(chi, truth))
        if record:
            row.update(steps=record["Steps"], stopped_by=record["StoppedBy"])
        rows.append(row)
        print(f"  truth {name} {method}: NRMSE {row['nrmse']:.2f} ({row['time_s']:.0f} s)",
              flush=True)  # fmt: skip
    return rows


_DONE = re.compile(r"dipole inversion \(([^)]*)\) done in ([0-9.]+) s")


def run_pipeline(folder: Path, out: Path, options: str, threads: int, steps: int | None):
    """``qsmprep`` from the raw phase with ``options`` (work directory shared by the case's
    runs); returns the output's anat folder, the inversion node's time and the whole run's."""
    slug = re.sub(r"[^a-z0-9]+", "_", options.lower()).strip("_") or "defaults"
    dest = out / f"qsmprep-{slug}"
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-m", "qsmprep.cli.run", str(folder / "bids"), str(dest),
           "participant", "-w", str(out / "work"), "--nprocs", "1", "--omp-nthreads",
           str(threads), "--skip-bids-validation", "--device", "cpu", "-v",
           *shlex.split(options)]  # fmt: skip
    if steps is not None and "--refine" in options:
        cmd += ["--refine-steps", str(steps)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"qsmprep failed: {shlex.join(cmd)}\n{run.stdout}\n{run.stderr}")
    found = _DONE.findall(run.stderr)
    inversion_s = float(found[-1][1]) if found else float("nan")
    return dest / "sub-01" / "anat", inversion_s, wall


def stage_phase(name, folder, truth, methods, out, threads, steps) -> list[dict]:
    import nibabel as nib

    rows = []
    for method in methods:
        anat, inv_s, wall = run_pipeline(folder, out, PIPELINE_OPTIONS[method], threads, steps)
        chi = np.asarray(nib.load(anat / "sub-01_Chimap.nii.gz").dataobj, np.float32)
        meta = json.loads((anat / "sub-01_Chimap.json").read_text())
        row = {"case": name, "method": LABELS[method], "time_s": inv_s, "run_s": wall}
        row.update(score(chi, truth))
        refinement = meta["DipoleInversion"].get("Refinement")
        if refinement:
            row.update(steps=refinement["Steps"], stopped_by=refinement["StoppedBy"])
        rows.append(row)
        print(f"  phase {name} {method}: NRMSE {row['nrmse']:.2f} (inversion {inv_s:.0f} s)",
              flush=True)  # fmt: skip
    return rows


def stage_ablation(name, truth, threads, plain: Path | None) -> list[dict]:
    """The side-information ablation on the true local field."""
    import torch

    from qsmprep.nn.inference import invert_adaptive_unet
    from qsmprep.nn.train import AXIAL_1MM
    from qsmprep.nn.unet import adaptive_side_override
    from qsmprep.nn.weights import load_model
    from qsmprep.qsm.inversion import reference

    mask = truth["brain"]
    local = np.where(mask, truth["local"], 0).astype(np.float32)
    side = np.r_[truth["voxel_size"], truth["b0_dir"]]
    minus = np.r_[truth["voxel_size"], -truth["b0_dir"]]
    model = load_model()

    def run(m, s, override=None):
        with adaptive_side_override(m, override):
            chi = invert_adaptive_unet(local, mask, s, m, device="cpu", nthreads=threads)
        return score(reference(chi, mask), truth)

    with torch.no_grad():
        k_right = model.adaptive.kernels(torch.tensor(side[None], dtype=torch.float32))
        k_wrong = model.adaptive.kernels(torch.tensor([AXIAL_1MM], dtype=torch.float32))
    kernel_change = 100 * float((k_right - k_wrong).norm() / k_right.norm())
    variants = [
        ("right side information", model, side, None),
        ("axial 1 mm side to the adaptive layer only", model, side, AXIAL_1MM),
        ("axial 1 mm side everywhere (TKD kernel too)", model, np.array(AXIAL_1MM), None),
        ("B0 negated (same physics)", model, minus, None),
    ]
    if plain is not None:
        variants.append(("plain U-Net (--plain)", load_model(plain), side, None))
    rows = []
    for label, m, s, override in variants:
        row = {"case": name, "method": label, **run(m, s, override)}
        row["kernel_change"] = kernel_change if override is not None else float("nan")
        rows.append(row)
        print(f"  ablation {name} {label}: NRMSE {row['nrmse']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        default=Path("bench-external"),
        help="bench_external.py's case folder (read; missing cases simulated)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-external-dl"))
    p.add_argument("--cases", nargs="+", default=list(ACCURACY_CASES))
    p.add_argument(
        "--stages",
        nargs="+",
        default=["truth", "phase", "ablation"],
        choices=["truth", "phase", "ablation"],
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        help="cap the refinements' steps (default: their own budgets)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--plain", type=Path, default=None, help="a plain U-Net for the ablation")
    p.add_argument("--ablation-cases", nargs="+", default=list(ABLATION_CASES))
    p.add_argument(
        "--peer", action="store_true", help="score the peer's outputs cached in the cases"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)  # fmt: skip
    results: dict[str, list] = {s: [] for s in args.stages}
    for name in args.cases:
        folder = case_folder(name, args.data)
        truth = truth_of(folder)
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"== {name}: {truth['chi'].shape}, voxel {truth['voxel_size'].tolist()} mm, "
              f"B0 {np.round(truth['b0_dir'], 3).tolist()}", flush=True)  # fmt: skip
        if "truth" in args.stages:
            results["truth"] += stage_truth(
                name, folder, truth, args.methods, args.threads, args.refine_steps
            )
            if args.peer:
                runs = {f"peer-inversion-{m}": f"QSM.rs {m}" for m in ("tv", "rts")}
                results["truth"] += peer_rows(name, folder, truth, runs)
        if "phase" in args.stages:
            results["phase"] += stage_phase(
                name, folder, truth, args.methods, out, args.threads, args.refine_steps
            )
            if args.peer:
                results["phase"] += peer_rows(name, folder, truth, {"peer-pipeline": PEER_NAME})
        if "ablation" in args.stages and name in args.ablation_cases:
            results["ablation"] += stage_ablation(name, truth, args.threads, args.plain)
    keys = ["nrmse", "hfen", "xsim", "nrmse_dgm", "time_s", "steps"]
    text = []
    if results.get("truth"):
        rows = results["truth"]
        text += [
            pivot(rows, "nrmse", "(a) inversion of the TRUE local field: NRMSE (%)"),
            table(rows, keys, "(a) details (time: the inversion, s)"),
        ]
    if results.get("phase"):
        rows = results["phase"]
        text += [
            pivot(rows, "nrmse", "(b) whole pipeline from the raw phase: NRMSE (%)"),
            table(
                rows,
                keys + ["run_s"],
                "(b) details (time: the inversion node, s; run_s: "
                "the qsmprep command, front end cached)",
            ),  # fmt: skip
        ]
    if results.get("ablation"):
        rows = results["ablation"]
        text += [
            pivot(rows, "nrmse", "(c) side-information ablation, true local field: NRMSE (%)"),
            table(
                rows,
                ["nrmse", "hfen", "xsim", "kernel_change"],
                "(c) details (kernel_change: relative change of the adaptive kernel, %)",
            ),  # fmt: skip
        ]
    print("\n\n".join(text))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
