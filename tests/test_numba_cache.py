"""numba's cache from a read-only seed, for any user and without HOME (as in the image).

Each case runs a fresh Python as another user (uid 1234 when the tests run as root, else
the current user) with HOME pointing nowhere, on a module in a folder that user cannot
write, so that numba finds no writable cache of its own.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

LOCATORS = (
    "qsmprep.numba_cache.SeededCacheLocator,"
    "UserProvidedCacheLocator,InTreeCacheLocator,UserWideCacheLocator"
)

KERNEL = """
import numba

@numba.njit(cache=True)
def add_one(x):
    return x + 1
"""

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import kernel
value = kernel.add_one(float(sys.argv[2]) if len(sys.argv) > 2 else 1)
stats = kernel.add_one.stats
print(value, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""


@pytest.fixture
def shared_dir():
    """A folder every user can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="qsmprep-test-numba-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _other_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is needed to run as another user")
    return [setpriv, "--reuid", "1234", "--regid", "1234", "--clear-groups"]


def _python(args, env, as_other=True):
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "HOME": "/nonexistent",
        "NUMBA_CPU_NAME": "generic",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = (_other_user() if as_other else []) + [sys.executable, *args]
    return subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture
def seeded(shared_dir):
    """A module that uid 1234 cannot write beside, and a seed compiled for it, read-only."""
    code = shared_dir / "code"
    code.mkdir(mode=0o755)
    (code / "kernel.py").write_text(KERNEL)
    (shared_dir / "probe.py").write_text(PROBE)
    seed = shared_dir / "seed"
    proc = _python([str(shared_dir / "probe.py"), str(code)], {"NUMBA_CACHE_DIR": str(seed)},
                   as_other=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "0", "1"]  # compiled, and saved into the seed
    for path in [seed, *seed.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return shared_dir, code, seed


def test_without_the_locator_a_read_only_install_cannot_even_import(seeded):
    shared, code, seed = seeded
    proc = _python([str(shared / "probe.py"), str(code)], {"QSMPREP_NUMBA_CACHE": str(seed)})
    assert proc.returncode != 0
    assert "no locator available" in proc.stderr


def test_seed_is_served_to_any_user_without_compiling(seeded):
    shared, code, seed = seeded
    tmp = shared / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    env = {"QSMPREP_NUMBA_CACHE": str(seed), "NUMBA_CACHE_LOCATOR_CLASSES": LOCATORS,
           "TMPDIR": str(tmp)}  # fmt: skip
    proc = _python([str(shared / "probe.py"), str(code)], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "1", "0"]  # one cache hit, nothing compiled
    # a signature that is not in the seed is compiled and cached privately, not in the seed
    before = sorted(p.name for p in seed.rglob("*"))
    proc = _python([str(shared / "probe.py"), str(code), "1.5"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2.5", "0", "1"]
    assert sorted(p.name for p in seed.rglob("*")) == before
    assert list(tmp.iterdir()) == []  # the private cache folders are gone at exit


def test_a_writable_numba_cache_dir_is_seeded_and_kept(seeded):
    shared, code, seed = seeded
    cache = shared / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    env = {"QSMPREP_NUMBA_CACHE": str(seed), "NUMBA_CACHE_LOCATOR_CLASSES": LOCATORS,
           "NUMBA_CACHE_DIR": str(cache)}  # fmt: skip
    proc = _python([str(shared / "probe.py"), str(code)], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "1", "0"]
    assert sorted(p.name for p in cache.rglob("*.nbi")) == sorted(
        p.name for p in seed.rglob("*.nbi")
    )


def test_qsmprep_version_as_any_user_without_home(shared_dir):
    """The reported crash: ``qsmprep --version`` as another user in a read-only install."""
    seed = shared_dir / "seed"
    seed.mkdir(mode=0o755)
    env = {"QSMPREP_NUMBA_CACHE": str(seed), "NUMBA_CACHE_LOCATOR_CLASSES": LOCATORS,
           "NUMBA_CACHE_DIR": "/nonexistent/numba"}  # fmt: skip
    from qsmprep import __version__

    proc = _python(["-m", "qsmprep.cli.run", "--version"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qsmprep {__version__}"


def test_nothing_writable_reads_the_seed_as_it_is(tmp_path, monkeypatch):
    """As with docker run --read-only and no --tmpfs: no folder can be made anywhere."""
    import qsmprep.numba_cache as nc

    py_file = tmp_path / "kernel.py"
    py_file.write_text(KERNEL)

    def f():  # stands for the jitted function: the locator reads only its code object
        pass

    seed = tmp_path / "seed"
    (seed / nc.SeededCacheLocator.get_suitable_cache_subpath(str(py_file))).mkdir(parents=True)
    monkeypatch.setenv(nc.SEED_ENV, str(seed))
    monkeypatch.delenv(nc.ROOT_ENV, raising=False)
    monkeypatch.setattr(nc.config, "CACHE_DIR", "")

    def no_tmp(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(nc.tempfile, "mkdtemp", no_tmp)
    locator = nc.SeededCacheLocator.from_function(f, str(py_file))
    assert locator is not None and locator.get_cache_path().startswith(str(seed))
    # a seed without entries for that folder: numba's own locators are tried instead
    monkeypatch.setenv(nc.SEED_ENV, str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    assert nc.SeededCacheLocator.from_function(f, str(py_file)) is None
