"""Per-participant logs, methods boilerplate and reports, for :mod:`qsmprep.cli.run`.

Each participant run gets ``OUTPUT_DIR/sub-X/log/<timestamp>/`` holding

- ``qsmprep.log``: the log of that participant (qsmprep's and nipype's messages);
- ``qsmprep.toml``: the resolved configuration, usable again with ``--config-file``;
- ``command.txt``: the command line;
- ``timings.json``: wall time of each processing node, per run;
- ``errors.txt`` and copies of the nipype crash files, when something failed;
- ``methods.md``: the methods boilerplate with ``[@key]`` citations;

then the methods go to ``OUTPUT_DIR/logs/CITATION.{md,html,bib}`` and the report to
``OUTPUT_DIR/sub-X.html``. A report that cannot be written is a warning, never a failure of
the participant.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from ..reports.outputs import log_root

logger = logging.getLogger("qsmprep")

#: Settings that are not written to the resolved TOML: the positional arguments (given on
#: the command line), values derived from others (``mem`` resolves into ``mem-gb``), and
#: the modes of one invocation (``clean-workdir`` would delete the work that a run with the
#: same settings resumes from).
_NOT_IN_TOML = {
    "bids_dir",
    "output_dir",
    "analysis_level",
    "bids_filters",
    "plugin",
    "mem",
    "clean_workdir",
    "reports_only",
    "boilerplate_only",
}

#: Loggers whose messages go to a participant's log file.
_LOGGERS = ("qsmprep", "nipype.workflow", "nipype.interface")


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are valid TOML


def config_toml(cfg: Config, argv: Sequence[str]) -> str:
    """The resolved settings as TOML (keys are the long options), with the command line
    and the positional arguments as comments; ``--config-file`` reads it back."""
    ex = cfg.execution
    lines = [
        f"# qsmprep {__version__}: resolved settings, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"# command: {command_line(argv)}",
        f"# bids_dir = {str(ex.bids_dir)!r}, output_dir = {str(ex.output_dir)!r}, "
        f"analysis_level = {ex.analysis_level!r}",
    ]
    for section in (cfg.execution, cfg.resources, cfg.workflow):
        for f in fields(section):
            value = getattr(section, f.name)
            if f.name in _NOT_IN_TOML or value is None or value == {}:
                continue
            lines.append(f"{f.name.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def command_line(argv: Sequence[str]) -> str:
    """``qsmprep`` and its arguments, quoted for a shell."""
    return shlex.join(["qsmprep", *map(str, argv)])


@dataclass
class ParticipantLog:
    """A participant's log folder and the handler that fills its ``qsmprep.log``."""

    subject: str
    folder: Path
    handler: logging.Handler
    started: float  # time.time() at the start

    def close(self) -> None:
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()


