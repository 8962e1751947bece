"""A NetKernel runtime against direct kernel sockets, measured side by side in one run.

``python -m bench.runtime [--impl fastpath|reference]`` (or ``python
bench/runtime.py``) starts an embedded NetKernel instance (a CoreEngine and the
kernel NSM, of the implementation ``--impl`` names: the C fast path by default)
under a unique name,
then measures, alternating the two paths round by round:

- **bulk**: one TCP connection, a sender process writing ``--msg-size`` byte
  messages (8 KB) for ``--seconds``, a receiver process reading them; the
  throughput is what the receiver counted between its first byte and EOF.
  Measured twice: each message written with ``sendall()`` (GuestLib waits
  for the stack to take it, a round trip per message), and with a ``send()``
  loop (GuestLib queues it in the send half and returns, like a kernel socket
  buffer);
- **rr**: one TCP connection (TCP_NODELAY), a client process sending
  ``--rr-size`` bytes (64 B) and waiting for as many back, for ``--seconds``;
  the rate is round trips per second.

Each measurement runs the same Python code in two fresh processes; only the
socket class differs: ``socket.socket`` on loopback (*direct*) or
``netkernel.<impl>.guestlib.socket`` (*NetKernel*: every call is NQEs
through the CoreEngine to the kernel NSM, which makes the same loopback
calls). It prints the absolute figures and the ratio NetKernel/direct
(DESIGN.md section 10 asks for >= 0.8x throughput and >= 0.7x request rate
of the kernel NSM; the reference runtime is Python and is not expected to
meet them).

Not a CI gate: tests/test_bench_runtime.py only smoke-tests it at a tiny size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import socket as std
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

HOST: Final = "127.0.0.1"
PATHS: Final = ("direct", "netkernel")
WORKER_TIMEOUT_SLACK: Final = 60.0


# -- the workers (one process each) -------------------------------------------------------------


IMPLS: Final = ("fastpath", "reference")


def _socket_class(path: str) -> Callable[..., Any]:
    if path == "netkernel":
        guestlib = importlib.import_module(f"netkernel.{os.environ['NK_BENCH_IMPL']}.guestlib")
        make: Callable[..., Any] = guestlib.socket
        return make
    return std.socket


def _report(**doc: Any) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _listen(path: str) -> Any:
    s = _socket_class(path)(std.AF_INET, std.SOCK_STREAM)
    s.setsockopt(std.SOL_SOCKET, std.SO_REUSEADDR, 1)
    s.bind((HOST, 0))
    s.listen(1)
    _report(port=s.getsockname()[1])
    return s


def _connect(path: str, port: int) -> Any:
    s = _socket_class(path)(std.AF_INET, std.SOCK_STREAM)
    s.setsockopt(std.IPPROTO_TCP, std.TCP_NODELAY, 1)
    s.connect((HOST, port))
    return s


def bulk_receiver(path: str, bufsize: int) -> None:
    """Accept one connection, read to EOF; report bytes and the seconds from first byte to EOF."""
    listener = _listen(path)
    conn, _ = listener.accept()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    total = conn.recv_into(view)
    first = time.perf_counter()
    while n := conn.recv_into(view):
        total += n
    seconds = time.perf_counter() - first
    conn.close()
    listener.close()
    _report(bytes=total, seconds=seconds)


def bulk_sender(path: str, port: int, msg_size: int, seconds: float, call: str) -> None:
    """Write ``msg_size``-byte messages for ``seconds``, then close."""
    s = _connect(path, port)
    msg = os.urandom(msg_size)
    sent = 0
    deadline = time.perf_counter() + seconds
    if call == "sendall":
        while time.perf_counter() < deadline:
            for _ in range(16):
                s.sendall(msg)
            sent += 16 * msg_size
    else:
        while time.perf_counter() < deadline:
            for _ in range(16):
                view = memoryview(msg)
                while view:
                    view = view[s.send(view):]
            sent += 16 * msg_size
    s.close()
    _report(bytes=sent)


def _recv_exactly(s: Any, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed mid-message")
        got += n


def rr_server(path: str, size: int) -> None:
    """Answer every ``size``-byte request with ``size`` bytes until the client closes."""
    listener = _listen(path)
    conn, _ = listener.accept()
    conn.setsockopt(std.IPPROTO_TCP, std.TCP_NODELAY, 1)
    buf = bytearray(size)
    view = memoryview(buf)
    served = 0
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        if n < size:
            _recv_exactly(conn, view[n:])
        conn.sendall(buf)
        served += 1
    conn.close()
    listener.close()
    _report(served=served)


def rr_client(path: str, port: int, size: int, seconds: float) -> None:
    """Send ``size`` bytes, wait for ``size`` back, for ``seconds``; report the round trips."""
    s = _connect(path, port)
    msg = os.urandom(size)
    view = memoryview(bytearray(size))
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline:
        for _ in range(8):
            s.sendall(msg)
            _recv_exactly(s, view)
        count += 8
    elapsed = now - start
    s.close()
    _report(round_trips=count, seconds=elapsed)


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.runtime worker")
    p.add_argument("role", choices=["bulk-recv", "bulk-send", "rr-server", "rr-client"])
    p.add_argument("--path", choices=PATHS, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--call", choices=["sendall", "send"], default="sendall")
    a = p.parse_args(argv)
    if a.role == "bulk-recv":
        bulk_receiver(a.path, max(65536, a.size))
    elif a.role == "bulk-send":
        bulk_sender(a.path, a.port, a.size, a.seconds, a.call)
    elif a.role == "rr-server":
        rr_server(a.path, a.size)
    else:
        rr_client(a.path, a.port, a.size, a.seconds)
    return 0


# -- the driver ---------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """A worker failed; the message carries its stderr."""


def _spawn(role: str, path: str, instance: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, NETKERNEL_INSTANCE=instance)
    env.setdefault("NK_BENCH_IMPL", IMPLS[0])
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", role,
                             "--path", path, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _what(proc: subprocess.Popen[str]) -> str:
    args = proc.args if isinstance(proc.args, list) else []
    return f"worker {proc.pid} ({' '.join(map(str, args[3:6]))})"


def _line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The worker's next JSON line (each is flushed on its own, see _report)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise BenchError(f"{_what(proc)} said nothing in {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise BenchError(f"{_what(proc)} exited with {proc.wait()}: {err.strip()}")
    doc: dict[str, Any] = json.loads(line)
    return doc


Spawn = Callable[..., "subprocess.Popen[str]"]


def _pair(role_a: str, role_b: str, path: str, instance: str, args_a: list[str],
          args_b: list[str], timeout: float,
          spawn: Spawn | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a listening worker and its peer to the end; their final reports.

    ``spawn(role, path, instance, *args)`` starts a worker (default: this file's).
    """
    spawn = spawn or _spawn
    procs = [spawn(role_a, path, instance, *args_a)]
    try:
        port = _line(procs[0], timeout)["port"]
        procs.append(spawn(role_b, path, instance, "--port", str(port), *args_b))
        report_b = _line(procs[1], timeout)
        report_a = _line(procs[0], timeout)
        for proc in procs:
            if proc.wait(timeout) != 0:
                raise BenchError(f"{_what(proc)} exited with {proc.returncode}")
        return report_a, report_b
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def bulk(path: str, instance: str, msg_size: int, seconds: float, call: str) -> float:
    """Bytes per second through one TCP connection, ``msg_size``-byte writes."""
    timeout = seconds + WORKER_TIMEOUT_SLACK
    recv, sent = _pair("bulk-recv", "bulk-send", path, instance, ["--size", str(msg_size)],
                       ["--size", str(msg_size), "--seconds", str(seconds), "--call", call],
                       timeout)
    if recv["bytes"] != sent["bytes"]:
        raise BenchError(f"{path}: sent {sent['bytes']} bytes, received {recv['bytes']}")
    return float(recv["bytes"]) / float(recv["seconds"])


