"""What polling costs: a handed POLLED device against an attached one (spec/vm.md VM-2).

    python -m bench.vm_device              # 3 rounds, median printed
    python -m bench.vm_device --rounds 1 --json

On the host, no QEMU: the same preloaded CPython client runs over

* ``attached``: an nk-agent that attached its device (RT-3): futex bells (DEV-9);
* ``polled``: an nk-agent handed a device attached with ``"guest": true`` (VM-1, VM-3):
  its bells wake nobody, both sides poll with bounded sleeps (50 µs doubling to 1 ms),
  as across a VM boundary.

Figures per mode: 64 B request/response round trips per second against a kernel echo
server, 8 KB-write bulk throughput to a kernel sink, and the CoreEngine's CPU time per
second while idle with the device attached (what the bounded sleeps cost when nothing
moves). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from netkernel import run
from netkernel.fastpath import preload
from netkernel.reference import coreengine as rce
from tests.live import own_instance
from tests.test_vm_device import HandedAgent

ROUND_TRIPS: Final = 3000
BULK: Final = 64 << 20
IDLE_SECONDS: Final = 2.0

CLIENT: Final = r"""
import socket, sys, time
echo, sink, n, bulk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection(("127.0.0.1", echo))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
t = time.perf_counter()
for _ in range(n):
    s.sendall(msg)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
rr = n / (time.perf_counter() - t)
s.close()
b = socket.create_connection(("127.0.0.1", sink)); chunk = b"y" * 8192
t = time.perf_counter()
for _ in range(bulk // 8192):
    b.sendall(chunk)
b.shutdown(socket.SHUT_WR); b.recv(1)
mbs = bulk / (time.perf_counter() - t) / 1e6
print(rr, mbs)
"""


def _serve(srv: socket.socket, sink: bool) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(1 << 16):
                if not sink:
                    conn.sendall(data)


@contextlib.contextmanager
def servers() -> Iterator[tuple[int, int]]:
    echo = socket.create_server(("127.0.0.1", 0))
    sink = socket.create_server(("127.0.0.1", 0))
    for srv, is_sink in ((echo, False), (sink, True)):
        threading.Thread(target=_serve, args=(srv, is_sink), daemon=True).start()
    try:
        yield echo.getsockname()[1], sink.getsockname()[1]
    finally:
        echo.close()
        sink.close()


def ce_cpu(name: str) -> float:
    """The CoreEngine process's CPU seconds so far (utime + stime)."""
    pid = int(rce.request({"cmd": "status"}, name)["pid"])
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(mode: str, ports: tuple[int, int]) -> dict[str, float]:
    paths = preload.paths()
    with own_instance() as name, tempfile.TemporaryDirectory() as tmp:
        if mode == "attached":
            agent: Any = run.Agent(paths.agent, name, "bench")
            env = run.environment(dict(os.environ), name, agent, paths)
            stop = agent.stop
            guest = None
        else:
            guest = rce.attach("tenant", "guest", instance=name, guest=True)
            agent = HandedAgent(str(guest.path), Path(tmp))
            env = agent.preload_env()
            stop = agent.close
        try:
            time.sleep(0.5)
            c0 = ce_cpu(name)
            time.sleep(IDLE_SECONDS)
            idle = (ce_cpu(name) - c0) / IDLE_SECONDS
            out = subprocess.run([sys.executable, "-c", CLIENT, str(ports[0]), str(ports[1]),
                                  str(ROUND_TRIPS), str(BULK)], env=env, capture_output=True,
                                 text=True, timeout=300, check=True).stdout.split()
        finally:
            stop()
            if guest is not None:
                guest.close()
    return {"round_trips_per_s": float(out[0]), "bulk_MB_per_s": float(out[1]),
            "ce_idle_cpu": idle}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vm_device", description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {"attached": [], "polled": []}
    with servers() as ports:
        for r in range(args.rounds):
            for mode in (("attached", "polled") if r % 2 == 0 else ("polled", "attached")):
                results[mode].append(one(mode, ports))
    summary = {mode: {k: statistics.median(x[k] for x in runs) for k in runs[0]}
               for mode, runs in results.items()}
    if args.json:
        print(json.dumps({"rounds": args.rounds, "median": summary}, indent=2))
        return 0
    print(f"{'mode':10} {'64 B round trips/s':>20} {'8 KB bulk MB/s':>16} {'CE idle CPU':>12}")
    for mode, m in summary.items():
        print(f"{mode:10} {m['round_trips_per_s']:20.0f} {m['bulk_MB_per_s']:16.1f}"
              f" {m['ce_idle_cpu'] * 100:11.1f}%")
    a, p = summary["attached"], summary["polled"]
    print(f"polled / attached: round trips {p['round_trips_per_s'] / a['round_trips_per_s']:.2f},"
          f" bulk {p['bulk_MB_per_s'] / a['bulk_MB_per_s']:.2f}"
          f" (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
