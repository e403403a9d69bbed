"""BIDS discovery: multi-echo GRE runs and the metadata QSM needs.

Input images are ``anat/sub-X[_ses-Y][_acq-Z][_run-N]_echo-N_part-{mag,phase}_{MEGRE,T2starw}``
(a single-echo run may omit ``echo-``). Files are grouped into runs by every entity but
``echo`` and ``part``; each run must have a magnitude and a phase image for the same echoes
1..N, on one grid, with ``EchoTime`` (s) in the sidecars. Problems raise
:class:`BIDSError` with a one-line message that names the file.

Sidecars are read here, by the BIDS inheritance principle (:func:`read_metadata`), not by
pybids' metadata index: pybids stops indexing the whole dataset at the first sidecar that is
not a JSON object, whereas a broken sidecar must fail only the runs that inherit it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

logger = logging.getLogger("qsmprep")

#: Suffixes of the multi-echo gradient-echo images qsmprep reads by default.
SUFFIXES = ("MEGRE", "T2starw")

#: Suffixes that ``--megre-suffix`` accepts: BIDS suffixes under which multi-echo GRE
#: magnitude and phase are stored (``T1w`` as in qMRI QSM examples, ``MP2RAGE`` with
#: ``inv-`` for multi-echo MP2RAGE).
GRE_SUFFIXES = ("MEGRE", "T2starw", "T1w", "MP2RAGE")

#: pybids entity name -> BIDS key, in BIDS filename order (BIDS 1.10 schema), for every
#: entity a raw image may carry except ``echo`` and ``part``, which vary within a run.
#: Output names keep all of them, so that two runs never share an output name.
NAME_ENTITIES = {
    "subject": "sub",
    "session": "ses",
    "sample": "sample",
    "task": "task",
    "tracksys": "tracksys",
    "acquisition": "acq",
    "nucleus": "nuc",
    "volume": "voi",
    "ceagent": "ce",
    "tracer": "trc",
    "staining": "stain",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "modality": "mod",
    "flip": "flip",
    "inv": "inv",
    "mt": "mt",
    "proc": "proc",
    "recording": "recording",
    "chunk": "chunk",
}

#: Entities that BIDS allows on the derivative maps and masks qsmprep writes (anat
#: parametric maps such as Chimap). Outputs named with any other entity of
#: :data:`NAME_ENTITIES` (e.g. ``inv-`` of MP2RAGE inputs) are listed in the
#: derivatives' ``.bidsignore``.
DERIVATIVE_ENTITIES = (
    "subject",
    "session",
    "task",
    "acquisition",
    "ceagent",
    "reconstruction",
    "run",
    "chunk",
)

#: Entities that vary within one run.
_WITHIN_RUN = {"echo", "part", "extension"}

#: Affine agreement (mm) between the images of one run.
AFFINE_TOL_MM = 1e-3

#: Plausible ranges of the numeric sidecar keys qsmprep reads (BIDS units).
METADATA_RANGES = {
    "EchoTime": (0.0, 1.0),  # s
    "MagneticFieldStrength": (0.0, 30.0),  # T
    "ImagingFrequency": (1.0, 1300.0),  # MHz
}


class BIDSError(ValueError):
    """The input dataset cannot be processed as it is; the message names the file."""


@dataclass(frozen=True)
class MEGRERun:
    """One multi-echo GRE run: magnitude and phase files ordered by echo, and metadata.

    ``echo_times`` are in seconds, ``field_strength`` in tesla (``None`` when the sidecars
    lack ``MagneticFieldStrength``), ``phase_units`` the phase sidecar's ``Units``.
    A run found by :func:`collect_fieldmap_runs` has a ``fieldmap_file`` (``Units``
    ``fieldmap_units``), its magnitude in ``mag_files``, and no phase or echo times.
    """

    subject: str
    session: str | None
    entities: dict[str, Any]
    suffix: str
    mag_files: tuple[str, ...]
    phase_files: tuple[str, ...]
    echo_times: tuple[float, ...]
    field_strength: float | None
    phase_units: str | None
    shape: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    fieldmap_file: str | None = None
    fieldmap_units: str | None = None

    @property
    def source_files(self) -> tuple[str, ...]:
        """Every input file of the run (magnitude and phase by echo, or field map)."""
        if self.fieldmap_file is not None:
            return (*self.mag_files, self.fieldmap_file)
        return tuple(
            f for pair in zip(self.mag_files, self.phase_files, strict=True) for f in pair
        )

    @property
    def prefix(self) -> str:
        """The run's filename stem without echo/part/suffix, e.g. ``sub-01_ses-1_run-1``."""
        parts = []
        for ent, key in NAME_ENTITIES.items():
            value = self.entities.get(ent)
            if value is not None:
                parts.append(f"{key}-{value}")
        return "_".join(parts)

    @property
    def anat_dir(self) -> str:
        """Relative folder of the run's outputs: ``sub-X[/ses-Y]/anat``."""
        ses = f"/ses-{self.session}" if self.session else ""
        return f"sub-{self.subject}{ses}/anat"


