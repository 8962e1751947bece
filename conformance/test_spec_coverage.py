"""The suite covers the spec: every requirement is named by a test, or says why it cannot be."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from netkernel.conformance import requirements

HERE = Path(__file__).resolve().parent
SCRIPT_REQ = re.compile(r"^#\s*req:\s*(.+)$", re.MULTILINE)


def named_requirements() -> dict[str, set[str]]:
    """Requirement ID -> files naming it, read statically from tests and scripts."""
    named: dict[str, set[str]] = {}
    for path in sorted(HERE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "req"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        named.setdefault(arg.value, set()).add(path.name)
    for path in sorted(HERE.rglob("*.nkt")):
        for line in SCRIPT_REQ.findall(path.read_text(encoding="utf-8")):
            for rid in line.split(","):
                named.setdefault(rid.strip(), set()).add(path.name)
    return named


def test_every_requirement_is_named_by_a_test_or_marked_untestable() -> None:
    named = named_requirements()
    missing = [
        f"{r.id} ({r.file}: {r.title})"
        for r in requirements.load().values()
        if r.id not in named and not r.untestable
    ]
    assert not missing, "requirements no conformance test names:\n  " + "\n  ".join(missing)


def test_tests_name_only_requirements_the_spec_defines() -> None:
    known = requirements.load()
    unknown = {rid: files for rid, files in named_requirements().items() if rid not in known}
    assert not unknown, f"tests name requirements spec/ does not define: {unknown}"


def test_untestable_requirements_give_a_reason() -> None:
    for r in requirements.load().values():
        if r.untestable is not None:
            assert len(r.untestable.strip()) > 10, f"{r.id}: 'Untestable' needs a real reason"


def test_spec_is_not_empty_in_any_file() -> None:
    by_file: dict[str, int] = {}
    for r in requirements.load().values():
        by_file[r.file] = by_file.get(r.file, 0) + 1
    for name in ("nqe.md", "device.md", "sockets.md", "coreengine.md", "security.md"):
        assert by_file.get(name, 0) >= 5, f"spec/{name} defines {by_file.get(name, 0)} requirements"
