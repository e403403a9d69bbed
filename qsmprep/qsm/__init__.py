"""Pure numerical core of qsmprep: functions on numpy arrays, no nipype, no torch.

Conventions shared by every module here:

- Arrays follow NIfTI voxel order ``(i, j, k)``; multi-echo data carry the echo on the
  last axis, ``(X, Y, Z, E)``.
- ``voxel_size`` is three floats in mm; ``b0_dir`` is the unit B0 direction expressed
  in the voxel axes (see :mod:`qsmprep.qsm.sideinfo`).
- Phase is in radians, the total field in Hz, the local field and chi in ppm.
  ``phase = 2*pi*f_Hz*TE`` and ``f_Hz = ppm * GAMMA_BAR * B0`` (GAMMA_BAR in MHz/T).
- Masks are boolean arrays of the image shape.
- FFTs go through :mod:`scipy.fft`; wrap calls in ``scipy.fft.set_workers(n)`` to
  use ``n`` threads.
"""

import os

if "NUMBA_THREADING_LAYER" not in os.environ:
    import numba

    # numba picks GNU OpenMP where TBB is missing, and a process that has run a parallel
    # kernel on it cannot fork (the child aborts): nipype's MultiProc, participants run in
    # parallel and embedding pipelines fork. The fork-safe layers (TBB, else numba's
    # workqueue) are as fast on these kernels; workqueue must not be entered by two
    # threads of one process at once, which qsmprep never does.
    numba.config.THREADING_LAYER = "forksafe"
