"""The discrete (finite-difference) dipole kernel vs the continuous k-space kernel.

    python benchmarks/bench_dipole_kernel.py [--size 128] [--radius 8]

The field of a uniformly magnetised sphere (chi = 1 ppm, radius ``--radius`` voxels,
1 mm voxels) is computed with both kernels of :func:`qsmprep.qsm.dipole.dipole_kernel`
(zero padding 2x) and compared with the analytic solution, ``chi a^3/(3 r^3)
(3 cos^2 - 1)`` outside and 0 inside, in shells at increasing distance: relative L2 error
(%) per shell, for B0 along the third voxel axis and two oblique directions. Also the
largest grid Laplacian of the field outside the sphere (0 for a harmonic field).
Prints a markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np

from qsmprep.qsm import dipole

DIRECTIONS = {
    "axial (0, 0, 1)": (0.0, 0.0, 1.0),
    "oblique (0.6, 0.8, 0)": (0.6, 0.8, 0.0),
    "oblique (0.3, -0.2, 0.93)": (0.3, -0.2, 0.93),
}
SHELLS = (10, 20, 40)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128, help="grid size (voxels per axis)")
    p.add_argument("--radius", type=float, default=8.0, help="sphere radius (voxels)")
    args = p.parse_args(argv)
    n, a = args.size, args.radius
    grid = np.indices((n, n, n)).astype(float) - n / 2
    r = np.sqrt((grid**2).sum(0))
    chi = (r <= a).astype(np.float64)
    inner = (r > a + 4) & (r < 0.4 * n)
    print(f"Sphere of radius {a:g} voxels on a {n}^3 grid of 1 mm voxels, chi = 1 ppm\n")
    head = " | ".join(f"error at r={s}-{s + 2} (%)" for s in SHELLS)
    print(f"| B0 | kernel | {head} | max grid Laplacian outside |")
    print("|---|---|" + "---:|" * (len(SHELLS) + 1))
    for name, b in DIRECTIONS.items():
        b = np.asarray(b) / np.linalg.norm(b)
        cos = np.tensordot(b, grid, axes=1) / np.maximum(r, 1e-9)
        truth = np.where(r <= a, 0.0, a**3 / (3 * np.maximum(r, 1e-9) ** 3) * (3 * cos**2 - 1))
        for kind in dipole.KERNEL_KINDS:
            field = dipole.forward_field(chi, (1, 1, 1), b, pad_factor=2.0, kind=kind)
            errs = []
            for s in SHELLS:
                m = (r > s) & (r < s + 2)
                errs.append(100 * np.linalg.norm(field[m] - truth[m]) / np.linalg.norm(truth[m]))
            lap = sum(
                np.roll(field, 1, ax) + np.roll(field, -1, ax) - 2 * field for ax in range(3)
            )
            cells = " | ".join(f"{e:.1f}" for e in errs)
            print(f"| {name} | {kind} | {cells} | {np.abs(lap[inner]).max():.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
