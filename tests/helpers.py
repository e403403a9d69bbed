"""Small helpers shared by the tests: processes (from /proc) and spoilt inputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def children(pid: int) -> list[int]:
    """Process ids of the direct children of ``pid``."""
    return _parents().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid``."""
    tree = _parents()
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def spoil_phase(path: Path, factor: float = 10.5) -> None:
    """Scale a phase image by ``factor``: out of every radian and vendor range, so that
    the participant fails with a phase scaling error."""
    img = nb.load(path)
    nb.save(nb.Nifti1Image(img.get_fdata(dtype=np.float32) * factor, img.affine), path)
