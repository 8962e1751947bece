"""CoreEngine switching rate on one core: the C loop against the reference, side by side.

``python -m bench.coreengine`` builds, in this process, a CoreEngine of each
implementation with one tenant device and one NSM device (real device files in
a runtime directory of a unique instance, mapped as the CoreEngine maps them),
opens one socket through it (SOCKET, TENANT_MAP and their replies), then
measures the steady state: the tenant keeps ``--window`` SENDs in flight (each
with its own tag and buffer), the NSM answers each with its size, and the
CoreEngine switches the SEND to the NSM and the reply back, two NQEs per round
trip. Both sides are played in the same thread as the CoreEngine's pass:

- *fastpath*: ``nk_ce_bench_sends`` (fastpath/csrc/ce_bench.c), a C loop that
  plays the tenant and the NSM on their rings around ``nk_ce_poll``;
- *reference*: the same in Python around ``reference.coreengine.CoreEngine.poll_once``.

Each figure is NQEs switched per second, over the whole loop (the two sides
included) and over the time spent inside the CoreEngine's pass alone. The goal
(DESIGN.md section 10) is >= 10 M NQE/s for the fast path; the ratio is
fastpath / reference. No timing is asserted anywhere
(tests/test_fastpath_coreengine.py smoke-tests this at a tiny size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from netkernel.reference import coreengine as ref
from netkernel.reference import device as dev
from netkernel.reference import shm
from netkernel.reference.engine import Dev
from netkernel.reference.nqe import NQE, REPLY_BIT, Op, pack, unpack

GOAL: Final = 10e6  # NQE/s, DESIGN.md section 10
SOCK: Final = 1
STREAM: Final = socket.AF_INET | socket.SOCK_STREAM << 16
IMPLS: Final = ("fastpath", "reference")


class BenchError(RuntimeError):
    """A side saw something it did not expect: the figures would mean nothing."""


@dataclass
class Sample:
    nqes: int
    elapsed: float  # the whole loop, seconds
    polling: float  # inside the CoreEngine's pass

    @property
    def rate(self) -> float:
        return self.nqes / self.elapsed

    @property
    def loop_rate(self) -> float:
        return self.nqes / self.polling


def _make(impl: str, instance: str) -> ref.CoreEngine:
    if impl == "fastpath":
        from netkernel.fastpath.coreengine import CoreEngine

        return CoreEngine(instance)
    return ref.CoreEngine(instance)


@contextlib.contextmanager
def rig(impl: str) -> Iterator[tuple[ref.CoreEngine, ref.Attached, ref.Attached]]:
    """A CoreEngine (no control thread, no loop) with a tenant and an NSM attached."""
    name = f"bench-ce-{uuid.uuid4().hex[:8]}"
    ce = _make(impl, name)
    ce.dir.mkdir(parents=True, exist_ok=True)
    conns: list[socket.socket] = []
    try:
        for kind in ("tenant", "nsm"):
            ours, theirs = socket.socketpair()
            conns += [ours, theirs]
            reply = ce.attach(ours, {"cmd": "attach", "kind": kind, "pid": os.getpid(),
                                     "name": f"bench-{kind}"})
            if not reply.get("ok"):
                raise BenchError(f"attach {kind}: {reply}")
        t = ce.devices[Dev(dev.Kind.TENANT, 1)]
        n = ce.devices[Dev(dev.Kind.NSM, 1)]
        _open_socket(ce, t, n)
        yield ce, t, n
    finally:
        ce.close()
        for c in conns:
            c.close()
        shm.remove_instance(name)


def _answer_nsm(ce: ref.CoreEngine, n: ref.Attached, want: Op) -> None:
    """The NSM's part of the handshake: answer the one NQE waiting, which must be ``want``."""
    ce.poll_once()
    for ring in (dev.RingId.COMPLETION, dev.RingId.RECEIVE):
        for raw in n.dmap.ring(0, ring).pop_many(1):
            msg = unpack(raw)
            if msg.op != want:
                raise BenchError(f"the NSM expected {want.name}, got {msg}")
            n.dmap.ring(0, dev.RingId.JOB).push(pack(msg.reply(0)))
            return
    raise BenchError(f"the NSM got no {want.name}")


def _open_socket(ce: ref.CoreEngine, t: ref.Attached, n: ref.Attached) -> None:
    t.dmap.ring(0, dev.RingId.JOB).push(pack(NQE(op=Op.SOCKET, sock_id=SOCK, op_data=STREAM,
                                                 tag=1)))
    _answer_nsm(ce, n, Op.TENANT_MAP)
    _answer_nsm(ce, n, Op.SOCKET)
    ce.poll_once()
    got = [unpack(r) for r in t.dmap.ring(0, dev.RingId.COMPLETION).pop_many(4)]
    if [(m.op, m.result) for m in got] != [(Op.SOCKET | REPLY_BIT, 0)]:
        raise BenchError(f"SOCKET was answered {got}")


