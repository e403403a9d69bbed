"""The template and atlas of the group level, read from a TemplateFlow folder offline.

qsmprep never downloads at run time. The group level reads three files, laid out as
TemplateFlow lays them out, from ``$TEMPLATEFLOW_HOME`` (default ``~/.cache/templateflow``):

- ``tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz``: the registration target;
- ``tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz``: its brain mask;
- ``tpl-MNI152NLin2009cAsym_res-01_atlas-HOSPA_desc-th25_dseg.nii.gz``: the Harvard-Oxford
  subcortical atlas at 25 % probability, whose deep grey labels give the ROIs.

The container image fetches them at build time (``python -m qsmprep.group.templates
fetch``, which needs network access and the ``templateflow`` package); elsewhere run the
same command once, or point ``TEMPLATEFLOW_HOME`` at a folder that has them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: The template space of the group level.
TEMPLATE = "MNI152NLin2009cAsym"

#: The atlas (TemplateFlow's name) and how qsmprep names it.
ATLAS = "HOSPA"
ATLAS_DESCRIPTION = "Harvard-Oxford subcortical atlas (FSL), 25 % probability threshold"

#: Role -> (file name, TemplateFlow query).
FILES: dict[str, tuple[str, dict]] = {
    "T1w": (
        f"tpl-{TEMPLATE}_res-02_T1w.nii.gz",
        {"resolution": 2, "desc": None, "suffix": "T1w", "extension": ".nii.gz"},
    ),
    "mask": (
        f"tpl-{TEMPLATE}_res-02_desc-brain_mask.nii.gz",
        {"resolution": 2, "desc": "brain", "suffix": "mask", "extension": ".nii.gz"},
    ),
    "atlas": (
        f"tpl-{TEMPLATE}_res-01_atlas-{ATLAS}_desc-th25_dseg.nii.gz",
        {"resolution": 1, "atlas": ATLAS, "desc": "th25", "suffix": "dseg",
         "extension": ".nii.gz"},
    ),
}  # fmt: skip

#: The deep grey matter labels of the atlas (Harvard-Oxford subcortical values) and the
#: ROI names qsmprep gives them.
DEEP_GREY_LABELS: dict[int, str] = {
    4: "left_thalamus",
    5: "left_caudate",
    6: "left_putamen",
    7: "left_pallidum",
    15: "right_thalamus",
    16: "right_caudate",
    17: "right_putamen",
    18: "right_pallidum",
}

FETCH_COMMAND = "python -m qsmprep.group.templates fetch"


class TemplateError(RuntimeError):
    """A template file is missing; the message says how to pre-fetch it."""


def templateflow_home() -> Path:
    """``$TEMPLATEFLOW_HOME``, or TemplateFlow's default ``~/.cache/templateflow``."""
    home = os.environ.get("TEMPLATEFLOW_HOME")
    return Path(home) if home else Path.home() / ".cache" / "templateflow"


def template_files(home: Path | None = None) -> dict[str, Path]:
    """The files of :data:`FILES` in ``home`` (default :func:`templateflow_home`).

    Raises :class:`TemplateError` with a one-line message naming the first missing file and
    how to fetch it.
    """
    home = Path(home) if home is not None else templateflow_home()
    out = {}
    for role, (name, _) in FILES.items():
        path = home / f"tpl-{TEMPLATE}" / name
        if not path.is_file():
            raise TemplateError(
                f"{name} is not in TEMPLATEFLOW_HOME={home}: pre-fetch it once with "
                f"'TEMPLATEFLOW_HOME={home} {FETCH_COMMAND}' (network and pip install "
                "templateflow needed), or use the qsmprep container, which has it"
            )
        out[role] = path
    return out


def fetch(home: Path | None = None) -> dict[str, Path]:
    """Download the files of :data:`FILES` into ``home`` with the ``templateflow`` package
    (a build-time step: it needs network access)."""
    home = Path(home) if home is not None else templateflow_home()
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    from templateflow import api

    for _, query in FILES.values():
        api.get(TEMPLATE, **query)
    return template_files(home)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qsmprep.group.templates {fetch,check} [--home DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m qsmprep.group.templates",
        description="Fetch (needs network) or check the group level's template and atlas.",
    )
    parser.add_argument("action", choices=["fetch", "check"])
    parser.add_argument(
        "--home", type=Path, help="TemplateFlow folder (default: $TEMPLATEFLOW_HOME)"
    )
    args = parser.parse_args(argv)
    try:
        files = fetch(args.home) if args.action == "fetch" else template_files(args.home)
    except TemplateError as e:
        print(f"qsmprep: {e}", file=sys.stderr)
        return 1
    for role, path in files.items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
