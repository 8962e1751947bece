"""Certification runs (``--nk-certify --nk-report-dir``): the verdict, the reports, the exit status.

Two deliberately broken targets, each the reference with one defect:

- :func:`lax_reserved` (tests.broken_targets.lax_codec): its decoder accepts non-zero
  reserved bytes, which breaks NQE-4, a MUST: the run fails, and every report names
  NQE-4 with a command that reproduces the failure;
- :func:`short_batches`: its rings hand out one NQE fewer than asked for in a batch,
  which breaks only RING-8, a MAY: the run passes (exit status 0) and says so.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from netkernel.conformance import report, requirements, targets
from netkernel.reference import ring as ref_ring

ROOT = Path(__file__).resolve().parent.parent


class _ShortBatchRing(ref_ring.Ring):
    """Takes one NQE fewer than it could from a batch of two or more (breaks RING-8)."""

    def pop_many(self, limit: int) -> list[bytes]:
        return super().pop_many(limit - 1 if limit >= 2 else limit)


def short_batches() -> targets.Target:
    ref = targets.reference()
    public = {k: getattr(ref_ring, k) for k in dir(ref_ring) if not k.startswith("__")}
    ring = types.SimpleNamespace(**dict(public, Ring=_ShortBatchRing))
    return dataclasses.replace(ref, name="short-batches", roles={**ref.roles, "ring": ring},
                               version="0.0-test")


def certify(tmp_path: Path, target: str, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                               dict[str, Any], Path]:
    out = tmp_path / "cert"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
         *args, "--target", target, "--nk-certify", "--nk-report-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert (out / "report.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "report.json").read_text()), out


def verdict_after_pytest(stdout: str) -> tuple[str, list[str]]:
    """pytest's own summary line and every line printed after it (the verdict)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    [at] = [i for i, ln in enumerate(lines) if re.search(r"\d+ (passed|failed).* in [\d.]+s", ln)]
    return lines[at], lines[at + 1:]


def test_a_failing_must_fails_the_run_and_every_report_names_it(tmp_path: Path) -> None:
    proc, doc, out = certify(
        tmp_path, "tests.broken_targets:lax_codec", "conformance/test_nqe.py",
        "-k", "test_decoder_rejects_nonzero_reserved or test_encoder_refuses_nonzero_reserved")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert requirements.load()["NQE-4"].level == "MUST"
    assert doc["requirements"]["NQE-4"]["status"] == "failed"
    assert "NQE-4" in doc["verdict"]["failed_mandatory"] and not doc["verdict"]["passed"]
    # what judged what, and how
    assert doc["spec"]["version"] == "v1" and doc["spec"]["digest"].startswith("sha256:")
    assert doc["suite"]["digest"].startswith("sha256:") and doc["suite"]["version"]
    assert doc["implementation"]["name"] == "lax-codec"
    assert doc["run"]["hypothesis"]["profile"] == "certify"
    assert doc["run"]["hypothesis"]["derandomize"] is True
    assert doc["run"]["python"] and doc["run"]["platform"]

    [failure] = [f for f in doc["failures"] if "NQE-4" in f["requirements"]]
    assert failure["nodeid"].endswith("::test_decoder_rejects_nonzero_reserved")
    assert "DID NOT RAISE" in failure["error"]
    repro = failure["reproduce"]
    assert repro["falsifying_example"].startswith("Falsifying example")
    assert repro["reproduce_failure"].startswith("@reproduce_failure(")
    assert repro["command"] == shlex.join(
        ["pytest", "--pyargs",
         "netkernel.conformance.test_nqe::test_decoder_rejects_nonzero_reserved",
         "--target", "tests.broken_targets:lax_codec", "--nk-certify"])

    page = (out / "report.html").read_text()
    assert '<tr id="NQE-4" class="failed">' in page and repro["command"] in page.replace(
        "&#x27;", "'")
    assert "<link" not in page and "<script" not in page  # self-contained
    md = (out / "report.md").read_text()
    assert "| NQE-4 | MUST | **failed** |" in md and repro["command"] in md

    junit = ET.parse(out / "junit.xml").getroot()
    [case] = [c for c in junit.iter("testcase")
              if c.get("name") == "test_decoder_rejects_nonzero_reserved"]
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["requirements"] == "NQE-4 NQE-10" and case.find("failure") is not None
    suite_props = {p.get("name"): p.get("value") for p in junit.iter("property")}
    assert set(suite_props["netkernel.failed_mandatory"].split()) == {"NQE-4", "NQE-10"}
    assert suite_props["netkernel.spec.digest"] == doc["spec"]["digest"]

    # the verdict is the run's last words, after pytest's own summary line
    pytest_line, verdict = verdict_after_pytest(proc.stdout)
    assert "1 failed, 1 passed" in pytest_line
    assert verdict[0].startswith("NetKernel certification of tests.broken_targets:lax_codec: FAIL")
    assert "  failing mandatory (MUST/MUST NOT): NQE-4 NQE-10" in verdict
    assert f"  report: {out / 'report.html'}" in verdict
    assert f"  report: {out / 'junit.xml'}" in verdict
    assert verdict[-1] == "  exit status: 1"

    # the reproduction command, run as written, fails the same test the same way
    argv = shlex.split(repro["command"])
    assert argv[0] == "pytest"
    rerun = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 1
    assert "1 failed" in rerun.stdout and "DID NOT RAISE" in rerun.stdout