def run_fastpath(sends: int, window: int) -> Sample:
    from netkernel.fastpath._lib import ffi, lib
    from netkernel.fastpath.coreengine import CoreEngine, geometry_struct

    with rig("fastpath") as (ce, t, n):
        assert isinstance(ce, CoreEngine)
        b = ffi.new("struct nk_ce_bench *")
        b.tenant_base = ffi.cast("void *", t.dmap.base)
        b.tenant_geo = geometry_struct(t.dmap.geo)[0]
        b.nsm_base = ffi.cast("void *", n.dmap.base)
        b.nsm_geo = geometry_struct(n.dmap.geo)[0]
        b.sock_id, b.window, b.sends = SOCK, window, sends
        got = lib.nk_ce_bench_sends(ce.ce, b)
        if got < 0:
            raise BenchError(f"nk_ce_bench_sends: errno {-got} ({os.strerror(-got)})")
        return Sample(int(got), b.elapsed_ns / 1e9, b.polling_ns / 1e9)


def run_reference(sends: int, window: int) -> Sample:
    with rig("reference") as (ce, t, n):
        t_send, t_comp = t.dmap.ring(0, dev.RingId.SEND), t.dmap.ring(0, dev.RingId.COMPLETION)
        n_recv, n_send = n.dmap.ring(0, dev.RingId.RECEIVE), n.dmap.ring(0, dev.RingId.SEND)
        buf = t.dmap.geo.buf_size
        requests = [pack(NQE(op=Op.SEND, sock_id=SOCK, tag=k, data_ptr=k * buf, size=64))
                    for k in range(window)]
        sent = answered = 0
        polling = 0.0
        start = time.perf_counter()
        while answered < sends:
            room = min(window - (sent - answered), ref.BATCH, sends - sent)
            sent += t_send.push_many([requests[(sent + i) % window] for i in range(room)])
            t0 = time.perf_counter()
            ce.poll_once()
            polling += time.perf_counter() - t0
            n_send.push_many([pack(unpack(raw).reply(64, size=0))
                              for raw in n_recv.pop_many(ref.BATCH)])
            t0 = time.perf_counter()
            ce.poll_once()
            polling += time.perf_counter() - t0
            replies = [unpack(raw) for raw in t_comp.pop_many(ref.BATCH)]
            if any((m.op, m.result) != (Op.SEND | REPLY_BIT, 64) for m in replies):
                raise BenchError(f"unexpected replies: {replies[:3]}")
            answered += len(replies)
        return Sample(2 * answered, time.perf_counter() - start, polling)


def measure(args: argparse.Namespace, say: Any = print) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {i: [] for i in IMPLS}
    for rnd in range(args.rounds):
        samples["fastpath"].append(run_fastpath(args.sends, args.window))
        samples["reference"].append(run_reference(args.ref_sends, args.window))
        say(f"  round {rnd + 1}/{args.rounds}  fastpath {samples['fastpath'][-1].rate / 1e6:8.2f}"
            f"  reference {samples['reference'][-1].rate / 1e6:8.4f} M NQE/s")
    return samples


def format_table(samples: dict[str, list[Sample]]) -> str:
    def med(impl: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples[impl])

    lines = [f"{'CoreEngine':<12} {'M NQE/s, whole loop':>20} {'M NQE/s, CE pass only':>22}"]
    for impl in IMPLS:
        lines.append(f"{impl:<12} {med(impl, 'rate') / 1e6:>20.3f}"
                     f" {med(impl, 'loop_rate') / 1e6:>22.3f}")
    lines.append(f"{'ratio':<12} {med('fastpath', 'rate') / med('reference', 'rate'):>19.1f}x"
                 f" {med('fastpath', 'loop_rate') / med('reference', 'loop_rate'):>21.1f}x")
    best = med("fastpath", "loop_rate")
    verdict = "met" if best >= GOAL else "MISSED"
    lines.append(f"goal >= {GOAL / 1e6:.0f} M NQE/s on one core (CE pass only): {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.coreengine",
        description="CoreEngine NQEs switched per second on one core: fast path vs reference.")
    p.add_argument("--sends", type=int, default=2_000_000,
                   help="SEND round trips for the fast path (2 NQEs each; default 2000000)")
    p.add_argument("--ref-sends", type=int, default=20_000,
                   help="SEND round trips for the reference (default 20000)")
    p.add_argument("--window", type=int, default=64,
                   help="SENDs in flight, 1..128 (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    p.add_argument("--json", action="store_true", help="print the samples as JSON too")
    args = p.parse_args(argv)
    if min(args.sends, args.ref_sends, args.rounds) < 1 or not 1 <= args.window <= 128:
        p.error("--sends, --ref-sends, --rounds must be positive; --window 1..128")
    started = time.monotonic()
    print(f"bench.coreengine: one tenant, one NSM, one socket, {args.window} SENDs in flight;"
          f" {args.rounds} round(s)", flush=True)
    try:
        samples = measure(args, say=lambda s: print(s, flush=True))
    except BenchError as exc:
        print(f"bench.coreengine: FAILED: {exc}", file=sys.stderr)
        return 1
    print(format_table(samples))
    print(f"({time.monotonic() - started:.1f} s; Python {sys.version.split()[0]},"
          f" {os.cpu_count()} CPUs)")
    if args.json:
        print(json.dumps({i: [s.__dict__ for s in samples[i]] for i in IMPLS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
