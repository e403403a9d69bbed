"""The participant report: ``OUTPUT_DIR/sub-X.html`` with its figures in ``sub-X/figures/``.

Everything comes from what a run left behind: the outputs and their sidecars, the input
magnitude they cite, the phase figure that the workflow drew (it needs intermediates that
are not outputs), and the participant's newest log folder (stage timings, resolved
configuration, command line, errors, methods text). So ``qsmprep --reports-only`` can
write the report again from an output folder.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from . import figures
from .outputs import RunOutputs, find_runs, latest_log_dir, load_image, preload, report_path
from .qc import QC_RULES, run_qc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger("qsmprep")

#: Files of a participant's log folder that the report reads.
LOG_FILES = {
    "log": "qsmprep.log",
    "config": "qsmprep.toml",
    "command": "command.txt",
    "timings": "timings.json",
    "errors": "errors.txt",
    "methods": "methods.md",
}

#: Figures of a run: name -> caption.
FIGURES = {
    "mask": "Brain mask (red outline) over the first-echo magnitude, in three planes.",
    "phase": "Phase of one echo before (wrapped, input) and after unwrapping.",
    "fields": "Total field (Hz) and local field (ppm, background removed) in the mask, on "
    "symmetric diverging scales.",
    "chimap": "Susceptibility (ppm) in three planes, fixed window.",
    "histogram": "Histogram of chi in the mask (mean and +-1 std marked).",
}

#: Sidecar keys of the processing choices, with their labels in the summary.
_METHOD_KEYS = (
    ("Unwrapping", "unwrapping"),
    ("PhaseOffsetRemoval", "phase offset"),
    ("Masking", "masking"),
    ("BackgroundFieldRemoval", "background removal"),
    ("DipoleInversion", "dipole inversion"),
    ("Referencing", "referencing"),
)

_QC_LABELS = {
    "mask_volume_ml": ("mask volume (mL)", "{:.1f}"),
    "mask_head_share": ("share of the head's interior in the mask", "{:.1%}"),
    "residual": ("data-consistency residual ||D*chi - f|| / ||f||", "{:.3f}"),
    "low_reliability_share": ("share of mask voxels with low field reliability", "{:.1%}"),
    "chi_mean_ppm": ("chi mean in the mask (ppm)", "{:.4f}"),
    "chi_std_ppm": ("chi std in the mask (ppm)", "{:.4f}"),
    "sign_index": ("sign index (p99.5 + p0.5) / (p99.5 - p0.5)", "{:+.3f}"),
}


def read_log_dir(log_dir: Path | None) -> dict[str, Any]:
    """What the report uses from a participant's log folder (missing parts are empty)."""
    out: dict[str, Any] = {"config": {}, "command": "", "timings": {}, "errors": [],
                           "methods": "", "crash_files": []}  # fmt: skip
    if log_dir is None or not Path(log_dir).is_dir():
        return out
    log_dir = Path(log_dir)
    path = log_dir / LOG_FILES["config"]
    if path.is_file():
        try:
            out["config"] = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            pass
    for key in ("command", "methods"):
        path = log_dir / LOG_FILES[key]
        if path.is_file():
            out[key] = path.read_text().strip()
    path = log_dir / LOG_FILES["timings"]
    if path.is_file():
        try:
            out["timings"] = json.loads(path.read_text())
        except ValueError:
            pass
    path = log_dir / LOG_FILES["errors"]
    if path.is_file():
        out["errors"] = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out["crash_files"] = [str(p) for p in sorted(log_dir.glob("crash-*"))]
    return out


def _fmt_params(record: Any) -> str:
    if not isinstance(record, dict):
        return str(record)
    text = str(record.get("Method", ""))
    params = record.get("Parameters") or {}
    if params:
        text += " (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
    for key in ("TwoPass", "Model"):
        if key in record:
            text += f"; {key}: {record[key]}"
    return text


