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

from netkernel.conformance import requirements, runtime, targets

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


# -- RT-7: --target exec:'CMD {device}' -----------------------------------------------------------

PROBE = """
import json, os, socket, stat, sys, time
device, out = sys.argv[1], sys.argv[2]
fd = int(os.environ["NETKERNEL_CONTROL_FD"])
conn = socket.socket(fileno=fd)
facts = {"device": device, "exists": os.path.isfile(device), "pid": os.getpid(),
         "sock": stat.S_ISSOCK(os.fstat(fd).st_mode), "family": conn.family.name,
         "peer": conn.getpeername(), "instance": os.environ.get("NETKERNEL_INSTANCE")}
open(out + ".tmp", "w").write(json.dumps(facts))
os.rename(out + ".tmp", out)
while not os.path.exists(out + ".close"):
    time.sleep(0.01)
conn.close()  # RT-4: the end of the connection is the hot-unplug; the program lives on
time.sleep(60)
"""


def test_device_placeholder_hands_over_the_device_and_the_control_connection(
        tmp_path: Path) -> None:
    """The suite attaches the NSM device for the program, which gets the file's absolute
    path on its command line and the attach's connection on NETKERNEL_CONTROL_FD (RT-7);
    the program closing that descriptor unplugs the device (RT-4)."""
    probe, out = tmp_path / "probe.py", tmp_path / "facts.json"
    probe.write_text(PROBE)
    launcher = targets.load(f"exec:{shlex.quote(sys.executable)} {probe} {{device}} {out}")
    inst = runtime.Instance(targets.REFERENCE_PROCESSES["coreengine"], tmp_path / "logs")
    try:
        proc = inst.start_nsm(launcher.roles["nsm"])
        facts = runtime.wait_until("the program reports", lambda: out.exists() and
                                   json.loads(out.read_text()))
        [nsm] = inst.status()["nsms"]
        # the CoreEngine knows the program's own pid: the shim exec'd it (same process)
        assert nsm["pid"] == proc.pid == facts["pid"]
        assert nsm["name"] == Path(sys.executable).name
        device = Path(facts["device"])
        assert device.is_absolute() and facts["exists"]
        assert device == inst.dir / f"nsm-{nsm['id']}.nk"  # RT-1: the runtime directory
        assert facts["sock"] and facts["family"] == "AF_UNIX"
        assert facts["peer"] == str(inst.dir / runtime.ENGINE_SOCK)
        assert facts["instance"] == inst.name

        (tmp_path / "facts.json.close").touch()
        runtime.wait_until("the CoreEngine unplugs the NSM", lambda: not inst.status()["nsms"],
                           timeout=3.0)
        assert not device.exists() and proc.alive()
    finally:
        inst.stop()
