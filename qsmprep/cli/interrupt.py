"""SIGINT and SIGTERM: stop cleanly, with one line instead of tracebacks.

Within :func:`handle_signals` a signal raises :class:`Interrupted` in the main process,
which unwinds the nipype run so that the caller can stop the worker processes
(:func:`stop_workers`), remove its staged outputs and exit with 128 + the signal number.
Worker processes forked from it inherit the handler and exit at once, quietly.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Signals that interrupt a run.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


@contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` within the block (main thread only;
    elsewhere it does nothing). The first signal raises; later ones are ignored while the
    caller cleans up. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()
    raised = []

    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked nipype worker: the main process cleans up
            os._exit(128 + signum)
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_workers(timeout: float = 10.0) -> int:
    """Terminate this process's child processes (nipype's workers), then kill those still
    alive after ``timeout`` seconds; return how many there were."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout / max(1, len(children)))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(1.0)
    return len(children)
