"""The ``qsmprep`` command: a BIDS App for quantitative susceptibility mapping.

``qsmprep BIDS_DIR OUTPUT_DIR participant [options]`` processes every multi-echo GRE run
of the selected participants and writes a BIDS derivatives dataset to OUTPUT_DIR.
Each participant runs as its own nipype workflow, so one failure never loses another
participant's outputs, and each run's outputs land together once all are written; then
the participant's log folder and report are written from what OUTPUT_DIR holds
(:mod:`qsmprep.cli.reporting`), also when it failed or was interrupted. With processes
to spare, several participants run at once, each in its own process
(:mod:`qsmprep.cli.parallel`).
``qsmprep BIDS_DIR OUTPUT_DIR group`` runs the group level (:mod:`qsmprep.cli.group`).
Exit codes (BIDS-Apps draft): 0 all done, 1 a participant failed (the others are
written), 2 qsmprep's own error, 16 the input dataset is not valid BIDS, 18 nothing
selected, 64 usage, 130 / 143 interrupted by SIGINT / SIGTERM. No traceback reaches the
terminal: an unexpected error is one line that points to a crash file.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Container
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..bids import GRE_SUFFIXES, SUFFIXES
from ..config import (
    DEFAULT_METHODS,
    DEFAULT_OPTIONS,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NOTHING_SELECTED,
    EXIT_OK,
    EXIT_USAGE,
    REGISTRATIONS,
    Config,
    ConfigError,
    load_toml,
    method_choices,
)
from ..conventions import PHASE_SIGN_CHOICES
from ..interfaces.qsm import R2STAR_METHODS
from ..workflows.qsm import INPUT_TYPES, REFINE_METHODS
from .interrupt import (
    Interrupted,
    check_interrupted,
    handle_signals,
    next_signal_aborts,
    status_callback,
    stop_workers,
)
from .parallel import Plan

logger = logging.getLogger("qsmprep")

#: Validation errors listed on the terminal (the rest are counted).
MAX_LISTED_ISSUES = 10

#: Longest error message printed on one line (the crash file holds the rest).
MAX_MESSAGE = 400

#: Exit codes and their meaning, for --help and the documentation.
EXIT_CODES = (
    (0, "all done"),
    (1, "some participant failed (the others are written)"),
    (2, "qsmprep's own error (a crash file says why)"),
    (16, "input validation failed"),
    (18, "nothing selected"),
    (64, "usage error"),
    (130, "interrupted (SIGINT, Ctrl-C)"),
    (143, "interrupted (SIGTERM)"),
)


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
        allow_abbrev=False,  # --mem must never be taken for --mem-gb
        description="qsmprep: quantitative susceptibility mapping from multi-echo GRE, "
        "as a BIDS App.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES) + ".",
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="participant: process participants; group: QC table, group report and "
        "deep-grey ROI statistics in MNI152NLin2009cAsym over the participants' outputs",
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
        help="do not check the input with bids-validator-deno (which checks only the "
        "selected participants' runs and the dataset's own files)",
    )
    g.add_argument(
        "--megre-suffix",
        nargs="+",
        choices=GRE_SUFFIXES,
        metavar="SUFFIX",
        help="BIDS suffix(es) of the multi-echo GRE magnitude/phase images to process: "
        f"{', '.join(GRE_SUFFIXES)} (default: {' '.join(SUFFIXES)})",
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
    g.add_argument(
        "--refine",
        choices=REFINE_METHODS,
        help="adaptive-unet: per-subject refinement by the measured field alone: finetune "
        "(the model fine-tuned on this run, QSMInvNet's loss) or dip (Deep Image Prior: a "
        "randomly initialised U-Net fitted to the field); minutes per run on a CPU. On the "
        "external benchmark's heads from raw phase, finetune was 4-10 NRMSE points worse "
        "than the U-Net alone and dip worse than TKD "
        f"(default: {DEFAULT_OPTIONS['refine']}; see docs/benchmarks.md)",
    )
    g.add_argument(
        "--refine-steps",
        type=int,
        metavar="N",
        help="largest number of refinement steps (default: the method's, see docs/model.md)",
    )

    g = parser.add_argument_group("scanner conventions")
    g.add_argument(
        "--phase-sign",
        choices=PHASE_SIGN_CHOICES,
        help="factor applied to the phase: auto follows the sidecar's Manufacturer where "
        "its convention is known (-1 for GE, whose phase is left-handed; otherwise +1, "
        "with a warning when the manufacturer is unknown) (default: auto)",
    )
    g.add_argument(
        "--phase-scale",
        metavar="RAD_PER_UNIT",
        help="radians per stored phase unit, e.g. pi/4096 or 0.001, for phase that is neither "
        "radians nor a known integer range (default: detected from Units and the values)",
    )

    g = parser.add_argument_group("reports and group level")
    g.add_argument(
        "--reports-only",
        action="store_true",
        default=None,
        help="write the participant reports again from OUTPUT_DIR and stop (nothing is processed)",
    )
    g.add_argument(
        "--boilerplate-only",
        action="store_true",
        default=None,
        help="write the methods boilerplate (OUTPUT_DIR/logs/CITATION.md, .html, .bib) for "
        "the selected runs and stop",
    )
    g.add_argument(
        "--registration",
        choices=REGISTRATIONS,
        help="group level: registration of each run's magnitude to MNI152NLin2009cAsym: "
        "affine, or affine then SyN (default: affine; SyN moved the deep grey ROIs off the "
        "phantom's nuclei)",
    )
    g.add_argument(
        "--template-chimaps",
        action="store_true",
        default=None,
        help="group level: also write each run's Chimap in MNI152NLin2009cAsym space",
    )

    g = parser.add_argument_group("resources and execution")
    g.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="nipype working directory; re-running with it resumes (default: ./work)",
    )
    g.add_argument(
        "--nprocs",
        type=int,
        metavar="N",
        help="processes (default: all CPUs); several participants run at once, each in its "
        "own process with an equal share of N (and of the memory), as many as N and the "
        "memory allow (one at a time with --use-plugin or the U-Net on a GPU)",
    )
    g.add_argument(
        "--omp-nthreads",
        type=int,
        metavar="N",
        help="threads per process (default: nprocs; at most a participant's share of nprocs)",
    )
    g.add_argument(
        "--mem-gb",
        type=float,
        metavar="GB",
        help="memory limit for the scheduler, in GB (default: 90%% of the RAM), shared out "
        "among the participants running at once",
    )
    g.add_argument(
        "--mem",
        "--mem-mb",
        "--mem_mb",
        dest="mem",
        metavar="MB",
        help="memory limit as fMRIPrep takes it: MB (16000), or with a unit (16G, 500M)",
    )
    g.add_argument(
        "--use-plugin",
        type=Path,
        metavar="FILE",
        help="nipype plugin YAML (plugin: MultiProc|SLURM|SGE|PBS..., plugin_args: {...})",
    )
    g.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        default=None,
        help="stop at the first failing step, without running the other steps or "
        "participants (participants already running beside it finish) (default: go on and "
        "report every failure at the end)",
    )
    g.add_argument(
        "--clean-workdir",
        action="store_true",
        default=None,
        help="delete the selected participants' earlier work (WORK_DIR/sub_<label>_wf and "
        "its crash files) before running, instead of resuming from it",
    )
    g.add_argument(
        "--write-graph",
        action="store_true",
        default=None,
        help="write each participant's workflow graph to WORK_DIR/sub_<label>_wf/graph.dot "
        "(and graph.svg when graphviz's dot is installed)",
    )
    g.add_argument(
        "--resource-monitor",
        action="store_true",
        default=None,
        help="record each step's run time, peak memory and CPU use in "
        "WORK_DIR/resource_monitor/sub-<label>.jsonl (nipype's resource monitor)",
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
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
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


def validate_bids(bids_dir: Path, scope: Container[str] | None = None) -> list[str]:
    """Run ``bids-validator-deno`` on ``bids_dir`` offline; return its error messages.

    With a ``scope`` (e.g. a :class:`~qsmprep.bids.SelectionScope`), only the errors about
    files in it (paths relative to the dataset) or about no file count; the others are
    counted in the log."""
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
    errors, ignored = [], 0
    for issue in issues:
        if issue.get("severity") != "error":
            continue
        if scope is not None and issue.get("location") and issue["location"] not in scope:
            ignored += 1
            continue
        code = issue.get("code", "ERROR")
        sub = f" ({issue['subCode']})" if issue.get("subCode") else ""
        errors.append(f"{code}{sub}: {issue.get('location', '')}")
    if ignored:
        logger.info("bids-validator-deno: %d error(s) in files outside the selection ignored",
                    ignored)  # fmt: skip
    return errors


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def exception_text(lines: list[str]) -> str:
    """The last exception of a formatted traceback (e.g. a nipype crash file) on one line:
    ``Type: message``, a multi-line message joined."""
    lines = [ln.lstrip("\t").rstrip() for ln in lines]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call")]
    if not starts:
        return _clip(next((ln for ln in reversed(lines) if ln.strip()), "?"))
    message: list[str] = []
    for ln in lines[starts[-1] + 1 :]:
        if message or (ln and not ln.startswith(" ")):
            message.append(ln)
    head, sep, rest = " ".join(message).partition(":")
    if sep and re.fullmatch(r"[\w.]+", head):  # drop the module path of the type
        return _clip(f"{head.rsplit('.', 1)[-1]}:{rest}")
    return _clip(" ".join(message) or "?")


def write_crash_file(folder: Path | None, step: str) -> Path | None:
    """Save the exception being handled, with its traceback, to a new crash file in
    ``folder`` (or the temporary folder when that cannot be written); return its path."""
    text = (
        f"qsmprep {__version__}\nstep: {step}\ncommand: {' '.join(sys.argv)}\n\n"
        f"{traceback.format_exc()}"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for base in (folder, Path(tempfile.gettempdir())):
        if base is None:
            continue
        try:
            base.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"crash-{stamp}-qsmprep-", suffix=".txt", dir=base)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return Path(name)
        except OSError:
            continue
    return None


def _unexpected(step: str, error: BaseException, crash_dir: Path | None) -> str:
    """One line for an unexpected error while ``step`` ran, after saving its crash file."""
    crash = write_crash_file(crash_dir, step)
    where = f"crash file: {crash}" if crash else "no crash file could be written"
    return f"{step}: {_clip(f'{type(error).__name__}: {error}')} ({where})"


def _crash_summary(crash_dir: Path, before: set[Path], runs: list) -> list[str]:
    """One line per new nipype crash file: the step, the run's first file, the error."""
    from ..workflows.base import _node_name

    lines = []
    for path in sorted(set(crash_dir.glob("crash-*.txt")) - before):
        text = path.read_text(errors="replace").splitlines()
        node = next((ln.split(":", 1)[1].strip() for ln in text if ln.startswith("Node:")), "?")
        parts = node.split(".")
        where = parts[-1]
        for run in sorted(runs, key=lambda r: -len(r.prefix)):  # longest prefix first
            name = _node_name(run.prefix)
            if f"qsm_{name}_wf" in parts or parts[-1].startswith(f"ds_{name}_"):
                first = Path((run.phase_files or (run.fieldmap_file,))[0]).name
                where = f"{parts[-1]} (run of {first})"
                break
        lines.append(f"{where}: {exception_text(text)} (crash file: {path})")
    return lines


