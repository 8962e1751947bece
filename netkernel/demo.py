"""``netkernel demo``: an HTTP server and an HTTP client, two tenants, talking over NetKernel.

The demo is the README's main job. It shows, end to end, what NetKernel does:

1. It uses the instance named ``--instance`` (default ``$NETKERNEL_INSTANCE``,
   else ``default``) if one runs, and otherwise starts an *embedded* one
   (a CoreEngine and the default NSM, :func:`netkernel.instance.up`) that it
   stops again at the end, also on an error or Ctrl-C.
2. It starts two tenant processes, each with its own NK device:
   ``python -m netkernel.demo server`` runs :mod:`http.server` on a GuestLib
   socket and serves ``--size`` random bytes; ``python -m netkernel.demo
   client`` fetches them with :mod:`http.client` over GuestLib. Both hash
   the bytes they sent or received (sha256).
3. It compares the hashes and prints what crossed the CoreEngine: the NQEs
   read from each device, by op, and the payload bytes, per tenant (the
   CoreEngine's counters while both are attached) and per NSM (what the
   NSM's counters grew by during the demo).
4. It lets the tenants exit (their devices detach) and checks that nothing
   is left: no tenant process, no device file of theirs, and with an
   embedded instance no process and no runtime directory at all.

A tenant talks to the orchestrator with one JSON line on stdout when its
part is done, and exits when its stdin closes, so a dying orchestrator never
leaves a tenant behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import http.server
import json
import os
import queue
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from netkernel import instance as inst
from netkernel.reference import guestlib, shm

DEFAULT_SIZE: Final = 1 << 20
HOST: Final = "127.0.0.1"
#: Longest the orchestrator waits for one step of a tenant (start, transfer, exit).
STEP_TIMEOUT: Final = 60.0
EXIT_TIMEOUT: Final = 10.0
SERVER_NAME: Final = "http-server"
CLIENT_NAME: Final = "http-client"


class DemoError(RuntimeError):
    """The demo failed; the message says where."""


# -- the two tenants ---------------------------------------------------------------------------


def _report(**doc: Any) -> None:
    """One JSON line to the orchestrator."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _wait_for_stdin_eof() -> None:
    """Block until the orchestrator closes our stdin (its signal to exit)."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass


class NetKernelHTTPServer(http.server.HTTPServer):
    """:class:`http.server.HTTPServer` listening on a GuestLib socket."""

    def __init__(self, address: tuple[str, int],
                 handler: Callable[..., socketserver.BaseRequestHandler]) -> None:
        socketserver.BaseServer.__init__(self, address, handler)
        self.socket = guestlib.socket(self.address_family, self.socket_type)  # type: ignore[assignment,unused-ignore]
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise


class NetKernelHTTPConnection(http.client.HTTPConnection):
    """:class:`http.client.HTTPConnection` connecting with a GuestLib socket."""

    def connect(self) -> None:
        self.sock = guestlib.create_connection((self.host, self.port), self.timeout)


def serve(size: int) -> int:
    """The server tenant: serve ``size`` random bytes at ``/`` until stdin says stop."""
    body = os.urandom(size)
    digest = hashlib.sha256(body).hexdigest()
    served: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            served.append(len(body))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = NetKernelHTTPServer((HOST, 0), Handler)
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
    loop.start()
    _report(event="listening", pid=os.getpid(), port=server.server_address[1], bytes=size,
            sha256=digest)
    sys.stdin.buffer.readline()  # "stop"
    server.shutdown()
    server.server_close()
    loop.join(EXIT_TIMEOUT)
    _report(event="stopped", pid=os.getpid(), requests=len(served), sha256=digest,
            nqes_published=guestlib.counters())
    _wait_for_stdin_eof()
    return 0


def fetch(port: int, timeout: float) -> int:
    """The client tenant: GET ``/`` from the server, hash what arrived, report it."""
    started = time.monotonic()
    conn = NetKernelHTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        h = hashlib.sha256()
        received = 0
        while chunk := resp.read(64 * 1024):
            h.update(chunk)
            received += len(chunk)
        status = resp.status
    finally:
        conn.close()
    _report(event="fetched", pid=os.getpid(), status=status, bytes=received,
            sha256=h.hexdigest(), seconds=time.monotonic() - started,
            nqes_published=guestlib.counters())
    _wait_for_stdin_eof()
    return 0


def tenant_main(argv: list[str] | None = None) -> int:
    """``python -m netkernel.demo server|client``: one tenant of the demo."""
    p = argparse.ArgumentParser(prog="python -m netkernel.demo",
                                description="one tenant of `netkernel demo`")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--size", type=int, default=DEFAULT_SIZE)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--timeout", type=float, default=STEP_TIMEOUT)
    args = p.parse_args(argv)
    # GuestLib names the device after argv[0]: the CoreEngine's status shows the role.
    sys.argv[0] = SERVER_NAME if args.role == "server" else CLIENT_NAME
    if args.role == "server":
        return serve(args.size)
    return fetch(args.port, args.timeout)


# -- the orchestrator --------------------------------------------------------------------------


@dataclass
class Tenant:
    """A tenant process of the demo, its stdout read line by line on a thread."""

    role: str
    proc: subprocess.Popen[bytes]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, role: str, args: list[str], name: str) -> Tenant:
        env = dict(os.environ, NETKERNEL_INSTANCE=name, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "netkernel.demo", role, *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, close_fds=True)
        t = cls(role, proc)
        assert proc.stdout is not None and proc.stderr is not None
        _pump(proc.stdout, t.lines.put, end=lambda: t.lines.put(None))
        _pump(proc.stderr, t.errors.append)
        return t

    def expect(self, event: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """The tenant's next report, which must be ``event``."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise DemoError(f"the {self.role} did not report {event!r} within {timeout:.0f} s"
                            f"{self._stderr()}") from None
        if line is None:
            code = self.proc.wait(EXIT_TIMEOUT)
            raise DemoError(f"the {self.role} exited with status {code} before {event!r}"
                            f"{self._stderr()}")
        doc: dict[str, Any] = json.loads(line)
        if doc.get("event") != event:
            raise DemoError(f"the {self.role} reported {doc.get('event')!r}, not {event!r}")
        return doc

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Close stdin (the tenant exits) and wait; kill it if it does not."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DemoError(f"the {self.role} did not exit within {EXIT_TIMEOUT:.0f} s"
                            f"{self._stderr()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()

    def _stderr(self) -> str:
        tail = "".join(self.errors[-20:]).rstrip()
        return f"; its stderr:\n{tail}" if tail else ""


