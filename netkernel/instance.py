"""Start, inspect and stop one NetKernel instance on this host (``netkernel up/status/down``).

An instance is a CoreEngine process and the NSM processes attached to it,
sharing one runtime directory (:mod:`netkernel.reference.shm`). This module
only orchestrates processes and files; everything it learns about a running
instance it asks the CoreEngine over ``engine.sock``.

- :func:`up` starts the CoreEngine, waits until it answers on ``engine.sock``,
  starts the NSM (optionally inside a network namespace with
  ``ip netns exec``), waits until the NSM has attached, and returns the
  status. Both run in their own session with their output in log files, so
  they outlive the command that started them.
- :func:`status` is the CoreEngine's status document.
- :func:`down` asks the CoreEngine to shut down, stops every process named by
  a pid file of the instance (SIGTERM, then SIGKILL), and removes the runtime
  directory with everything in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from netkernel.reference import coreengine, shm

#: The implementations ``up --impl`` knows: the package whose ``coreengine`` and
#: ``nsm_<kind>`` modules run as the processes. ``fastpath`` (C, issue 4) passes the
#: same conformance suite as ``reference`` and is the default.
IMPLS: Final[dict[str, str]] = {
    "fastpath": "netkernel.fastpath",
    "reference": "netkernel.reference",
}
DEFAULT_IMPL: Final = "fastpath"
#: NSM placements ``up --nsm`` knows (spec/shm.md SHM-1), per implementation: the module
#: (in the implementation's package) the NSM runs as, and its arguments. ``kernel``: every
#: connection over Linux TCP; ``auto``: connections between tenants paired in shared memory
#: when the listener's queue has room; ``shm``: always paired. The reference has no shm NSM:
#: its ``auto`` is its best, the kernel NSM.
NSM_KINDS: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "fastpath": {
        "kernel": ("nsm_kernel",),
        "auto": ("nsm_shm", "--placement", "auto"),
        "shm": ("nsm_shm", "--placement", "shm"),
    },
    "reference": {"kernel": ("nsm_kernel",), "auto": ("nsm_kernel",)},
}
NSM_CHOICES: Final = ("auto", "kernel", "shm")
DEFAULT_NSM: Final = "auto"
ENGINE_MODULE: Final = "coreengine"
START_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0
_POLL: Final = 0.02


class InstanceError(RuntimeError):
    """The instance cannot be started, reached or stopped; the message says why."""


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (reaping it if it is our own child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _ours(pid: int, instance: str) -> bool:
    """Is ``pid`` a NetKernel process of ``instance``? Guards against reused pids."""
    args = _cmdline(pid)
    return any(a.startswith("netkernel.") for a in args) and instance in args


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _spawn(argv: list[str], log: Path, instance: str) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached: own session, stdin from /dev/null, output to ``log``."""
    env = dict(os.environ, NETKERNEL_INSTANCE=instance, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                close_fds=True)


def running(instance: str | None = None) -> bool:
    """True if the instance's CoreEngine answers on its control socket."""
    try:
        coreengine.request({"cmd": "status"}, instance, timeout=1.0)
    except OSError:
        return False
    return True


def status(instance: str | None = None) -> dict[str, Any]:
    """The CoreEngine's status document (see :meth:`CoreEngine.status`), each NSM's
    entry completed with what the NSM publishes (RT-7): ``placement`` and per-tenant
    ``served`` counters (SHM-7)."""
    name = shm.instance_name(instance)
    try:
        doc: dict[str, Any] = coreengine.request({"cmd": "status"}, name, timeout=2.0)
    except OSError as exc:
        raise InstanceError(f"instance {name!r} is not running ({exc.strerror or exc})") from None
    directory = shm.instance_dir(name)
    for entry in doc.get("nsms", []):
        published = nsm_stats(directory, int(entry["id"]))
        if published is not None:
            entry["placement"] = published.get("placement")
            entry["served"] = published.get("tenants", {})
    return doc


