"""The fast path end to end without the Python GuestLib: C tenant vs direct kernel sockets.

``python -m bench.kernel_nsm [--seconds S] [--rounds R] [--json]`` starts an
embedded fast-path instance (the C CoreEngine and the C kernel NSM,
``netkernel.instance.up(name, impl="fastpath")``) under a unique name, then
measures, the two paths alternating round by round, as issue 4 asks:

- **bulk**: one TCP connection, a sender writing 8 KB messages for
  ``--seconds``, a receiver reading them to EOF; MB/s at the receiver, first
  byte to EOF (goal: NetKernel >= 0.8x direct);
- **rr**: one TCP connection (TCP_NODELAY), 64 B out and 64 B back, for
  ``--seconds``; round trips per second (goal: >= 0.7x).

Every worker is a fresh process whose loop is C (fastpath/csrc/bench_kernel_nsm.c,
the GIL released): over plain Linux sockets on loopback (*direct*), or over
the minimal C tenant (fastpath/csrc/tenant.c, *NetKernel*: NQEs through the
CoreEngine to the kernel NSM, which makes the same loopback calls). Only the
socket layer differs. Besides the table it prints where the time goes: CPU
per process (the workers' own, the CoreEngine's and the NSM's, from
/proc/<pid>/stat) per message, and the tenant's sleeps and bells per message.
``--spin-ns`` takes a list: the NetKernel side is then also measured with each
spin budget (how long the tenant polls before it sleeps on its bell).

Not a CI gate: tests/test_fastpath_tenant.py only smoke-tests it at a tiny size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runtime import (
    PATHS,
    BenchError,
    Figure,
    _line,
    _what,
    add_options,
    format_table,
    parse_options,
)
from bench.runtime import _pair as runtime_pair

WORKER_TIMEOUT_SLACK: Final = 60.0
GOALS: Final = {"bulk": 0.8, "rr": 0.7}
ROLES: Final = ("bulk-recv", "bulk-send", "rr-server", "rr-client", "call-rtt")


# -- the workers (one process each) -------------------------------------------------------------


def _report(**doc: Any) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.kernel_nsm worker")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--path", choices=PATHS, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--spin-ns", type=int, default=-1)
    p.add_argument("--send-batch", type=int, default=0)
    a = p.parse_args(argv)
    from netkernel.fastpath._lib import ffi, lib

    tenant = None
    if a.path == "netkernel":
        from netkernel.fastpath.tenant import Tenant

        tenant = Tenant(os.environ["NETKERNEL_INSTANCE"], spin_ns=a.spin_ns,
                        send_batch=a.send_batch)
    t = tenant.ptr if tenant is not None else ffi.NULL
    r = ffi.new("struct nk_bench_result *")
    cpu0 = _cpu_self()
    if a.role in ("bulk-recv", "rr-server"):
        port = ffi.new("uint16_t *")
        listener = lib.nk_bench_listen(t, port)
        if listener < 0:
            raise OSError(-listener, os.strerror(-listener))
        _report(port=port[0])
        cpu0 = _cpu_self()
        if a.role == "bulk-recv":
            rc = lib.nk_bench_bulk_recv(t, listener, max(65536, a.size), 0, r)
        else:
            rc = lib.nk_bench_rr_server(t, listener, a.size, r)
    elif a.role == "call-rtt":
        rc = lib.nk_bench_call_rtt(t, a.size, r)
    elif a.role == "bulk-send":
        rc = lib.nk_bench_bulk_send(t, a.port, a.size, a.seconds, 0, 0, r)
    else:
        rc = lib.nk_bench_rr_client(t, a.port, a.size, a.seconds, r)
    cpu = _cpu_self() - cpu0
    stats = tenant.stats() if tenant is not None else {}
    if tenant is not None:
        tenant.close()
    if rc < 0:
        raise OSError(-rc, f"{a.role}: {os.strerror(-rc)}")
    _report(bytes=r.bytes, count=r.count, seconds=r.seconds, cpu=cpu, stats=stats)
    return 0


# -- the driver ---------------------------------------------------------------------------------


def _spawn(role: str, path: str, instance: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, NETKERNEL_INSTANCE=instance)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", role,
                             "--path", path, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _pair(role_a: str, role_b: str, path: str, instance: str, args_a: list[str],
          args_b: list[str], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """A listening worker and its peer (this file's workers), run to the end."""
    return runtime_pair(role_a, role_b, path, instance, args_a, args_b, timeout, _spawn)


def _ticks(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` so far, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def instance_pids(instance: str) -> dict[str, int]:
    """The CoreEngine's and the NSMs' pids, from the instance's pid files."""
    from netkernel.fastpath import shm

    out: dict[str, int] = {}
    for f in sorted(shm.instance_dir(instance).glob("*.pid")):
        try:
            out["coreengine" if f.stem == "engine" else f.stem] = int(f.read_text())
        except (OSError, ValueError):
            continue
    return out


class Breakdown:
    """CPU per process and tenant counters per message, for the NetKernel runs."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []

    def add(self, name: str, messages: float, docs: dict[str, dict[str, Any]],
            daemons: dict[str, float]) -> None:
        row: dict[str, float] = {}
        for role, doc in docs.items():
            row[f"{role} CPU us/msg"] = 1e6 * doc["cpu"] / messages
            for k in ("sleeps", "bells"):
                row[f"{role} {k}/msg"] = doc.get("stats", {}).get(k, 0) / messages
        for who, cpu in daemons.items():
            row[f"{who} CPU us/msg"] = 1e6 * cpu / messages
        self.rows[name] = row

    def format(self) -> str:
        lines = ["where the time goes (NetKernel, last round; per message = per 8 KB write"
                 " or per round trip):"]
        for name, row in self.rows.items():
            lines.append(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def _measured(run: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
              pids: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    before = {who: _ticks(pid) for who, pid in pids.items()}
    a, b = run()
    return a, b, {who: _ticks(pid) - before[who] for who, pid in pids.items()}


def bulk(path: str, instance: str, size: int, seconds: float, spin: int,
         pids: dict[str, int], brk: Breakdown | None, batch: int = 0) -> float:
    """Bytes per second through one TCP connection, ``size``-byte writes."""
    timeout = seconds + WORKER_TIMEOUT_SLACK
    extra = ["--spin-ns", str(spin), "--send-batch", str(batch)]
    recv, sent, daemons = _measured(lambda: _pair(
        "bulk-recv", "bulk-send", path, instance, ["--size", str(size), *extra],
        ["--size", str(size), "--seconds", str(seconds), *extra], timeout), pids)
    if recv["bytes"] != sent["bytes"]:
        raise BenchError(f"{path}: sent {sent['bytes']} bytes, received {recv['bytes']}")
    if brk is not None:
        brk.add(f"bulk {size} B spin={spin}", sent["bytes"] / size,
                {"sender": sent, "receiver": recv}, daemons)
    return float(recv["bytes"]) / float(recv["seconds"])


def rr(path: str, instance: str, size: int, seconds: float, spin: int,
       pids: dict[str, int], brk: Breakdown | None, batch: int = 0) -> float:
    """Round trips per second of ``size``-byte request/response on one TCP connection."""
    timeout = seconds + WORKER_TIMEOUT_SLACK
    extra = ["--spin-ns", str(spin), "--send-batch", str(batch)]
    server, client, daemons = _measured(lambda: _pair(
        "rr-server", "rr-client", path, instance, ["--size", str(size), *extra],
        ["--size", str(size), "--seconds", str(seconds), *extra], timeout), pids)
    if server["count"] != client["count"]:
        raise BenchError(f"{path}: {client['count']} round trips, {server['count']} served")
    if brk is not None:
        brk.add(f"rr {size} B spin={spin}", client["count"], {"client": client,
                                                              "server": server}, daemons)
    return float(client["count"]) / float(client["seconds"])


def call_rtt(instance: str, calls: int, spin: int) -> float:
    """Seconds per NetKernel request round trip (GETSOCKNAME: tenant, CoreEngine, NSM, back)."""
    proc = _spawn("call-rtt", "netkernel", instance, "--size", str(calls), "--spin-ns", str(spin))
    try:
        doc = _line(proc, WORKER_TIMEOUT_SLACK)
        if proc.wait(WORKER_TIMEOUT_SLACK) != 0:
            raise BenchError(f"{_what(proc)} exited with {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return float(doc["seconds"]) / max(1, int(doc["count"]))


def measure(args: argparse.Namespace, instance: str, brk: Breakdown,
            say: Callable[[str], None] = print) -> tuple[list[Figure], list[Figure]]:
    """The two goals, the paths alternating within each round; then the spin sweep."""
    pids = instance_pids(instance)
    spin = args.spin_ns[0]
    kinds = {"bulk": bulk, "rr": rr}
    sizes = {"bulk": args.msg_size, "rr": args.rr_size}
    figs = {"bulk": Figure(f"bulk {args.msg_size} B", "MB/s", 1e6, {p: [] for p in PATHS}),
            "rr": Figure(f"request/response {args.rr_size} B", "round trips/s", 1.0,
                         {p: [] for p in PATHS})}
    if args.only:
        figs = {args.only: figs[args.only]}
    for rnd in range(args.rounds):
        for kind, fig in figs.items():
            for path in PATHS:
                brk_here = brk if path == "netkernel" else None
                fig.samples[path].append(kinds[kind](path, instance, sizes[kind], args.seconds,
                                                     spin, pids, brk_here, args.send_batch))
            say(f"  round {rnd + 1}/{args.rounds}  {fig.name:<24}"
                f" direct {fig.samples['direct'][-1] / fig.scale:>10,.1f}"
                f"  NetKernel {fig.samples['netkernel'][-1] / fig.scale:>10,.1f} {fig.unit}")
    sweep: list[Figure] = []
    for other in args.spin_ns[1:]:
        for kind, fig in figs.items():
            f = Figure(f"{fig.name} spin={other}", fig.unit, fig.scale,
                       {"direct": fig.samples["direct"], "netkernel": []})
            for _ in range(args.rounds):
                f.samples["netkernel"].append(kinds[kind]("netkernel", instance, sizes[kind],
                                                          args.seconds, other, pids, brk,
                                                          args.send_batch))
            say(f"  spin {other:>8} ns  {fig.name:<24}"
                f"  NetKernel {f.value('netkernel') / f.scale:>10,.1f} {f.unit}")
            sweep.append(f)
    rtt = call_rtt(instance, max(100, int(args.seconds * 5000)), spin)
    brk.notes.append(f"one NetKernel request round trip (GETSOCKNAME, tenant -> CoreEngine -> NSM"
                     f" -> CoreEngine -> tenant): {rtt * 1e6:.1f} us")
    if "rr" in figs:
        direct = 1e6 / figs["rr"].value("direct")
        nk = 1e6 / figs["rr"].value("netkernel")
        brk.notes.append(f"one 64 B round trip: direct {direct:.1f} us, NetKernel {nk:.1f} us"
                         f" (it crosses the CoreEngine 4 times and the NSM twice)")
    return list(figs.values()), sweep


def _spins(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of spin budgets >= 0 (ns)")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m bench.kernel_nsm",
        description="The fast path (C tenant -> C CoreEngine -> C kernel NSM) vs direct kernel"
                    " sockets on loopback, C loops on both sides: bulk throughput and"
                    " request/response rate (issue 4's goals).")
    add_options(p, measurements=4)
    p.add_argument("--spin-ns", type=_spins, default=[0],
                   help="the tenant's spin budget before it sleeps, ns; a list (e.g."
                        " 0,5000,20000) also measures NetKernel with the others")
    p.add_argument("--send-batch", type=int, default=0,
                   help="the tenant publishes SENDs once this many are queued or before it"
                        " waits (default 0: at the end of every send call)")
    p.add_argument("--only", choices=["bulk", "rr"], help="run one of the two benchmarks")
    p.add_argument("--nsm", choices=["kernel", "shm"], default="kernel",
                   help="the NSM of the embedded instance: 'kernel' (default: issue 4's"
                        " figures) or 'shm' (the C tenants' connection paired in shared"
                        " memory, spec/shm.md)")
    args = parse_options(p, argv)

    from netkernel import instance as inst

    name = f"bench-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    print(f"bench.kernel_nsm: embedded instance {name!r} (C CoreEngine + C {args.nsm} NSM),"
          f" C tenant, {args.rounds} round(s) of 4 x {args.seconds:g} s", flush=True)
    brk = Breakdown()
    try:
        inst.up(name, impl="fastpath", nsm=args.nsm)
        figures, sweep = measure(args, name, brk, say=lambda s: print(s, flush=True))
    except (BenchError, inst.InstanceError, OSError) as exc:
        print(f"bench.kernel_nsm: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.kernel_nsm: interrupted", file=sys.stderr)
        return 130
    finally:
        inst.down(name)
    print(format_table(figures + sweep))
    for fig in figures:
        kind = "bulk" if fig.name.startswith("bulk") else "rr"
        verdict = "met" if fig.ratio() >= GOALS[kind] else "MISSED"
        print(f"goal {kind}: NetKernel/direct >= {GOALS[kind]}x: {fig.ratio():.3f}x, {verdict}")
    print(brk.format())
    print(f"({time.monotonic() - started:.1f} s; {os.cpu_count()} CPUs; tenant spin"
          f" {args.spin_ns[0]} ns)")
    if args.json:
        print(json.dumps({f.name: {"unit": f.unit, **{p: f.samples[p] for p in PATHS},
                                   "ratio": f.ratio()} for f in figures + sweep}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