def load_layout(bids_dir: Path | str):
    """Index the files of ``bids_dir`` with pybids (no validation here; see
    :mod:`qsmprep.cli.run`). Sidecars are read later, per run, by :func:`read_metadata`."""
    from bids import BIDSLayout
    from bids.layout.index import BIDSLayoutIndexer

    root = Path(bids_dir)
    if not root.is_dir():
        raise BIDSError(f"BIDS directory not found: {root}")
    description = root / "dataset_description.json"
    if not description.is_file():
        raise BIDSError(f"{root} is not a BIDS dataset: dataset_description.json is missing")
    _read_json(description, root)
    try:
        return BIDSLayout(
            str(root),
            validate=False,
            derivatives=False,
            indexer=BIDSLayoutIndexer(index_metadata=False),
        )
    except Exception as e:  # pybids reports a broken dataset in many ways
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BIDSError(f"{root} cannot be indexed as a BIDS dataset: {reason}") from None


def check_filters(layout, filters: dict[str, Any]) -> None:
    """Raise :class:`BIDSError` unless ``filters`` (``--bids-filter-file``) name pybids
    entities with string, number, boolean or null values (or lists of them)."""
    known = set(layout.get_entities())
    unknown = sorted(set(filters) - known)
    if unknown:
        raise BIDSError(
            f"unknown BIDS entity in the filters: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    scalar = (str, int, float, bool, type(None))
    for key, value in filters.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, scalar) for v in values):
            raise BIDSError(
                f"filter {key!r} must be a string, number, boolean, null or a list of them, "
                f"not {value!r}"
            )


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; :class:`BIDSError` naming it otherwise."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BIDSError(
            f"{rel} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except UnicodeDecodeError:
        raise BIDSError(f"{rel} is not UTF-8 text") from None
    except OSError as e:
        raise BIDSError(f"{rel} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise BIDSError(f"{rel} must hold a JSON object, not a {type(data).__name__}")
    return data


def _name_parts(name: str) -> tuple[str, frozenset[str]]:
    """Suffix and ``key-value`` pairs of a BIDS file name (extensions dropped)."""
    parts = name.split(".", 1)[0].split("_")
    return parts[-1], frozenset(parts[:-1])


class Metadata(dict):
    """Sidecar metadata of one image; ``sources`` maps each key to the sidecar (path
    relative to the dataset) that set it, for error messages."""

    def __init__(self, *args, sources: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources = dict(sources or {})


def read_metadata(path: str | Path, root: str | Path) -> Metadata:
    """Sidecar metadata of the image ``path`` in the dataset at ``root``, by the BIDS
    inheritance principle.

    Every ``.json`` in the image's folder or a folder above it (up to ``root``) whose
    suffix is the image's and whose entities are a subset of the image's applies; the
    values of deeper and more specific sidecars win. A sidecar that is not a JSON object
    raises :class:`BIDSError` naming it.
    """
    root = Path(root).absolute()
    meta = Metadata()
    for candidate in sidecar_files(path, root):
        values = _read_json(candidate, root)
        meta.update(values)
        meta.sources.update(dict.fromkeys(values, candidate.relative_to(root).as_posix()))
    return meta


def sidecar_files(path: str | Path, root: str | Path) -> list[Path]:
    """The sidecars that apply to the image ``path`` in the dataset at ``root`` (BIDS
    inheritance principle), least specific first: every ``.json`` in the image's folder or a
    folder above it (up to ``root``) whose suffix is the image's and whose entities are a
    subset of the image's."""
    path, root = Path(path).absolute(), Path(root).absolute()
    suffix, pairs = _name_parts(path.name)
    folders = [path.parent, *path.parent.parents]
    folders = folders[: folders.index(root) + 1] if root in folders else [path.parent]
    found = []
    for depth, folder in enumerate(reversed(folders)):
        for candidate in folder.glob("*.json"):
            c_suffix, c_pairs = _name_parts(candidate.name)
            if c_suffix == suffix and c_pairs <= pairs:
                found.append((depth, len(c_pairs), candidate.name, candidate))
    return [candidate for *_, candidate in sorted(found)]


def metadata_number(meta: dict[str, Any], key: str, image: str | Path) -> float | None:
    """``meta[key]`` as a float within :data:`METADATA_RANGES` (``None`` when absent).

    A value that is not a finite number in range raises :class:`BIDSError` naming the
    image whose sidecar holds it.
    """
    value = meta.get(key)
    if value is None:
        return None
    name = _sidecar_name(meta, key, image)
    if isinstance(value, list):
        raise BIDSError(
            f"{key} in {name} is a list ({_short(value)}); qsmprep needs one value per image "
            "(one file per echo: echo-<index>_part-{mag,phase})"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BIDSError(f"{key} in {name} must be a number, not {_short(value)}{_unit_hint(key)}")
    low, high = METADATA_RANGES.get(key, (-math.inf, math.inf))
    if not (math.isfinite(value) and low < value <= high):
        raise BIDSError(f"{key} {value} in {name} is outside ({low:g}, {high:g}]{_unit_hint(key)}")
    return float(value)


def metadata_text(meta: dict[str, Any], key: str, image: str | Path) -> str | None:
    """``meta[key]`` as a string (``None`` when absent); :class:`BIDSError` otherwise."""
    value = meta.get(key)
    if value is None or isinstance(value, str):
        return value
    raise BIDSError(
        f"{key} in {_sidecar_name(meta, key, image)} must be a string, not {_short(value)}"
    )


def _sidecar_name(meta: dict[str, Any], key: str, image: str | Path) -> str:
    if isinstance(meta, Metadata) and key in meta.sources:
        return meta.sources[key]
    return Path(image).name.removesuffix(".gz").removesuffix(".nii") + ".json"


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unit_hint(key: str) -> str:
    unit = {"EchoTime": "seconds", "MagneticFieldStrength": "tesla", "ImagingFrequency": "MHz"}
    return f" (BIDS gives {key} in {unit[key]})" if key in unit else ""


def select_participants(layout, labels: list[str] | None = None) -> list[str]:
    """Participant labels to process: ``labels`` (without ``sub-``), or all in the dataset.

    Raises :class:`BIDSError` naming the labels that are not in the dataset.
    """
    available = sorted(layout.get_subjects())
    if labels is None:
        return available
    missing = [lab for lab in labels if lab not in available]
    if missing:
        raise BIDSError(
            f"participant(s) not found in {layout.root}: {', '.join(missing)} "
            f"(available: {', '.join(available) or 'none'})"
        )
    return list(labels)


@dataclass(frozen=True)
class SelectionScope:
    """The files of a dataset that concern one qsmprep invocation, so that a problem found
    elsewhere (in a participant that was not selected, or a run that the filters left out)
    does not block it.

    A path relative to the dataset (``/``-separated; a leading ``/`` is allowed) is in the
    scope when it belongs to no participant (``dataset_description.json``,
    ``participants.tsv``, top-level sidecars), or when it belongs to a selected participant
    (and a selected session, if ``sessions`` is set) and is either outside its datatype
    folders (``*_scans.tsv``, ``*_sessions.tsv``, inherited sidecars) or one of the selected
    runs' images or the sidecars that apply to them. All files of the participants in
    ``whole`` are in the scope: their runs could not be listed.
    """

    subjects: frozenset[str]
    files: frozenset[str]
    sessions: frozenset[str] | None = None
    whole: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls,
        root: str | Path,
        runs: list[MEGRERun],
        sessions: list[str] | None = None,
        whole: list[str] | tuple[str, ...] = (),
    ) -> SelectionScope:
        """The scope of ``runs`` (and of the participants in ``whole``) in the dataset at
        ``root``; ``sessions`` are the selected session labels (``None``: all)."""
        root = Path(root).absolute()
        paths = []
        for run in runs:
            for image in run.source_files:
                stem = Path(image).name.removesuffix(".gz").removesuffix(".nii")
                paths += [Path(image), Path(image).with_name(f"{stem}.json")]
                paths += sidecar_files(image, root)
        files = set()
        for path in paths:
            path = Path(path).absolute()
            for base, full in ((root, path), (root.resolve(), path.resolve())):
                if full.is_relative_to(base):
                    files.add(full.relative_to(base).as_posix())
                    break
        return cls(
            subjects=frozenset({run.subject for run in runs} | set(whole)),
            files=frozenset(files),
            sessions=None if sessions is None else frozenset(sessions),
            whole=frozenset(whole),
        )

    def __contains__(self, path: object) -> bool:
        parts = [p for p in str(path).split("/") if p]
        if not parts or not parts[0].startswith("sub-"):
            return True  # the dataset as a whole, or a file of no participant
        subject = parts[0][4:]
        if subject not in self.subjects:
            return False
        session = parts[1][4:] if len(parts) > 2 and parts[1].startswith("ses-") else None
        if self.sessions is not None and session is not None and session not in self.sessions:
            return False
        if subject in self.whole or len(parts) <= 2 + (session is not None):
            return True  # not in a datatype folder
        return "/".join(parts) in self.files


def collect_runs(
    layout,
    subject: str,
    sessions: list[str] | None = None,
    filters: dict[str, Any] | None = None,
) -> list[MEGRERun]:
    """All multi-echo GRE runs of one participant, checked and ordered by echo.

    ``sessions`` restricts to these session labels; ``filters`` are extra pybids query
    entities (the ``"megre"`` part of ``--bids-filter-file``).
    """
    query: dict[str, Any] = {
        "datatype": "anat",
        "suffix": list(SUFFIXES),
        "part": ["mag", "phase"],
        "extension": [".nii", ".nii.gz"],
    }
    query.update(filters or {})
    query["subject"] = subject
    if sessions:
        query["session"] = sessions
    files = layout.get(**query)
    groups: dict[tuple, list] = defaultdict(list)
    for f in files:
        ents = f.get_entities()
        key = tuple(sorted((k, str(v)) for k, v in ents.items() if k not in _WITHIN_RUN))
        groups[key].append(f)
    runs = sorted((_make_run(layout, group) for group in groups.values()), key=_run_order)
    _check_unique_names(runs)
    return runs


def _check_unique_names(runs: list[MEGRERun]) -> None:
    """Refuse runs that would write to the same output names (e.g. a MEGRE and a T2starw
    run with the same entities): one would overwrite the other."""
    seen: dict[str, str] = {}
    for run in runs:
        name = f"{run.anat_dir}/{run.prefix}"
        first = run.fieldmap_file or run.mag_files[0]
        if name in seen:
            raise BIDSError(
                f"two runs would write the same outputs {name}_*: {Path(seen[name]).name} "
                f"and {Path(first).name}; select one with --bids-filter-file"
            )
        seen[name] = first


def other_gre_suffixes(layout, subjects: list[str], selected: list[str]) -> list[str]:
    """Suffixes of :data:`GRE_SUFFIXES` outside ``selected`` under which ``subjects`` have
    ``anat/*_part-phase`` images: what to suggest when no run was selected."""
    candidates = [s for s in GRE_SUFFIXES if s not in selected]
    if not candidates or not subjects:
        return []
    found = layout.get(
        subject=subjects,
        datatype="anat",
        part="phase",
        suffix=candidates,
        extension=[".nii", ".nii.gz"],
        return_type="id",
        target="suffix",
    )
    return [s for s in candidates if s in found]


def collect_fieldmap_runs(
    layout,
    subject: str,
    sessions: list[str] | None = None,
    filters: dict[str, Any] | None = None,
) -> list[MEGRERun]:
    """Total field maps to start from: ``fmap/*_fieldmap`` (Units Hz or rad/s) with the
    ``fmap/*_magnitude`` image of the same entities (BIDS "direct field mapping")."""
    query: dict[str, Any] = {
        "datatype": "fmap",
        "suffix": "fieldmap",
        "extension": [".nii", ".nii.gz"],
    }
    query.update(filters or {})
    query["subject"] = subject
    if sessions:
        query["session"] = sessions
    runs = []
    for f in layout.get(**query):
        # pybids adds an "fmap" entity (the field-map kind) that the magnitude lacks
        ents = {
            k: v for k, v in f.get_entities().items() if k not in ("suffix", "extension", "fmap")
        }
        mags = layout.get(**ents, suffix="magnitude", extension=[".nii", ".nii.gz"])
        name = Path(f.path).name
        if len(mags) != 1:
            raise BIDSError(f"{name} needs exactly one magnitude image, found {len(mags)}")
        meta = read_metadata(f.path, layout.root)
        units = meta.get("Units")
        if units not in ("Hz", "rad/s"):
            raise BIDSError(f"Units of {name} must be Hz or rad/s, not {_short(units)}")
        _check_conventions(meta, f.path)
        shape = _check_grid([mags[0].path, f.path])
        b0 = metadata_number(meta, "MagneticFieldStrength", f.path)
        run_entities = {k: v for k, v in ents.items() if k != "datatype"}
        runs.append(
            MEGRERun(
                subject=str(ents["subject"]),
                session=None if ents.get("session") is None else str(ents["session"]),
                entities=run_entities,
                suffix="fieldmap",
                mag_files=(mags[0].path,),
                phase_files=(),
                echo_times=(),
                field_strength=b0,
                phase_units=None,
                shape=shape,
                metadata=meta,
                fieldmap_file=f.path,
                fieldmap_units=units,
            )
        )
    runs.sort(key=_run_order)
    _check_unique_names(runs)
    return runs


def _run_order(run: MEGRERun) -> tuple:
    """Sort by session, acquisition, ..., run (numbers as numbers), then suffix."""
    key = []
    for ent in NAME_ENTITIES:
        value = run.entities.get(ent)
        text = "" if value is None else str(value)
        key.append((0, int(text), text) if text.isdigit() else (1, 0, text))
    return (*key, run.suffix, sorted((k, str(v)) for k, v in run.entities.items()))


def _echo_number(f) -> int | None:
    echo = f.get_entities().get("echo")
    return None if echo is None else int(echo)


def _make_run(layout, group: list) -> MEGRERun:
    by_part: dict[str, dict[int | None, Any]] = {"mag": {}, "phase": {}}
    for f in group:
        part = f.get_entities()["part"]
        echo = _echo_number(f)
        if echo in by_part[part]:
            raise BIDSError(
                f"two {part} images for echo {echo}: {Path(by_part[part][echo].path).name} "
                f"and {Path(f.path).name}"
            )
        by_part[part][echo] = f
    mags, phases = by_part["mag"], by_part["phase"]
    for have, lack, name in ((mags, phases, "phase"), (phases, mags, "magnitude")):
        for echo, f in have.items():
            if echo not in lack:
                raise BIDSError(f"no {name} image matches {Path(f.path).name}")
    echoes = list(mags)
    if None in echoes and len(echoes) > 1:
        f = mags[None]
        raise BIDSError(f"{Path(f.path).name} has no echo- entity but its run has several echoes")
    numbered = sorted(e for e in echoes if e is not None)
    if numbered and numbered != list(range(1, len(numbered) + 1)):
        missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
        first = Path(mags[numbered[0]].path).name
        raise BIDSError(
            f"echo(es) {', '.join(map(str, missing))} missing for the run of {first} "
            f"(found echoes {', '.join(map(str, numbered))})"
        )
    order = numbered or [None]
    mag_files = [mags[e].path for e in order]
    phase_files = [phases[e].path for e in order]

    echo_times = []
    meta0: dict[str, Any] = {}
    phase_meta0: dict[str, Any] = {}
    for i, (m, p) in enumerate(zip(mag_files, phase_files, strict=True)):
        m_meta, p_meta = read_metadata(m, layout.root), read_metadata(p, layout.root)
        if i == 0:
            meta0, phase_meta0 = {**m_meta, **p_meta}, p_meta
        _check_conventions(m_meta, m)
        _check_conventions(p_meta, p)
        for image, meta in ((p, p_meta), (m, m_meta)):
            if _is_ms(meta.get("EchoTime")):
                raise BIDSError(
                    f"EchoTime {meta['EchoTime']} in the sidecar of {Path(image).name} is not "
                    "in seconds"
                )
        te_m = metadata_number(m_meta, "EchoTime", m)
        te_p = metadata_number(p_meta, "EchoTime", p)
        if te_p is None and te_m is None:
            raise BIDSError(f"EchoTime missing from the sidecar of {Path(p).name}")
        if te_p is not None and te_m is not None and abs(te_p - te_m) > 1e-6:
            raise BIDSError(
                f"EchoTime differs between {Path(m).name} ({te_m}) and {Path(p).name} ({te_p})"
            )
        echo_times.append(te_p if te_p is not None else te_m)
    if any(b <= a for a, b in zip(echo_times, echo_times[1:], strict=False)):
        raise BIDSError(
            f"echo times of the run of {Path(mag_files[0]).name} do not increase with the echo "
            f"number: {echo_times}"
        )

    shape = _check_grid(mag_files + phase_files)
    b0 = metadata_number(phase_meta0, "MagneticFieldStrength", phase_files[0])
    if b0 is None:
        b0 = metadata_number(meta0, "MagneticFieldStrength", mag_files[0])
    ents = group[0].get_entities()
    run_entities = {k: v for k, v in ents.items() if k not in _WITHIN_RUN}
    return MEGRERun(
        subject=str(ents["subject"]),
        session=None if ents.get("session") is None else str(ents["session"]),
        entities=run_entities,
        suffix=str(ents["suffix"]),
        mag_files=tuple(mag_files),
        phase_files=tuple(phase_files),
        echo_times=tuple(echo_times),
        field_strength=b0,
        phase_units=metadata_text(phase_meta0, "Units", phase_files[0]),
        shape=shape,
        metadata=meta0,
    )


def _is_ms(value: Any) -> bool:
    """An echo time that looks like milliseconds rather than seconds (1 to 1000)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 1 <= value < 1e3


def _check_conventions(meta: dict[str, Any], image: str) -> None:
    """Check the types of the sidecar keys that set scanner conventions (used later)."""
    metadata_number(meta, "MagneticFieldStrength", image)
    metadata_number(meta, "ImagingFrequency", image)
    metadata_text(meta, "Manufacturer", image)
    metadata_text(meta, "Units", image)


def _check_grid(files: list[str]) -> tuple[int, ...]:
    """Shape shared by ``files`` (3D, or 4D with one volume); error if a file cannot be read,
    if its affine is degenerate, or if shapes or affines differ."""
    ref_shape, ref_affine, ref_name = None, None, None
    for path in files:
        img = load_header(path)
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise BIDSError(f"{Path(path).name} is not a 3D image (shape {shape})")
        if ref_shape is None:
            ref_shape, ref_affine, ref_name = shape, img.affine, Path(path).name
            continue
        if shape != ref_shape:
            raise BIDSError(f"{Path(path).name} has shape {shape} but {ref_name} has {ref_shape}")
        if not np.allclose(img.affine, ref_affine, atol=AFFINE_TOL_MM):
            raise BIDSError(f"{Path(path).name} and {ref_name} have different affines")
    return ref_shape


def load_header(path: str | Path):
    """The NIfTI image at ``path`` (its header; the data stay on disk), with a usable affine.

    Raises :class:`BIDSError` naming the file when it is empty or not NIfTI, or when its
    affine is not finite or degenerate (a zero-length voxel axis, or parallel axes).
    """
    name = Path(path).name
    try:
        img = nb.load(path)
        affine = np.asarray(img.affine, dtype=float)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, ValueError
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BIDSError(f"{name} cannot be read as a NIfTI image: {reason}") from None
    if not np.all(np.isfinite(affine)):
        raise BIDSError(f"{name} has a non-finite affine (NaN or Inf in its sform/qform)")
    rot = affine[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if np.any(norms < 1e-6) or abs(np.linalg.det(rot / np.maximum(norms, 1e-12))) < 1e-3:
        zooms = ", ".join(f"{v:.3g}" for v in norms)
        raise BIDSError(
            f"{name} has a degenerate affine (voxel axes {zooms} mm long, or parallel): "
            "fix its sform/qform"
        )
    return img


def field_strength(run: MEGRERun, fallback: float | None = None) -> float:
    """The run's B0 in tesla: ``MagneticFieldStrength`` from the sidecar, else ``fallback``.

    Without either, raises :class:`BIDSError` naming the file and the option to pass.
    """
    if run.field_strength is not None:
        if fallback is not None and abs(fallback - run.field_strength) > 1e-3:
            logger.warning(
                "%s: MagneticFieldStrength %.3g T in the sidecar is used, not --field-strength %g",
                run.prefix,
                run.field_strength,
                fallback,
            )
        return run.field_strength
    if fallback is None:
        source = Path(run.fieldmap_file or run.phase_files[0]).name
        sidecar = source.removesuffix(".gz").removesuffix(".nii") + ".json"
        raise BIDSError(
            f"MagneticFieldStrength missing from {sidecar} (and any inherited sidecar); "
            "pass the field strength in tesla with --field-strength"
        )
    return float(fallback)


def find_mask(run: MEGRERun, derivatives_dir: Path | str) -> str:
    """The run's ``desc-brain_mask`` in a derivatives dataset (e.g. an earlier qsmprep output).

    Looks for ``<derivatives_dir>/sub-X[/ses-Y]/anat/<prefix>_desc-brain_mask.nii[.gz]``.
    """
    folder = Path(derivatives_dir) / run.anat_dir
    for ext in (".nii.gz", ".nii"):
        path = folder / f"{run.prefix}_desc-brain_mask{ext}"
        if path.is_file():
            return str(path)
    raise BIDSError(f"no mask {run.prefix}_desc-brain_mask.nii[.gz] in {folder}")


def bids_uri(path: str | Path, root: str | Path, dataset: str = "raw") -> str:
    """``bids:<dataset>:<relative path>`` for a file inside the dataset at ``root``."""
    rel = Path(path).absolute().relative_to(Path(root).absolute())
    return f"bids:{dataset}:{rel.as_posix()}"