def nsm_stats(directory: Path, nsm_id: int) -> dict[str, Any] | None:
    """What NSM ``nsm_id`` last published in ``nsm-<ID>.stats.json`` (RT-7), or None."""
    try:
        doc = json.loads((directory / f"nsm-{nsm_id}.stats.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("nsm") == nsm_id else None


def _wait_for(what: str, ready: Any, procs: list[tuple[subprocess.Popen[bytes], Path]],
              timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got:
            return got
        for proc, log in procs:
            if proc.poll() is not None:
                raise InstanceError(f"{what}: process {proc.pid} exited with status"
                                    f" {proc.returncode}; {log}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise InstanceError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(_POLL)


def up(instance: str | None = None, *, nsm: str = DEFAULT_NSM, netns: str | None = None,
       timeout: float = START_TIMEOUT, impl: str = DEFAULT_IMPL) -> dict[str, Any]:
    """Start the CoreEngine and one NSM with placement ``nsm`` (:data:`NSM_KINDS`; or
    none: ``nsm="none"``), both of implementation ``impl`` (:data:`IMPLS`).

    Returns the status once every process is attached and ready. On failure
    everything started is stopped again and InstanceError says what broke.
    """
    name = shm.instance_name(instance)
    if impl not in IMPLS:
        raise InstanceError(f"unknown implementation {impl!r} (known: {', '.join(IMPLS)})")
    if nsm != "none" and nsm not in NSM_KINDS[impl]:
        if nsm in NSM_CHOICES:
            raise InstanceError(f"the {impl} implementation has no {nsm} NSM"
                                f" (it has: {', '.join(NSM_KINDS[impl])})")
        raise InstanceError(f"unknown NSM {nsm!r} (known: {', '.join(NSM_CHOICES)}, none)")
    package = IMPLS[impl]
    if running(name):
        raise InstanceError(f"instance {name!r} is already running")
    _stop_leftovers(name)
    directory = shm.instance_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        engine_log = directory / "engine.log"
        ce = _spawn([sys.executable, "-m", f"{package}.{ENGINE_MODULE}", "--instance", name],
                    engine_log, name)
        (directory / "engine.pid").write_text(f"{ce.pid}\n")
        _wait_for("CoreEngine", lambda: running(name), [(ce, engine_log)], timeout)
        if nsm != "none":
            module, *nsm_args = NSM_KINDS[impl][nsm]
            _start_nsm(name, [f"{package}.{module}", *nsm_args], nsm, netns, ce, engine_log,
                       timeout)
    except BaseException:
        down(name)
        raise
    return status(name)


def _start_nsm(name: str, module: list[str], kind: str, netns: str | None,
               ce: subprocess.Popen[bytes], engine_log: Path, timeout: float) -> None:
    directory = shm.instance_dir(name)
    argv = [sys.executable, "-m", *module, "--instance", name]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    log = directory / f"nsm-{kind}.starting.log"
    proc = _spawn(argv, log, name)
    pid_file = directory / f"nsm-{kind}.starting.pid"
    pid_file.write_text(f"{proc.pid}\n")  # so that down() finds it if we fail below

    def attached() -> int | None:
        for entry in status(name).get("nsms", []):
            if entry.get("pid") == proc.pid:
                return int(entry["id"])
        return None

    nsm_id = _wait_for(f"NSM {kind}", attached, [(proc, log), (ce, engine_log)], timeout)
    # Name the files after the ID the CoreEngine assigned (the log stays open: same inode).
    log.rename(directory / f"nsm-{nsm_id}.log")
    (directory / f"nsm-{nsm_id}.pid").write_text(f"{proc.pid}\n")
    pid_file.unlink()


def _pid_files(name: str) -> list[Path]:
    directory = shm.instance_dir(name)
    if not directory.is_dir():
        return []
    # NSMs first, then the CoreEngine: the NSMs then see their devices detach cleanly.
    return sorted(directory.glob("*.pid"), key=lambda p: (p.name == "engine.pid", p.name))


def _stop_leftovers(name: str) -> None:
    """Before ``up``: stop processes of a dead instance and clear its directory."""
    if _pid_files(name) or shm.instance_dir(name).exists():
        down(name)


def down(instance: str | None = None, *, timeout: float = STOP_TIMEOUT) -> list[int]:
    """Stop the instance and remove its runtime directory. Returns the pids stopped.

    Idempotent: stopping an instance that is not running only clears its files.
    """
    name = shm.instance_name(instance)
    with contextlib.suppress(OSError):
        coreengine.request({"cmd": "shutdown"}, name, timeout=1.0)
    pids = [pid for p in _pid_files(name) if (pid := _read_pid(p)) is not None]
    pids = [pid for pid in pids if _alive(pid) and _ours(pid, name)]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        deadline = time.monotonic() + wait
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(_POLL)
        if not any(_alive(pid) for pid in pids):
            break
    left = [pid for pid in pids if _alive(pid)]
    shm.remove_instance(name)
    if left:
        raise InstanceError(f"processes {left} of instance {name!r} did not stop")
    return pids
