"""Thin nipype interfaces: load NIfTI, call :mod:`qsmprep.qsm` / :mod:`qsmprep.nn`, save NIfTI."""

from .bids import DerivativesSink
from .qsm import BackgroundRemoval, BrainMask, DipoleInversion, FieldMap, PrepareEchoes

__all__ = [
    "BackgroundRemoval",
    "BrainMask",
    "DerivativesSink",
    "DipoleInversion",
    "FieldMap",
    "PrepareEchoes",
]