def test_failing_only_an_optional_requirement_passes_the_run(tmp_path: Path) -> None:
    proc, doc, out = certify(
        tmp_path, "tests.test_certify:short_batches", "conformance/test_ring.py",
        "-k", "test_batches_take_what_fits_in_order or test_full_and_empty")
    assert requirements.load()["RING-8"].level == "MAY"
    assert doc["requirements"]["RING-8"]["status"] == "failed"
    assert doc["requirements"]["RING-4"]["status"] == "passed"
    assert doc["verdict"] == dict(doc["verdict"], passed=True, failed_mandatory=[],
                                  failed_optional=["RING-8"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert doc["implementation"]["version"] == "0.0-test"
    pytest_line, verdict = verdict_after_pytest(proc.stdout)
    assert "1 failed, 1 passed" in pytest_line
    assert verdict[0].endswith(
        "PASS: no mandatory requirement failed (1 optional requirement(s) failed)")
    assert "  failing optional (SHOULD/MAY): RING-8" in verdict
    assert verdict[-1] == "  exit status: 0"
    assert "| RING-8 | MAY | **failed** |" in (out / "report.md").read_text()


def test_without_certify_any_failure_fails_the_run(tmp_path: Path) -> None:
    """Development runs keep pytest's rule (the project's CI holds the reference to every
    requirement), and their report records the Hypothesis seed that reproduces them."""
    json_path = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
         "conformance/test_ring.py", "-k", "test_batches_take_what_fits_in_order",
         "--target", "tests.test_certify:short_batches", "--nk-report", str(json_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    doc = json.loads(json_path.read_text())
    seed = doc["run"]["hypothesis"]["seed"]
    assert isinstance(seed, str) and seed.isdigit()
    [failure] = doc["failures"]
    assert failure["reproduce"]["command"].endswith(f"--hypothesis-seed={seed}")
    assert verdict_after_pytest(proc.stdout)[1][-1] == "  exit status: 1"


def test_a_failing_test_that_names_no_requirement_fails_a_certification(
        monkeypatch: pytest.MonkeyPatch) -> None:
    known = {"A-1": requirements.Requirement("A-1", "t", "x.md", "SHOULD", ("codec",), None)}
    outcomes = [report.Outcome(["A-1"], "t1", "failed"), report.Outcome([], "self", "failed")]
    monkeypatch.setattr(requirements, "load", lambda *a: known)
    doc = report.build(outcomes, target_spec="x", target=None, certify=True, run={})
    assert doc["verdict"]["failed_optional"] == ["A-1"]
    assert doc["verdict"]["failed_unattributed_tests"] == ["self"]
    assert report.certification_exit(doc) == 1


def test_a_run_that_ended_early_has_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    known = {"A-1": requirements.Requirement("A-1", "t", "x.md", "MUST", ("codec",), None)}
    monkeypatch.setattr(requirements, "load", lambda *a: known)
    doc = report.build([], target_spec="x", target=None, certify=True, run={}, pytest_status=4)
    assert doc["verdict"]["passed"] is False and doc["verdict"]["no_verdict"] == "usage error"
    lines = report.summary_lines(doc, [], 4)
    assert "NO VERDICT: the run ended early (usage error)" in lines[0]
    assert 'class="verdict NO"' in report.html_page(doc)