def _pump(pipe: IO[bytes], put: Callable[[str], object],
          end: Callable[[], object] | None = None) -> None:
    def run() -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in pipe:
                put(raw.decode(errors="replace"))
        if end is not None:
            end()

    threading.Thread(target=run, daemon=True).start()


class _Interrupts:
    """SIGINT and SIGTERM unwind as KeyboardInterrupt, except inside :meth:`held`.

    While a process is being started and recorded (an instance, a tenant) the
    signal waits, so every process the demo started is known to the code that
    stops it; the interrupt is raised as soon as the held section ends.
    """

    SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def _handler(self, signum: int, _frame: object) -> None:
        if self.depth:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Result:
    """What one demo run measured; :func:`format_report` prints it."""

    instance: str
    embedded: bool
    engine_pid: int
    size: int
    server: dict[str, Any]
    client: dict[str, Any]
    tenants: dict[str, dict[str, Any]]  # role -> the CoreEngine's status entry
    nsms: list[dict[str, Any]]  # status entries, counters as grown during the demo
    others: int  # tenants of the instance that are not the demo's
    #: role -> (NSM ID, the NSM's placement, its counters of that tenant) (SHM-7)
    served: dict[str, tuple[int, str, dict[str, int]]] = field(default_factory=dict)


def _entry_of(doc: dict[str, Any], pid: int) -> dict[str, Any] | None:
    return next((t for t in doc.get("tenants", []) if t.get("pid") == pid), None)


def _counter_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            out[key] = {k: v - before.get(key, {}).get(k, 0) for k, v in value.items()
                        if v - before.get(key, {}).get(k, 0)}
        elif isinstance(value, int):
            out[key] = value - int(before.get(key, 0))
    return out