def _plugin(cfg: Config) -> tuple[str, dict]:
    """nipype plugin and its arguments; every plugin reports node status to
    :func:`~qsmprep.cli.interrupt.status_callback`, which stops the run after a signal."""
    res = cfg.resources
    if res.plugin:
        name, args = res.plugin["plugin"], dict(res.plugin["plugin_args"])
        if name in ("MultiProc", "LegacyMultiProc"):
            args.setdefault("n_procs", res.nprocs)
            if res.mem_gb is not None:
                args.setdefault("memory_gb", res.mem_gb)
        elif name != "Linear":
            _ensure_logname()
    elif res.nprocs == 1:
        name, args = "Linear", {}
    else:
        name, args = "MultiProc", {"n_procs": res.nprocs, "raise_insufficient": False}
        if res.mem_gb is not None:
            args["memory_gb"] = res.mem_gb
    args["status_callback"] = status_callback
    return name, args


def _ensure_logname() -> None:
    """nipype's batch plugins (SLURM, SGE, PBS, LSF, Condor) name their jobs after
    ``$LOGNAME``, which containers often lack (``KeyError: 'LOGNAME'``)."""
    if os.environ.get("LOGNAME"):
        return
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # a UID without a passwd entry (docker run --user)
        name = f"uid{os.getuid()}"
    os.environ["LOGNAME"] = name


