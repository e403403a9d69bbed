"""Property-based tests of BIDS discovery and metadata parsing (hypothesis).

Random datasets (odd entities, missing and mistyped sidecar keys, broken sidecars and
images) must raise nothing but qsmprep's own :class:`~qsmprep.bids.BIDSError`, and what
discovery accepts must be usable as it is.
"""

import json
import math
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsmprep.bids import (
    METADATA_RANGES,
    BIDSError,
    collect_runs,
    load_layout,
    metadata_number,
    metadata_text,
    read_metadata,
    select_participants,
)
from qsmprep.conventions import phase_sign, ppm_field_strength

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    suppress_health_check=[HealthCheck.too_slow],
)

KEYS = ("EchoTime", "MagneticFieldStrength", "ImagingFrequency", "Units", "Manufacturer")

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5000, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.004, 0.012, 0.02, 3.0, 7.0, 123.2, "rad", "arbitrary", "4 ms", "GE", ""]),
    st.text(max_size=6),
)
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=3), json_scalars, max_size=2),
)
plausible_values = {
    "MagneticFieldStrength": st.sampled_from([3.0, 7.0, 1.5]),
    "ImagingFrequency": st.sampled_from([123.2, 127.7, 297.2]),
    "Units": st.sampled_from(["rad", "arbitrary"]),
    "Manufacturer": st.sampled_from(["Siemens", "GE MEDICAL SYSTEMS", "Philips", "qsmprep"]),
}


def sidecars(echo: int):
    """Sidecar of one echo's image: mostly plausible, else missing, broken or mistyped."""
    plausible = st.fixed_dictionaries(
        {"EchoTime": st.just(0.004 * max(echo, 1))}, optional=plausible_values
    )
    return st.one_of(
        plausible,
        plausible,
        plausible,
        st.none(),  # no sidecar
        st.sampled_from(["{bad json", "[0.004]", '"text"', "", "\udcff"]),  # broken
        st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5),  # mistyped
    )


images = st.sampled_from(["ok"] * 8 + ["empty", "4d", "other shape", "junk"])
labels = st.one_of(
    st.sampled_from(["01", "02", "a", "hr"]), st.text("ab1-", min_size=1, max_size=3)
)


@st.composite
def datasets(draw):
    """{relative path: content}: images as a kind of image, sidecars as JSON text or a dict."""
    files = {}
    for sub in draw(st.lists(st.sampled_from(["01", "02", "x1"]), min_size=1, max_size=2,
                             unique=True)):  # fmt: skip
        ses = draw(st.one_of(st.none(), labels))
        acq = draw(st.one_of(st.none(), labels))
        run = draw(st.one_of(st.none(), st.integers(0, 3)))
        suffix = draw(st.sampled_from(["MEGRE", "T2starw"]))
        optional = (("ses", ses), ("acq", acq), ("run", run))
        ents = [f"sub-{sub}"] + [f"{k}-{v}" for k, v in optional if v is not None]
        folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses is not None else "") + "anat"
        echoes = draw(  # echo 0: no echo- entity
            st.one_of(
                st.integers(1, 4).map(lambda n: list(range(1, n + 1))),
                st.lists(st.integers(0, 4), min_size=1, max_size=4, unique=True),
            )
        )
        for echo in echoes:
            parts = draw(st.one_of(st.just({"mag", "phase"}), st.sets(
                st.sampled_from(["mag", "phase"]), min_size=1)))  # fmt: skip
            for part in parts:
                echo_ent = [] if echo == 0 else [f"echo-{echo}"]
                stem = "_".join(ents + echo_ent + [f"part-{part}", suffix])
                files[f"{folder}/{stem}.nii.gz"] = draw(images)
                files[f"{folder}/{stem}.json"] = draw(sidecars(echo))
    inherited = f"{draw(st.sampled_from(['', 'sub-01/']))}MEGRE.json"
    files[inherited] = draw(st.one_of(st.none(), st.none(), sidecars(0)))
    return files


def _write(root: Path, files: dict) -> None:
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".json"):
            if content is None:
                continue
            text = content if isinstance(content, str) else json.dumps(content)
            path.write_bytes(text.encode("utf-8", "surrogateescape"))
        elif content == "empty":
            path.write_bytes(b"")
        elif content == "junk":
            path.write_bytes(b"not a nifti file" * 30)
        else:
            shape = {"ok": (3, 3, 2), "4d": (3, 3, 2, 2), "other shape": (3, 2, 2)}[content]
            nb.save(nb.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)


@SETTINGS
@given(datasets())
def test_discovery_raises_only_bidserror(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        root.mkdir()
        _write(root, files)
        try:
            layout = load_layout(root)
            subjects = select_participants(layout)
        except BIDSError:
            return
        for subject in subjects:
            try:
                runs = collect_runs(layout, subject)
            except BIDSError as e:
                assert str(e) and "\n" not in str(e)  # one line
                continue
            for run in runs:  # what discovery accepts is usable as it is
                assert len(run.echo_times) == len(run.mag_files) == len(run.phase_files) > 0
                assert all(0 < te < 1 for te in run.echo_times)
                assert list(run.echo_times) == sorted(set(run.echo_times))
                assert run.field_strength is None or 0 < run.field_strength <= 30
                assert run.phase_units is None or isinstance(run.phase_units, str)
                assert len(run.shape) == 3
                assert phase_sign(run, "auto")[0] in (1, -1)
                try:
                    b0, record = ppm_field_strength(run)
                except BIDSError:
                    assert run.field_strength is None
                else:
                    assert math.isfinite(b0) and b0 > 0 and record["Source"]


@SETTINGS
@given(st.sampled_from(KEYS), json_values)
def test_metadata_values_are_checked(key, value):
    try:
        number = metadata_number({key: value}, key, "x_MEGRE.nii.gz")
    except BIDSError as e:
        assert key in str(e) and "x_MEGRE.json" in str(e)
    else:
        low, high = METADATA_RANGES.get(key, (-math.inf, math.inf))
        assert number is None or (math.isfinite(number) and low < number <= high)
        assert (number is None) == (value is None)
    try:
        text = metadata_text({key: value}, key, "x_MEGRE.nii.gz")
    except BIDSError:
        assert not isinstance(value, str) and value is not None
    else:
        assert text == value


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.one_of(json_values, st.text(max_size=8)), st.booleans())
def test_sidecar_content_raises_only_bidserror(content, as_text):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = root / "sub-01" / "anat" / "sub-01_part-mag_MEGRE.nii.gz"
        image.parent.mkdir(parents=True)
        text = content if as_text and isinstance(content, str) else json.dumps(content)
        image.with_name("sub-01_part-mag_MEGRE.json").write_bytes(
            text.encode("utf-8", "surrogateescape")
        )
        try:
            meta = read_metadata(image, root)
        except BIDSError as e:
            assert "sub-01_part-mag_MEGRE.json" in str(e)
        else:
            assert isinstance(content, dict) and json.dumps(meta) == json.dumps(content)