def _settled(name: str, pids: list[int], timeout: float) -> dict[str, Any]:
    """The status once the demo's tenants have no socket open (their CLOSEs answered)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = inst.status(name)
        entries = [_entry_of(doc, pid) for pid in pids]
        if all(e is not None and e.get("sockets", 0) == 0 for e in entries):
            return doc
        if time.monotonic() > deadline:
            missing = [pid for pid, e in zip(pids, entries, strict=True) if e is None]
            if missing:
                raise DemoError(f"tenant(s) {missing} are not attached to the CoreEngine")
            return doc  # sockets still closing: report what is there
        time.sleep(0.02)


def _served(name: str, tenants: dict[str, dict[str, Any]],
            size: int) -> dict[str, tuple[int, str, dict[str, int]]]:
    """What the NSMs published about the demo's tenants (SHM-7), once it shows the server's
    payload (an NSM rewrites its counters file a few times a second); {} if none does."""
    deadline = time.monotonic() + 2.0
    while True:
        doc = inst.status(name)
        out = {role: (int(n["id"]), str(n.get("placement")), n["served"][str(e["id"])])
               for role, e in tenants.items() for n in doc.get("nsms", [])
               if str(e["id"]) in n.get("served", {})}
        sent = out.get("server", (0, "", {}))[2]
        if (sent.get("shm_bytes_out", 0) + sent.get("stack_bytes_out", 0) >= size
                or time.monotonic() > deadline):
            return out
        time.sleep(0.05)


def _run_tenants(name: str, size: int, timeout: float, say: Callable[[str], None],
                 interrupts: _Interrupts) -> Result:
    before = inst.status(name)
    nsm_before = {n["id"]: n.get("counters", {}) for n in before.get("nsms", [])}
    if not before.get("nsms"):
        raise DemoError(f"instance {name!r} has no NSM attached: start one with"
                        f" `netkernel up --instance {name}`")
    started: list[Tenant] = []

    def start(role: str, args: list[str]) -> Tenant:
        with interrupts.held():
            started.append(Tenant.start(role, args, name))
        return started[-1]

    try:
        server = start("server", ["--size", str(size)])
        listening = server.expect("listening")
        say(f"netkernel demo: {SERVER_NAME} (pid {server.proc.pid}) listening on"
            f" {HOST}:{listening['port']}; starting {CLIENT_NAME}")
        client = start("client", ["--port", str(listening["port"]), "--timeout", str(timeout)])
        fetched = client.expect("fetched", timeout)
        server.send("stop")
        stopped = server.expect("stopped")
        pids = [server.proc.pid, client.proc.pid]
        during = _settled(name, pids, 2.0)
        tenants = {role: e for role, pid in (("server", pids[0]), ("client", pids[1]))
                   if (e := _entry_of(during, pid)) is not None}
        served = _served(name, tenants, size)  # before the tenants detach and are forgotten
        codes = {t.role: t.finish() for t in (server, client)}
    finally:
        for t in started:
            t.kill()
    bad = {role: code for role, code in codes.items() if code != 0}
    if bad:
        raise DemoError(f"tenant(s) exited with {bad}")
    after = _detached(name, pids, nsm_before)
    nsms = [dict(n, counters=_counter_delta(n.get("counters", {}), nsm_before.get(n["id"], {})))
            for n in after.get("nsms", [])]
    others = len(during.get("tenants", [])) - len(tenants)
    return Result(name, False, int(after["pid"]), size, dict(listening, **stopped), fetched,
                  tenants, nsms, others, served)


def _detached(name: str, pids: list[int], nsm_before: dict[int, Any]) -> dict[str, Any]:
    """The status once the demo's tenants are gone and each NSM unmapped what it mapped.

    A detach is done for the CoreEngine at once; the NSMs answer its TENANT_UNMAP
    a little later, and the demo waits (bounded) for those answers to count them.
    """
    deadline = time.monotonic() + EXIT_TIMEOUT
    while True:
        doc = inst.status(name)
        left = [pid for pid in pids if _entry_of(doc, pid) is not None]
        grown = [_counter_delta(n.get("counters", {}), nsm_before.get(n["id"], {})).get("ops", {})
                 for n in doc.get("nsms", [])]
        unmapped = all(g.get("TENANT_UNMAP|REPLY", 0) >= g.get("TENANT_MAP|REPLY", 0)
                       for g in grown)
        if not left and (unmapped or time.monotonic() > deadline):
            return doc
        if time.monotonic() > deadline:
            raise DemoError(f"tenant(s) {left} still attached after they exited")
        time.sleep(0.02)


def check(result: Result) -> list[str]:
    """Everything that must hold for the demo to pass; an empty list means it did."""
    s, c, size = result.server, result.client, result.size
    problems = []
    if c.get("status") != 200:
        problems.append(f"HTTP status {c.get('status')}, not 200")
    if c.get("bytes") != size:
        problems.append(f"the client received {c.get('bytes')} bytes, not {size}")
    if c.get("sha256") != s.get("sha256"):
        problems.append(f"sha256 differs: server {s.get('sha256')}, client {c.get('sha256')}")
    if s.get("requests") != 1:
        problems.append(f"the server answered {s.get('requests')} requests, not 1")
    for role in ("server", "client"):
        if role not in result.tenants:
            problems.append(f"the {role} was never seen attached to the CoreEngine")
    # No bypass: the payload crossed the CoreEngine, SEND from the server, EV_DATA to the client.
    sent = result.tenants.get("server", {}).get("counters", {}).get("bytes_in", 0)
    got = result.tenants.get("client", {}).get("counters", {}).get("bytes_out", 0)
    if sent < size or got < size:
        problems.append(f"the CoreEngine carried {sent} bytes from the server and {got} to the"
                        f" client, fewer than the {size} payload bytes")
    return problems


def _leftovers(name: str, pids: list[int], devices: list[Path], embedded: bool) -> list[str]:
    """Processes and files of the demo (or of its embedded instance) that outlived it."""
    out = [f"process {pid} still runs" for pid in pids if inst._alive(pid)]
    out += [f"device file {p} still exists" for p in devices if p.exists()]
    d = shm.instance_dir(name)
    if embedded and d.exists():
        out.append(f"{d} still exists: {sorted(p.name for p in d.iterdir())}")
    return out


def run(name: str | None = None, *, size: int = DEFAULT_SIZE, timeout: float = STEP_TIMEOUT,
        say: Callable[[str], None] = print, impl: str = inst.DEFAULT_IMPL) -> int:
    """Run the demo on instance ``name``; returns the exit status (0: every check passed)."""
    name = shm.instance_name(name)
    embedded = False
    result: Result | None = None
    pids: list[int] = []
    interrupts = _Interrupts()
    with interrupts.installed():
        try:
            if not inst.running(name):
                say(f"netkernel demo: no instance {name!r} runs; starting an embedded one"
                    f" (CoreEngine + NSM, {impl})")
                with interrupts.held():  # up() records every process it starts before we stop
                    embedded = True
                    up = inst.up(name, impl=impl)
                pids = [int(up["pid"]), *(int(n["pid"]) for n in up["nsms"])]
                say(f"netkernel demo: instance {name!r} up: CoreEngine pid {up['pid']}, "
                    + ", ".join(f"NSM {n['id']} {n['name']} pid {n['pid']}" for n in up["nsms"]))
            else:
                say(f"netkernel demo: using the running instance {name!r} (left running)")
            result = _run_tenants(name, size, timeout, say, interrupts)
            result.embedded = embedded
            pids += [int(result.server["pid"]), int(result.client["pid"])]
        except KeyboardInterrupt:
            say("netkernel demo: interrupted")
            return 130
        except (DemoError, inst.InstanceError, OSError, ValueError) as exc:
            say(f"netkernel demo: FAILED: {exc}")
            return 1
        finally:
            interrupts.depth += 1  # from here on a signal must not cut the teardown short
            if embedded:
                with contextlib.suppress(inst.InstanceError):
                    inst.down(name)
    say(format_report(result))
    devices = [Path(e["path"]) for e in result.tenants.values() if e.get("path")]
    problems = check(result) + _leftovers(name, pids, devices, embedded)
    for p in problems:
        say(f"netkernel demo: FAILED: {p}")
    if problems:
        return 1
    tail = "stopped, nothing left behind" if embedded else "left running"
    say(f"netkernel demo: OK ({result.size:,} bytes, sha256 match; instance {name!r} {tail})")
    return 0


# -- the report --------------------------------------------------------------------------------


def _fmt_rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.1f} MB/s" if seconds > 0 else "-"


def format_report(r: Result) -> str:
    """The text the demo prints: the transfer, the hashes, then the CoreEngine's counters."""
    s, c = r.server, r.client
    match = "match" if s.get("sha256") == c.get("sha256") else "DIFFER"
    lines = [
        f"instance {r.instance}: CoreEngine pid {r.engine_pid}"
        f" ({'embedded' if r.embedded else 'already running'})",
        f"  {SERVER_NAME}  pid {s['pid']:<7} http.server on a GuestLib socket, {HOST}:{s['port']},"
        f" serving {r.size:,} random bytes",
        f"  {CLIENT_NAME}  pid {c['pid']:<7} http.client GET / -> {c['status']},"
        f" {c['bytes']:,} bytes in {c['seconds']:.2f} s ({_fmt_rate(c['bytes'], c['seconds'])})",
        f"  sha256  server {s['sha256'][:16]}...  client {c['sha256'][:16]}...  {match}",
        "",
        "What crossed the CoreEngine: NQEs it read from each device, by op, and payload bytes",
    ]
    columns: list[tuple[str, dict[str, Any]]] = [
        (f"{e.get('name') or role} (VM {e['id']})", e.get("counters", {}))
        for role, e in sorted(r.tenants.items(), key=lambda kv: kv[0] != "server")
    ] + [(f"NSM {n['id']} ({n.get('name') or '-'})", n.get("counters", {})) for n in r.nsms]
    ops = sorted({op for _, cn in columns for op in cn.get("ops", {})}, key=_op_order)
    rows: list[tuple[str, list[int]]] = [
        (op, [cn.get("ops", {}).get(op, 0) for _, cn in columns]) for op in ops
    ]
    rows += [
        ("NQEs read from the device", [cn.get("nqes_in", 0) for _, cn in columns]),
        ("NQEs written to the device", [cn.get("nqes_out", 0) for _, cn in columns]),
        ("payload bytes in (SEND, EV_DATA)", [cn.get("bytes_in", 0) for _, cn in columns]),
        ("payload bytes out", [cn.get("bytes_out", 0) for _, cn in columns]),
        ("rejected", [cn.get("rejected", 0) for _, cn in columns]),
    ]
    width = max(len(label) for label, _ in rows) + 2
    colw = [max(14, len(title) + 2) for title, _ in columns]
    lines.append(" " * width + "".join(f"{title:>{w}}" for (title, _), w in
                                       zip(columns, colw, strict=True)))
    for label, values in rows:
        lines.append(f"{label:<{width}}" + "".join(
            f"{(f'{v:,}' if v else '-'):>{w}}" for v, w in zip(values, colw, strict=True)))
    switched = sum(cn.get("nqes_in", 0) for _, cn in columns)
    lines.append(f"NQEs switched by the CoreEngine during the demo: {switched:,}"
                 + (f" (NSM counters include {r.others} other tenant(s))" if r.others else ""))
    for role, (nsm, placement, c) in sorted(r.served.items(), key=lambda kv: kv[0] != "server"):
        how = ("paired in shared memory, no TCP" if c.get("paired")
               else "over the NSM's network stack")
        lines.append(
            f"NSM {nsm} (placement {placement}) carried {r.tenants[role].get('name') or role}'s"
            f" connection {how}:"
            f" {c.get('shm_bytes_out', 0):,} bytes out by shared memory,"
            f" {c.get('stack_bytes_out', 0):,} by the stack")
    return "\n".join(lines)


def _op_order(name: str) -> tuple[int, str]:
    from netkernel.reference.nqe import Op

    base, _, reply = name.partition("|")
    code = Op[base].value if base in Op.__members__ else 0xFF
    return (code, reply)


def cli_main(args: argparse.Namespace) -> int:
    """``netkernel demo``: the entry point :mod:`netkernel.cli` calls."""
    if args.size <= 0:
        print(f"{args.prog}: error: --size must be positive", file=sys.stderr)
        return 2
    return run(args.instance, size=args.size, timeout=args.timeout, impl=args.impl)


if __name__ == "__main__":
    sys.exit(tenant_main())

