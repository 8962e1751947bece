"""Real programs, run directly or under NetKernel (tests/test_programs.py, bench/programs.py).

* :class:`Via`: how a command runs: :data:`DIRECT`, or :func:`under` an instance
  (``python -m netkernel run --instance NAME -- CMD``), optionally with the NetKernel side
  inside ``unshare -n``: a network namespace with only a loopback that is down, so a
  byte that does not go through NetKernel (whose NSM runs in the root namespace) goes
  nowhere;
* :func:`run`: a command to completion under a deadline, its process group killed on timeout;
* :class:`Server`: a background server on a loopback port, started in its own process
  group, ready when the port is listening (``/proc/net``, so no probe connection
  disturbs one-shot servers such as ``iperf3 -1``), stopped (SIGTERM then SIGKILL to the
  whole group: nginx workers, ``netkernel run``'s agent) whatever happened;
* set-ups of the programs in temporary directories: :func:`nginx_conf`, and the server
  command lines (:func:`http_server`, :func:`redis_server`, :func:`memcached`,
  :func:`iperf3_server`, :func:`sockperf_server`, the helper scripts in tests/programs/);
* :func:`nsm_bytes`: the bytes the instance's NSMs moved (CoreEngine status), to show
  that a run went through NetKernel;
* parsers of the programs' reports (:func:`wrk_report`, :func:`ab_report`,
  :func:`redis_benchmark_report`, :func:`sockperf_report`, :func:`iperf3_report`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from netkernel import instance as nk_instance

SCRIPTS: Final = Path(__file__).resolve().parent / "programs"
#: Variables that must not leak from the caller into a run (a direct run stays direct,
#: NetKernel runs take the instance from --instance, never from NETKERNEL_ROOT).
#: NETKERNEL_PRELOAD and NETKERNEL_AGENT_BIN stay: they choose the builds `netkernel run`
#: uses (a sanitizer build, say).
_DROP_ENV: Final = ("NETKERNEL_ROOT", "NETKERNEL_INSTANCE", "NETKERNEL_AGENT", "LD_PRELOAD")
#: Debian packages providing the programs (what .ci/run installs).
APT_PACKAGES: Final = ("curl", "nginx-light", "redis-server", "redis-tools", "iperf3",
                       "memcached", "libmemcached-tools", "sockperf", "wrk", "apache2-utils",
                       "util-linux")


def missing(*binaries: str) -> list[str]:
    """The binaries of ``binaries`` not on PATH."""
    return [b for b in binaries if shutil.which(b) is None]


def script(name: str, *args: object) -> list[str]:
    """``python tests/programs/NAME.py ARGS``."""
    return [sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)]


def bulk_digest(size: int, seed: int) -> str:
    """The sha256 of the stream ``tests/programs/bulk.py send PORT size seed`` sends."""
    spec = importlib.util.spec_from_file_location("nk_bulk", SCRIPTS / "bulk.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    digest: str = module.digest(size, seed)
    return digest


def last_json(text: str) -> Any:
    """The last line of ``text`` that is a JSON object (a program's report among other
    output)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    raise AssertionError(f"no JSON line in:\n{text[-3000:]}")


def env() -> dict[str, str]:
    """The caller's environment without NetKernel's variables."""
    out = dict(os.environ)
    for name in _DROP_ENV:
        out.pop(name, None)
    return out


def netns_prefix() -> list[str]:
    """``unshare -n`` (``-rn`` when not root: a user namespace maps us to root in it)."""
    return ["unshare", "-n", "--"] if os.geteuid() == 0 else ["unshare", "-rn", "--"]


@dataclass(frozen=True)
class Via:
    """How a command runs: directly (``instance`` None) or under NetKernel."""

    instance: str | None = None
    netns: bool = False

    @property
    def nk(self) -> bool:
        return self.instance is not None

    @property
    def label(self) -> str:
        if self.instance is None:
            return "netns" if self.netns else "direct"
        return "netkernel+netns" if self.netns else "netkernel"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        full = list(cmd)
        if self.instance is not None:
            full = [sys.executable, "-m", "netkernel", "run", "--instance", self.instance,
                    "--", *full]
        return [*netns_prefix(), *full] if self.netns else full


DIRECT: Final = Via()


def under(instance: str, *, netns: bool = False) -> Via:
    return Via(instance, netns)


