"""The vendor example: an NSM in plain C, written from spec/*.md alone, certifies clean.

``examples/vendor-nsm/`` is what a vendor brings to certification (issue 7): a C
program that includes and links nothing of NetKernel. Its good build must pass
every requirement of the ``nsm`` role through ``--target exec:'CMD {device}'``
(RT-7); its broken build (``-DVENDOR_BROKEN``, three documented defects, see
examples/vendor-nsm/README.md) must be caught with exactly the requirement IDs
its defects break — no more, no fewer.

All tests of the example are in this module: select them with
``pytest tests/test_vendor_nsm.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from netkernel.conformance import requirements

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "vendor-nsm"

# The defects of the broken build and the requirement each one breaks
# (examples/vendor-nsm/README.md, "The broken variant"):
#   1. a SEND is answered when it arrives, before the stack took its bytes:
#      NSM-6 (SENDs wait for the stack), NSM-3 (a SEND to an unconnected socket
#      is answered with its size, not Linux's -EPIPE), NSM-8 (no SEND is left
#      waiting for a CLOSE to answer -EBADF);
#   2. a CLOSE is answered before the CoreEngine read the socket's events: NSM-17;
#   3. data that arrives while the receive slice is full is dropped: NSM-16; so that the
#      slice fills, that build keeps no share and no reserve: NSM-18.
BROKEN_FAILS = {"NSM-3", "NSM-6", "NSM-8", "NSM-16", "NSM-17", "NSM-18"}

needs_cc = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("cc") is None,
    reason="building examples/vendor-nsm needs make and a C compiler (cc)",
)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both builds, fresh, with -Wall -Wextra -Werror (the Makefile's WARN)."""
    out = tmp_path_factory.mktemp("vendor-nsm")
    proc = subprocess.run(["make", "-C", str(EXAMPLE), f"BUILD={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in (proc.stdout + proc.stderr).lower()
    return out


def certify(binary: Path, report: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """One certification run of the whole suite against the program, as a vendor runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
         "conformance", "--target", f"exec:{binary} {{device}}",
         "--nk-certify", "--nk-report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report.read_text())


def nsm_requirements() -> list[str]:
    return [r.id for r in requirements.load().values() if "nsm" in r.roles]


@needs_cc
def test_the_example_builds_warning_free(build: Path) -> None:
    for name in ("vendor-nsm", "vendor-nsm-broken"):
        assert (build / name).is_file() and (build / name).stat().st_mode & 0o111


@needs_cc
def test_the_example_uses_nothing_of_the_fast_path() -> None:
    # written against the spec alone: no NetKernel header, no NetKernel library
    source = (EXAMPLE / "vendor-nsm.c").read_text()
    makefile = (EXAMPLE / "Makefile").read_text()
    includes = [line for line in source.splitlines() if line.startswith("#include")]
    assert includes and all("<" in line for line in includes), includes
    assert not any("nk/" in line or "netkernel" in line for line in includes), includes
    for text in (makefile, source):
        assert "fastpath" not in text and "-lnk" not in text


@needs_cc
def test_the_example_nsm_certifies_clean(build: Path, tmp_path: Path) -> None:
    proc, doc = certify(build / "vendor-nsm", tmp_path / "vendor.json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert doc["certify"] is True
    status = {rid: e["status"] for rid, e in doc["requirements"].items()}
    ids = nsm_requirements()
    assert "NSM-1" in ids and "RT-3" in ids
    for rid in ids:
        if rid.startswith("SHM-"):  # the example claims no SHM_PAIRING (spec/shm.md)
            assert status[rid] == "unsupported", (rid, status[rid])
        elif rid == "RT-7":  # how a program is started: untestable, the suite uses it
            assert status[rid] == "untestable"
        else:
            assert status[rid] == "passed", (rid, doc["requirements"][rid])
    # every other role is not the example's: nothing else is judged, nothing failed
    assert doc["summary"].get("failed", 0) == 0
    assert {s for rid, s in status.items() if rid not in ids} == {"not-applicable"}


@needs_cc
def test_the_broken_example_fails_exactly_its_defects(build: Path, tmp_path: Path) -> None:
    proc, doc = certify(build / "vendor-nsm-broken", tmp_path / "broken.json")
    assert proc.returncode != 0, "a mandatory requirement failed: the exit status says so"
    failed = {rid for rid, e in doc["requirements"].items() if e["status"] == "failed"}
    assert failed == BROKEN_FAILS, (sorted(failed), proc.stdout[-4000:])
    # the defects break nothing else of the role
    for rid in set(nsm_requirements()) - BROKEN_FAILS:
        assert doc["requirements"][rid]["status"] in ("passed", "untestable", "unsupported"), rid
