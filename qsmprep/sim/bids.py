"""Write simulated multi-echo GRE runs as a BIDS raw dataset, with the truth kept aside.

Layout (BIDS 1.10)::

    root/dataset_description.json, participants.tsv/.json, README
    root/sub-X[/ses-Y]/anat/sub-X[_ses-Y][_acq-Z][_run-N]_echo-N_part-{mag,phase}_MEGRE.nii.gz
                                                                             (+ .json)
    truth_dir/runs.json                  index of runs (paths relative to truth_dir / root)
    truth_dir/sub-X[/ses-Y]/<prefix>_{chi,mask,labels,totalfield,localfield,
                                      backgroundfield,r2star}.nii.gz, <prefix>_params.json

``truth_dir`` defaults to ``root.parent / f"{root.name}-truth"``: outside the BIDS root, so
no BIDS tool mistakes the truth for data. Truth units: chi ppm (relative to water), total
field Hz, local and background field ppm, R2* 1/s; the mask and labels are uint8.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from . import tissues as T
from .phantom import HeadPhantom, make_head_phantom
from .signal import MegreSimulation, check_echo_times, simulate_megre, tilt_rotation

#: Siemens stores phase as integers -4096..4095 for -pi..pi.
SIEMENS_PHASE_MAX = 4096

#: Threads compressing NIfTI files.
_WRITE_WORKERS = min(4, os.cpu_count() or 1)

#: BIDS version the written datasets follow.
BIDS_VERSION = "1.10.0"

#: Truth maps per run: key -> (file suffix, what it holds).
TRUTH_MAPS = {
    "chi": ("chi", "susceptibility, ppm relative to water"),
    "mask": ("mask", "brain mask (1 inside)"),
    "labels": ("labels", "tissue labels (see params Labels)"),
    "total_field": ("totalfield", "total field, Hz (after the simulated shim)"),
    "local_field": ("localfield", "local field of the sources inside the brain mask, ppm"),
    "background_field": ("backgroundfield", "background field = total - local, ppm"),
    "r2star": ("r2star", "R2*, 1/s at the run's field strength"),
}


@dataclass(frozen=True)
class Preset:
    """Default output voxel size (mm) and echo times (s) of a dataset size."""

    voxel_size: tuple[float, float, float]
    echo_times: tuple[float, ...]


#: ``small``: whole head at 4 mm (45 x 55 x 45) for tests; ``2mm`` for accuracy
#: benchmarks; ``1mm`` (180 x 220 x 180) for speed benchmarks.
PRESETS: dict[str, Preset] = {
    "small": Preset((4.0, 4.0, 4.0), (0.004, 0.008, 0.012, 0.016)),
    "2mm": Preset((2.0, 2.0, 2.0), (0.004, 0.008, 0.012, 0.016)),
    "1mm": Preset((1.0, 1.0, 1.0), (0.004, 0.008, 0.012, 0.016)),
}

_LABEL_RE = re.compile(r"[A-Za-z0-9]+")


def simulation_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    """Grid on which a run of ``voxel_size`` (mm) is simulated before box averaging:
    2 mm when every output voxel is at least 4 mm (2x oversampling), else the 1 mm phantom."""
    return (2.0, 2.0, 2.0) if min(voxel_size) >= 4.0 else (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class SubjectSpec:
    """One run to simulate. Runs that share ``label`` share the phantom (one head).

    ``voxel_size`` and ``echo_times`` default to the preset's; ``seed`` is the phantom
    seed (default: the dataset seed plus the subject's index). ``phase_units``: ``"rad"``
    (float32, Units "rad") or ``"siemens"`` (int16 -4096..4095, Units "arbitrary").
    ``write_field_strength=False`` leaves MagneticFieldStrength out of the sidecars.
    """

    label: str
    session: str | None = None
    acq: str | None = None
    run: int | None = None
    voxel_size: tuple[float, float, float] | None = None
    b0_tilt_deg: tuple[float, float] = (0.0, 0.0)
    echo_times: tuple[float, ...] | None = None
    field_strength: float = 3.0
    write_field_strength: bool = True
    phase_units: str = "rad"
    snr: float | None = 50.0
    seed: int | None = None

    @property
    def prefix(self) -> str:
        """``sub-X[_ses-Y][_acq-Z][_run-N]``."""
        parts = [f"sub-{self.label}"]
        if self.session is not None:
            parts.append(f"ses-{self.session}")
        if self.acq is not None:
            parts.append(f"acq-{self.acq}")
        if self.run is not None:
            parts.append(f"run-{self.run}")
        return "_".join(parts)

    @property
    def subdir(self) -> Path:
        """``sub-X[/ses-Y]``."""
        d = Path(f"sub-{self.label}")
        return d / f"ses-{self.session}" if self.session is not None else d

    def validate(self) -> None:
        for name in ("label", "session", "acq"):
            v = getattr(self, name)
            if (v is not None or name == "label") and not (
                isinstance(v, str) and _LABEL_RE.fullmatch(v)
            ):
                raise ValueError(f"{name} must be alphanumeric (BIDS label), got {v!r}")
        if self.run is not None and (not isinstance(self.run, int) or self.run < 1):
            raise ValueError(f"run must be a positive integer, got {self.run!r}")
        if self.phase_units not in ("rad", "siemens"):
            raise ValueError(f"phase_units must be 'rad' or 'siemens', got {self.phase_units!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        # the simulation checks these too, but only after earlier runs were written
        if self.echo_times is not None:
            check_echo_times(self.echo_times)
        if self.voxel_size is not None:
            vs = np.asarray(self.voxel_size, float)
            if vs.shape != (3,) or not np.all(vs >= 1.0):
                raise ValueError(f"voxel_size must be 3 values >= 1 mm, got {self.voxel_size}")
        tilt_rotation(self.b0_tilt_deg)
        if not self.field_strength > 0:
            raise ValueError(f"field_strength must be positive tesla, got {self.field_strength}")
        if self.snr is not None and not self.snr > 0:
            raise ValueError(f"snr must be positive (None for no noise), got {self.snr}")


@dataclass
class RunInfo:
    """Files of one written run: BIDS inputs (ordered by echo) and truth maps."""

    subject: str
    session: str | None
    acq: str | None
    run: int | None
    prefix: str
    mag_files: list[Path]
    phase_files: list[Path]
    echo_times: tuple[float, ...]
    field_strength: float
    truth: dict[str, Path] = field(default_factory=dict)

    def load_truth(self, name: str) -> np.ndarray:
        """Truth map ``name`` (a :data:`TRUTH_MAPS` key) as an array (mask as bool)."""
        if name not in TRUTH_MAPS:
            raise ValueError(f"unknown truth map {name!r}; known: {sorted(TRUTH_MAPS)}")
        data = np.asarray(nib.load(self.truth[name]).dataobj)
        return data > 0 if name == "mask" else data

    @property
    def params(self) -> dict:
        """The run's simulation parameters (its ``_params.json``)."""
        return json.loads(self.truth["params"].read_text())


@dataclass
class DatasetInfo:
    """A written dataset: BIDS root, truth directory and its runs."""

    root: Path
    truth_dir: Path
    runs: list[RunInfo]

    def run(self, prefix: str) -> RunInfo:
        """The run whose prefix is ``prefix`` (e.g. ``"sub-01_acq-tilt"``)."""
        for r in self.runs:
            if r.prefix == prefix:
                return r
        raise ValueError(f"no run {prefix!r}; runs: {[r.prefix for r in self.runs]}")


def _check_outside(root: Path, truth_dir: Path) -> None:
    r, t = root.resolve(), truth_dir.resolve()
    if t == r or r in t.parents or t in r.parents:
        raise ValueError(
            f"truth_dir {truth_dir} must lie outside the BIDS root {root} (and not contain it)"
        )


def _check_empty(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{what} {path} exists and is not an empty directory")


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def siemens_phase(phase: np.ndarray) -> np.ndarray:
    """Radians in [-pi, pi) to Siemens-style int16 in -4096..4095 (``round(phase/pi*4096)``)."""
    q = np.round(np.asarray(phase, np.float64) * (SIEMENS_PHASE_MAX / np.pi)).astype(np.int32)
    q[q >= SIEMENS_PHASE_MAX] -= 2 * SIEMENS_PHASE_MAX
    q[q < -SIEMENS_PHASE_MAX] += 2 * SIEMENS_PHASE_MAX
    return q.astype(np.int16)


def _sidecar(spec: SubjectSpec, te: float, tr: float, part: str) -> dict:
    siemens = spec.phase_units == "siemens"
    meta = {
        "Manufacturer": "Siemens" if siemens else "qsmprep",
        "ManufacturersModelName": "qsmprep.sim MNI152 head phantom (simulated)",
        "MRAcquisitionType": "3D",
        "ScanningSequence": "GR",
        "SequenceVariant": "SP",
        "PulseSequenceType": "multi-echo gradient echo",
        "EchoTime": te,
        "RepetitionTime": tr,
        "FlipAngle": 15,
    }
    if spec.write_field_strength:
        meta["MagneticFieldStrength"] = spec.field_strength
    if part == "phase":
        meta["Units"] = "arbitrary" if siemens else "rad"
    return meta


def _write_run(
    root: Path, truth_dir: Path, spec: SubjectSpec, sim: MegreSimulation, params: dict
) -> RunInfo:
    anat = root / spec.subdir / "anat"
    tr = round(sim.echo_times[-1] + 0.008, 4)
    images: list[tuple[np.ndarray, Path]] = []
    mags, phases = [], []
    for e, te in enumerate(sim.echo_times):
        for part in ("mag", "phase"):
            stem = f"{spec.prefix}_echo-{e + 1}_part-{part}_MEGRE"
            if part == "mag":
                data = sim.mag[..., e]
            elif spec.phase_units == "siemens":
                data = siemens_phase(sim.phase[..., e])
            else:
                data = sim.phase[..., e]
            images.append((data, anat / f"{stem}.nii.gz"))
            _write_json(_sidecar(spec, te, tr, part), anat / f"{stem}.json")
            (mags if part == "mag" else phases).append(anat / f"{stem}.nii.gz")

    tdir = truth_dir / spec.subdir
    maps = {
        "chi": sim.chi,
        "mask": sim.mask.astype(np.uint8),
        "labels": sim.labels.astype(np.uint8),
        "total_field": sim.total_field_hz,
        "local_field": sim.local_field_ppm,
        "background_field": sim.background_field_ppm,
        "r2star": sim.r2star,
    }
    truth = {}
    for key, arr in maps.items():
        truth[key] = tdir / f"{spec.prefix}_{TRUTH_MAPS[key][0]}.nii.gz"
        images.append((arr, truth[key]))
    # gzip dominates writing 1 mm data; zlib releases the GIL, so compress in parallel
    with ThreadPoolExecutor(max_workers=_WRITE_WORKERS) as pool:
        list(
            pool.map(
                lambda job: _save_nifti(np.ascontiguousarray(job[0]), sim.affine, job[1]), images
            )
        )
    truth["params"] = tdir / f"{spec.prefix}_params.json"
    _write_json(params, truth["params"])
    return RunInfo(
        subject=spec.label,
        session=spec.session,
        acq=spec.acq,
        run=spec.run,
        prefix=spec.prefix,
        mag_files=mags,
        phase_files=phases,
        echo_times=sim.echo_times,
        field_strength=spec.field_strength,
        truth=truth,
    )


def _tissue_table() -> list[dict]:
    return [asdict(t) for t in T.TISSUES]


def _phantom_seeds(specs: Sequence[SubjectSpec], seed: int) -> dict[str, int]:
    seeds: dict[str, int] = {}
    for spec in specs:
        if spec.label not in seeds:
            seeds[spec.label] = spec.seed if spec.seed is not None else seed + len(seeds)
        elif spec.seed is not None and spec.seed != seeds[spec.label]:
            raise ValueError(
                f"subject {spec.label} is given two phantom seeds; one head, one seed"
            )
    return seeds


def _check_specs(specs: Sequence[SubjectSpec]) -> None:
    seen, with_ses = set(), {}
    for spec in specs:
        spec.validate()
        if spec.prefix in seen:
            raise ValueError(
                f"run {spec.prefix} is given twice; set acq or run to tell them apart"
            )
        seen.add(spec.prefix)
        has = spec.session is not None
        if with_ses.setdefault(spec.label, has) != has:
            raise ValueError(f"subject {spec.label} mixes runs with and without a session")


def write_bids_dataset(
    root: str | os.PathLike,
    subjects: Sequence[SubjectSpec] | None = None,
    preset: str = "small",
    truth_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> DatasetInfo:
    """Simulate ``subjects`` (default one, ``sub-01``) and write them as a BIDS raw dataset.

    ``preset`` (:data:`PRESETS`) sets the default voxel size and echo times. The truth goes
    to ``truth_dir`` (default ``root.parent / f"{root.name}-truth"``), which must lie outside
    ``root``; both must be absent or empty. Returns the files written per run.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(root)
    truth_dir = Path(truth_dir) if truth_dir is not None else root.parent / f"{root.name}-truth"
    specs = list(subjects) if subjects is not None else [SubjectSpec(label="01")]
    if not specs:
        raise ValueError("no subjects to write")
    _check_specs(specs)
    _check_outside(root, truth_dir)
    _check_empty(root, "BIDS root")
    _check_empty(truth_dir, "truth_dir")
    phantom_seeds = _phantom_seeds(specs, seed)
    defaults = PRESETS[preset]

    from qsmprep import __version__

    phantoms: dict[tuple, HeadPhantom] = {}
    runs = []
    for i, spec in enumerate(specs):
        vs = tuple(float(v) for v in (spec.voxel_size or defaults.voxel_size))
        te = tuple(spec.echo_times or defaults.echo_times)
        sim_vs = simulation_voxel_size(vs)
        pseed = phantom_seeds[spec.label]
        key = (sim_vs, pseed)
        if key not in phantoms:
            phantoms[key] = make_head_phantom(sim_vs, seed=pseed)
        run_seed = int(np.random.SeedSequence([seed, pseed, i]).generate_state(1)[0])
        sim = simulate_megre(
            phantoms[key],
            echo_times=te,
            field_strength=spec.field_strength,
            b0_tilt_deg=spec.b0_tilt_deg,
            snr=spec.snr,
            seed=run_seed,
            voxel_size=vs,
        )
        params = {
            "Generator": f"qsmprep.sim {__version__}",
            "Preset": preset,
            "Subject": spec.label,
            "Session": spec.session,
            "Acquisition": spec.acq,
            "Run": spec.run,
            "PhaseUnits": spec.phase_units,
            "MagneticFieldStrengthWritten": spec.write_field_strength,
            **sim.params(),
            "ChiOutside": T.CHI_AIR,
            "Tissues": _tissue_table(),
            "TruthMaps": {k: v[1] for k, v in TRUTH_MAPS.items()},
        }
        runs.append(_write_run(root, truth_dir, spec, sim, params))

    _write_dataset_files(root, specs, phantom_seeds, __version__)
    info = DatasetInfo(root=root, truth_dir=truth_dir, runs=runs)
    _write_index(info)
    return info


def _write_dataset_files(
    root: Path, specs: Sequence[SubjectSpec], seeds: dict[str, int], version: str
) -> None:
    _write_json(
        {
            "Name": "qsmprep simulated head phantom",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["qsmprep developers"],
            "GeneratedBy": [
                {
                    "Name": "qsmprep.sim",
                    "Version": version,
                    "Description": "MNI152 head phantom, simulated multi-echo GRE",
                }
            ],
        },
        root / "dataset_description.json",
    )
    lines = ["participant_id\tphantom_seed"]
    lines += [f"sub-{label}\t{s}" for label, s in seeds.items()]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    _write_json(
        {
            "participant_id": {"Description": "Subject label"},
            "phantom_seed": {
                "Description": "Seed of the simulated head phantom (veins, calcification)"
            },
        },
        root / "participants.json",
    )
    (root / "README").write_text(
        "Simulated multi-echo GRE data of the qsmprep MNI152 head phantom "
        "(qsmprep.sim).\n\nThe ground truth (susceptibility, fields, masks, labels) is kept "
        "outside this dataset, in the directory listed by the generator.\n"
    )


def _write_index(info: DatasetInfo) -> None:
    def rel(p: Path, base: Path) -> str:
        return os.path.relpath(p, base)

    runs = []
    for r in info.runs:
        runs.append(
            {
                "prefix": r.prefix,
                "subject": r.subject,
                "session": r.session,
                "acq": r.acq,
                "run": r.run,
                "echo_times": list(r.echo_times),
                "field_strength": r.field_strength,
                "mag_files": [rel(p, info.root) for p in r.mag_files],
                "phase_files": [rel(p, info.root) for p in r.phase_files],
                "truth": {k: rel(p, info.truth_dir) for k, p in r.truth.items()},
            }
        )
    _write_json(
        {"root": rel(info.root, info.truth_dir), "runs": runs}, info.truth_dir / "runs.json"
    )


def load_dataset_info(truth_dir: str | os.PathLike) -> DatasetInfo:
    """Read back the :class:`DatasetInfo` of a dataset from its ``truth_dir/runs.json``."""
    truth_dir = Path(truth_dir)
    index = truth_dir / "runs.json"
    if not index.is_file():
        raise ValueError(f"{index} not found: not a qsmprep.sim truth directory")
    doc = json.loads(index.read_text())
    root = (truth_dir / doc["root"]).resolve()
    runs = [
        RunInfo(
            subject=r["subject"],
            session=r["session"],
            acq=r["acq"],
            run=r["run"],
            prefix=r["prefix"],
            mag_files=[root / p for p in r["mag_files"]],
            phase_files=[root / p for p in r["phase_files"]],
            echo_times=tuple(r["echo_times"]),
            field_strength=r["field_strength"],
            truth={k: truth_dir / p for k, p in r["truth"].items()},
        )
        for r in doc["runs"]
    ]
    return DatasetInfo(root=root, truth_dir=truth_dir, runs=runs)