#: Seconds the rest of a finished command's process group may take to exit.
LINGER: Final = 8.0


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = proc.joinpath("stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def until_gone(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for process group ``pgid`` to be empty; True if it is."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (a session leader), SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    # Members may outlive the leader (nginx workers, an agent): the group goes entirely.
    until_gone(proc.pid, grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (f"{' '.join(self.argv)} -> exit {self.returncode} in {self.seconds:.2f} s\n"
                f"--- stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-3000:]}")

    def ok(self) -> Result:
        """Itself if the command exited 0; AssertionError with its output otherwise."""
        assert self.returncode == 0, str(self)
        return self


def run(cmd: Sequence[str], via: Via = DIRECT, *, timeout: float = 60.0,
        cwd: Path | None = None, stdin: Path | None = None) -> Result:
    """Run ``cmd`` (as ``via`` says, its input from the file ``stdin`` or nothing) to
    completion; its whole process group is killed and AssertionError raised if it takes
    longer than ``timeout`` seconds."""
    argv = via.argv(cmd)
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            open(stdin or os.devnull, "rb") as inp:
        proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err,
                                env=env(), cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, grace=1.0)
            out.seek(0)
            err.seek(0)
            raise AssertionError(
                f"{' '.join(argv)} did not finish in {timeout:g} s\n--- stdout:\n"
                f"{out.read().decode(errors='replace')[-3000:]}\n--- stderr:\n"
                f"{err.read().decode(errors='replace')[-3000:]}") from None
        # What the command left in its group (an agent flushing its last replies) gets
        # a few seconds to finish, then goes.
        until_gone(proc.pid, LINGER)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return Result(argv, proc.returncode, out.read().decode(errors="replace"),
                      err.read().decode(errors="replace"), time.monotonic() - start)


def free_port() -> int:
    """A loopback port free for both TCP and UDP right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def _proc_net_ports(kind: str, state: str | None) -> set[int]:
    ports = set()
    for name in (kind, kind + "6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{name}") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if state is None or fields[3] == state:
                    ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def listening(port: int, proto: str = "tcp") -> bool:
    """Is something in this network namespace listening on TCP ``port`` (bound to UDP
    ``port``)? Under NetKernel that is the NSM's socket, in the NSM's namespace."""
    if proto == "tcp":
        return port in _proc_net_ports("tcp", "0A")
    return port in _proc_net_ports("udp", None)


class Server:
    """A background server: ``with Server(...) as srv`` starts it (in its own process
    group, output to ``log``) and waits until ``ready()``; leaving the block stops it."""

    def __init__(self, cmd: Sequence[str], via: Via = DIRECT, *,
                 ready: Callable[[], bool], log: Path, cwd: Path | None = None,
                 timeout: float = 20.0) -> None:
        self.argv = via.argv(cmd)
        self.via = via
        self.ready = ready
        self.log = log
        self.cwd = cwd
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env(), cwd=self.cwd,
                                         start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{' '.join(self.argv)} exited with status"
                                     f" {self.proc.returncode} before it was ready;"
                                     f" output:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{' '.join(self.argv)} not ready after"
                                     f" {self.timeout:g} s; output:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop the whole process group; the server's exit status."""
        if self.proc is None:
            return None
        _kill_group(self.proc)
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def workdir(prefix: str = "nk-prog-") -> Iterator[Path]:
    """A temporary directory readable by every user (nginx workers may drop privileges)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


def tcp_server(cmd: Sequence[str], via: Via, port: int, log: Path, **kw: Any) -> Server:
    """A :class:`Server` ready when TCP ``port`` is listening."""
    return Server(cmd, via, ready=lambda: listening(port), log=log, **kw)


# ---- the programs' set-ups -------------------------------------------------------------

def http_server(port: int, directory: Path) -> list[str]:
    """Python's http.server on 127.0.0.1:``port`` serving ``directory``."""
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
            "--directory", str(directory)]


def nginx_conf(root: Path, port: int, docroot: Path, *, workers: int = 1,
               user: str | None = None) -> list[str]:
    """Write ``root/nginx.conf`` (everything nginx writes stays in ``root``) and return the
    command running nginx in the foreground with a master and ``workers`` workers, which
    accept on the listening socket they inherit from the master. Started as root, the
    workers run as ``user`` ("nobody nogroup": they drop their privileges, as nginx's
    default is), or as root by default."""
    for sub in ("tmp", "logs"):
        (root / sub).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o777)
    user = "" if os.geteuid() != 0 else f"user {user or 'root root'};"
    temps = "\n".join(f"    {kind}_temp_path {root}/tmp/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(f"""\
{user}
worker_processes {workers};
master_process on;
pid {root}/nginx.pid;
error_log {root}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {root}/logs/access.log;
{temps}
    sendfile on;
    keepalive_requests 100000;
    types {{ text/html html; application/octet-stream bin; }}
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
    }}
}}
""")
    return ["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"]


def nginx_statuses(root: Path) -> dict[int, int]:
    """How many requests of nginx's access log (combined format) got each status."""
    counts: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for line in (root / "logs" / "access.log").read_text(errors="replace").splitlines():
            m = re.search(r'" (\d{3}) ', line)
            if m:
                counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def nginx_errors(root: Path, lines: int = 20) -> str:
    """The last error lines (level above notice) of nginx's error log."""
    with contextlib.suppress(OSError):
        text = (root / "logs" / "error.log").read_text(errors="replace").splitlines()
        return "\n".join([line for line in text
                          if not re.search(r"\[(notice|info)\]", line)
                          or "failed" in line][-lines:])
    return ""


