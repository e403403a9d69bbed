"""File and thread helpers shared by the interfaces (NIfTI in/out, side information, threads)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import nibabel as nb
import numpy as np

from ..qsm.sideinfo import SideInformation, b0_direction

logger = logging.getLogger("qsmprep")

#: Angle (degrees) between the B0 directions given by the qform and by the sform beyond
#: which they are reported as disagreeing.
FORM_ANGLE_TOL_DEG = 0.5


class ImageReadError(ValueError):
    """An image file cannot be read (truncated, corrupt, not NIfTI); the message names it."""


def read_image(path: str | os.PathLike) -> nb.spatialimages.SpatialImage:
    """The image at ``path``, read into memory at once.

    A gzipped NIfTI-1 file is inflated in one call, which releases the GIL (images can be
    read in parallel threads) and takes 2/3 of the time of nibabel's streamed reading;
    other files go through ``nb.load``.
    """
    path = os.fspath(path)
    if path.endswith(".nii.gz"):
        raw = Path(path).read_bytes()
        inflater = zlib.decompressobj(wbits=31)
        data = inflater.decompress(raw)
        if not inflater.eof:
            raise EOFError("the gzip stream ends early")
        if inflater.unused_data:  # several gzip members (bgzip, cat a.gz b.gz)
            data = gzip.decompress(raw)
        if len(data) >= 4 and int.from_bytes(data[:4], "little") == 348:
            return nb.Nifti1Image.from_bytes(data)
    return nb.load(path)


def load(path: str, dtype=np.float32) -> tuple[np.ndarray, nb.Nifti1Image]:
    """Data of ``path`` as ``dtype`` (``None``: as stored, scaling applied) and the image.

    A file that cannot be read raises :class:`ImageReadError` naming it.
    """
    try:
        img = read_image(path)
        return np.asarray(img.dataobj, dtype=dtype), img
    except (OSError, EOFError, ValueError, zlib.error, nb.filebasedimages.ImageFileError) as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ImageReadError(
            f"{os.path.basename(path)} cannot be read; the file is truncated or corrupt ({reason})"
        ) from None


def load_many(
    paths: Sequence[str], dtype=np.float32, threads: int = 1
) -> list[tuple[np.ndarray, nb.Nifti1Image]]:
    """:func:`load` of each path, ``threads`` at a time (gzip inflation runs in parallel)."""
    if threads <= 1 or len(paths) <= 1:
        return [load(p, dtype) for p in paths]
    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        return list(pool.map(lambda p: load(p, dtype), paths))


def load_mask(path: str) -> np.ndarray:
    """A mask image as a boolean array (non-zero voxels)."""
    return np.asarray(nb.load(path).dataobj) != 0


def save_like(data: np.ndarray, ref: nb.Nifti1Image, path: str, dtype=np.float32) -> str:
    """Save ``data`` on the grid of ``ref`` (same affine, sform/qform codes); return the path."""
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    img = nb.Nifti1Image(data.astype(dtype, copy=False), ref.affine)
    sform, scode = ref.header.get_sform(coded=True)
    qform, qcode = ref.header.get_qform(coded=True)
    img.set_sform(ref.affine, code=int(scode) if sform is not None else 1)
    img.set_qform(ref.affine, code=int(qcode) if qform is not None else 1)
    img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(dtype)
    nb.save(img, path)
    return os.path.abspath(path)


def scanner_affine(img: nb.Nifti1Image, name: str) -> tuple[np.ndarray, str]:
    """The affine that places ``img`` in the scanner frame, for B0, and which one it is.

    The qform when its code is 1 ("scanner anatomical"): a sform may hold a registration
    to another space, which would turn B0. Otherwise the sform when its code is 1, else
    nibabel's choice. A warning names ``name`` when the qform and the sform are both set
    and their B0 directions differ by more than :data:`FORM_ANGLE_TOL_DEG`.
    """
    qform, qcode = img.header.get_qform(coded=True)
    sform, scode = img.header.get_sform(coded=True)
    qcode, scode = int(qcode or 0), int(scode or 0)
    if qform is not None and sform is not None:
        try:
            cos = float(np.dot(b0_direction(qform), b0_direction(sform)))
        except ValueError:  # a sheared form: b0_direction refuses it later if it is used
            cos = 1.0
        angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
        if angle > FORM_ANGLE_TOL_DEG:
            logger.warning(
                "%s: the qform (code %d) and the sform (code %d) put B0 %.1f degrees apart; "
                "B0 is taken from the %s",
                name,
                qcode,
                scode,
                angle,
                "qform (scanner)" if qcode == 1 else "sform",
            )
    if qform is not None and qcode == 1:
        return qform, "qform (scanner, code 1)"
    if sform is not None and scode == 1:
        return sform, "sform (scanner, code 1)"
    return np.asarray(img.affine), f"affine (qform code {qcode}, sform code {scode})"


def has_signal(mag: np.ndarray) -> np.ndarray:
    """Voxels whose magnitude (3D or ``(X, Y, Z, E)``) is non-zero in some echo; the others
    carry no phase (e.g. regions that were NaN/Inf, zeroed by the preparation) and stay out
    of masks."""
    return np.asarray(mag).reshape(*mag.shape[:3], -1).any(axis=-1)


def read_side_info(path: str) -> SideInformation:
    """The side information written by :class:`~qsmprep.interfaces.qsm.PrepareEchoes`."""
    return SideInformation.from_dict(json.loads(Path(path).read_text()))


@contextmanager
def thread_limits(n: int) -> Iterator[None]:
    """Use ``n`` threads for scipy.fft and numba within the block."""
    import numba
    import scipy.fft

    n = max(1, int(n))
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with scipy.fft.set_workers(n):
            yield
    finally:
        numba.set_num_threads(previous)


@contextmanager
def stage(what: str, cwd: str) -> Iterator[None]:
    """Log the start and the duration of a processing stage (INFO on the ``qsmprep`` logger).

    Messages start with the name of the workflow running the node (the parent of the
    node's folder ``cwd``), so that runs processed in parallel can be told apart.
    """
    label = Path(cwd).parent.name.removeprefix("qsm_").removesuffix("_wf")
    logger.info("%s: %s ...", label, what)
    t0 = time.perf_counter()
    yield
    logger.info("%s: %s done in %.1f s", label, what, time.perf_counter() - t0)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers never see a partly written file, and an interrupted run leaves the old file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(obj: dict, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes((json.dumps(obj, indent=2) + "\n").encode(), path)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back within the block (they arrive when it ends), so that a
    group of file moves is not cut in half. Outside the main thread it does nothing."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
