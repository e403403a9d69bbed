"""Typed settings of a qsmprep run, from the command line and an optional TOML file.

Only the top-level code (:mod:`qsmprep.cli.run`) reads a :class:`Config`; workflow
factories take plain arguments, so any of them can be embedded elsewhere.

Every long command-line option has a field of the same name (hyphens become
underscores), and a TOML file passed with ``--config-file`` may set any of them::

    unwrapping = "romeo"
    bf-removal = "vsharp"
    omp-nthreads = 2
    participant-label = ["01", "02"]

The command line wins over the TOML file, which wins over the defaults. The defaults of
the processing choices live in :data:`qsmprep.workflows.qsm.DEFAULT_METHODS` and
``DEFAULT_OPTIONS`` (re-exported here) and nowhere else, so that ``init_qsm_wf()`` with
no arguments builds the same pipeline as the command line.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .workflows.qsm import AUTO_MASKING, DEFAULT_METHODS, DEFAULT_OPTIONS, resolve_masking

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Inversion methods that are not in :data:`qsmprep.qsm.inversion.METHODS` (torch code).
EXTRA_INVERSIONS = ("adaptive-unet",)

#: Group level: registration of each run to the template (affine, or affine then SyN).
#: Affine is the default: on the head phantoms (docs/outputs.md) SyN's cross-contrast
#: warps (GRE magnitude to a T1w template) moved the deep grey ROIs off their nuclei.
REGISTRATIONS = ("affine", "syn")

#: Exit codes (BIDS-Apps draft, and the shell's 128 + signal number for interruptions).
EXIT_OK = 0
EXIT_FAILED = 1  # some participant failed; the others' outputs are written
EXIT_ERROR = 2  # qsmprep itself failed outside any participant (a crash file says why)
EXIT_INVALID = 16
EXIT_NOTHING_SELECTED = 18
EXIT_USAGE = 64
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class ConfigError(ValueError):
    """A setting has a wrong value; the message says which and why."""


def method_choices() -> dict[str, tuple[str, ...]]:
    """Names accepted for each stage, read from the method registries.

    A method added to a registry (``METHODS`` in :mod:`qsmprep.qsm.unwrap`,
    :mod:`~qsmprep.qsm.masking`, :mod:`~qsmprep.qsm.bgremove`,
    :mod:`~qsmprep.qsm.inversion`) becomes a valid choice without any change here.
    """
    from .qsm import bgremove, inversion, masking, unwrap

    return {
        "unwrapping": tuple(unwrap.METHODS),
        "masking": (AUTO_MASKING, *masking.METHODS),
        "bf_removal": tuple(bgremove.METHODS),
        "inversion": tuple(inversion.METHODS) + EXTRA_INVERSIONS,
    }


def _default_nprocs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class ExecutionConfig:
    """What to process and where."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    work_dir: Path = field(default_factory=lambda: Path("work").absolute())
    participant_label: list[str] | None = None
    session_label: list[str] | None = None
    bids_filter_file: Path | None = None
    bids_filters: dict[str, Any] = field(default_factory=dict)
    skip_bids_validation: bool = False
    megre_suffix: list[str] | None = None
    field_strength: float | None = None
    stop_on_first_crash: bool = False
    write_graph: bool = False
    resource_monitor: bool = False
    clean_workdir: bool = False
    verbose: int = 0
    reports_only: bool = False
    boilerplate_only: bool = False
    registration: str = "affine"
    template_chimaps: bool = False


@dataclass
class ResourceConfig:
    """Processes, threads and memory."""

    nprocs: int = field(default_factory=_default_nprocs)
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    mem: str | None = None  # fMRIPrep's --mem: MB, or with a unit (16G); sets mem_gb
    use_plugin: Path | None = None
    plugin: dict[str, Any] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        """Threads per process: ``omp_nthreads``, or ``nprocs`` when it is not set."""
        return self.omp_nthreads or self.nprocs


