"""numba's threading layer: a process that ran qsmprep's parallel kernels can still fork."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_fork_after_parallel_kernels():
    """With GNU OpenMP the child of such a fork aborts ("fork() called from a process
    already using GNU OpenMP"): nipype's MultiProc and parallel participants fork."""
    code = textwrap.dedent(
        """
        import os, sys
        import numpy as np
        from qsmprep.qsm.phase import field_reliability

        rng = np.random.default_rng(0)
        field = rng.normal(size=(24, 24, 24)).astype(np.float32)
        mag = np.ones((24, 24, 24, 3), np.float32)
        mask = np.zeros((24, 24, 24), bool)
        mask[4:20, 4:20, 4:20] = True
        args = (field, mag, [0.004, 0.008, 0.012], mask, (1.0, 1.0, 1.0))
        first = field_reliability(*args)
        pid = os.fork()
        if pid == 0:
            ok = np.array_equal(field_reliability(*args), first)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_THREADING_LAYER"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fork() called" not in res.stderr
