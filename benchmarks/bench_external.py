"""qsmprep against heads it did not simulate, stage by stage, beside the QSM.rs peer.

    pip install -e ".[bench]"       # qsm-forward (GPL-3) and qsm-ci, for this script only
    python benchmarks/bench_external.py [--cases axial oblique aniso 7t cylinders 1mm]
        [--stages inversion bgremove pipeline] [--variants ...] [--out bench-external]
        [--nprocs 2] [--no-peer] [--json FILE]

The data (``external_heads.py``): random heads built from nilearn's ICBM152 maps with
this script's own deformations and structures, simulated by qsm-forward at 1 mm and
averaged into the acquisition voxels, plus qsm-forward's cylinder phantom:

- ``axial``: 2 mm, B0 along the third voxel axis, 3 T, 5 echoes 4-28 ms;
- ``oblique``: 2 mm, B0 25 deg off the third axis;
- ``aniso``: 2 x 2 x 3 mm, B0 20 deg off;
- ``7t``: 2 mm, 7 T, 5 echoes 3-19 ms;
- ``cylinders``: qsm-forward's cylinder phantom, 2 mm, B0 30 deg off the cylinders;
- ``1mm``: 1 mm, 3 T, 4 echoes, simulated on its own grid: for timing.

Each head is a different random draw, none of them qsmprep's phantom. Scores are qsm-ci's
(``qsm_ci.qsm_eval.score_arrays``) inside the TRUE brain mask, where a voxel a method
dropped counts as 0 (``coverage`` is the share it kept), both maps demeaned. Stages:

- ``inversion`` (a): each inversion of the TRUE local field in the TRUE mask;
- ``bgremove`` (b): each background removal of the exact total field (the shim residual,
  block-averaged) in the TRUE mask, then the default inversion; the local field's NRMSE
  (where the method defines it) and chi's;
- ``pipeline`` (c, d): ``qsmprep BIDS OUT participant`` from the raw phase with the
  defaults (and ``--variants``), timed, chi scored; (d) the share of the brain its mask
  keeps, the share of the mask that is not brain, and the total field's error (ppm, after
  removing the mean difference in the brain) by distance from the brain's edge.

The peer, QSM.rs (``../shared/tools/qsmrs``, "QSM.rs (d2a6920), QSMxT 9 stage
defaults"), runs the same cases in the same run: its defaults from phase, and its
inversions (RTS, TV) of the true local field. Prints markdown tables; ``--json`` also
writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _common import PEER, PEER_NAME

#: Cases that score accuracy (the 1 mm case is for timing).
ACCURACY_CASES = ("axial", "oblique", "aniso", "7t", "cylinders")
INVERSIONS = ("tkd", "rts", "tv", "ilsqr", "adaptive-unet")
BGREMOVALS = ("vsharp", "pdf", "lbv", "ismv")
#: Distance bands (mm from the brain's edge) for the total field's error.
BANDS = ((0, 6), (6, 10), (10, 1000))


#: qsmprep's own head phantom (``qsmprep.sim``, seed 3), 4 echoes 4-16 ms, 3 T, SNR 50,
#: simulated at 1 mm and averaged: B0 tilt (deg about x, y) and voxel size (mm). Not an
#: independent check, but a default must not win on one phantom family only.
OWN_CASES = {
    "own-axial": ((0.0, 0.0), (2.0, 2.0, 2.0)),
    "own-oblique": ((20.0, 10.0), (2.0, 2.0, 2.0)),
    "own-aniso": ((20.0, 10.0), (1.0, 1.0, 2.0)),
}


def simulate_own(name: str, out: Path) -> Path:
    """A case of qsmprep's own phantom in the layout of ``external_heads.simulate``."""
    import external_heads as heads

    from qsmprep.qsm.phase import hz_to_ppm
    from qsmprep.sim import make_head_phantom, simulate_megre

    folder = out / name
    if (folder / "truth.npz").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tilt, voxel_size = OWN_CASES[name]
    tes = (0.004, 0.008, 0.012, 0.016)
    sim = simulate_megre(
        make_head_phantom((1.0, 1.0, 1.0), seed=3),
        echo_times=tes,
        field_strength=3.0,
        b0_tilt_deg=tilt,
        snr=50,
        seed=3,
        voxel_size=voxel_size,
    )
    case = heads.Case(name, 3, voxel_size, 0.0, 3.0, tes)
    heads._write_bids(folder / "bids", case, sim.mag * np.exp(1j * sim.phase), sim.affine)
    np.savez_compressed(
        folder / "truth.npz",
        chi=sim.chi,
        local=sim.local_field_ppm,
        total=hz_to_ppm(sim.total_field_hz, 3.0),
        brain=sim.mask.astype(bool),
        labels=np.where(sim.mask, 8, 0).astype(np.uint8),  # not qsm-ci's label scheme
        b0_dir=np.asarray(sim.b0_dir),
        voxel_size=np.asarray(sim.voxel_size, float),
        affine=sim.affine,
    )
    return folder


