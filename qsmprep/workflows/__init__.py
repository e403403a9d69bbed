"""Workflow factories. They read no global configuration, so any can be embedded elsewhere."""

from .base import init_participant_wf
from .qsm import init_qsm_wf

__all__ = ["init_participant_wf", "init_qsm_wf"]
