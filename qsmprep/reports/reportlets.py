"""Report figures that need a workflow's intermediates (nipype interfaces).

The participant report is drawn from outputs, except the phase before and after
unwrapping, which no output holds: the participant workflow runs :class:`PhaseReportlet`
on the intermediates and leaves the figure (and the facts it shows, as JSON) where the
report looks for it (:func:`qsmprep.reports.outputs.figure_path`).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class _PhaseReportletInputSpec(BaseInterfaceInputSpec):
    in_phase = File(exists=True, mandatory=True, desc="phase (X, Y, Z, E), rad, as read")
    unwrapped = File(exists=True, mandatory=True, desc="unwrapped phase of one echo (rad)")
    echo_index = traits.Int(mandatory=True, desc="0-based echo of unwrapped in in_phase")
    echo_times = traits.List(traits.Float, desc="echo times (s)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    phase_scaling = traits.Str(desc="how the stored phase was converted to radians")
    offset_removed = traits.Bool(False, usedefault=True, desc="MCPC-3D-S ran before unwrapping")
    out_file = traits.Str(mandatory=True, desc="figure path (.png); facts go beside as .json")


class _PhaseReportletOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the figure")
    out_json = File(exists=True, desc="the facts it shows")


class PhaseReportlet(SimpleInterface):
    """Draw one echo's phase before (as read) and after unwrapping, and record the phase
    scaling that was detected."""

    input_spec = _PhaseReportletInputSpec
    output_spec = _PhaseReportletOutputSpec

    def _run_interface(self, runtime):
        from ..interfaces._io import atomic_write_json
        from .figures import plot_phase

        phase_img = nb.load(self.inputs.in_phase)
        phase = np.asarray(phase_img.dataobj, dtype=np.float32)
        phase = phase[..., None] if phase.ndim == 3 else phase
        echo = self.inputs.echo_index % phase.shape[-1]
        tes = self.inputs.echo_times if isdefined(self.inputs.echo_times) else []
        te = f", TE {1000 * tes[echo]:.2f} ms" if len(tes) > echo else ""
        label = f"echo {echo + 1}{te}"
        out = Path(self.inputs.out_file)
        wrapped = np.mod(phase[..., echo] + np.pi, 2 * np.pi) - np.pi  # unwrapped input too
        plot_phase(
            nb.Nifti1Image(wrapped.astype(np.float32), phase_img.affine),
            nb.load(self.inputs.unwrapped),
            nb.load(self.inputs.mask),
            out,
            title=label,
        )
        caption = f"Phase of {label}: as read (wrapped, top) and unwrapped (bottom)"
        if self.inputs.offset_removed:
            caption += " after removal of the echo-independent phase offset (MCPC-3D-S)"
        facts = {"Echo": echo + 1, "Caption": caption + "."}
        if tes:
            facts["EchoTime"] = tes[echo]
        if isdefined(self.inputs.phase_scaling):
            facts["PhaseScaling"] = self.inputs.phase_scaling
        json_path = out.with_suffix(".json")
        atomic_write_json(facts, json_path)
        self._results["out_file"] = str(out)
        self._results["out_json"] = str(json_path)
        return runtime
