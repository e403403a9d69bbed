"""numba's cache of compiled functions for read-only installs (container images).

numba keeps compiled functions beside their source (``__pycache__``), in
``NUMBA_CACHE_DIR`` or in ``~/.cache``, and needs that folder to be writable even to read
from it. In a container the install is read-only, the user may be any UID and HOME may
not exist: without help every run compiles again (about 20 s) or stops at import with
"cannot cache function ...: no locator available".

:class:`SeededCacheLocator` serves a cache compiled when the image was built (the seed,
``$QSMPREP_NUMBA_CACHE``, read-only) from a writable folder: ``$NUMBA_CACHE_DIR`` when it
is set, else a private temporary folder (mode 0700, one per process tree, removed when
the process that made it exits). The seed's files of a source folder are copied there
the first time one of its functions is cached; numba reads them, and writes whatever it
compiles anew beside them, never into the seed. Enable it with::

    NUMBA_CACHE_LOCATOR_CLASSES=qsmprep.numba_cache.SeededCacheLocator,UserProvidedCacheLocator,InTreeCacheLocator,UserWideCacheLocator

numba's cache entries are specific to the CPU model they were compiled for: an image
sets ``NUMBA_CPU_NAME=generic`` when it builds the seed and when it runs, so that one
seed serves every x86-64 CPU.

This module is imported by numba while it decorates functions: it must not import
anything that uses numba.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile

from numba.core import config
from numba.core.caching import UserProvidedCacheLocator

#: Environment variable naming the read-only seed (a NUMBA_CACHE_DIR made at build time).
SEED_ENV = "QSMPREP_NUMBA_CACHE"
#: Environment variable through which child processes find their parent's private folder.
ROOT_ENV = "QSMPREP_NUMBA_CACHE_ROOT"

_owned: set[str] = set()


def _private_root() -> str | None:
    """The process tree's private cache folder: the parent's (``$QSMPREP_NUMBA_CACHE_ROOT``)
    when it exists and belongs to this user alone, else a new one removed at exit."""
    inherited = os.environ.get(ROOT_ENV)
    if inherited:
        try:
            st = os.stat(inherited)
        except OSError:
            st = None
        private = st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
        if private and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return inherited
    try:
        root = tempfile.mkdtemp(prefix="qsmprep-numba-")
    except OSError:
        return None
    _owned.add(root)
    atexit.register(shutil.rmtree, root, True)
    os.environ[ROOT_ENV] = root
    return root


def _seed(src: str, dst: str) -> None:
    """Copy the files of ``src`` that ``dst`` lacks (atomically, so that processes that
    seed the same folder at once never see half a file)."""
    try:
        names = os.listdir(src)
    except FileNotFoundError:
        return
    for name in names:
        target = os.path.join(dst, name)
        if os.path.exists(target):
            continue
        fd, tmp = tempfile.mkstemp(dir=dst, prefix=f".{name}.")
        os.close(fd)
        try:
            shutil.copyfile(os.path.join(src, name), tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class SeededCacheLocator(UserProvidedCacheLocator):
    """Cache numba functions in a writable folder seeded from ``$QSMPREP_NUMBA_CACHE``.

    Tries ``$NUMBA_CACHE_DIR``, then a private temporary folder, then (nothing writable)
    the seed itself, read-only; declines (so that numba tries its next locator) when no
    seed is set or it has no entries for the function's folder.
    """

    def __init__(self, py_func, py_file, root: str, read_only: bool = False):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._subpath = self.get_suitable_cache_subpath(py_file)
        self._cache_path = os.path.join(root, self._subpath)
        self._read_only = read_only

    def ensure_cache_path(self):
        if self._read_only:  # the seed itself: it must exist, it cannot be written
            if not os.path.isdir(self._cache_path):
                raise FileNotFoundError(self._cache_path)
            return
        super().ensure_cache_path()

    @classmethod
    def from_function(cls, py_func, py_file):
        seed = os.environ.get(SEED_ENV)
        if not seed or not os.path.isdir(seed) or not os.path.exists(py_file):
            return None
        for root in ((config.CACHE_DIR,) if config.CACHE_DIR else ()) + (None,):
            root = root or _private_root()  # None: the private folder, made on demand
            if not root:
                continue
            self = cls(py_func, py_file, root)
            try:
                self.ensure_cache_path()  # creates the folder and checks that it is writable
                _seed(os.path.join(seed, self._subpath), self._cache_path)
            except OSError:
                continue
            return self
        # Nothing writable at all (e.g. docker run --read-only without --tmpfs /tmp): read
        # the seed as it is. Loading works; compiling a signature that is not in the seed
        # would fail to save (PermissionError), but nothing can run there anyway.
        self = cls(py_func, py_file, seed, read_only=True)
        try:
            self.ensure_cache_path()
        except OSError:
            return None
        return self
