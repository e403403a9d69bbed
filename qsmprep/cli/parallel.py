"""Participants in parallel, each in its own process, within ``--nprocs`` and ``--mem``.

:func:`plan` decides how many participants run at once and what each gets (processes and
threads for its nipype graph, memory); :class:`ParticipantPool` runs them. Each
participant's process is forked from the main one and does all of a participant's work
(:func:`qsmprep.cli.run._participant_main`): its log folder, its workflow with its own
worker processes, the commit of each run's outputs, its report. So one participant's
failure, or its process dying, never touches another's outputs, and each log holds only
its participant's messages. Each participant's process leads its own process group, with
its workers: a terminal's Ctrl-C reaches the main process only, and what a killed
participant leaves behind can be ended. On SIGINT or SIGTERM the main process passes the
signal on to the participants' processes, which stop their own workers, discard their
staged outputs and record the interruption in their logs and reports; those still running
after a grace period (or a further signal) are killed with their groups, so that no
process is left behind, and each gets SIGTERM from the kernel if the main process dies
without that (Linux).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import wait

from .interrupt import Interrupted, stop_processes

#: Share of the physical memory that the participants may use without ``--mem`` (nipype's
#: MultiProc default).
MEMORY_SHARE = 0.9

#: Seconds between checks that a participant's process has ended.
POLL_S = 0.5

#: prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Plan:
    """How participants run: ``parallel`` at once, each with ``nprocs`` processes,
    ``threads`` threads per process and ``mem_gb`` of memory (``None``: no limit)."""

    parallel: int
    nprocs: int
    threads: int
    mem_gb: float | None


def available_memory_gb() -> float:
    """:data:`MEMORY_SHARE` of the physical memory, in GB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):  # pragma: no cover - not POSIX
        return float("inf")
    return MEMORY_SHARE * total / 1e9


def plan(
    n_participants: int,
    nprocs: int,
    threads: int,
    mem_gb: float | None,
    peak_gb: float,
    *,
    allowed: bool = True,
) -> Plan:
    """Participants at once: as many as there are participants, processes (one each at
    least) and times the heaviest participant's peak memory ``peak_gb`` fits in ``mem_gb``
    (default :func:`available_memory_gb`); each gets an equal share of the processes, at
    most its share of threads, and an equal share of the memory. ``allowed=False`` (a
    nipype plugin file, a GPU) keeps one participant at a time with all resources."""
    if not allowed or n_participants < 2 or nprocs < 2:
        return Plan(1, nprocs, threads, mem_gb)
    total = available_memory_gb() if mem_gb is None else mem_gb
    by_memory = int(total // max(peak_gb, 1e-3))
    parallel = max(1, min(n_participants, nprocs, by_memory))
    if parallel == 1:
        return Plan(1, nprocs, threads, mem_gb)
    share = nprocs // parallel
    mem_share = None if total == float("inf") else round(total / parallel, 3)
    return Plan(parallel, share, min(threads, share), mem_share)


def _end_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this process when its parent dies, even by SIGKILL
    (Linux; elsewhere nothing happens), so that a participant is never left running alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _own_group(pid: int = 0) -> None:
    """Make process ``pid`` (0: this one) the leader of its own process group, which its
    worker processes join: the main process can then end them all, also after the
    participant's process was killed (its workers would be left running otherwise)."""
    with suppress(OSError):  # it has ended already
        os.setpgid(pid, 0)


def _end_group(pid: int) -> None:
    """Kill what is left of the process group of participant process ``pid``."""
    with suppress(OSError):  # nothing is left
        os.killpg(pid, signal.SIGKILL)


def _child(target: Callable[[str], list[str]], subject: str, conn, parent: int) -> None:
    """A participant's process: run ``target(subject)`` and send its failure lines back."""
    _own_group()
    _end_with_parent(parent)
    try:
        lines = target(subject)
        conn.send(lines)
    finally:
        conn.close()
        sys.stderr.flush()


def _ended(exitcode: int | None) -> str:
    """Why a participant's process ended without sending its result."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory?)" if exitcode == -signal.SIGKILL else ""
        what = f"its process was killed by {name}{hint}"
    else:
        what = f"its process ended without a result (exit code {exitcode})"
    return f"{what}: the runs it had not finished are discarded; run again to resume"


class ParticipantPool:
    """Run ``target(subject)`` for each participant in its own forked process, ``parallel``
    at a time, in the order given; ``target`` returns the participant's failure lines."""

    def __init__(self, target: Callable[[str], list[str]], parallel: int):
        self.target = target
        self.parallel = parallel
        #: Participants whose process was running when the pool was stopped.
        self.stopped: list[str] = []
        #: Participants whose process ended without a result (killed, e.g. for memory):
        #: their logs and reports could not say so.
        self.died: list[str] = []

    def run(
        self, subjects: Sequence[str], stop_on_first_failure: bool = False
    ) -> tuple[dict[str, list[str]], list[str]]:
        """Process ``subjects``; return each started participant's failure lines (empty:
        success) and the participants not started: after a failure, when
        ``stop_on_first_failure``, no participant starts (those running finish).

        On an interruption (or any error), the running participants are stopped with the
        same signal (SIGTERM for an error) before the exception goes on."""
        ctx = multiprocessing.get_context("fork")  # the participants share the parsed input
        pending = list(subjects)
        running: dict = {}  # subject -> (process, result connection)
        received: dict[str, list[str]] = {}  # results of participants not yet ended
        results: dict[str, list[str]] = {}
        stopping = False
        try:
            while running or (pending and not stopping):
                while pending and not stopping and len(running) < self.parallel:
                    subject = pending.pop(0)
                    receive, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(
                        target=_child,
                        args=(self.target, subject, send, os.getpid()),
                        name=f"qsmprep-sub-{subject}",
                    )
                    proc.start()
                    _own_group(proc.pid)  # as the participant does: whoever comes first
                    send.close()  # only the participant (and its workers) can write
                    running[subject] = (proc, receive)
                # A result or a participant's end; the workers of a participant that was
                # killed inherited its pipes (they keep them open), so its end is also
                # checked by the process's exit status, every POLL_S seconds.
                waiting = [proc.sentinel for proc, _ in running.values()]
                waiting += [conn for _, conn in running.values() if not conn.closed]
                ready = set(wait(waiting, timeout=POLL_S))
                for subject, (proc, conn) in list(running.items()):
                    ended = proc.exitcode is not None
                    if not conn.closed and (conn in ready or ended):
                        result = _receive(conn)
                        if result is not None:
                            received[subject] = result
                    if not ended:
                        continue
                    del running[subject]
                    proc.join()
                    _end_group(proc.pid)
                    lines = received.pop(subject, None)
                    if lines is None:
                        lines = [_ended(proc.exitcode)]
                        self.died.append(subject)
                    results[subject] = lines
                    stopping = stopping or bool(lines and stop_on_first_failure)
        except BaseException as error:
            signum = error.signum if isinstance(error, Interrupted) else signal.SIGTERM
            procs = [proc for proc, _ in running.values()]
            self.stopped = [subject for subject, (proc, _) in running.items() if proc.is_alive()]
            stop_processes(procs, signum)
            for proc in procs:
                _end_group(proc.pid)
            raise
        return results, pending


def _receive(conn) -> list[str] | None:
    """The failure lines waiting in ``conn`` (then closed), or None (none, or its end)."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None
    finally:
        conn.close()