def redis_server(port: int) -> list[str]:
    return ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--bind", "127.0.0.1"]


def memcached(port: int, udp_port: int = 0) -> list[str]:
    user = ["-u", "root"] if os.geteuid() == 0 else []
    return ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", str(udp_port), *user]


def iperf3_server(port: int) -> list[str]:
    """One test, then exit (``-1``)."""
    return ["iperf3", "-s", "-p", str(port), "-1"]


def sockperf_server(port: int, udp: bool = False) -> list[str]:
    """sockperf's server, TCP or UDP (its default)."""
    return ["sockperf", "server", *([] if udp else ["--tcp"]), "-i", "127.0.0.1",
            "-p", str(port)]


# ---- what went through NetKernel -------------------------------------------------------

def nsm_bytes(name: str) -> int:
    """Bytes the NSMs of instance ``name`` moved so far, both directions (their counters
    outlive the tenants, which detach when their agent exits)."""
    total = 0
    for nsm in nk_instance.status(name)["nsms"]:
        counters = nsm.get("counters", {})
        total += int(counters.get("bytes_in", 0)) + int(counters.get("bytes_out", 0))
    return total


def tenants(name: str, program: str) -> list[dict[str, Any]]:
    """The CoreEngine's status entries of the attached tenants whose agent is named
    ``program`` (``netkernel run`` names it after the command). An earlier run's agent
    may still be attached for a moment (it leaves once idle), and IDs are reused lowest
    first (CE-22), so the newest run's is not told by its ID: callers look at all."""
    return [entry for entry in nk_instance.status(name)["tenants"]
            if entry.get("name") == program and entry.get("attached")]


# ---- the programs' reports -------------------------------------------------------------

def wrk_report(text: str) -> dict[str, float]:
    """Requests/s, requests, and the error counts wrk prints (absent ones are 0)."""
    out = {"requests": 0.0, "rps": 0.0, "non_2xx": 0.0, "connect": 0.0, "read": 0.0,
           "write": 0.0, "timeout": 0.0}
    if m := re.search(r"(\d+) requests in", text):
        out["requests"] = float(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        out["non_2xx"] = float(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      text):
        for key, value in zip(("connect", "read", "write", "timeout"), m.groups(),
                              strict=True):
            out[key] = float(value)
    return out


def ab_report(text: str) -> dict[str, float]:
    """ab's complete/failed/non-2xx request counts and requests/s."""
    out = {"complete": -1.0, "failed": -1.0, "non_2xx": 0.0, "rps": 0.0}
    for key, pattern in (("complete", r"Complete requests:\s+(\d+)"),
                         ("failed", r"Failed requests:\s+(\d+)"),
                         ("non_2xx", r"Non-2xx responses:\s+(\d+)"),
                         ("rps", r"Requests per second:\s+([\d.]+)")):
        if m := re.search(pattern, text):
            out[key] = float(m.group(1))
    return out


def redis_benchmark_report(text: str) -> dict[str, float]:
    """``redis-benchmark -q``'s requests/s per test (its progress lines end in \\r)."""
    out = {}
    for line in re.split(r"[\r\n]+", text):
        if m := re.match(r"\s*(\S[^:]*): ([\d.]+) requests per second", line):
            out[m.group(1)] = float(m.group(2))
    return out


def sockperf_report(text: str) -> dict[str, float]:
    """sockperf's summary: average latency (usec) of ping-pong, message rate (msg/s) and
    bandwidth (MB/s) of throughput, and the counts of sent/received/dropped messages."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    out: dict[str, float] = {}
    patterns = {
        "total_sent": r"Total of (\d+) messages sent",
        "latency_us": r"Summary: Latency is ([\d.]+) usec",
        "msg_rate": r"Summary: Message Rate is (\d+) \[msg/sec\]",
        "mbps": r"Summary: BandWidth is ([\d.]+) MBps",
        "sent": r"SentMessages=(\d+)",
        "received": r"ReceivedMessages=(\d+)",
        "dropped": r"# dropped messages = (\d+)",
        "duplicated": r"# duplicated messages = (\d+)",
        "out_of_order": r"# out-of-order messages = (\d+)",
    }
    for key, pattern in patterns.items():
        if m := re.search(pattern, text):
            out[key] = float(m.group(1))
    return out


def iperf3_report(doc: dict[str, Any]) -> dict[str, float]:
    """What an ``iperf3 -J`` client report says: bits/s and bytes as received, bytes sent,
    and for UDP the datagrams sent and lost."""
    end = doc["end"]
    received, sent = end["sum_received"], end["sum_sent"]
    out = {"bps": float(received["bits_per_second"]), "bytes": float(received["bytes"]),
           "sent_bytes": float(sent["bytes"])}
    if doc["start"]["test_start"]["protocol"] == "UDP":
        out["packets"] = float(sent["packets"])
        out["lost"] = float(received["lost_packets"])
    return out