def case_folder(name: str, out: Path) -> Path:
    """Simulate (or reuse) a case; return its folder."""
    import external_heads as heads

    if name == "cylinders":
        return heads.simulate_cylinders(out)
    if name in OWN_CASES:
        return simulate_own(name, out)
    return heads.simulate(heads.CASES[name], out)


def truth_of(folder: Path) -> dict[str, np.ndarray]:
    import external_heads as heads

    return heads.load_truth(folder)


def score(chi: np.ndarray, truth: dict) -> dict[str, float]:
    """qsm-ci's challenge metrics of ``chi`` (ppm) in the true brain mask."""
    from qsm_ci.qsm_eval import score_arrays

    metrics, _ = score_arrays(
        chi.astype(np.float64),
        truth["chi"].astype(np.float64),
        truth["brain"],
        "chi",
        seg=truth["labels"],
    )
    keys = ("nrmse", "hfen", "xsim", "nrmse_dgm", "dgm_linearity", "coverage")
    return {k: float(metrics[k]) for k in keys if k in metrics}


def field_nrmse(local: np.ndarray, truth_local: np.ndarray, mask: np.ndarray) -> float:
    """Demeaned NRMSE (%) of a local field inside ``mask`` (qsm-ci's field metric)."""
    from qsm_ci.qsm_eval import nrmse_challenge

    return float(nrmse_challenge(local.astype(float), truth_local.astype(float), mask)[0])


def _geometry(truth: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(truth["voxel_size"].tolist()), tuple(truth["b0_dir"].tolist())


def invert_with(
    method: str,
    local: np.ndarray,
    mask: np.ndarray,
    truth: dict,
    threads: int,
    valid: np.ndarray | None = None,
):
    """Chi (ppm, mean-referenced) by qsmprep's ``method``, as the pipeline calls it: a
    weighted method solves on ``mask`` and trusts the field on ``valid`` (the background
    removal's output mask, default ``mask``); the others invert on ``valid``."""
    from qsmprep.qsm.inversion import WEIGHTED, invert, reference

    vs, b0 = _geometry(truth)
    valid = mask if valid is None else valid
    if method == "adaptive-unet":
        from qsmprep.nn.inference import invert_adaptive_unet
        from qsmprep.nn.weights import load_model
        from qsmprep.qsm.sideinfo import SideInformation

        chi = invert_adaptive_unet(
            local, valid, SideInformation(vs, b0), load_model(), device="cpu", nthreads=threads
        )
        return reference(chi, valid)
    if method in WEIGHTED:
        chi = invert(local, mask, vs, b0, method, weight=valid.astype(np.float32))
        return reference(chi, mask)
    return reference(invert(local, valid, vs, b0, method), valid)


# --------------------------------------------------------------------------------------
# the peer


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def run_peer(args: list[str]) -> tuple[float, str]:
    """Run the peer's driver; return its wall time (s) and output."""
    t0 = time.perf_counter()
    run = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"peer failed: {shlex.join(args)}\n{run.stdout}\n{run.stderr}")
    return wall, run.stdout


