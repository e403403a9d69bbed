"""The ``qsmprep`` command: a BIDS App for quantitative susceptibility mapping.

``qsmprep BIDS_DIR OUTPUT_DIR participant [options]`` processes every multi-echo GRE run
of the selected participants and writes a BIDS derivatives dataset to OUTPUT_DIR.
Each participant runs as its own nipype workflow, so one failure never loses another
participant's outputs. Exit codes (BIDS-Apps draft): 0 all done, 1 a participant
failed, 16 the input dataset is not valid BIDS, 18 nothing selected, 64 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import __version__
from ..config import (
    DEFAULT_METHODS,
    DEFAULT_OPTIONS,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NOTHING_SELECTED,
    EXIT_OK,
    EXIT_USAGE,
    Config,
    ConfigError,
    load_toml,
    method_choices,
)
from ..interfaces.qsm import R2STAR_METHODS
from ..workflows.qsm import INPUT_TYPES

logger = logging.getLogger("qsmprep")

#: Validation errors listed on the terminal (the rest are counted).
MAX_LISTED_ISSUES = 10


class _Parser(argparse.ArgumentParser):
    """argparse with the BIDS-Apps usage exit code (64) instead of 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; algorithm choices come from the method registries."""
    choices = method_choices()
    parser = _Parser(
        prog="qsmprep",
        description="qsmprep: quantitative susceptibility mapping from multi-echo GRE, "
        "as a BIDS App.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 all done; 1 some participant failed (the others are "
        "written); 16 input validation failed; 18 nothing selected; 64 usage error.",
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="participant: process participants; group: not yet available",
    )
    parser.add_argument("--version", action="version", version=f"qsmprep {__version__}")

    g = parser.add_argument_group("selecting data")
    g.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="participants to process (with or without 'sub-'; default: all)",
    )
    g.add_argument(
        "--session-label", nargs="+", metavar="LABEL", help="sessions to process (default: all)"
    )
    g.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON of pybids filters for the GRE images, e.g. {"megre": {"acquisition": "hr"}}',
    )
    g.add_argument(
        "--skip-bids-validation",
        action="store_true",
        default=None,
        help="do not check the input with bids-validator-deno",
    )
    g.add_argument(
        "--field-strength",
        type=float,
        metavar="T",
        help="B0 in tesla for runs whose sidecars lack MagneticFieldStrength",
    )

    g = parser.add_argument_group("processing choices")
    g.add_argument(
        "--unwrapping",
        choices=choices["unwrapping"],
        help=f"phase unwrapping (default: {DEFAULT_METHODS['unwrapping']})",
    )
    g.add_argument(
        "--masking",
        choices=choices["masking"],
        help=f"brain masking (default: {DEFAULT_METHODS['masking']}: the voxel quality of "
        "ROMEO (Otsu) when ROMEO unwraps wrapped phase, else the magnitude threshold; "
        "border voxels of unreliable field leave the mask)",
    )
    g.add_argument(
        "--bf-removal",
        choices=choices["bf_removal"],
        help=f"background field removal (default: {DEFAULT_METHODS['bf_removal']})",
    )
    g.add_argument(
        "--inversion",
        choices=choices["inversion"],
        help=f"dipole inversion (default: {DEFAULT_METHODS['inversion']}; adaptive-unet runs "
        "the bundled U-Net, which beats RTS but not TV on the held-out test phantoms, so "
        "it is not the default)",
    )
    g.add_argument(
        "--mcpc3ds",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="remove the echo-independent phase offset (MCPC-3D-S) before unwrapping; "
        f"wrapped phase with 2+ echoes only (default: {_on_off(DEFAULT_OPTIONS['mcpc3ds'])})",
    )
    g.add_argument(
        "--two-pass",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="two-pass masking and inversion against rim and strong-source streaks "
        f"(default: {_on_off(DEFAULT_OPTIONS['two_pass'])})",
    )
    g.add_argument(
        "--r2star",
        choices=("off", *R2STAR_METHODS),
        help="also write R2* and T2* maps, by a log-linear fit or ARLO (3+ equally spaced "
        f"echoes) (default: {DEFAULT_OPTIONS['r2star']})",
    )
    g.add_argument(
        "--swi",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also write SWI and minIP images (default: {_on_off(DEFAULT_OPTIONS['swi'])})",
    )
    g.add_argument(
        "--input-type",
        choices=INPUT_TYPES,
        help="what to start from: phase (wrapped phase per echo), unwrapped (unwrapped phase "
        "per echo, rad), fieldmap (fmap/*_fieldmap in Hz or rad/s with its _magnitude) "
        f"(default: {DEFAULT_OPTIONS['input_type']})",
    )
    g.add_argument(
        "--mask-file",
        type=Path,
        metavar="FILE",
        help="your own brain mask for the one selected run, on its grid",
    )
    g.add_argument(
        "--mask-derivatives",
        type=Path,
        metavar="DIR",
        help="a derivatives dataset with sub-X/[ses-Y/]anat/<run>_desc-brain_mask.nii.gz "
        "for every run (e.g. an earlier qsmprep output)",
    )
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="adaptive-unet: where to run it (default: auto, CUDA when present)",
    )
    g.add_argument(
        "--model", type=Path, metavar="PATH", help="adaptive-unet: your own weights file"
    )

    g = parser.add_argument_group("resources and execution")
    g.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="nipype working directory; re-running with it resumes (default: ./work)",
    )
    g.add_argument("--nprocs", type=int, metavar="N", help="processes (default: all CPUs)")
    g.add_argument(
        "--omp-nthreads", type=int, metavar="N", help="threads per process (default: nprocs)"
    )
    g.add_argument(
        "--mem-gb", type=float, metavar="GB", help="memory limit for the scheduler, in GB"
    )
    g.add_argument(
        "--use-plugin",
        type=Path,
        metavar="FILE",
        help="nipype plugin YAML (plugin: MultiProc|SLURM|SGE|PBS..., plugin_args: {...})",
    )
    g.add_argument(
        "--config-file",
        type=Path,
        metavar="TOML",
        help="settings in TOML; keys are the long options (the command line wins)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        help="more output (repeat for more)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Parse the command line (and ``--config-file``) into a validated :class:`Config`.

    Usage errors exit with code 64.
    """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-file", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config_file is not None:
        try:
            parser.set_defaults(**load_toml(known.config_file))
        except ConfigError as e:
            parser.error(str(e))
    opts = parser.parse_args(argv)
    try:
        return Config.from_options(vars(opts))
    except ConfigError as e:
        parser.error(str(e))
    raise AssertionError("unreachable")  # parser.error exits


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to the current ``sys.stderr`` (which callers may redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def _setup_logging(verbose: int) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    level = logging.DEBUG if verbose >= 2 else logging.INFO
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s qsmprep %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    nipype_level = {0: "WARNING", 1: "INFO"}.get(verbose, "DEBUG")
    ncfg.update_config(
        {"logging": {"workflow_level": nipype_level, "interface_level": nipype_level}}
    )
    nlogging.update_logging(ncfg)
    workflow_logger = logging.getLogger("nipype.workflow")
    if verbose == 0:
        workflow_logger.addFilter(_short_crash_report)
    else:
        workflow_logger.removeFilter(_short_crash_report)


def _short_crash_report(record: logging.LogRecord) -> bool:
    """Keep nipype's crash notice to one line (the traceback is in the crash file)."""
    if isinstance(record.msg, str) and record.msg.startswith("Saving crash info to"):
        record.msg, record.args = "Saving crash info to %s", (record.args[0],)
    return True


def validate_bids(bids_dir: Path) -> list[str]:
    """Run ``bids-validator-deno`` on ``bids_dir`` offline; return its error messages."""
    exe = Path(sys.executable).with_name("bids-validator-deno")
    exe = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    if exe is None:
        return ["bids-validator-deno not found; install it or pass --skip-bids-validation"]
    proc = subprocess.run(
        [exe, "--format", "json", "--ignoreWarnings", str(bids_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return [f"bids-validator-deno failed (exit {proc.returncode}): {tail[0]}"]
    issues = report.get("issues", {}).get("issues", [])
    errors = []
    for issue in issues:
        if issue.get("severity") != "error":
            continue
        code = issue.get("code", "ERROR")
        sub = f" ({issue['subCode']})" if issue.get("subCode") else ""
        errors.append(f"{code}{sub}: {issue.get('location', '')}")
    return errors


def _crash_summary(crash_dir: Path, before: set[Path]) -> list[str]:
    """One line per new nipype crash file: node name and the exception's last line."""
    lines = []
    for path in sorted(set(crash_dir.glob("crash-*.txt")) - before):
        text = path.read_text(errors="replace").strip().splitlines()
        node = next((ln.split(":", 1)[1].strip() for ln in text if ln.startswith("Node:")), "?")
        last = next((ln.strip() for ln in reversed(text) if ln.strip()), "?")
        lines.append(f"{node}: {last} (crash file: {path})")
    return lines


def _plugin(cfg: Config) -> tuple[str, dict]:
    res = cfg.resources
    if res.plugin:
        name, args = res.plugin["plugin"], dict(res.plugin["plugin_args"])
        if name in ("MultiProc", "LegacyMultiProc"):
            args.setdefault("n_procs", res.nprocs)
            if res.mem_gb is not None:
                args.setdefault("memory_gb", res.mem_gb)
        return name, args
    if res.nprocs == 1:
        return "Linear", {}
    args = {"n_procs": res.nprocs, "raise_insufficient": False}
    if res.mem_gb is not None:
        args["memory_gb"] = res.mem_gb
    return "MultiProc", args


def _masks(cfg: Config, runs: list) -> dict[str, str] | None:
    """The user's mask of each run (prefix -> file), or None when masks are computed."""
    from ..bids import find_mask

    wf_cfg = cfg.workflow
    if wf_cfg.mask_file is not None:
        return {run.prefix: str(wf_cfg.mask_file) for run in runs}
    if wf_cfg.mask_derivatives is not None:
        return {run.prefix: find_mask(run, wf_cfg.mask_derivatives) for run in runs}
    return None


def run_participant(cfg: Config, subject: str, runs: list) -> list[str]:
    """Build and run one participant's workflow; return failure lines (empty: success)."""
    from ..bids import BIDSError
    from ..workflows import init_participant_wf

    ex, wf_cfg = cfg.execution, cfg.workflow
    try:
        wf = init_participant_wf(
            subject,
            runs,
            bids_dir=ex.bids_dir,
            output_dir=ex.output_dir,
            unwrapping=wf_cfg.unwrapping,
            bf_removal=wf_cfg.bf_removal,
            inversion=wf_cfg.inversion,
            masking=wf_cfg.masking,
            input_type=wf_cfg.input_type,
            mcpc3ds=wf_cfg.mcpc3ds,
            two_pass=wf_cfg.two_pass,
            masks=_masks(cfg, runs),
            r2star=cfg.r2star_method,
            swi=wf_cfg.swi,
            device=wf_cfg.device,
            model=wf_cfg.model,
            fallback_field_strength=ex.field_strength,
            omp_nthreads=cfg.resources.threads,
            max_mem_gb=cfg.resources.mem_gb,
        )
    except (BIDSError, ValueError) as e:
        return [str(e)]
    crash_dir = ex.work_dir / "crash" / f"sub-{subject}"
    crash_dir.mkdir(parents=True, exist_ok=True)
    wf.base_dir = str(ex.work_dir)
    wf.config["execution"].update(
        {
            "crashdump_dir": str(crash_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": False,
            "poll_sleep_duration": 0.2,  # nipype's 2 s default adds seconds per node
        }
    )
    before = set(crash_dir.glob("crash-*.txt"))
    plugin, plugin_args = _plugin(cfg)
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as e:  # nipype raises RuntimeError after node crashes
        return _crash_summary(crash_dir, before) or [f"{type(e).__name__}: {e}"]
    return []


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qsmprep`` console script; returns the exit code."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    cfg = parse_args(argv)
    _setup_logging(cfg.execution.verbose)
    ex = cfg.execution
    if ex.analysis_level == "group":
        print("qsmprep: the group level is not yet available", file=sys.stderr)
        return EXIT_USAGE

    from ..bids import (
        BIDSError,
        collect_fieldmap_runs,
        collect_runs,
        load_layout,
        select_participants,
    )

    collect = collect_fieldmap_runs if cfg.workflow.input_type == "fieldmap" else collect_runs

    if not ex.skip_bids_validation:
        logger.info("validating %s with bids-validator-deno", ex.bids_dir)
        errors = validate_bids(ex.bids_dir)
        if errors:
            print(f"qsmprep: {ex.bids_dir} is not valid BIDS ({len(errors)} error(s)):",
                  file=sys.stderr)  # fmt: skip
            for err in errors[:MAX_LISTED_ISSUES]:
                print(f"  {err}", file=sys.stderr)
            if len(errors) > MAX_LISTED_ISSUES:
                print(f"  ... and {len(errors) - MAX_LISTED_ISSUES} more", file=sys.stderr)
            print("Fix the dataset or pass --skip-bids-validation.", file=sys.stderr)
            return EXIT_INVALID

    try:
        layout = load_layout(ex.bids_dir)
        subjects = select_participants(layout, ex.participant_label)
    except BIDSError as e:
        print(f"qsmprep: {e}", file=sys.stderr)
        return EXIT_NOTHING_SELECTED

    failures: dict[str, list[str]] = {}
    selected: dict[str, list] = {}
    for subject in subjects:
        try:
            runs = collect(layout, subject, ex.session_label, ex.bids_filters)
        except BIDSError as e:
            failures[subject] = [str(e)]
            continue
        if runs:
            selected[subject] = runs
        else:
            logger.warning("sub-%s: no multi-echo GRE run selected; skipped", subject)
    if not selected and not failures:
        wanted = (
            "fmap/*_fieldmap with *_magnitude"
            if cfg.workflow.input_type == "fieldmap"
            else "anat/*_part-{mag,phase}_{MEGRE,T2starw}"
        )
        print(f"qsmprep: no run matches the selection ({wanted})", file=sys.stderr)
        return EXIT_NOTHING_SELECTED
    n_runs = sum(len(runs) for runs in selected.values())
    if cfg.workflow.mask_file is not None and (n_runs != 1 or failures):
        print(
            f"qsmprep: --mask-file is for one run, but {n_runs + len(failures)} are selected; "
            "use --mask-derivatives or narrow the selection",
            file=sys.stderr,
        )
        return EXIT_USAGE

    from ..interfaces.bids import write_dataset_description

    ex.output_dir.mkdir(parents=True, exist_ok=True)
    ex.work_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(ex.output_dir, ex.bids_dir)
    for subject, runs in selected.items():
        t0 = time.perf_counter()
        logger.info("sub-%s: %d run(s)", subject, len(runs))
        lines = run_participant(cfg, subject, runs)
        if lines:
            failures[subject] = lines
        else:
            logger.info("sub-%s: done in %.0f s", subject, time.perf_counter() - t0)

    done = [s for s in selected if s not in failures]
    if done:
        print(f"qsmprep: outputs of {len(done)} participant(s) in {ex.output_dir}",
              file=sys.stderr)  # fmt: skip
    for subject, lines in failures.items():
        for line in lines:
            print(f"qsmprep: sub-{subject} failed: {line}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
