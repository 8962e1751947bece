"""`--nk-report` tells an implementer exactly which requirement they break."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from netkernel.conformance import requirements
from netkernel.conformance.plugin import requirement_status

ROOT = Path(__file__).resolve().parent.parent


def run_suite(tmp_path: Path, target: str, *paths: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
         *paths, "--target", target, "--nk-report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert report.exists(), proc.stdout + proc.stderr
    return proc.returncode, json.loads(report.read_text())


def test_report_lists_every_requirement_with_a_status(tmp_path: Path) -> None:
    code, doc = run_suite(tmp_path, "reference", "conformance/test_nqe.py")
    assert code == 0
    known = requirements.load()
    assert set(doc["requirements"]) == set(known)
    statuses = {rid: e["status"] for rid, e in doc["requirements"].items()}
    assert statuses["NQE-1"] == "passed"
    assert all(s in {"passed", "failed", "not-tested", "not-applicable", "unsupported",
                     "untestable"} for s in statuses.values())
    assert doc["target"] == "reference"


def test_broken_decoder_is_caught_and_the_requirement_named(tmp_path: Path) -> None:
    code, doc = run_suite(tmp_path, "tests.broken_targets:lax_codec", "conformance/test_nqe.py")
    assert code != 0
    failed = {rid for rid, e in doc["requirements"].items() if e["status"] == "failed"}
    reserved = {r.id for r in requirements.load().values()
                if r.file == "nqe.md" and "reserved" in r.title.lower()}
    assert reserved and failed & reserved, (failed, reserved)


def test_missing_roles_are_reported_not_applicable(tmp_path: Path) -> None:
    code, doc = run_suite(tmp_path, "tests.broken_targets:codec_only",
                          "conformance/test_ring.py")
    assert code == 0
    ring_reqs = [e for rid, e in doc["requirements"].items() if rid.startswith("RING-")]
    assert ring_reqs and all(e["status"] == "not-applicable" for e in ring_reqs)
    assert all("no 'ring' role" in " ".join(e["reasons"]) for e in ring_reqs)


def test_status_folding_prefers_failure_then_pass() -> None:
    known = {
        rid: requirements.Requirement(rid, "t", "x.md", "MUST", ("codec",), None)
        for rid in ("A-1", "A-2", "A-3", "A-4", "A-5")
    }
    known["A-6"] = requirements.Requirement("A-6", "t", "x.md", "MUST", ("codec",), "no probe")
    results = [
        (["A-1"], "t1", "passed", ""), (["A-1", "A-2"], "t2", "failed", ""),
        (["A-3"], "t3", "skipped", "unsupported: no FUTEX_BELLS"),
        (["A-4"], "t4", "skipped", "not applicable: no ring role"),
    ]
    got = {rid: e["status"] for rid, e in requirement_status(known, results).items()}
    assert got == {"A-1": "failed", "A-2": "failed", "A-3": "unsupported",
                   "A-4": "not-applicable", "A-5": "not-tested", "A-6": "untestable"}
