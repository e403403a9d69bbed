"""docs/troubleshooting.md lists every error and warning message of the modules that
check the user's input, options and data conventions, and of the reports and the group
level's templates."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["bids.py", "config.py", "cli/run.py", "cli/reporting.py", "conventions.py",
           "qsm/phase.py", "group/templates.py"]  # fmt: skip
ERRORS = {"BIDSError", "ConfigError", "PhaseScalingError", "TemplateError"}


def _pieces(node: ast.AST) -> list[str]:
    """The literal text of a message: the constant parts of an f-string, or a %-format
    string cut at its placeholders."""
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.split(r"%[-.\d]*[sdgf]", node.value)
    return []


def messages(path: Path) -> list[str]:
    """The longest literal piece of each message raised or warned in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        call = None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            if isinstance(func, ast.Name) and func.id in ERRORS:
                call = node.exc
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "warning" and getattr(node.func.value, "id", "") == "logger":
                call = node
        if call is not None and call.args:
            pieces = [p.strip() for p in _pieces(call.args[0]) if len(p.strip()) >= 8]
            if pieces:
                found.append(max(pieces, key=len))
    return found


@pytest.mark.parametrize("module", MODULES)
def test_troubleshooting_lists_every_message(module):
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    found = messages(ROOT / "qsmprep" / module)
    assert found, module
    missing = [m for m in found if m not in doc]
    assert not missing, f"docs/troubleshooting.md lacks messages of {module}: {missing}"
