"""Scanner conventions that change chi silently, resolved per run from its sidecars.

- Phase sign: GE stores phase with the opposite handedness, so its chi comes out negated
  unless the phase is negated first (:func:`phase_sign`).
- ppm: the field in Hz is divided by the Larmor frequency; ``ImagingFrequency`` (MHz) is
  the scanner's own, while ``MagneticFieldStrength`` is nominal ("3 T" Siemens systems run
  at 2.89 T, 3.6 % lower) (:func:`ppm_field_strength`).

The other conventions are read from the images themselves by the interfaces: the phase
scaling (:func:`qsmprep.qsm.phase.scale_phase`) and the B0 direction from the scanner
qform (:func:`qsmprep.interfaces._io.scanner_affine`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from .bids import MEGRERun, field_strength
from .qsm.dipole import GAMMA_BAR_MHZ_PER_T

logger = logging.getLogger("qsmprep")

#: ``--phase-sign`` choices.
PHASE_SIGN_CHOICES = ("auto", "+1", "-1")

#: Phase sign by manufacturer (a pattern on the sidecar's ``Manufacturer``): the factor
#: that makes the phase grow with a positive frequency offset, as qsmprep expects. Only
#: conventions that are established are listed (GE's phase is left-handed); others get +1
#: with a warning. "qsmprep" is the built-in simulator (``qsmprep.sim``).
PHASE_SIGN_BY_MANUFACTURER = (
    (re.compile(r"^(ge\b|general electric)", re.IGNORECASE), -1, "GE"),
    (re.compile(r"siemens", re.IGNORECASE), +1, "Siemens"),
    (re.compile(r"^qsmprep$", re.IGNORECASE), +1, "qsmprep (simulated)"),
)

#: Largest relative difference between the field strength from ImagingFrequency and the
#: nominal one before the frequency is taken for another nucleus (or a typo) and ignored.
FREQUENCY_TOLERANCE = 0.1


def phase_sign(run: MEGRERun, option: str = "auto") -> tuple[int, str]:
    """The factor (+1 or -1) applied to the run's phase, and where it comes from.

    ``option`` is ``--phase-sign``: ``"+1"`` / ``"-1"`` are used as given; ``"auto"``
    follows the sidecar's ``Manufacturer`` where its convention is known
    (:data:`PHASE_SIGN_BY_MANUFACTURER`), and otherwise assumes +1 with a warning.
    """
    if option in ("+1", "-1"):
        return int(option), f"--phase-sign {option}"
    if option != "auto":
        raise ValueError(f"phase sign must be one of {', '.join(PHASE_SIGN_CHOICES)}")
    maker = run.metadata.get("Manufacturer")
    for pattern, sign, name in PHASE_SIGN_BY_MANUFACTURER:
        if isinstance(maker, str) and pattern.search(maker.strip()):
            return sign, f"Manufacturer {maker!r}: {name} convention"
    what = f"Manufacturer {maker!r} has no known" if maker else "no Manufacturer, so no"
    logger.warning(
        "%s: %s phase sign convention; +1 is assumed (if veins come out diamagnetic, "
        "negative, pass --phase-sign -1)",
        run.prefix,
        what,
    )
    return 1, f"{what} convention: +1 assumed"


def ppm_field_strength(
    run: MEGRERun, fallback: float | None = None
) -> tuple[float, dict[str, Any]]:
    """B0 in tesla to convert the run's field from Hz to ppm, and a record of its source.

    ``ImagingFrequency`` (MHz, the scanner's Larmor frequency) when the sidecar has it and
    it agrees with the nominal field strength within :data:`FREQUENCY_TOLERANCE`; else
    ``MagneticFieldStrength``, else ``fallback`` (``--field-strength``); without any,
    :class:`~qsmprep.bids.BIDSError` (see :func:`qsmprep.bids.field_strength`).
    """
    frequency = run.metadata.get("ImagingFrequency")
    nominal = run.field_strength if run.field_strength is not None else fallback
    if frequency is not None:
        from_frequency = float(frequency) / GAMMA_BAR_MHZ_PER_T
        if nominal is None or abs(from_frequency / nominal - 1) <= FREQUENCY_TOLERANCE:
            return from_frequency, {
                "Source": "ImagingFrequency",
                "ImagingFrequency": float(frequency),
                "FieldStrength": round(from_frequency, 6),
            }
        logger.warning(
            "%s: ImagingFrequency %g MHz is not the 1H frequency at %g T; ppm from the "
            "nominal field strength",
            run.prefix,
            frequency,
            nominal,
        )
    b0 = field_strength(run, fallback)
    source = "MagneticFieldStrength" if run.field_strength is not None else "--field-strength"
    return b0, {"Source": source, "FieldStrength": b0}