def _masks(cfg: Config, runs: list) -> dict[str, str] | None:
    """The user's mask of each run (prefix -> file), or None when masks are computed."""
    from ..bids import find_mask

    wf_cfg = cfg.workflow
    if wf_cfg.mask_file is not None:
        return {run.prefix: str(wf_cfg.mask_file) for run in runs}
    if wf_cfg.mask_derivatives is not None:
        return {run.prefix: find_mask(run, wf_cfg.mask_derivatives) for run in runs}
    return None


def build_participant_wf(cfg: Config, subject: str, runs: list, stage_dir: Path | None = None):
    """One participant's workflow, from the settings, staging its outputs in ``stage_dir``
    (``BIDSError``/``ValueError`` if the runs cannot be processed as asked)."""
    from ..workflows import init_participant_wf

    ex, wf_cfg = cfg.execution, cfg.workflow
    return init_participant_wf(
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
        refine=wf_cfg.refine,
        refine_steps=wf_cfg.refine_steps,
        fallback_field_strength=ex.field_strength,
        phase_sign=wf_cfg.phase_sign,
        phase_scale=wf_cfg.phase_scale,
        omp_nthreads=cfg.resources.threads,
        max_mem_gb=cfg.resources.mem_gb,
        stage_dir=stage_dir,
    )