def rr(path: str, instance: str, size: int, seconds: float) -> float:
    """Round trips per second of ``size``-byte request/response on one TCP connection."""
    timeout = seconds + WORKER_TIMEOUT_SLACK
    server, client = _pair("rr-server", "rr-client", path, instance, ["--size", str(size)],
                           ["--size", str(size), "--seconds", str(seconds)], timeout)
    if server["served"] != client["round_trips"]:
        raise BenchError(f"{path}: {client['round_trips']} round trips, {server['served']} served")
    return float(client["round_trips"]) / float(client["seconds"])


@dataclass
class Figure:
    """One benchmark's samples per path."""

    name: str
    unit: str
    scale: float
    samples: dict[str, list[float]]

    def value(self, path: str) -> float:
        return statistics.median(self.samples[path])

    def ratio(self) -> float:
        return self.value("netkernel") / self.value("direct")


def measure(args: argparse.Namespace, instance: str,
            say: Callable[[str], None] = print) -> list[Figure]:
    """Every benchmark, the two paths alternating within each round."""
    runs: list[tuple[Figure, Callable[[str], float]]] = [
        (Figure(f"bulk {args.msg_size} B, sendall()", "MB/s", 1e6, {p: [] for p in PATHS}),
         lambda path: bulk(path, instance, args.msg_size, args.seconds, "sendall")),
        (Figure(f"bulk {args.msg_size} B, send()", "MB/s", 1e6, {p: [] for p in PATHS}),
         lambda path: bulk(path, instance, args.msg_size, args.seconds, "send")),
        (Figure(f"request/response {args.rr_size} B", "round trips/s", 1.0,
                {p: [] for p in PATHS}),
         lambda path: rr(path, instance, args.rr_size, args.seconds)),
    ]
    for rnd in range(args.rounds):
        for fig, run in runs:
            for path in PATHS:
                fig.samples[path].append(run(path))
            say(f"  round {rnd + 1}/{args.rounds}  {fig.name:<28}"
                f" direct {fig.samples['direct'][-1] / fig.scale:>10,.1f}"
                f"  NetKernel {fig.samples['netkernel'][-1] / fig.scale:>8,.1f} {fig.unit}")
    return [fig for fig, _ in runs]


