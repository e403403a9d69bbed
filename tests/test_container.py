"""The container build: pinned dependencies, labels, user and numba cache settings of the
Dockerfile, and (slow, with podman and root) the image run as any user."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qsmprep import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONTAINER_CHECK = Path(
    os.environ.get("CONTAINER_CHECK", ROOT.parent / "shared" / "tools" / "container-check")
)


def _name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[_name(name)] = version
    return pins


def _stages() -> dict[str, str]:
    """Dockerfile text of each stage, by stage name."""
    parts = re.split(r"^FROM \S+ AS (\w+)$", DOCKERFILE, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_constraints_pin_every_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = _pins()
    missing = [r for r in requirements if ";" not in r and _name(r) not in pins]
    assert not missing, f"not in constraints.txt (run make constraints): {missing}"
    assert pins["torch"] == "2.13.0"  # no +cpu label: a CUDA build fits it too
    assert "qsmprep" not in pins


def test_every_install_uses_the_constraints():
    installs = re.findall(r"pip install[^\n]*", DOCKERFILE)
    assert len(installs) >= 3
    assert all("-c /opt/qsmprep/constraints.txt" in line for line in installs), installs
    makefile = (ROOT / "Makefile").read_text()
    assert "PIP_INSTALL := $(PY) -m pip install --quiet -c $(CONSTRAINTS)" in makefile
    assert "CONSTRAINTS ?= constraints.txt" in makefile


def test_runtime_stage_labels_user_and_no_simulator():
    stages = _stages()
    assert list(stages) == ["os", "build", "templates", "sim", "runtime"]  # runtime: default
    runtime = stages["runtime"]
    assert f"ARG VERSION={__version__}" in runtime  # bump it with the package version
    for key in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in runtime
    assert runtime.rstrip().splitlines()[-1] == "USER qsmprep"
    assert "useradd --system --uid 1000" in stages["os"]
    # runtime = os + the built environment: no pip layers, no removed files kept below
    assert runtime.lstrip().startswith("COPY --from=build /opt/qsmprep /opt/qsmprep")
    # the simulator's extra is installed in the sim stage only; runtime takes its cache
    assert 'extra == \\"sim\\"' in stages["sim"] and "pip install" not in runtime
    assert "COPY --from=sim /opt/qsmprep/numba-cache /opt/qsmprep/numba-cache" in runtime


def test_group_templates_are_fetched_in_their_own_stage():
    """The group level's templates come from the 'templates' stage (templateflow stays
    there); FETCH_TEMPLATES=0 builds offline with an empty TEMPLATEFLOW_HOME."""
    stages = _stages()
    env = dict(re.findall(r"^\s+(TEMPLATEFLOW_HOME)=(\S+)", stages["os"], re.MULTILINE))
    assert env == {"TEMPLATEFLOW_HOME": "/opt/templateflow"}
    templates = stages["templates"]
    assert "ARG FETCH_TEMPLATES=1" in templates
    assert 'if [ "$FETCH_TEMPLATES" = 1 ]' in templates
    assert 'extra == \\"templates\\"' in templates  # the extra, pinned by constraints.txt
    assert "python -m qsmprep.group.templates fetch" in templates
    assert 'mkdir -p "$TEMPLATEFLOW_HOME"' in templates  # exists (empty) when not fetched
    runtime = stages["runtime"]
    assert "COPY --from=templates /opt/templateflow /opt/templateflow" in runtime
    assert "templateflow" not in stages["build"] and "templateflow" not in stages["sim"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [r.split(">")[0] for r in project["optional-dependencies"]["templates"]] == [
        "templateflow"
    ]


def test_image_numba_settings():
    env = dict(re.findall(r"^\s+(NUMBA_\w+|QSMPREP_\w+)=(\S+)", DOCKERFILE, re.MULTILINE))
    assert env["NUMBA_CPU_NAME"] == "generic"  # one cache for every x86-64 CPU
    assert env["QSMPREP_NUMBA_CACHE"] == "/opt/qsmprep/numba-cache"
    first = env["NUMBA_CACHE_LOCATOR_CLASSES"].split(",")[0]
    module, cls = first.rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[cls]), cls).__name__ == cls
    assert "TORCH_VARIANT=cpu" in DOCKERFILE


@pytest.mark.slow
@pytest.mark.skipif(
    not (CONTAINER_CHECK.is_file() and shutil.which("podman") and shutil.which("buildah")
         and os.geteuid() == 0),
    reason="needs root, podman, buildah and shared/tools/container-check",
)  # fmt: skip
def test_image_runs_a_participant_as_any_user(tmp_path):
    """Build with container-check, then --version and a participant as uid 1234 with a
    read-only input and HOME=/, as ``docker run --user 1234:1234`` does. The group
    level's templates come from the network (TemplateFlow), which this test may not
    reach: it builds without them (CI's container workflow fetches them)."""
    tag = "localhost/qsmprep:pytest"
    build = subprocess.run(
        [str(CONTAINER_CHECK), "--context", str(ROOT), "--tag", tag,
         "--build-arg", "TORCH_INDEX=", "--build-arg", "FETCH_TEMPLATES=0", "--",
         "--version"],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert build.stdout.strip().splitlines()[-1] == f"qsmprep {__version__}"
    from qsmprep.sim import write_bids_dataset

    data = Path(tempfile.mkdtemp(prefix="qsmprep-container-"))
    try:
        data.chmod(0o755)
        write_bids_dataset(data / "bids", preset="small")
        subprocess.run(["chmod", "-R", "a+rX", str(data)], check=True)
        (data / "out").mkdir(mode=0o777)
        (data / "out").chmod(0o777)
        ctr = subprocess.run(["buildah", "from", "--pull=never", tag], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        try:
            run = subprocess.run(
                ["buildah", "run", "--isolation", "chroot", "--user", "1234:1234",
                 "-v", f"{data / 'bids'}:/bids:ro", "-v", f"{data / 'out'}:/out", ctr, "--",
                 "qsmprep", "/bids", "/out", "participant", "--nprocs", "2", "-w", "/tmp/w"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (data / "out" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").is_file()
    finally:
        shutil.rmtree(data, ignore_errors=True)
