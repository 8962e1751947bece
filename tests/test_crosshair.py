"""``crosshair check`` verifies the connection table's contracts, and can fail (CE-3..CE-6).

A contract check counts only if it can fail. So besides checking
``reference/conntable.py`` (no counterexample expected), this runs the same
check on ``tests/contracts/conntable_broken.py``, whose functions carry the
reference's contracts word for word and each break one invariant: CrossHair
must report a counterexample naming every one of them. The contracts
quantify over tables given as arguments, so a pass is not a vacuous
"confirmed" over an empty table.

CrossHair's timeouts are CPU seconds per condition; the wall-clock limits
below only stop a hung run on a loaded machine. CI runs the reference check
with a longer bound (``.ci/run``).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from netkernel.reference import conntable
from tests.contracts import conntable_broken

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "reference" / "conntable.py"
BROKEN = ROOT / "tests" / "contracts" / "conntable_broken.py"
BROKEN_FUNCTIONS = ("remove_tenant", "detach_vm", "translate", "insert")
WALL_LIMIT = 240  # seconds, per run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crosshair") is None,
                                reason="crosshair-tool is not installed (pip install -e .[test])")


def crosshair_check(path: Path, per_condition: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crosshair", "check", "--analysis_kind", "PEP316",
         "--per_condition_timeout", str(per_condition), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=WALL_LIMIT,
    )


def contract_lines(fn: object) -> list[str]:
    doc = inspect.getdoc(fn) or ""
    return [line for line in doc.splitlines() if re.match(r"(pre|post):", line)]


def test_broken_variants_carry_the_reference_contracts() -> None:
    """The broken functions are judged by exactly the reference's contracts."""
    for name in BROKEN_FUNCTIONS:
        ref_fn = getattr(conntable, name)
        broken_fn = getattr(conntable_broken, name)
        assert contract_lines(ref_fn), f"reference {name} carries no contract"
        assert contract_lines(broken_fn) == contract_lines(ref_fn), name


def test_reference_conntable_has_no_counterexample() -> None:
    proc = crosshair_check(REFERENCE, per_condition=1.5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in proc.stdout, proc.stdout


def test_broken_conntable_is_rejected_with_each_function_named() -> None:
    proc = crosshair_check(BROKEN, per_condition=4)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if ": error: " in line]
    for name in BROKEN_FUNCTIONS:
        assert any(f"calling {name}(" in line for line in errors), (name, proc.stdout)