def format_table(figures: list[Figure]) -> str:
    lines = [f"{'benchmark':<28} {'direct':>12} {'NetKernel':>12} {'unit':<14} NetKernel/direct"]
    for f in figures:
        lines.append(f"{f.name:<28} {f.value('direct') / f.scale:>12,.1f}"
                     f" {f.value('netkernel') / f.scale:>12,.1f} {f.unit:<14} {f.ratio():.3f}x")
    return "\n".join(lines)


def add_options(p: argparse.ArgumentParser, *, measurements: int) -> None:
    """The options every side-by-side benchmark takes (bench.runtime, bench.kernel_nsm)."""
    p.add_argument("--seconds", type=float, default=3.0,
                   help=f"duration of each measurement (default 3; {measurements}"
                        " measurements per round)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds, paths alternating; the median is reported (default 1)")
    p.add_argument("--msg-size", type=int, default=8192, help="bulk message size (8192)")
    p.add_argument("--rr-size", type=int, default=64, help="request/response size (64)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")


def parse_options(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.msg_size < 1 or args.rr_size < 1:
        p.error("--seconds, --rounds, --msg-size and --rr-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m bench.runtime",
        description="NetKernel (GuestLib -> CoreEngine -> kernel NSM) vs direct kernel"
                    " sockets on loopback: bulk throughput and request/response rate.")
    p.add_argument("--impl", choices=IMPLS, default=IMPLS[0],
                   help="implementation of GuestLib, CoreEngine and NSM (default fastpath)")
    add_options(p, measurements=6)
    args = parse_options(p, argv)

    from netkernel import instance as inst

    name = f"bench-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    print(f"bench.runtime: embedded instance {name!r} (CoreEngine + kernel NSM, {args.impl}),"
          f" {args.rounds} round(s) of 6 x {args.seconds:g} s", flush=True)
    os.environ["NK_BENCH_IMPL"] = args.impl  # the workers' GuestLib
    try:
        inst.up(name, impl=args.impl, nsm="kernel")
        figures = measure(args, name, say=lambda s: print(s, flush=True))
    except (BenchError, inst.InstanceError) as exc:
        print(f"bench.runtime: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.runtime: interrupted", file=sys.stderr)
        return 130
    finally:
        inst.down(name)
    print(format_table(figures))
    print(f"({time.monotonic() - started:.1f} s; Python {sys.version.split()[0]},"
          f" {os.cpu_count()} CPUs)")
    if args.json:
        print(json.dumps({f.name: {"unit": f.unit, **{p: f.samples[p] for p in PATHS},
                                   "ratio": f.ratio()} for f in figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