def start_participant_log(
    cfg: Config, subject: str, argv: Sequence[str], started: float | None = None
) -> ParticipantLog:
    """Create ``sub-X/log/<timestamp>/`` with the settings and command line, and send the
    qsmprep and nipype messages to its ``qsmprep.log`` until :meth:`ParticipantLog.close`.
    ``started`` (``time.time()``, default now) is when the participant's processing began:
    crash files written since then are copied into the folder."""
    from ..interfaces._io import atomic_write_bytes

    stamp = time.strftime("%Y%m%d-%H%M%S") + "_" + secrets.token_hex(3)
    folder = log_root(cfg.execution.output_dir, subject) / stamp
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(config_toml(cfg, argv).encode(), folder / "qsmprep.toml")
    atomic_write_bytes((command_line(argv) + "\n").encode(), folder / "command.txt")
    handler = logging.FileHandler(folder / "qsmprep.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG if cfg.execution.verbose >= 2 else logging.INFO)
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(handler)
    log = ParticipantLog(subject, folder, handler, time.time() if started is None else started)
    logger.info("sub-%s: qsmprep %s, command line: %s", subject, __version__, command_line(argv))
    logger.info("sub-%s: log folder %s", subject, folder)
    return log


def node_timings(work_dir: Path, wf, runs: Sequence, since: float) -> dict[str, dict]:
    """Wall time (s) of every node of each run's QSM workflow, from nipype's result files
    in ``work_dir``: ``{run prefix: {node: {"seconds": s, "cached": bool}}}``; a node
    whose result is older than ``since`` (``time.time()``) was reused from an earlier run."""
    from nipype.utils.filemanip import loadpkl

    from ..workflows.base import qsm_workflow_name

    out: dict[str, dict] = {}
    for run in runs:
        folder = Path(work_dir) / wf.name / qsm_workflow_name(run.prefix)
        nodes = {}
        for result in sorted(folder.glob("*/result_*.pklz")):
            try:
                runtime = loadpkl(result).runtime
                seconds = float(getattr(runtime, "duration", 0.0))
            except Exception:  # an unreadable result file only loses its timing
                continue
            nodes[result.parent.name] = {
                "seconds": round(seconds, 3),
                "cached": result.stat().st_mtime < since,
            }
        if nodes:
            out[run.prefix] = nodes
    return out


def copy_crash_files(crash_dir: Path, folder: Path, since: float) -> list[Path]:
    """Copy the crash files written in ``crash_dir`` since ``since`` into ``folder``."""
    copied = []
    for path in sorted(Path(crash_dir).glob("crash-*")):
        if path.stat().st_mtime >= since - 1:
            target = folder / path.name
            shutil.copy2(path, target)
            copied.append(target)
    return copied


def write_methods(text: str, log_folder: Path | None, output_dir: Path) -> None:
    """Store the raw methods text in the log folder and write ``OUTPUT_DIR/logs/CITATION.*``."""
    from ..interfaces._io import atomic_write_bytes
    from ..reports.boilerplate import write_citation_files

    if log_folder is not None:
        atomic_write_bytes((text + "\n").encode(), log_folder / "methods.md")
    write_citation_files(text, Path(output_dir) / "logs")


def finish_participant(
    cfg: Config,
    subject: str,
    runs: Sequence,
    log: ParticipantLog,
    failures: Sequence[str],
    wf=None,
) -> None:
    """Record timings, errors, crash files and methods in the log folder; write the
    boilerplate and the participant's report; close the log."""
    import json

    from ..interfaces._io import atomic_write_bytes
    from ..reports.participant import write_participant_report

    ex = cfg.execution
    try:
        if failures:
            atomic_write_bytes(("\n".join(failures) + "\n").encode(), log.folder / "errors.txt")
            crash_dir = ex.work_dir / "crash" / f"sub-{subject}"
            copied = copy_crash_files(crash_dir, log.folder, log.started)
            for path in copied:
                logger.info("sub-%s: crash file copied to %s", subject, path)
        if wf is not None:
            timings = node_timings(ex.work_dir, wf, runs, log.started)
            atomic_write_bytes(
                (json.dumps(timings, indent=2) + "\n").encode(), log.folder / "timings.json"
            )
            write_methods(wf.visit_desc(), log.folder, ex.output_dir)
        t0 = time.perf_counter()
        path = write_participant_report(ex.output_dir, subject, log_dir=log.folder)
        logger.info("sub-%s: report %s (%.1f s)", subject, path, time.perf_counter() - t0)
    except Exception as e:  # the outputs are written: a report problem must not fail them
        logger.warning("sub-%s: the report could not be written: %s: %s", subject,
                       type(e).__name__, e)  # fmt: skip
    finally:
        log.close()


def reports_only(cfg: Config, subjects: Sequence[str]) -> list[str]:
    """``--reports-only``: write the reports of ``subjects`` again from the output folder
    (figures, QC numbers, the newest log folder); return failure lines."""
    failed = []
    from ..reports.participant import write_participant_report

    for subject in subjects:
        try:
            path = write_participant_report(cfg.execution.output_dir, subject)
            logger.info("sub-%s: report %s", subject, path)
        except Exception as e:
            failed.append(f"sub-{subject}: report failed: {type(e).__name__}: {e}")
    return failed
