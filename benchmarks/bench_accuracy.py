"""Every unwrapping x background removal x inversion combination against the phantom's truth.

    python benchmarks/bench_accuracy.py [--cases axial oblique aniso] [--voxel-size 2 2 2]
        [--aniso-voxel-size 1 1 2] [--tilt-deg 20 10] [--snr 50] [--threads N]
        [--masking ...] [--unwrap ...] [--bgremove ...] [--inversion ...]
        [--two-pass off|on|both] [--json FILE]

For each case the head phantom (``qsmprep.sim``) is simulated as multi-echo GRE (4
echoes, 4-16 ms, 3 T, SNR 50) on the 1 mm grid and box-averaged into the case's voxels:

- ``axial``: ``--voxel-size`` (default 2 mm isotropic), B0 along the third voxel axis;
- ``oblique``: the same voxels, B0 tilted by ``--tilt-deg`` (default 20 deg about x and
  10 deg about y: 22 deg from the third axis);
- ``aniso``: ``--aniso-voxel-size`` (default 1 x 1 x 2 mm), B0 tilted as for oblique.

Each run goes through the pipeline's stages and dispatchers, with their defaults, as
qsmprep's workflow calls them: ``masking.make_mask`` (``--masking``; ``quality`` from
ROMEO without a mask, as the workflow does),
``phase.mcpc3ds``, ``unwrap.unwrap_echoes``, ``phase.fit_field``, ``phase.hz_to_ppm``,
``bgremove.remove_background`` and ``inversion.invert`` (or ``invert_two_pass`` with the
unfilled mask as the reliable one) then ``inversion.reference``.
Stages shared by several combinations run once. Combinations the pipeline refuses
(``qsmprep.workflows.qsm.check_methods``: quality masking without ROMEO) are skipped.

Accuracy (:mod:`qsmprep.qsm.metrics`): NRMSE and HFEN (%) and XSIM of chi against the
box-averaged true chi, both demeaned, inside the brain voxels that every combination of
the case keeps (the intersection of their masks with the true brain mask), so the
combinations of a case are compared on the same voxels. Also given: the share of the
brain each combination keeps (its output mask) and its NRMSE there, which is what a user
gets. The time is the inversion's.

Prints a markdown table of every run and one of the means over the cases, best first.
Timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

ECHO_TIMES = (0.004, 0.008, 0.012, 0.016)
FIELD_STRENGTH = 3.0


def simulate_case(voxel_size, tilt, snr: float, seed: int):
    """Multi-echo GRE of the head phantom on ``voxel_size`` (mm) with B0 tilted by ``tilt``."""
    from qsmprep.sim import make_head_phantom, simulate_megre, simulation_voxel_size

    phantom = make_head_phantom(simulation_voxel_size(voxel_size), seed=seed)
    return simulate_megre(
        phantom,
        echo_times=ECHO_TIMES,
        field_strength=FIELD_STRENGTH,
        b0_tilt_deg=tilt,
        snr=snr,
        seed=seed,
        voxel_size=voxel_size,
    )


def case_masks(sig, wrapped, maskings):
    """``{masking: (filled, reliable, romeo_result)}`` as the workflow makes them.

    ``quality`` thresholds the voxel quality of ROMEO run without a mask, and the workflow
    keeps that unwrapping (``romeo_result``); the reliable mask of two-pass inversion is
    the same method without hole filling.
    """
    from qsmprep.qsm import masking, unwrap
    from qsmprep.qsm.sideinfo import SideInformation

    vs = SideInformation.from_affine(sig.affine).voxel_size
    out = {}
    for mm in maskings:
        romeo, quality = None, None
        if mm == "quality":
            romeo = unwrap.unwrap_echoes(wrapped, sig.mag, sig.echo_times, None, vs, "romeo")
            quality = romeo.quality
        filled = masking.make_mask(sig.mag, mm, quality=quality)
        reliable = masking.make_mask(sig.mag, mm, quality=quality, fill_holes=False)
        out[mm] = (filled, reliable, romeo)
    return out


def run_case(sig, maskings, unwraps, bgremoves, inversions, two_pass) -> tuple[dict, dict]:
    """All combinations on one simulated acquisition: chi maps and inversion times.

    Keys are ``(masking, unwrap, bgremove, inversion, two_pass)``; ``two_pass`` lists the
    variants to run (``False``, ``True`` or both).
    """
    from qsmprep.qsm import bgremove, inversion, phase, unwrap
    from qsmprep.qsm.sideinfo import SideInformation
    from qsmprep.workflows.qsm import check_methods

    side = SideInformation.from_affine(sig.affine)
    vs, b0 = side.voxel_size, side.b0_direction
    mag, tes = sig.mag, sig.echo_times
    wrapped = phase.mcpc3ds(sig.phase, mag, tes, vs)
    chis, times = {}, {}
    for mm, (mask, reliable, romeo) in case_masks(sig, wrapped, maskings).items():
        for uw in unwraps:
            try:  # only what the pipeline can run (quality masking needs ROMEO's map)
                check_methods(uw, mm)
            except ValueError:
                continue
            if romeo is not None and uw == "romeo":
                unwrapped = romeo.unwrapped
            else:
                unwrapped = unwrap.unwrap_echoes(wrapped, mag, tes, mask, vs, uw).unwrapped
            field = phase.hz_to_ppm(
                phase.fit_field(unwrapped, mag, tes, mask=mask), FIELD_STRENGTH
            ).astype(np.float32)
            del unwrapped
            for bg in bgremoves:
                local, used = bgremove.remove_background(field, mask, vs, bg, b0_dir=b0)
                local = np.where(used, local, 0).astype(np.float32)
                for inv, tp in itertools.product(inversions, two_pass):
                    t0 = time.perf_counter()
                    if tp:
                        chi = inversion.invert_two_pass(local, reliable & used, used, vs, b0, inv)
                    else:
                        chi = inversion.invert(local, used, vs, b0, inv)
                    times[mm, uw, bg, inv, tp] = time.perf_counter() - t0
                    chis[mm, uw, bg, inv, tp] = (inversion.reference(chi, used), used)
                print(f"  {mm} + {uw} + {bg}: done", flush=True)
    return chis, times


def main(argv: list[str] | None = None) -> int:
    from qsmprep.qsm import bgremove, inversion, masking, metrics, unwrap

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--cases",
        nargs="+",
        choices=("axial", "oblique", "aniso"),
        default=["axial", "oblique", "aniso"],
    )
    p.add_argument("--voxel-size", nargs=3, type=float, default=(2.0, 2.0, 2.0))
    p.add_argument("--aniso-voxel-size", nargs=3, type=float, default=(1.0, 1.0, 2.0))
    p.add_argument("--tilt-deg", nargs=2, type=float, default=(20.0, 10.0))
    p.add_argument("--snr", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--unwrap", nargs="+", choices=sorted(unwrap.METHODS), default=sorted(unwrap.METHODS)
    )
    p.add_argument(
        "--bgremove", nargs="+", choices=sorted(bgremove.METHODS), default=sorted(bgremove.METHODS)
    )
    p.add_argument(
        "--inversion",
        nargs="+",
        choices=sorted(inversion.METHODS),
        default=sorted(inversion.METHODS),
    )
    p.add_argument("--masking", nargs="+", choices=sorted(masking.METHODS), default=["threshold"])
    p.add_argument(
        "--two-pass",
        choices=("off", "on", "both"),
        default="off",
        help="two-pass inversion variants to run",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    two_pass = {"off": [False], "on": [True], "both": [False, True]}[args.two_pass]

    import numba
    import scipy.fft as sfft

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    cases = {
        "axial": (tuple(args.voxel_size), (0.0, 0.0)),
        "oblique": (tuple(args.voxel_size), tuple(args.tilt_deg)),
        "aniso": (tuple(args.aniso_voxel_size), tuple(args.tilt_deg)),
    }
    rows, info = [], {}
    with sfft.set_workers(args.threads):
        for case in args.cases:
            vs, tilt = cases[case]
            t0 = time.perf_counter()
            sig = simulate_case(vs, tilt, args.snr, args.seed)
            angle = np.degrees(np.arccos(abs(sig.b0_dir[2]) / np.linalg.norm(sig.b0_dir)))
            print(
                f"{case}: {sig.mask.shape} voxels of {vs} mm, B0 {angle:.1f} deg off-axis, "
                f"simulated in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            chis, times = run_case(
                sig, args.masking, args.unwrap, args.bgremove, args.inversion, two_pass
            )
            common = np.logical_and.reduce([used for _, used in chis.values()]) & sig.mask
            info[case] = {
                "voxel_size": list(vs),
                "b0_angle_deg": float(angle),
                "common_mask_pct": float(100 * common.sum() / sig.mask.sum()),
            }
            for (mm, uw, bg, inv, tp), (chi, used) in chis.items():
                rows.append(
                    {
                        "case": case,
                        "masking": mm,
                        "two_pass": tp,
                        "unwrap": uw,
                        "bgremove": bg,
                        "inversion": inv,
                        "coverage": float(100 * (used & sig.mask).sum() / sig.mask.sum()),
                        "nrmse_own": metrics.nrmse(chi, sig.chi, used & sig.mask),
                        "nrmse": metrics.nrmse(chi, sig.chi, common),
                        "hfen": metrics.hfen(chi, sig.chi, common),
                        "xsim": metrics.xsim(chi, sig.chi, common),
                        "inversion_s": times[mm, uw, bg, inv, tp],
                    }
                )

    print(
        f"\nQSM accuracy on the head phantom, {args.threads} thread(s), "
        f"{os.cpu_count()} CPU(s), SNR {args.snr:g}\n"
    )
    for case, meta in info.items():
        vs = "x".join(f"{v:g}" for v in meta["voxel_size"])
        print(
            f"- {case}: {vs} mm, B0 {meta['b0_angle_deg']:.1f} deg from the third axis, "
            f"metrics on {meta['common_mask_pct']:.0f} % of the brain"
        )
    print(
        "\n| case | masking | unwrap | bgremove | inversion | two-pass | NRMSE (%) | HFEN (%) "
        "| XSIM | brain kept (%) | NRMSE there (%) | inversion (s) |"
    )
    print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['masking']} | {r['unwrap']} | {r['bgremove']} "
            f"| {r['inversion']} | {'yes' if r['two_pass'] else 'no'} "
            f"| {r['nrmse']:.1f} | {r['hfen']:.1f} | {r['xsim']:.3f} "
            f"| {r['coverage']:.0f} | {r['nrmse_own']:.1f} | {r['inversion_s']:.2f} |"
        )
    print("\nMean over the cases, best first:\n")
    print(
        "| masking | unwrap | bgremove | inversion | two-pass | NRMSE (%) | HFEN (%) | XSIM "
        "| brain kept (%) | NRMSE there (%) |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    keys = ("masking", "unwrap", "bgremove", "inversion", "two_pass")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    means = sorted(
        (
            tuple(
                float(np.mean([r[m] for r in g]))
                for m in ("nrmse", "hfen", "xsim", "coverage", "nrmse_own")
            ),
            k,
        )
        for k, g in groups.items()
    )
    for (nrmse, hfen, xsim, cover, own), (mm, uw, bg, inv, tp) in means:
        print(
            f"| {mm} | {uw} | {bg} | {inv} | {'yes' if tp else 'no'} "
            f"| {nrmse:.1f} | {hfen:.1f} | {xsim:.3f} | {cover:.0f} | {own:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"cases": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
