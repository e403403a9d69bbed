"""SIGINT and SIGTERM: stop cleanly, with one line instead of tracebacks.

Within :func:`handle_signals` a signal raises :class:`Interrupted` in the main process,
which unwinds the nipype run so that the caller can stop the worker processes
(:func:`stop_workers`), remove its staged outputs and exit with 128 + the signal number.
nipype turns any exception of a node that runs in the main process (``Linear``, the
sinks) into a node failure, so the signal is also remembered and raised again at the next
node's start or end (:func:`status_callback`) and after the run (:func:`check_interrupted`).
Worker processes forked from the main process inherit the handler: they leave SIGINT
(Ctrl-C reaches the whole process group) to the main process, which terminates them, and
exit at once, quietly, on SIGTERM.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

#: Signals that interrupt a run.
SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: The signal received within :func:`handle_signals` (empty: none yet).
_received: list[int] = []

#: Whether an interruption has broken nipype's process pool in this process (for good).
_pool_broken: list[bool] = []

#: Set within :func:`next_signal_aborts`: a further signal raises again.
_abortable: list[bool] = []


class Interrupted(BaseException):
    """The run was interrupted by ``signum`` (a BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way up swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _PoolLog(logging.Filter):
    """``concurrent.futures`` logs a traceback when a worker of nipype's process pool dies:
    drop it once an interruption broke the pool on purpose (such records arrive late),
    shorten it to one line otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _pool_broken:
            return False
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg, record.args = (
                "qsmprep: a worker process failed: %s: %s",
                (
                    type(error).__name__,
                    error,
                ),
            )
            record.exc_info = record.exc_text = None
        return True


_POOL_LOG = _PoolLog()

#: nipype's logger, which would report the interrupted node as a failure.
_NIPYPE = logging.getLogger("nipype.workflow")


@contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` within the block (main thread only;
    elsewhere it does nothing). The first signal raises; later ones are ignored while the
    caller cleans up (except within :func:`next_signal_aborts`). The previous handlers come
    back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()
    _received.clear()

    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked nipype worker: the main process cleans up
            if signum == signal.SIGINT:
                return  # the main process got it too, and terminates the workers
            os._exit(128 + signum)
        if not _received:
            _received.append(signum)
            _pool_broken.append(True)
            _NIPYPE.disabled = True
            raise Interrupted(signum)
        if _abortable:
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    nipype_disabled = _NIPYPE.disabled
    pool_log = logging.getLogger("concurrent.futures")
    pool_log.addFilter(_POOL_LOG)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _received.clear()
        _NIPYPE.disabled = nipype_disabled
        if not _pool_broken:
            pool_log.removeFilter(_POOL_LOG)


@contextmanager
def next_signal_aborts() -> Iterator[None]:
    """Within the block, a signal that follows the first one raises :class:`Interrupted`
    instead of being ignored: for cleanup work that may be cut short (the interrupted
    participant's report), so that a second Ctrl-C stops at once."""
    _abortable.append(True)
    try:
        yield
    finally:
        _abortable.clear()


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived (and was swallowed on its way up)."""
    if _received:
        raise Interrupted(_received[0])


def status_callback(node, status: str) -> None:
    """nipype's per-node status hook: stop at the next node once a signal arrived."""
    check_interrupted()


def stop_workers(timeout: float = 10.0) -> int:
    """Terminate this process's child processes (nipype's workers), then kill those still
    alive after ``timeout`` seconds; return how many there were."""
    children = multiprocessing.active_children()
    if children:
        _pool_broken.append(True)
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout / max(1, len(children)))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(1.0)
    return len(children)


def stop_processes(processes: list, signum: int, timeout: float = 60.0) -> int:
    """Pass ``signum`` on to ``processes`` (participants running in parallel, each of which
    stops its own workers and records the interruption in its log and report), wait up to
    ``timeout`` seconds for them, then kill those still alive; a further signal kills them
    at once. Return how many were alive."""
    alive = [proc for proc in processes if proc.is_alive()]
    if alive:
        _pool_broken.append(True)
    for proc in alive:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signum)
    deadline = time.monotonic() + timeout
    try:
        with next_signal_aborts():  # by exit status: their workers may hold their sentinels
            while any(proc.exitcode is None for proc in alive) and time.monotonic() < deadline:
                time.sleep(0.1)
    except Interrupted:
        pass
    for proc in alive:
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    return len(alive)