def peer_inversion(folder: Path, truth: dict, method: str) -> tuple[np.ndarray, float]:
    """The peer's ``method`` on the true local field in the true mask."""
    out = folder / f"peer-inversion-{method}"
    out.mkdir(exist_ok=True)
    aff = truth["affine"]
    local = _save(np.where(truth["brain"], truth["local"], 0), aff, out / "local.nii")
    mask = _save(truth["brain"].astype(np.float32), aff, out / "mask.nii")
    meta = json.loads(
        (folder / "bids/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.json").read_text()
    )
    phase = folder / "bids/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"
    wall, _ = run_peer(
        [
            str(PEER / "qsmrs-driver"),
            "--phase",
            str(phase),
            "--te",
            str(meta["EchoTime"]),
            "--b0",
            str(meta["MagneticFieldStrength"]),
            "--out",
            str(out),
            "--localfield",
            str(local),
            "--mask",
            str(mask),
            "--inv",
            method,
        ]
    )
    return np.asarray(nib.load(out / "Chimap.nii").dataobj, np.float32), wall


def peer_pipeline(folder: Path) -> tuple[Path, float]:
    """The peer with its defaults, from phase; returns its output folder and wall time."""
    out = folder / "peer-pipeline"
    wall, _ = run_peer([str(PEER / "run-bids"), str(folder / "bids"), "01", str(out)])
    return out, wall


# --------------------------------------------------------------------------------------
# stages


def stage_inversion(name: str, folder: Path, truth: dict, threads: int, peer: bool) -> list:
    """(a) every inversion of the true local field in the true mask."""
    mask = truth["brain"]
    local = np.where(mask, truth["local"], 0).astype(np.float32)
    rows = []
    for method in INVERSIONS:
        t0 = time.perf_counter()
        chi = invert_with(method, local, mask, truth, threads)
        rows.append(
            {
                "case": name,
                "method": f"qsmprep {method}",
                "time_s": time.perf_counter() - t0,
                **score(chi, truth),
            }
        )
    if peer:
        for method in ("rts", "tv"):
            chi, wall = peer_inversion(folder, truth, method)
            rows.append(
                {"case": name, "method": f"QSM.rs {method}", "time_s": wall, **score(chi, truth)}
            )
    return rows


def stage_bgremove(name: str, truth: dict, inversion: str, threads: int) -> list:
    """(b) every background removal of the exact total field in the true mask, then
    ``inversion``."""
    from qsmprep.qsm.bgremove import remove_background

    vs, b0 = _geometry(truth)
    mask = truth["brain"]
    total = np.where(mask, truth["total"], 0).astype(np.float32)
    rows = []
    for method in BGREMOVALS:
        t0 = time.perf_counter()
        local, used = remove_background(total, mask, vs, method, b0)
        bg_s = time.perf_counter() - t0
        chi = invert_with(inversion, local, mask, truth, threads, valid=used)
        rows.append(
            {
                "case": name,
                "method": f"{method} + {inversion}",
                "time_s": bg_s,
                "local_nrmse": field_nrmse(local, truth["local"], used),
                "local_kept": float(used[mask].mean()),
                **score(chi, truth),
            }
        )
    return rows


def _distance_bands(brain: np.ndarray, voxel_size) -> list[np.ndarray]:
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(brain, sampling=voxel_size)
    return [brain & (depth > lo) & (depth <= hi) for lo, hi in BANDS]


