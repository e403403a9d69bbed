"""Run the timing and accuracy benchmarks one after the other and keep their tables.

    python benchmarks/run_all.py [--out bench-out] [--threads 2] [--only NAME ...]

Each benchmark runs as its own process (nothing else should run on the machine: the
timings are wall-clock); its table goes to ``OUT/NAME.md``, with a header naming the
command, the machine and the commit. The tables are what docs/benchmarks.md reports.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def jobs(threads: int) -> dict[str, list[str]]:
    """name -> command line (relative to the repository root)."""
    t = ["--threads", str(threads)]
    return {
        "unwrap_1mm": ["benchmarks/bench_unwrap.py", "--preset", "1mm", *t],
        "bgremove_1mm": ["benchmarks/bench_bgremove.py", "--preset", "1mm", *t],
        "inversion_1mm": ["benchmarks/bench_inversion.py", "--preset", "1mm", *t],
        "unet_1mm": ["benchmarks/bench_unet.py", "--preset", "1mm", *t],
        "pipeline_1mm": [
            "benchmarks/bench_pipeline.py",
            "--preset",
            "1mm",
            "--nprocs",
            str(threads),
        ],
        "pipeline_2mm_variants": [
            "benchmarks/bench_pipeline.py",
            "--preset",
            "2mm",
            "--nprocs",
            str(threads),
            "--variants",
            "all",
        ],  # fmt: skip
        "accuracy_2mm": [
            "benchmarks/bench_accuracy.py",
            *t,
            "--masking",
            "threshold",
            "quality",
            "--two-pass",
            "both",
        ],  # fmt: skip
        "dipole_kernel": ["benchmarks/bench_dipole_kernel.py"],
    }


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", nargs="+", help="run only these benchmarks")
    args = p.parse_args(argv)
    todo = jobs(args.threads)
    unknown = sorted(set(args.only or []) - set(todo))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {sorted(todo)}")
    root = HERE.parent
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, cmd in todo.items():
        if args.only and name not in args.only:
            continue
        line = " ".join(["python", *cmd])
        print(f"== {name}: {line}", flush=True)
        start = datetime.datetime.now().isoformat(timespec="seconds")
        res = subprocess.run([sys.executable, *cmd], cwd=root, capture_output=True, text=True)
        head = f"<!-- {line} | {machine()} | commit {commit} | {start} -->\n"
        (args.out / f"{name}.md").write_text(head + res.stdout)
        (args.out / f"{name}.log").write_text(res.stderr)
        if res.returncode:
            failed.append(name)
            print(f"   failed ({res.returncode}); see {args.out / (name + '.log')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