def _summary(run: RunOutputs, facts: dict, timings: dict, config: dict) -> list[tuple[str, str]]:
    meta = run.sidecar("chi_map")
    rows: list[tuple[str, str]] = []
    tes = meta.get("EchoTime") or []
    if tes:
        rows.append(
            ("echoes", f"{len(tes)}: " + ", ".join(f"{1000 * t:.2f}" for t in tes) + " ms")
        )
    elif "FieldSource" in meta:
        rows.append(("input", str(meta["FieldSource"])))
    b0 = meta.get("MagneticFieldStrength")
    ppm = meta.get("PpmConversion") or {}
    freq = meta.get("ImagingFrequency") or ppm.get("ImagingFrequency")
    if b0 is not None:
        rows.append(
            ("field strength", f"{b0:g} T" + (f" (imaging frequency {freq} MHz)" if freq else ""))
        )
    if ppm.get("FieldStrength") is not None:
        rows.append(("ppm relative to", f"{ppm['FieldStrength']:g} T, from {ppm.get('Source')}"))
    side = meta.get("SideInformation") or {}
    if side:
        vs = side.get("VoxelSize", [])
        b = np.asarray(side.get("B0Direction", [0, 0, 1]), dtype=float)
        angle = float(np.degrees(np.arccos(min(1.0, abs(b[2]) / max(np.linalg.norm(b), 1e-12)))))
        rows.append(("voxel size", " x ".join(f"{v:.3g}" for v in vs) + " mm"))
        direction = ", ".join(f"{v:.3f}" for v in b)
        source = f"; from the {meta['B0DirectionSource']}" if "B0DirectionSource" in meta else ""
        rows.append(
            (
                "B0 direction (voxel axes)",
                f"({direction}), {angle:.1f} deg from the slice axis{source}",
            )
        )
    scaling = meta.get("PhaseScaling") or facts.get("PhaseScaling")
    if scaling:
        rows.append(("phase scaling", str(scaling)))
    sign = meta.get("PhaseSign") or facts.get("PhaseSign")
    if sign is not None:
        source = f" ({meta['PhaseSignSource']})" if "PhaseSignSource" in meta else ""
        text = f"{sign:+d}" if isinstance(sign, int) else str(sign)
        rows.append(("phase sign", text + source))
    if meta.get("NonFiniteVoxels"):
        rows.append(
            (
                "NaN/Inf voxels in the inputs",
                f"{meta['NonFiniteVoxels']}: field interpolated from their neighbours, left "
                "out of the reliable mask",
            )
        )
    for key, label in _METHOD_KEYS:
        if key in meta:
            rows.append((label, _fmt_params(meta[key])))
    inversion = (meta.get("DipoleInversion") or {}).get("Method")
    device = config.get("device", "auto") if inversion == "adaptive-unet" else "cpu"
    rows.append(("device", str(device)))
    if timings:
        total = sum(t.get("seconds", 0.0) for t in timings.values() if not t.get("cached"))
        parts = ", ".join(
            f"{name} {t['seconds']:.1f} s" + (" (cached)" if t.get("cached") else "")
            for name, t in timings.items()
        )
        rows.append(("wall time per stage", f"{parts}; {total:.1f} s run now"))
    generated = _generated_by(run.output_dir)
    rows.append(("qsmprep version of the outputs", generated or "unknown"))
    return rows