def front_end_numbers(mask: np.ndarray, total_ppm: np.ndarray | None, truth: dict) -> dict:
    """(d) the mask's share of the brain, its non-brain share, and the total field's error."""
    brain = truth["brain"]
    out = {
        "brain_kept": float(mask[brain].mean()),
        "not_brain": float((mask & ~brain).sum() / max(mask.sum(), 1)),
    }
    if total_ppm is not None:
        err = total_ppm - truth["total"]
        err = err - np.median(err[brain & mask])
        out["total_off_005"] = float((np.abs(err[brain]) > 0.05).mean())
        for (lo, hi), band in zip(BANDS, _distance_bands(brain, truth["voxel_size"]), strict=True):
            key = f"total_rms_{lo}-{hi if hi < 1000 else 'in'}mm"
            out[key] = float(np.sqrt(np.mean(err[band] ** 2))) if band.any() else float("nan")
    return out


def run_qsmprep(folder: Path, variant: str, nprocs: int) -> tuple[Path, float]:
    """``qsmprep bids out participant`` with the variant's options, fresh work dir."""
    import shutil

    slug = variant.replace(" ", "_").replace("-", "") or "defaults"
    out, work = folder / f"qsmprep-{slug}", folder / f"work-{slug}"
    for d in (out, work):
        shutil.rmtree(d, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "qsmprep.cli.run",
        str(folder / "bids"),
        str(out),
        "participant",
        "-w",
        str(work),
        "--nprocs",
        str(nprocs),
        "--skip-bids-validation",
        *shlex.split(variant),
    ]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"qsmprep failed: {shlex.join(cmd)}\n{run.stdout}\n{run.stderr}")
    shutil.rmtree(work, ignore_errors=True)
    return out / "sub-01" / "anat", wall


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, np.float32)


