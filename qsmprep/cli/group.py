"""``qsmprep BIDS_DIR OUTPUT_DIR group``: the group level over the participants' outputs."""

from __future__ import annotations

import logging
import sys

from ..config import EXIT_FAILED, EXIT_NOTHING_SELECTED, EXIT_OK, Config

logger = logging.getLogger("qsmprep")


def run_group(cfg: Config) -> int:
    """Run :func:`qsmprep.group.level.run_group_level` with the settings; print one line per
    problem; exit 1 when something could not be done (the rest is written), 18 when
    OUTPUT_DIR holds no participant output."""
    from ..group.level import run_group_level
    from ..reports.outputs import find_runs

    ex = cfg.execution
    runs = [r for r in find_runs(ex.output_dir)
            if ex.participant_label is None or r.subject in ex.participant_label]  # fmt: skip
    if not runs:
        print(f"qsmprep: no Chimap in {ex.output_dir} (of the selected participants): run the "
              "participant level first", file=sys.stderr)  # fmt: skip
        return EXIT_NOTHING_SELECTED
    logging.getLogger("dipy").setLevel(logging.WARNING)
    result = run_group_level(
        ex.output_dir,
        ex.participant_label,
        registration=ex.registration,
        template_chimaps=ex.template_chimaps,
    )
    for path in result.files:
        print(f"qsmprep: wrote {path}", file=sys.stderr)
    for line in result.errors:
        print(f"qsmprep: group: {line}", file=sys.stderr)
    return EXIT_FAILED if result.errors else EXIT_OK