def _generated_by(output_dir: Path) -> str:
    try:
        desc = json.loads((output_dir / "dataset_description.json").read_text())
        return str(desc["GeneratedBy"][0]["Version"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def _qc_rows(qc: dict) -> list[dict]:
    rules = {r.column: r for r in QC_RULES}
    rows = []
    for column, (label, fmt) in _QC_LABELS.items():
        value = qc.get(column)
        rule = rules.get(column)
        rows.append(
            {
                "label": label,
                "value": "n/a" if value is None else fmt.format(value),
                "rule": "" if rule is None else f"{'>' if rule.above else '<'} {rule.limit:g}",
                "flagged": column in qc.get("flagged", []),
            }
        )
    return rows


def run_figures(run: RunOutputs, window: float = figures.CHI_WINDOW_PPM) -> list[str]:
    """Draw the run's figures from its outputs (the phase figure comes from the workflow);
    return notes on figures that could not be drawn."""
    notes = []
    chi_img = load_image(run.path("chi_map"))
    mask_img = load_image(run.path("mask"))
    mask = np.asarray(mask_img.dataobj) > 0
    mag_path = run.magnitude()
    if mag_path is not None:
        figures.plot_mask(load_image(mag_path), mask_img, run.figure("mask"))
    else:
        notes.append("The input magnitude was not found (raw dataset moved?): no mask figure.")
    local = run.path("local_field")
    if local is not None:
        total = run.path("total_field")
        figures.plot_fields(
            load_image(total) if total is not None else None, load_image(local), mask_img,
            run.figure("fields"),
        )  # fmt: skip
    figures.plot_chimap(chi_img, run.figure("chimap"), window)
    chi = np.asarray(chi_img.dataobj, dtype=np.float32)
    figures.plot_histogram(chi[mask], run.figure("histogram"), window)
    return notes


def write_participant_report(
    output_dir: Path,
    subject: str,
    *,
    log_dir: Path | None = None,
    errors: Sequence[str] | None = None,
    methods_html: str | None = None,
    window: float = figures.CHI_WINDOW_PPM,
) -> Path:
    """Write ``OUTPUT_DIR/sub-<subject>.html`` and its figures; return the report's path.

    ``log_dir`` defaults to the participant's newest log folder; ``errors`` and
    ``methods_html`` default to what that folder holds.
    """
    from ..interfaces._io import atomic_write_bytes
    from .boilerplate import render

    output_dir = Path(output_dir)
    log_dir = log_dir if log_dir is not None else latest_log_dir(output_dir, subject)
    log = read_log_dir(log_dir)
    if errors is None:
        errors = log["errors"]
    if methods_html is None and log["methods"]:
        methods_html = render(log["methods"]).html
    runs = []
    for run in find_runs(output_dir, subject):
        t0 = time.perf_counter()
        kinds = ("chi_map", "mask", "local_field", "total_field", "reliability")
        preload([run.path(k) for k in kinds] + [run.quality(), run.magnitude()])
        # the QC numbers (FFTs and distance maps, which release the GIL) are computed
        # while matplotlib draws the figures
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(run_qc, run)
            notes = run_figures(run, window)
            qc = pending.result()
        facts_path = run.figure("phase").with_suffix(".json")
        facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
        shown = []
        for name, caption in FIGURES.items():
            path = run.figure(name)
            if path.is_file():
                if name == "phase" and facts.get("Caption"):
                    caption = facts["Caption"]
                rel = path.relative_to(output_dir).as_posix()
                shown.append({"src": rel, "alt": f"{run.stem} {name}", "caption": caption})
        runs.append(
            {
                "stem": run.stem,
                "summary": _summary(run, facts, log["timings"].get(run.stem, {}), log["config"]),
                "qc": qc,
                "qc_rows": _qc_rows(qc),
                "figures": shown,
                "notes": notes,
            }
        )
        logger.info("%s: report figures and QC in %.1f s", run.stem, time.perf_counter() - t0)
    page = (
        environment()
        .get_template("participant.html")
        .render(
            subject=subject,
            runs=runs,
            errors=list(errors),
            crash_files=log["crash_files"],
            methods=methods_html,
            version=__version__,
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
            log_dir=str(log_dir) if log_dir else "",
            command=log["command"],
        )
    )
    out = report_path(output_dir, subject)
    atomic_write_bytes(page.encode(), out)
    return out


def environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("qsmprep", "data/templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