def stage_pipeline(name: str, folder: Path, truth: dict, variants, nprocs: int, peer: bool):
    """(c, d) the whole pipeline from the raw phase, ours and the peer's."""
    from qsmprep.qsm.phase import hz_to_ppm

    b0_t = json.loads(
        (folder / "bids/sub-01/anat/sub-01_echo-1_part-phase_MEGRE.json").read_text()
    )
    field_t = float(b0_t["MagneticFieldStrength"])
    rows = []
    for variant in variants:
        anat, wall = run_qsmprep(folder, variant, nprocs)
        chi = _read(anat / "sub-01_Chimap.nii.gz")
        mask = _read(anat / "sub-01_desc-brain_mask.nii.gz") > 0
        total = hz_to_ppm(_read(anat / "sub-01_totalfield.nii.gz"), field_t)
        rows.append(
            {
                "case": name,
                "method": f"qsmprep {variant or 'defaults'}",
                "time_s": wall,
                **score(chi, truth),
                **front_end_numbers(mask, total, truth),
            }
        )
    if peer:
        out, wall = peer_pipeline(folder)
        chi = _read(out / "Chimap.nii")
        mask = _read(out / "mask.nii") > 0
        total = _read(out / "B0_ppm.nii")
        rows.append(
            {
                "case": name,
                "method": PEER_NAME,
                "time_s": wall,
                **score(chi, truth),
                **front_end_numbers(mask, total, truth),
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# tables


def _fmt(v, key: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if key in ("xsim", "total_rms_0-6mm", "total_rms_6-10mm", "total_rms_10-inmm"):
        return f"{v:.3f}"
    if key in ("brain_kept", "not_brain", "coverage", "local_kept", "total_off_005"):
        return f"{100 * v:.0f}"
    if key == "time_s":
        return f"{v:.1f}"
    return f"{v:.1f}"


def pivot(rows: list[dict], key: str, title: str) -> str:
    """Methods as rows, cases as columns, ``key`` in the cells, and the worst case."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["case"]): r.get(key) for r in rows}
    lines = [
        f"{title}",
        "",
        "| method | " + " | ".join(cases) + " | worst |",
        "| --- |" + " ---: |" * (len(cases) + 1),
    ]
    for m in methods:
        values = [cell.get((m, c)) for c in cases]
        finite = [v for v in values if v is not None and np.isfinite(v)]
        worst = (min if key == "xsim" else max)(finite) if finite else None
        lines.append(
            f"| {m} | " + " | ".join(_fmt(v, key) for v in values) + f" | {_fmt(worst, key)} |"
        )
    return "\n".join(lines)


def table(rows: list[dict], keys: list[str], title: str) -> str:
    """One row per (case, method) with ``keys`` as columns."""
    head = "| case | method | " + " | ".join(keys) + " |"
    lines = [title, "", head, "| --- | --- |" + " ---: |" * len(keys)]
    for r in rows:
        cells = " | ".join(_fmt(r.get(k), k) for k in keys)
        lines.append(f"| {r['case']} | {r['method']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=[*ACCURACY_CASES, "1mm"])
    p.add_argument(
        "--stages",
        nargs="+",
        default=["inversion", "bgremove", "pipeline"],
        choices=["inversion", "bgremove", "pipeline"],
    )
    p.add_argument(
        "--variants",
        nargs="*",
        default=[""],
        help='qsmprep options per pipeline run, e.g. "" "--bf-removal vsharp"',
    )
    p.add_argument("--inversion", default="tv", help="inversion after each bgremove (stage b)")
    p.add_argument("--out", type=Path, default=Path("bench-external"))
    p.add_argument("--nprocs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    peer = not args.no_peer
    if peer and not (PEER / "qsmrs-driver").exists():
        raise SystemExit(f"the peer is not at {PEER}: pass --no-peer")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list] = {s: [] for s in args.stages}
    for name in args.cases:
        folder = case_folder(name, args.out)
        truth = truth_of(folder)
        timing_only = name == "1mm"
        print(
            f"== {name}: {truth['chi'].shape}, B0 {np.round(truth['b0_dir'], 3).tolist()}",
            flush=True,
        )
        if "inversion" in args.stages and not timing_only:
            results["inversion"] += stage_inversion(name, folder, truth, args.nprocs, peer)
        if "bgremove" in args.stages and not timing_only:
            results["bgremove"] += stage_bgremove(name, truth, args.inversion, args.nprocs)
        if "pipeline" in args.stages:
            variants = [""] if timing_only else args.variants
            results["pipeline"] += stage_pipeline(name, folder, truth, variants, args.nprocs, peer)
    out = []
    if results.get("inversion"):
        rows = results["inversion"]
        out += [
            pivot(rows, "nrmse", "(a) inversion of the true local field: NRMSE (%)"),
            table(rows, ["nrmse", "hfen", "xsim", "nrmse_dgm", "time_s"], "(a) details"),
        ]
    if results.get("bgremove"):
        rows = results["bgremove"]
        out += [
            pivot(rows, "nrmse", "(b) background removal of the exact total field: chi NRMSE (%)"),
            table(
                rows,
                ["local_nrmse", "local_kept", "nrmse", "hfen", "xsim", "time_s"],
                "(b) details (local field NRMSE where the method defines it; % kept)",
            ),
        ]
    if results.get("pipeline"):
        rows = results["pipeline"]
        acc = [r for r in rows if r["case"] != "1mm"]
        if acc:
            out += [pivot(acc, "nrmse", "(c) whole pipeline from raw phase: chi NRMSE (%)")]
        out += [
            pivot(rows, "time_s", "(c) wall time (s)"),
            table(
                rows,
                [
                    "nrmse",
                    "hfen",
                    "xsim",
                    "nrmse_dgm",
                    "coverage",
                    "brain_kept",
                    "not_brain",
                    "total_off_005",
                    "total_rms_0-6mm",
                    "total_rms_6-10mm",
                    "total_rms_10-inmm",
                    "time_s",
                ],
                "(c, d) details: % of the brain kept by the mask, % of the mask that is "
                "not brain, % of brain voxels whose total field is off by > 0.05 ppm, "
                "the total field's rms error (ppm) 0-6 mm, 6-10 mm and > 10 mm inside "
                "the brain's edge",
            ),
        ]
    print("\n\n".join(out))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