@dataclass
class WorkflowConfig:
    """Algorithm choices (the registries' names) and their options."""

    unwrapping: str = DEFAULT_METHODS["unwrapping"]
    masking: str = DEFAULT_METHODS["masking"]
    bf_removal: str = DEFAULT_METHODS["bf_removal"]
    inversion: str = DEFAULT_METHODS["inversion"]
    input_type: str = DEFAULT_OPTIONS["input_type"]
    mcpc3ds: bool = DEFAULT_OPTIONS["mcpc3ds"]
    two_pass: bool = DEFAULT_OPTIONS["two_pass"]
    r2star: str = DEFAULT_OPTIONS["r2star"]
    swi: bool = DEFAULT_OPTIONS["swi"]
    mask_file: Path | None = None
    mask_derivatives: Path | None = None
    device: str = "auto"
    model: Path | None = None
    phase_sign: str = "auto"
    phase_scale: float | None = None
    refine: str = DEFAULT_OPTIONS["refine"]
    refine_steps: int | None = None


@dataclass
class Config:
    """All settings of one qsmprep invocation."""

    execution: ExecutionConfig
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Config:
        """Build and validate from a flat mapping of option names to values.

        Names use underscores (``bf_removal``) or hyphens (``bf-removal``); ``None``
        values are ignored so that the defaults apply.
        """
        flat = {_key(k): v for k, v in options.items() if v is not None}
        unknown = sorted(set(flat) - set(option_names()) - {"config_file"})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        for name, value in flat.items():
            check_type(name, value)
        sections = {}
        for name, section in _SECTIONS.items():
            own = {f.name: flat[f.name] for f in fields(section) if f.name in flat}
            sections[name] = own
        if "bids_dir" not in sections["execution"] or "output_dir" not in sections["execution"]:
            raise ConfigError("bids_dir and output_dir are required")
        cfg = cls(
            execution=ExecutionConfig(**sections["execution"]),
            resources=ResourceConfig(**sections["resources"]),
            workflow=WorkflowConfig(**sections["workflow"]),
        )
        cfg._normalise()
        return cfg

    @property
    def user_mask(self) -> bool:
        """Whether the masks come from the user (``mask_file`` or ``mask_derivatives``)."""
        return self.workflow.mask_file is not None or self.workflow.mask_derivatives is not None

    @property
    def r2star_method(self) -> str | None:
        """The R2* fit to run, or ``None`` (``r2star = "off"``)."""
        return None if self.workflow.r2star == "off" else self.workflow.r2star

    def _normalise(self) -> None:
        ex, res, wf = self.execution, self.resources, self.workflow
        ex.bids_dir = Path(ex.bids_dir).absolute()
        if not ex.bids_dir.is_dir():
            raise ConfigError(f"bids_dir is not a directory: {ex.bids_dir}")
        ex.output_dir = Path(ex.output_dir).absolute()
        if ex.output_dir == ex.bids_dir:
            raise ConfigError("output_dir must differ from bids_dir")
        ex.work_dir = Path(ex.work_dir).absolute()
        for what, folder in (("output_dir", ex.output_dir), ("work-dir", ex.work_dir)):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{what} {folder} exists and is not a directory")
        if ex.analysis_level not in ("participant", "group"):
            raise ConfigError(
                f"analysis level must be participant or group, not {ex.analysis_level!r}"
            )
        ex.participant_label = _labels(ex.participant_label, "sub-")
        ex.session_label = _labels(ex.session_label, "ses-")
        if ex.bids_filter_file is not None:
            ex.bids_filter_file = Path(ex.bids_filter_file)
            ex.bids_filters = load_bids_filters(ex.bids_filter_file)
        if ex.megre_suffix is not None:
            ex.megre_suffix = _suffixes(ex.megre_suffix, ex.bids_filters)
            ex.bids_filters = {**ex.bids_filters, "suffix": ex.megre_suffix}
        for name in ("stop_on_first_crash", "write_graph", "resource_monitor", "clean_workdir"):
            setattr(ex, name, bool(getattr(ex, name)))
        if ex.field_strength is not None:
            ex.field_strength = float(ex.field_strength)
            if not 0 < ex.field_strength <= 30:
                raise ConfigError(f"field strength must be in (0, 30] T, not {ex.field_strength}")
        ex.verbose = int(ex.verbose)
        ex.reports_only, ex.boilerplate_only = bool(ex.reports_only), bool(ex.boilerplate_only)
        if ex.reports_only and ex.boilerplate_only:
            raise ConfigError("give either reports-only or boilerplate-only, not both")
        if ex.registration not in REGISTRATIONS:
            raise ConfigError(
                f"registration must be one of {', '.join(REGISTRATIONS)}, not {ex.registration!r}"
            )
        ex.template_chimaps = bool(ex.template_chimaps)
        res.nprocs = _positive_int(res.nprocs, "nprocs")
        if res.omp_nthreads is not None:
            res.omp_nthreads = _positive_int(res.omp_nthreads, "omp-nthreads")
        if res.mem is not None:
            if res.mem_gb is not None:
                raise ConfigError("give the memory limit with mem or mem-gb, not both")
            res.mem_gb = parse_memory_gb(res.mem)
        if res.mem_gb is not None:
            res.mem_gb = float(res.mem_gb)
            if res.mem_gb <= 0:
                raise ConfigError(f"mem-gb must be positive, not {res.mem_gb}")
        if res.use_plugin is not None:
            res.use_plugin = Path(res.use_plugin)
            res.plugin = load_plugin(res.use_plugin)
        choices = method_choices()
        for stage, names in choices.items():
            value = getattr(wf, stage)
            if value not in names:
                raise ConfigError(
                    f"{stage.replace('_', '-')} must be one of {', '.join(names)}, not {value!r}"
                )
        wf.mcpc3ds, wf.two_pass, wf.swi = bool(wf.mcpc3ds), bool(wf.two_pass), bool(wf.swi)
        if ex.megre_suffix is not None and wf.input_type == "fieldmap":
            raise ConfigError("megre-suffix selects GRE images; it does not apply to fieldmap")
        wf.masking = resolve_masking(wf.masking, wf.unwrapping, wf.input_type)
        from .interfaces.qsm import R2STAR_METHODS

        if wf.r2star not in ("off", *R2STAR_METHODS):
            raise ConfigError(
                f"r2star must be one of off, {', '.join(R2STAR_METHODS)}, not {wf.r2star!r}"
            )
        for name in ("mask_file", "mask_derivatives"):
            value = getattr(wf, name)
            if value is not None:
                value = Path(value).absolute()
                if not value.exists():
                    raise ConfigError(f"{name.replace('_', '-')} not found: {value}")
                setattr(wf, name, value)
        if wf.mask_file is not None and wf.mask_derivatives is not None:
            raise ConfigError("give either mask-file or mask-derivatives, not both")
        from .workflows.qsm import check_methods

        try:
            check_methods(
                wf.unwrapping,
                wf.masking,
                inversion=wf.inversion,
                input_type=wf.input_type,
                two_pass=wf.two_pass,
                user_mask=self.user_mask,
                r2star=self.r2star_method,
                swi=wf.swi,
                refine=wf.refine,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        wf.phase_sign = {"1": "+1", "+1": "+1", "-1": "-1", "auto": "auto"}.get(
            str(wf.phase_sign).strip(), str(wf.phase_sign)
        )
        if wf.phase_sign not in ("auto", "+1", "-1"):
            raise ConfigError(f"phase-sign must be auto, +1 or -1, not {wf.phase_sign!r}")
        if wf.phase_scale is not None:
            wf.phase_scale = parse_phase_scale(wf.phase_scale)
        if wf.input_type == "fieldmap" and (wf.phase_sign != "auto" or wf.phase_scale):
            raise ConfigError("phase-sign and phase-scale apply to phase, not to a field map")
        if wf.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {wf.device!r}")
        if wf.refine_steps is not None:
            wf.refine_steps = _positive_int(wf.refine_steps, "refine-steps")
        if wf.model is not None:
            wf.model = Path(wf.model).absolute()
            if not wf.model.is_file():
                raise ConfigError(f"model file not found: {wf.model}")


_SECTIONS = {
    "execution": ExecutionConfig,
    "resources": ResourceConfig,
    "workflow": WorkflowConfig,
}

#: What each setting holds (a TOML value of another type is a usage error); the rest are
#: strings.
_KINDS = {
    "bids_dir": "path",
    "output_dir": "path",
    "work_dir": "path",
    "bids_filter_file": "path",
    "use_plugin": "path",
    "mask_file": "path",
    "mask_derivatives": "path",
    "model": "path",
    "config_file": "path",
    "participant_label": "labels",
    "session_label": "labels",
    "skip_bids_validation": "bool",
    "mcpc3ds": "bool",
    "two_pass": "bool",
    "swi": "bool",
    "reports_only": "bool",
    "boilerplate_only": "bool",
    "template_chimaps": "bool",
    "stop_on_first_crash": "bool",
    "write_graph": "bool",
    "resource_monitor": "bool",
    "clean_workdir": "bool",
    "megre_suffix": "suffixes",
    "mem": "memory",
    "field_strength": "number",
    "mem_gb": "number",
    "nprocs": "integer",
    "omp_nthreads": "integer",
    "refine_steps": "integer",
    "verbose": "integer",
    "phase_sign": "sign",
    "phase_scale": "scale",
}

_KIND_TEXT = {
    "path": "a path (string)",
    "labels": 'a label or a list of labels, as strings (e.g. ["01", "02"])',
    "bool": "true or false",
    "number": "a number",
    "integer": "an integer",
    "str": "a string",
    "sign": "auto, +1 or -1",
    "scale": 'a number or an expression such as "pi/4096"',
    "suffixes": 'a suffix or a list of suffixes, as strings (e.g. ["MP2RAGE"])',
    "memory": 'MB as a number (16000) or a string with a unit ("16G")',
}


def check_type(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` has the type of setting ``name``."""
    kind = _KINDS.get(_key(name), "str")
    ok = {
        "path": lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "",
        "labels": lambda v: (
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        ),
        "bool": lambda v: isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "sign": lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
        "scale": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        "suffixes": lambda v: (
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        ),
        "memory": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    }[kind](value)
    if not ok:
        option = _key(name).replace("_", "-")
        raise ConfigError(f"{option} must be {_KIND_TEXT[kind]}, not {value!r}")


#: Fields derived from others, never set directly.
_DERIVED = {"bids_filters", "plugin"}


def option_names() -> tuple[str, ...]:
    """Every setting's name (underscored), i.e. the long options and TOML keys."""
    return tuple(
        f.name for section in _SECTIONS.values() for f in fields(section) if f.name not in _DERIVED
    )


def _key(name: str) -> str:
    return name.replace("-", "_")


def _labels(values: list[str] | str | None, prefix: str) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values:
        v = str(v)
        v = v[len(prefix) :] if v.startswith(prefix) else v
        if not re.fullmatch(r"[A-Za-z0-9]+", v):
            raise ConfigError(f"label {v!r} is not alphanumeric (BIDS labels are [a-zA-Z0-9]+)")
        if v not in out:
            out.append(v)
    return out


def _suffixes(values: list[str] | str, filters: Mapping[str, Any]) -> list[str]:
    from .bids import GRE_SUFFIXES

    values = [values] if isinstance(values, str) else list(values)
    bad = [v for v in values if v not in GRE_SUFFIXES]
    if bad or not values:
        raise ConfigError(
            f"megre-suffix must be among {', '.join(GRE_SUFFIXES)}, not {', '.join(bad) or 'none'}"
        )
    if "suffix" in filters:
        raise ConfigError(
            "give the GRE suffix with megre-suffix or in the BIDS filter file, not both"
        )
    return list(dict.fromkeys(values))


#: Units of ``--mem`` (decimal, as fMRIPrep reads them), in GB; no unit means MB.
_MEM_UNITS = {"": 1e-3, "K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}


def parse_memory_gb(value: Any) -> float:
    """``--mem`` as fMRIPrep has it: a number of MB (``16000``), or a number with a unit
    ``K``, ``M``, ``G`` or ``T`` (optionally followed by ``B``: ``16G``, ``16GB``); in GB."""
    text = str(value).strip().upper().removesuffix("B")
    number = text.rstrip("KMGT")
    unit = text[len(number) :]
    try:
        gb = float(number) * _MEM_UNITS[unit]
    except (KeyError, ValueError):
        raise ConfigError(
            f"mem must be MB (16000) or a number with a unit (16G), not {value!r}"
        ) from None
    if not 0 < gb < float("inf"):
        raise ConfigError(f"mem must be positive and finite, not {value!r}")
    return gb


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, not {value!r}") from None
    if n < 1:
        raise ConfigError(f"{name} must be at least 1, not {n}")
    return n


def parse_phase_scale(value: float | str) -> float:
    """``--phase-scale``: radians per stored unit, as a number or a product/quotient of
    numbers and ``pi`` (``"pi/4096"``, ``"2*pi/4096"``, ``"1/1000"``)."""
    text = str(value).replace(" ", "").lower()
    tokens = re.split(r"([*/])", text)
    try:
        result = math.pi if tokens[0] == "pi" else float(tokens[0])
        for op, token in zip(tokens[1::2], tokens[2::2], strict=True):
            factor = math.pi if token == "pi" else float(token)
            result = result * factor if op == "*" else result / factor
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f'phase-scale must be a number or an expression such as "pi/4096", not {value!r}'
        ) from None
    if not (math.isfinite(result) and result > 0):
        raise ConfigError(f"phase-scale must be positive, not {value!r}")
    return result


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML settings file; keys are long option names (hyphens or underscores)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    out = {_key(k): v for k, v in data.items()}
    nested = sorted(k for k, v in out.items() if isinstance(v, dict))
    unknown = sorted(set(out) - set(option_names()) - set(nested))
    if nested or unknown:
        bad = ", ".join(nested + unknown)
        raise ConfigError(f"config file {path}: unknown key(s) {bad}")
    for positional in ("bids_dir", "output_dir", "analysis_level"):
        if positional in out:
            raise ConfigError(f"config file {path}: {positional} is given on the command line")
    return out


def load_bids_filters(path: Path) -> dict[str, Any]:
    """Read a ``--bids-filter-file``: ``{"megre": {pybids entity: value, ...}}``.

    The filters narrow the query for the multi-echo GRE images, e.g.
    ``{"megre": {"acquisition": "highres", "run": 1}}``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"BIDS filter file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"BIDS filter file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or set(data) - {"megre"}:
        raise ConfigError(
            f'BIDS filter file {path} must be an object with the single key "megre", '
            f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
    filters = data.get("megre", {})
    if not isinstance(filters, dict):
        raise ConfigError(f'BIDS filter file {path}: "megre" must map entities to values')
    return filters


def load_plugin(path: Path) -> dict[str, Any]:
    """Read a nipype plugin YAML: ``plugin: MultiProc`` and optional ``plugin_args: {...}``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"plugin file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"plugin file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or "plugin" not in data:
        raise ConfigError(f"plugin file {path} must set 'plugin' (e.g. MultiProc, SLURM)")
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"plugin file {path}: plugin_args must be a mapping")
    name = str(data["plugin"])
    known = nipype_plugins()
    if name not in known:
        raise ConfigError(
            f"plugin file {path}: unknown nipype plugin {name!r} (known: {', '.join(known)})"
        )
    return {"plugin": name, "plugin_args": args}


def nipype_plugins() -> tuple[str, ...]:
    """Names of the execution plugins of the installed nipype (``MultiProc``, ``SLURM``...)."""
    from nipype.pipeline import plugins

    return tuple(
        sorted(
            n.removesuffix("Plugin")
            for n in dir(plugins)
            if n.endswith("Plugin") and n != "Plugin"
        )
    )
