"""Thin nipype interfaces: load NIfTI, call :mod:`qsmprep.qsm` / :mod:`qsmprep.nn`, save NIfTI."""

from .bids import DerivativesSink
from .qsm import (
    SWI,
    BackgroundRemoval,
    BrainMask,
    DipoleInversion,
    FieldMap,
    FillField,
    PrepareEchoes,
    PrepareFieldMap,
    Relaxometry,
    UserMask,
)

__all__ = [
    "SWI",
    "BackgroundRemoval",
    "BrainMask",
    "DerivativesSink",
    "DipoleInversion",
    "FieldMap",
    "FillField",
    "PrepareEchoes",
    "PrepareFieldMap",
    "Relaxometry",
    "UserMask",
]
