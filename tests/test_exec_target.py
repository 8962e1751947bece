"""How a vendor certifies an NSM program: ``--target exec:CMD`` (DESIGN §9, targets.py).

The suite starts ``CMD`` as the NSM of every instance it creates, around the
reference CoreEngine, and judges it by spec/nsm.md. Here the program is the
reference's own NSM, run as a vendor would run theirs.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from netkernel.conformance import requirements, targets

ROOT = Path(__file__).resolve().parent.parent
NSM_CMD = f"{shlex.quote(sys.executable)} -m netkernel.reference.nsm_kernel --instance {{instance}}"


def test_exec_target_starts_the_command_per_instance() -> None:
    t = targets.load(f"exec:{NSM_CMD}")
    assert set(t.roles) == {"nsm"}
    launcher = t.roles["nsm"]
    assert isinstance(launcher, targets.Launcher)
    assert launcher.argv[-1] == "{instance}" and launcher.argv[0] == sys.executable


def test_an_nsm_program_is_certified_by_exec_target(tmp_path: Path) -> None:
    report = tmp_path / "nsm.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
         "conformance/test_nsm.py", "conformance/test_runtime.py",
         "--target", f"exec:{NSM_CMD}", "--nk-certify", "--nk-report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["target"] == f"exec:{NSM_CMD}"
    status = {rid: e["status"] for rid, e in doc["requirements"].items()}
    nsm_reqs = [r.id for r in requirements.load().values() if r.file == "nsm.md"]
    assert nsm_reqs and all(status[rid] == "passed" for rid in nsm_reqs), \
        {rid: status[rid] for rid in nsm_reqs if status[rid] != "passed"}
    # the NSM's side of the control protocol is judged too; the CoreEngine's is not its own
    assert status["RT-3"] == "passed" and status["RT-4"] == "passed"
    ce_only = doc["requirements"]["RT-2"]
    assert ce_only["status"] == "not-applicable"
    assert "no 'coreengine' role" in " ".join(ce_only["reasons"])