def _crash_dir(cfg: Config, subject: str) -> Path:
    """Where the crash files of a participant go (its log folder gets copies)."""
    return cfg.execution.work_dir / "crash" / f"sub-{subject}"


def prepare_participant(
    cfg: Config, subject: str, runs: list, stage_dir: Path
) -> tuple[object | None, list[str]]:
    """Build one participant's workflow (:func:`build_participant_wf`); return it, or
    ``None`` and the line that says why it cannot be built."""
    from ..bids import BIDSError

    try:
        return build_participant_wf(cfg, subject, runs, stage_dir), []
    except (BIDSError, ValueError) as e:
        return None, [str(e)]
    except Exception as e:
        return None, [_unexpected("building the workflow", e, _crash_dir(cfg, subject))]


def run_participant(cfg: Config, subject: str, runs: list, wf) -> list[str]:
    """Run one participant's workflow (from :func:`build_participant_wf`); return failure
    lines (empty: success)."""
    ex = cfg.execution
    crash_dir = _crash_dir(cfg, subject)
    if ex.clean_workdir:
        logger.info("sub-%s: deleting earlier work in %s", subject, ex.work_dir / wf.name)
        for path in (ex.work_dir / wf.name, crash_dir):
            shutil.rmtree(path, ignore_errors=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    wf.base_dir = str(ex.work_dir)
    wf.config["execution"].update(
        {
            "crashdump_dir": str(crash_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": ex.stop_on_first_crash,
            "poll_sleep_duration": 0.2,  # nipype's 2 s default adds seconds per node
        }
    )
    if ex.write_graph:
        _write_graph(wf)
    before = set(crash_dir.glob("crash-*.txt"))
    plugin, plugin_args = _plugin(cfg)
    try:
        with _resource_log(ex.work_dir, subject, ex.resource_monitor) as callback:
            if callback is not None:  # record each step, then stop after a signal
                plugin_args["status_callback"] = _chain(callback, status_callback)
            wf.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as e:  # nipype raises RuntimeError after node crashes
        check_interrupted()  # a signal that nipype took for a node failure
        lines = _crash_summary(crash_dir, before, runs)
        return lines or [_unexpected(f"running the workflow ({plugin})", e, crash_dir)]
    check_interrupted()
    return []


def _write_graph(wf) -> None:
    """Write the workflow graph to WORK_DIR/<workflow>/graph.dot, and graph.svg when
    graphviz's ``dot`` is installed; a failure to draw is a warning, never an error."""
    fmt = "svg" if shutil.which("dot") else "dot"
    try:
        path = wf.write_graph("graph.dot", graph2use="colored", format=fmt, simple_form=True)
    except (OSError, RuntimeError) as e:
        logger.warning("could not write the workflow graph: %s", e)
        return
    logger.info("workflow graph: %s", path)


@contextlib.contextmanager
def _resource_log(work_dir: Path, subject: str, enabled: bool):
    """nipype's resource monitor for one participant: yields the plugin's status callback,
    which writes one JSON line per finished step (run time, peak memory in GB, CPU use in
    %) to WORK_DIR/resource_monitor/sub-<label>.jsonl; yields None when ``enabled`` is off.

    nipype's monitor writes its samples (``.proc-*``) to the current directory: the run
    happens in WORK_DIR/resource_monitor/sub-<label>/ meanwhile, not in the user's."""
    from nipype import config as ncfg
    from nipype.utils.profiler import log_nodes_cb

    ncfg.resource_monitor = enabled
    if not enabled:
        yield None
        return
    if not ncfg.resource_monitor:  # psutil missing: nipype warned already
        yield None
        return
    path = work_dir / "resource_monitor" / f"sub-{subject}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    callback_logger = logging.getLogger("callback")
    handler = logging.FileHandler(path)
    callback_logger.addHandler(handler)
    callback_logger.setLevel(logging.DEBUG)
    callback_logger.propagate = False
    logger.info("sub-%s: resource monitor log in %s", subject, path)
    samples = path.with_suffix("")
    samples.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(samples)
    try:
        yield log_nodes_cb
    finally:
        os.chdir(cwd)
        callback_logger.removeHandler(handler)
        handler.close()
        ncfg.resource_monitor = False


def _chain(*callbacks):
    """One nipype status callback that calls each of ``callbacks`` in turn."""

    def callback(node, status: str) -> None:
        for fn in callbacks:
            fn(node, status)

    return callback


def check_writable(folder: Path, what: str) -> str | None:
    """Create ``folder`` if needed and try writing in it; return why that fails, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot write to the {what} {folder}: {e.strerror or e}"
    return None


@dataclass
class _Participant:
    """The participant being processed, for its log and report if a signal stops it."""

    subject: str
    runs: list
    log: Any  # reporting.ParticipantLog
    wf: Any = None
    writing_report: bool = False


class _Session:
    """What one ``qsmprep`` invocation must undo or record when it stops early: its staged
    outputs, and the log and report of the participant it was processing."""

    def __init__(self):
        self.cfg: Config | None = None
        self.crash_dir: Path | None = None
        self.stage_dir: Path | None = None
        self.current: _Participant | None = None
        self.pool = None  # parallel.ParticipantPool, when participants run in parallel

    def remove_staged(self) -> None:
        if self.stage_dir is None:
            return
        shutil.rmtree(self.stage_dir, ignore_errors=True)
        try:  # the parent is shared with other invocations writing to the same folder
            self.stage_dir.parent.rmdir()
        except OSError:
            pass

    def record_interruption(self, error: Interrupted) -> str:
        """Write the interrupted participant's log folder and report (a further signal cuts
        that short); return what to tell the user about it."""
        from . import reporting

        current, self.current = self.current, None
        if self.pool is not None and self.pool.stopped:
            subs = ", ".join(f"sub-{s}" for s in self.pool.stopped)
            return f"; the logs and reports of {subs} say so"
        if current is None or self.cfg is None:
            return ""
        sub = f"sub-{current.subject}"
        if current.writing_report:  # its outputs are complete; only the report is not
            return f"; the report of {sub} is incomplete: --reports-only writes it again"
        line = (
            f"interrupted by {error.name}: the outputs of this attempt were discarded (earlier "
            "outputs are kept); run the same command again to resume"
        )
        try:
            with next_signal_aborts():
                reporting.finish_participant(
                    self.cfg, current.subject, current.runs, current.log, [line], current.wf
                )
        except Interrupted:
            current.log.close()
            return f"; the log of {sub} is in {current.log.folder} (its report was cut short)"
        return f"; the log and report of {sub} say so"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qsmprep`` console script; returns the exit code.

    SIGINT and SIGTERM stop the worker processes, remove the outputs not yet moved into
    place and return 130 / 143; an unexpected error returns 2 after saving a crash file.
    Neither prints a traceback.
    """
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    session = _Session()
    with handle_signals():
        try:
            try:
                return _main(argv, session)
            except Exception as e:
                line = _unexpected("internal error", e, session.crash_dir)
                print(f"qsmprep: {line}; please report it", file=sys.stderr)
                return EXIT_ERROR
            finally:
                session.remove_staged()
        except Interrupted as e:
            workers = stop_workers() + len(session.pool.stopped if session.pool else [])
            session.remove_staged()
            recorded = session.record_interruption(e)
            stopped = f"stopped {workers} worker process(es), " if workers else ""
            print(
                f"qsmprep: interrupted by {e.name}: {stopped}removed the unfinished outputs; "
                f"run the same command again to resume from the work directory{recorded}",
                file=sys.stderr,
            )
            return e.exit_code


def _main(argv: list[str] | None, session: _Session) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    started = time.time()
    cfg = parse_args(argv)
    _setup_logging(cfg.execution.verbose)
    ex = cfg.execution
    session.cfg, session.crash_dir = cfg, ex.work_dir / "crash"
    if ex.analysis_level == "group":
        from .group import run_group

        return run_group(cfg)
    if ex.reports_only:
        from .reporting import reports_only

        failed = reports_only(cfg, _output_subjects(cfg))
        for line in failed:
            print(f"qsmprep: {line}", file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_OK

    from ..bids import (
        BIDSError,
        SelectionScope,
        check_filters,
        collect_fieldmap_runs,
        collect_runs,
        load_layout,
        select_participants,
    )
    from ..workflows.base import STAGE_DIRNAME

    collect = collect_fieldmap_runs if cfg.workflow.input_type == "fieldmap" else collect_runs

    try:
        layout = load_layout(ex.bids_dir)
    except BIDSError as e:
        print(f"qsmprep: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        check_filters(layout, ex.bids_filters)
    except BIDSError as e:
        print(f"qsmprep: --bids-filter-file {ex.bids_filter_file}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
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
        except Exception as e:
            crash_dir = session.crash_dir / f"sub-{subject}"
            failures[subject] = [_unexpected("finding the runs", e, crash_dir)]
            continue
        if runs:
            selected[subject] = runs
        else:
            logger.warning("sub-%s: no multi-echo GRE run selected; skipped", subject)
    if not ex.skip_bids_validation:
        # only the selection counts: a broken participant that was not selected (or a run
        # that the filters leave out) must not block the others
        scope = SelectionScope.of(
            ex.bids_dir,
            [run for runs in selected.values() for run in runs],
            ex.session_label,
            whole=list(failures),
        )
        logger.info("validating %s with bids-validator-deno (the selection)", ex.bids_dir)
        errors = validate_bids(ex.bids_dir, scope)
        if errors:
            print(f"qsmprep: {ex.bids_dir} is not valid BIDS ({len(errors)} error(s)):",
                  file=sys.stderr)  # fmt: skip
            for err in errors[:MAX_LISTED_ISSUES]:
                print(f"  {err}", file=sys.stderr)
            if len(errors) > MAX_LISTED_ISSUES:
                print(f"  ... and {len(errors) - MAX_LISTED_ISSUES} more", file=sys.stderr)
            print("Fix the dataset or pass --skip-bids-validation.", file=sys.stderr)
            return EXIT_INVALID
    if not selected and not failures:
        suffixes = ex.bids_filters.get("suffix", SUFFIXES)
        suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
        wanted = (
            "fmap/*_fieldmap with *_magnitude"
            if cfg.workflow.input_type == "fieldmap"
            else f"anat/*_part-{{mag,phase}}_{{{','.join(suffixes)}}}"
        )
        print(f"qsmprep: no run matches the selection ({wanted})", file=sys.stderr)
        if cfg.workflow.input_type != "fieldmap":
            from ..bids import other_gre_suffixes

            others = other_gre_suffixes(layout, subjects, suffixes)
            if others:
                print(
                    f"qsmprep: magnitude and phase images with suffix {', '.join(others)} are "
                    f"there: select them with --megre-suffix {' '.join(others)}",
                    file=sys.stderr,
                )
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
    from . import reporting

    if ex.boilerplate_only:
        return _boilerplate_only(cfg, selected)
    for folder, what in ((ex.output_dir, "output directory"), (ex.work_dir, "work directory")):
        problem = check_writable(folder, what)
        if problem:
            print(f"qsmprep: {problem}", file=sys.stderr)
            return EXIT_USAGE
    write_dataset_description(ex.output_dir, ex.bids_dir)
    for subject, lines in failures.items():  # its runs could not be found: a log and report
        log = reporting.start_participant_log(cfg, subject, argv, started)
        session.current = _Participant(subject, [], log, writing_report=True)
        reporting.finish_participant(cfg, subject, [], log, lines)
        session.current = None
    session.stage_dir = ex.output_dir / STAGE_DIRNAME / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    how = _plan(cfg, selected)
    if how.parallel > 1:
        from .parallel import ParticipantPool

        memory = "" if how.mem_gb is None else f" and {how.mem_gb:.1f} GB"
        logger.info(
            "%d of %d participants at a time, each in its own process with %d nipype "
            "process(es), %d thread(s) per process%s",
            how.parallel,
            len(selected),
            how.nprocs,
            how.threads,
            memory,
        )
        share = replace(
            cfg,
            resources=replace(
                cfg.resources, nprocs=how.nprocs, omp_nthreads=how.threads, mem_gb=how.mem_gb
            ),
        )

        def target(subject: str) -> list[str]:
            stage = session.stage_dir / f"sub-{subject}"
            return _participant_main(cfg, share, subject, selected[subject], argv, stage)

        session.pool = ParticipantPool(target, how.parallel)
        results, rest = session.pool.run(list(selected), ex.stop_on_first_crash)
        processed = list(results)
        failures.update({subject: lines for subject, lines in results.items() if lines})
        for subject in session.pool.died:  # killed: a log folder and report say so
            log = reporting.start_participant_log(cfg, subject, argv, started)
            session.current = _Participant(subject, selected[subject], log, writing_report=True)
            reporting.finish_participant(cfg, subject, selected[subject], log, results[subject])
            session.current = None
    else:
        processed, rest = [], []
        for subject, runs in selected.items():
            processed.append(subject)
            stage = session.stage_dir / f"sub-{subject}"
            lines = _process_participant(cfg, cfg, subject, runs, argv, session, stage)
            if lines:
                failures[subject] = lines
                if ex.stop_on_first_crash:
                    rest = [s for s in selected if s not in processed]
                    break
    if rest:
        running = " (the participants already running finished)" if how.parallel > 1 else ""
        logger.warning(
            "stopped at the first failure (--stop-on-first-crash)%s; not processed: %s",
            running,
            ", ".join(f"sub-{s}" for s in rest),
        )

    done = [s for s in processed if s not in failures]
    if done:
        print(f"qsmprep: outputs of {len(done)} participant(s) in {ex.output_dir}",
              file=sys.stderr)  # fmt: skip
    for subject, lines in failures.items():
        for line in lines:
            print(f"qsmprep: sub-{subject} failed: {line}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def _plan(cfg: Config, selected: dict[str, list]) -> Plan:
    """How many of the ``selected`` participants run at once, and with what (see
    :func:`qsmprep.cli.parallel.plan`): one at a time under a nipype plugin file (the plugin
    decides), and with the U-Net on a GPU (one GPU's memory is not shared out)."""
    from ..workflows.base import estimate_mem_gb
    from .parallel import plan

    res, wf_cfg = cfg.resources, cfg.workflow
    peak = max(
        (
            estimate_mem_gb(run.shape, max(1, len(run.echo_times)))
            for runs in selected.values()
            for run in runs
        ),
        default=0.0,
    )
    allowed = not res.plugin
    if allowed and wf_cfg.inversion == "adaptive-unet" and wf_cfg.device != "cpu":
        import torch

        allowed = not torch.cuda.is_available()
    return plan(len(selected), res.nprocs, res.threads, res.mem_gb, peak, allowed=allowed)


def _process_participant(
    cfg: Config,
    share: Config,
    subject: str,
    runs: list,
    argv: list[str],
    session: _Session,
    stage: Path,
) -> list[str]:
    """Process one participant: its log folder, its workflow (run with the resources of
    ``share``; outputs staged in ``stage``, each run's committed once complete) and its
    report; return its failure lines (empty: success). ``session.current`` names it while
    it runs, for an interruption."""
    from . import reporting

    t0 = time.perf_counter()
    current = _Participant(subject, runs, reporting.start_participant_log(cfg, subject, argv))
    session.current = current
    logger.info("sub-%s: %d run(s)", subject, len(runs))
    if share is not cfg:
        res = share.resources
        memory = "" if res.mem_gb is None else f" and {res.mem_gb:.1f} GB"
        logger.info(
            "sub-%s: beside other participants, with %d nipype process(es), %d thread(s) per "
            "process%s",
            subject,
            res.nprocs,
            res.threads,
            memory,
        )
    current.wf, lines = prepare_participant(share, subject, runs, stage)
    if current.wf is not None:
        lines = run_participant(share, subject, runs, current.wf)
    shutil.rmtree(stage, ignore_errors=True)  # what a failed run left staged
    if not lines:
        logger.info("sub-%s: done in %.0f s", subject, time.perf_counter() - t0)
    # the runs' outputs are committed (or kept as they were): the report reads them
    current.writing_report = True
    reporting.finish_participant(cfg, subject, runs, current.log, lines, current.wf)
    session.current = None
    return lines


def _participant_main(
    cfg: Config, share: Config, subject: str, runs: list, argv: list[str], stage: Path
) -> list[str]:
    """One participant in its own process (participants in parallel): like :func:`main`
    for one participant, a signal stops its worker processes, removes its staged outputs
    and is recorded in its log and report; an unexpected error fails only this
    participant, with a crash file. Returns the failure lines."""
    session = _Session()
    session.cfg, session.crash_dir = cfg, cfg.execution.work_dir / "crash"
    with handle_signals():
        try:
            try:
                return _process_participant(cfg, share, subject, runs, argv, session, stage)
            except Exception as e:
                return [_unexpected("processing the participant", e, _crash_dir(cfg, subject))]
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        except Interrupted as e:
            stop_workers()
            shutil.rmtree(stage, ignore_errors=True)
            session.record_interruption(e)
            return [f"interrupted by {e.name}"]


def _output_subjects(cfg: Config) -> list[str]:
    """Participants with a folder in OUTPUT_DIR (those of --participant-label only)."""
    found = sorted(p.name[4:] for p in cfg.execution.output_dir.glob("sub-*") if p.is_dir())
    wanted = cfg.execution.participant_label
    return [s for s in found if wanted is None or s in wanted]


def _boilerplate_only(cfg: Config, selected: dict[str, list]) -> int:
    """--boilerplate-only: the methods text of the selected runs, into OUTPUT_DIR/logs."""
    from ..bids import BIDSError
    from .reporting import write_methods

    problem = check_writable(cfg.execution.output_dir, "output directory")
    if problem:
        print(f"qsmprep: {problem}", file=sys.stderr)
        return EXIT_USAGE
    paragraphs: list[str] = []
    for subject, runs in selected.items():
        try:
            text = build_participant_wf(cfg, subject, runs).visit_desc()
        except (BIDSError, ValueError) as e:
            print(f"qsmprep: sub-{subject}: {e}", file=sys.stderr)
            return EXIT_FAILED
        paragraphs += [p for p in text.split("\n\n") if p not in paragraphs]
    write_methods("\n\n".join(paragraphs), None, cfg.execution.output_dir)
    print(f"qsmprep: methods boilerplate in {cfg.execution.output_dir / 'logs'}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
