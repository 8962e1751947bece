"""The C switching core against the reference engine: same outputs, same state (CE-*, SEC-*).

Random programs of attaches, detaches, tenant calls (valid, malformed, forged
IDs, out-of-range buffers), NSM replies to what the engine forwarded, NSM
events on the sockets it knows, BUF_RETURNs of what the tenant got, and raw
garbage are fed to :mod:`netkernel.reference.engine` and to
:mod:`netkernel.fastpath.engine`. After every step both must have produced the
same outputs (bytes, destinations, order) and hold the same connection table,
flights, grants, ledgers, drains, counters and status. A deliberately broken
fast path (one that forgets to stamp the VM ID) must be caught.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from netkernel.fastpath import conntable as fast_conntable
from netkernel.fastpath import engine as fast
from netkernel.fastpath import ledger as fast_ledger
from netkernel.reference import bufpool
from netkernel.reference import conntable as ref_conntable
from netkernel.reference import device as ref_device
from netkernel.reference import engine as ref
from netkernel.reference import nqe as ref_nqe

NQE = ref_nqe.NQE
Op = ref_nqe.Op
Kind, RingId, Geometry = ref.Kind, ref.RingId, ref.Geometry
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
GRAIN = 4 << 10
DATA = 64 << 10
SEND_HALF = 32 << 10

TENANT_GEOS = [
    Geometry(n_qsets=2, ring_entries=4, data_size=DATA, send_size=SEND_HALF, buf_size=GRAIN,
             kind=Kind.TENANT),
    Geometry(n_qsets=1, ring_entries=2, data_size=DATA, send_size=16 << 10, buf_size=GRAIN,
             kind=Kind.TENANT),
]
NSM_GEOS = [
    Geometry(n_qsets=1, ring_entries=8, data_size=8 << 10, send_size=4 << 10, buf_size=GRAIN,
             kind=Kind.NSM),
    Geometry(n_qsets=2, ring_entries=8, data_size=8 << 10, send_size=4 << 10, buf_size=GRAIN,
             kind=Kind.NSM),
]
CALL_OPS = [Op.SOCKET, Op.BIND, Op.LISTEN, Op.CONNECT, Op.ACCEPT, Op.SEND, Op.SHUTDOWN,
            Op.CLOSE, Op.SETSOCKOPT, Op.GETSOCKOPT, Op.GETSOCKNAME, Op.GETPEERNAME]
OTHER_OPS = [Op.BUF_RETURN, Op.ATTACH, Op.DETACH, Op.TENANT_MAP, Op.TENANT_UNMAP, Op.EV_DATA,
             Op.EV_FIN, 0x81, 0xFF, 0x7E]
EVENT_OPS = [Op.EV_DATA, Op.EV_FIN, Op.EV_ERROR, Op.EV_ACCEPTABLE]

ptrs = st.sampled_from([0, 64, GRAIN, 2 * GRAIN + 100, SEND_HALF - GRAIN, SEND_HALF,
                        SEND_HALF + GRAIN, DATA - GRAIN, DATA, U64, U64 - 10])
sizes = st.sampled_from([0, 0, 1, 16, 100, GRAIN, GRAIN + 1, SEND_HALF, U32])
op_datas = st.one_of(st.sampled_from([0, 1, 2 | (1 << 16), 5, 1 << 32, (1 << 32) | 7,
                                      (1 << 33) | 3, (40 << 32), U64, 1 << 16]),
                     st.integers(0, U64))
tags = st.integers(0, 3)
socks = st.sampled_from([0, 1, 2, 3, 5, U32])
reserved = st.sampled_from([b"\0\0\0"] * 6 + [b"\x01\0\0", b"\0\0\xff"])


class Pair:
    """The reference engine and the fast path, fed the same inputs."""

    def __init__(self, ce: Any, config: dict[str, Any]) -> None:
        self.ce = ce
        self.r = ref.Engine(**{**config, "policy": _ref_policy(config["policy"])})
        self.f = ce.Engine(**{**config, "policy": _fast_policy(ce, config["policy"])})
        self.forwarded: list[Any] = []  # outputs to NSMs: what an NSM may answer
        self.delivered: list[Any] = []  # EV_DATA outputs to tenants: what may be returned

    def devices(self, kind: Kind) -> list[int]:
        return sorted(d.ident for d in self.r.devices if d.kind is kind)

    def learn(self, outs: list[Any]) -> None:
        for o in outs:
            if o.dest.kind is Kind.NSM:
                self.forwarded.append(o)
            elif o.raw[0] == Op.EV_DATA:
                self.delivered.append(o)
        self.forwarded = self.forwarded[-40:]
        self.delivered = self.delivered[-12:]

    def step(self, what: str, *args: Any) -> None:
        """Run one entry point on both; raise AssertionError on any difference."""
        try:
            r_e, r_out = getattr(ref, what)(self.r, *args)
            r_err = None
        except ref.EngineError as exc:
            r_err = exc
        except KeyError:  # the reference's own bug (see the report): not a comparison
            reject()
        try:
            f_e, f_out = getattr(self.ce, what)(self.f, *args)
            f_err = None
        except self.ce.EngineError as exc:
            f_err = exc
        assert (r_err is None) == (f_err is None), (what, args, r_err, f_err)
        if r_err is not None:
            return
        if what == "attach":
            assert r_out == f_out, (r_out, f_out)
            r_out = f_out = []
        assert [(o.dest, o.raw) for o in r_out] == [(tuple(o.dest), o.raw) for o in f_out], \
            (what, args)
        self.r, self.f = r_e, f_e
        self.learn(r_out)
        want, got = snapshot_ref(self.r), snapshot_fast(self.f)
        assert want == got, {k: (want[k], got[k]) for k in want if want[k] != got[k]}
        assert ref.status(self.r) == self.ce.status(self.f)


def last_nsm(engine: Any, vm_id: int) -> int | None:
    """A policy of the caller's own (CE-15): the highest NSM ID, or none for tenant 3."""
    nsms = [d.ident for d in engine.devices if d.kind is Kind.NSM]
    return None if vm_id == 3 or not nsms else max(nsms)


def _ref_policy(spec: Any) -> Any:
    if spec == "last":
        return last_nsm
    return ref.first_nsm if spec is None else ref.assign(spec)


def _fast_policy(ce: Any, spec: Any) -> Any:
    if spec == "last":
        return last_nsm
    return ce.first_nsm if spec is None else ce.assign(spec)


def snapshot_ref(e: ref.Engine) -> dict[str, Any]:
    """Everything the reference engine holds, in plain comparable types."""
    ledgers = {}
    for vm, led in e.ledgers.items():
        ledgers[vm] = {"slices": dict(led.slices()), "sent": sorted(led.lent_send()),
                       "held": sorted((span, nsm) for span, nsm in led._held.values())}
    flights = {fk: (f.tkey, ref_nqe.pack(f.request), (tuple(f.out.dest), f.out.raw), f.opens)
               for fk, f in e.flights.items()}
    grants = {k: (tuple(g.slice), g.ready, g.held) for k, g in e.grants.items()}
    return {"devices": dict(e.devices), "table": dict(e.table.fwd),
            "rev": dict(e.table.rev), "flights": flights, "grants": grants,
            "ledgers": ledgers, "draining": dict(e.draining), "next_sock": dict(e.next_sock),
            "counters": dict(e.counters)}


def snapshot_fast(e: Any) -> dict[str, Any]:
    """The same view of the fast path's C engine."""
    devices = e.devices
    table = e.table
    flights = {fk: (f["tkey"], f["request"], (tuple(f["out"].dest), f["out"].raw), f["opens"])
               for fk, f in e.flights.items()}
    grants = {k: (tuple(g.slice), g.ready, g.held) for k, g in e.grants.items()}
    ledgers = {d.ident: e.ledger(d.ident) for d in devices if d.kind is Kind.TENANT}
    return {"devices": devices, "table": table, "rev": {n: t for t, n in table.items()},
            "flights": flights, "grants": grants, "ledgers": ledgers, "draining": e.draining,
            "next_sock": e.next_sock, "counters": {d: fast.counters(e, d) for d in devices}}


def _nqe_bytes(msg: NQE, res: bytes) -> bytes:
    """The bytes of ``msg`` with reserved bytes ``res``, unchecked (the op may be unknown)."""
    return ref_nqe.WIRE.pack(msg.op, msg.qset, msg.vm_id, msg.sock_id, msg.op_data,
                             msg.data_ptr, msg.size, msg.tag, res)


def tenant_nqe(data: st.DataObject) -> bytes:
    op = data.draw(st.sampled_from(CALL_OPS * 3 + OTHER_OPS))
    msg = NQE(op=op, qset=data.draw(st.integers(0, 3)), vm_id=data.draw(st.integers(0, 255)),
              sock_id=data.draw(socks), op_data=data.draw(op_datas), data_ptr=data.draw(ptrs),
              size=data.draw(sizes), tag=data.draw(tags))
    if op == Op.SOCKET:
        msg = dataclasses.replace(msg, size=data.draw(st.sampled_from([0, 0, 0, 1])))
    if op == Op.ATTACH:
        msg = dataclasses.replace(msg, op_data=data.draw(st.sampled_from([1, 2, 1 << 16])))
    if op == Op.BUF_RETURN and data.draw(st.booleans()):
        msg = dataclasses.replace(msg, sock_id=0)
    return _nqe_bytes(msg, data.draw(reserved))


def nsm_answer(pair: Pair, data: st.DataObject) -> tuple[Any, int, Any, bytes] | None:
    """An NSM's reply to one NQE it got, or an event on a socket it knows."""
    if not pair.forwarded:
        return None
    o = data.draw(st.sampled_from(pair.forwarded[:2] * 4 + pair.forwarded))
    got = ref_nqe.unpack(o.raw)
    dev = ref.Dev(Kind.NSM, o.dest.ident)
    kind = data.draw(st.sampled_from(["reply"] * 6 + ["event", "unknown", "forged"]))
    if kind == "reply":
        pair.forwarded.remove(o)  # answered, as a well-behaved NSM does once
    if kind == "event":
        op = data.draw(st.sampled_from(EVENT_OPS))
        size = data.draw(st.sampled_from([0, 40, GRAIN, 1]))
        base = data.draw(st.sampled_from([SEND_HALF, SEND_HALF + GRAIN, 16 << 10, DATA - GRAIN,
                                          0, SEND_HALF + 100]))
        msg = NQE(op=op, qset=o.dest.qset, sock_id=got.sock_id, data_ptr=base, size=size,
                  op_data=data.draw(st.sampled_from([0, 0, 16, 100, U64])), tag=0)
    else:
        result = data.draw(st.sampled_from([0] * 6 + [got.size, -104, -22, 5]))
        msg = dataclasses.replace(got.reply(result), vm_id=data.draw(st.integers(0, 3)))
        if kind == "unknown":
            msg = dataclasses.replace(msg, op=ref_nqe.OP_UNKNOWN_REPLY)
        if kind == "forged":
            msg = dataclasses.replace(msg, sock_id=data.draw(socks), tag=data.draw(tags))
    ring = RingId.SEND if msg.op in EVENT_OPS else RingId.JOB
    return dev, o.dest.qset, ring, ref_nqe.pack(msg)


def run_program(ce: Any, data: st.DataObject) -> None:
    config = {
        "policy": data.draw(st.sampled_from([None, None, {1: 2, 2: 1}, {3: 7}, "last"])),
        "slices": data.draw(st.sampled_from([1, 2, 3, 9])),
        "max_inflight": data.draw(st.sampled_from([None, None, 0, 1, 3])),
    }
    pair = Pair(ce, config)
    for _ in range(data.draw(st.integers(1, 4))):
        pair.step("attach", data.draw(st.sampled_from(TENANT_GEOS)), None)
    for _ in range(data.draw(st.integers(1, 3))):
        pair.step("attach", data.draw(st.sampled_from(NSM_GEOS)),
                  data.draw(st.sampled_from([None, None, 2, 3])))
    for _ in range(data.draw(st.integers(1, 60))):
        action = data.draw(st.sampled_from(
            ["tenant"] * 3 + ["open"] * 3 + ["call"] * 6 + ["answer"] * 8 + ["event"] * 3
            + ["buf_return"] * 2 + ["garbage", "attach", "detach", "nsm_call"]))
        tenants, nsms = pair.devices(Kind.TENANT), pair.devices(Kind.NSM)
        if action == "open" and tenants:
            vm = data.draw(st.sampled_from(tenants))
            msg = NQE(op=Op.SOCKET, sock_id=data.draw(st.integers(1, 12)), op_data=2 | (1 << 16),
                      tag=data.draw(tags))
            pair.step("switch", ref.Dev(Kind.TENANT, vm), data.draw(st.integers(0, 1)) %
                      pair.r.devices[ref.Dev(Kind.TENANT, vm)].n_qsets, RingId.JOB,
                      ref_nqe.pack(msg))
        elif action == "call" and pair.r.table.fwd:
            vm, q, sock = data.draw(st.sampled_from(sorted(pair.r.table.fwd)))
            op = data.draw(st.sampled_from(CALL_OPS[1:]))
            size = data.draw(st.sampled_from([0, 16, 100, GRAIN, 3 * GRAIN + 5]))
            if op in (Op.LISTEN, Op.SHUTDOWN, Op.CLOSE):
                size = data.draw(st.sampled_from([0, 0, 0, 4]))
            op_data = data.draw(st.sampled_from([0, 0, 1, 8, (1 << 32) | 5, (4 << 32)]))
            if op == Op.ACCEPT:
                op_data = data.draw(st.integers(1, 8)) | data.draw(st.sampled_from([0, 1 << 32]))
            msg = NQE(op=op, sock_id=sock, op_data=op_data, size=size, tag=data.draw(tags),
                      data_ptr=data.draw(st.sampled_from([0, 64, GRAIN, 2 * GRAIN, SEND_HALF])))
            ring = RingId.SEND if op == Op.SEND else RingId.JOB
            pair.step("switch", ref.Dev(Kind.TENANT, vm), q, ring, ref_nqe.pack(msg))
        elif action == "event" and pair.r.table.rev:
            nsm, q, sock = data.draw(st.sampled_from(sorted(pair.r.table.rev)))
            vm = pair.r.table.rev[(nsm, q, sock)][0]
            slices = pair.r.ledgers[vm].slices()
            base = slices[nsm].offset if nsm in slices else SEND_HALF
            op = data.draw(st.sampled_from(EVENT_OPS + [Op.EV_DATA] * 4))
            size = data.draw(st.sampled_from([40, 100, GRAIN, 0])) if op == Op.EV_DATA else 0
            msg = NQE(op=op, qset=q, sock_id=sock, size=size,
                      data_ptr=base + data.draw(st.sampled_from([0, GRAIN, 2 * GRAIN, 100])),
                      op_data=data.draw(st.sampled_from([0, 0, 16, 1000])))
            pair.step("switch", ref.Dev(Kind.NSM, nsm), q, RingId.SEND, ref_nqe.pack(msg))
        elif action == "tenant" and tenants:
            vm = data.draw(st.sampled_from(tenants))
            raw = tenant_nqe(data)
            ring = RingId.SEND if raw[0] in (Op.SEND, Op.BUF_RETURN) else RingId.JOB
            pair.step("switch", ref.Dev(Kind.TENANT, vm), data.draw(st.integers(0, 1)) %
                      pair.r.devices[ref.Dev(Kind.TENANT, vm)].n_qsets, ring, raw)
        elif action == "answer":
            got = nsm_answer(pair, data)
            if got is not None and got[0] in pair.r.devices:
                pair.step("switch", *got)
        elif action == "buf_return" and pair.delivered:
            o = data.draw(st.sampled_from(pair.delivered))
            ev = ref_nqe.unpack(o.raw)
            msg = NQE(op=Op.BUF_RETURN, data_ptr=ev.data_ptr,
                      size=data.draw(st.sampled_from([ev.size, ev.size, ev.size + 1, 0])))
            dev = ref.Dev(Kind.TENANT, o.dest.ident)
            if dev in pair.r.devices:
                pair.step("switch", dev, o.dest.qset, RingId.SEND, ref_nqe.pack(msg))
        elif action == "garbage" and (tenants or nsms):
            kind = data.draw(st.sampled_from([Kind.TENANT] * bool(tenants) + [Kind.NSM]
                                             * bool(nsms)))
            ident = data.draw(st.sampled_from(tenants if kind is Kind.TENANT else nsms))
            raw = data.draw(st.binary(min_size=32, max_size=32))
            pair.step("switch", ref.Dev(kind, ident), 0, RingId.JOB, raw)
        elif action == "nsm_call" and nsms:
            raw = tenant_nqe(data)
            pair.step("switch", ref.Dev(Kind.NSM, data.draw(st.sampled_from(nsms))), 0,
                      RingId.SEND, raw)
        elif action == "attach":
            kind = data.draw(st.sampled_from([Kind.TENANT, Kind.NSM]))
            geos = TENANT_GEOS if kind is Kind.TENANT else NSM_GEOS
            pair.step("attach", data.draw(st.sampled_from(geos)),
                      data.draw(st.sampled_from([None, 1, 2, 254, 255, 0])))
        elif action == "detach":
            kind = data.draw(st.sampled_from([Kind.TENANT, Kind.NSM]))
            pair.step("detach", ref.Dev(kind, data.draw(st.integers(1, 4))))


def differential(ce: Any, examples: int) -> Any:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        run_program(ce, data)

    return check


def test_fast_engine_matches_the_reference_step_by_step() -> None:
    differential(fast, 250)()


def _unstamped(module: Any) -> Any:
    """The fast path with vm_id zeroed in everything it forwards to an NSM (breaks CE-8)."""

    def switch(engine: Any, src: Any, qset: int, ring: Any, raw: bytes) -> Any:
        e, outs = module.switch(engine, src, qset, ring, raw)
        return e, [o._replace(raw=o.raw[:2] + b"\0" + o.raw[3:])
                   if o.dest.kind is Kind.NSM else o for o in outs]

    broken = types.SimpleNamespace(**{k: getattr(module, k) for k in module.__all__})
    broken.switch = switch
    return broken


def test_the_differential_test_catches_an_engine_that_does_not_stamp() -> None:
    with pytest.raises(AssertionError):
        differential(_unstamped(fast), 400)()


def test_a_refused_nqe_leaves_the_c_state_unchanged() -> None:
    """SEC-8: a SEND refused for its quota leaves the ledger and flights as they were."""
    e = fast.Engine(max_inflight=1)
    e, t = fast.attach(e, TENANT_GEOS[0])
    e, n = fast.attach(e, NSM_GEOS[0])
    e, outs = fast.switch(e, t, 0, RingId.JOB, ref_nqe.pack(NQE(op=Op.SOCKET, sock_id=5,
                                                                 op_data=2 | (1 << 16))))
    fmap = ref_nqe.unpack(outs[0].raw)
    e, outs = fast.switch(e, n, 0, RingId.JOB, ref_nqe.pack(fmap.reply(0)))
    sock = ref_nqe.unpack(outs[0].raw)
    e, outs = fast.switch(e, n, 0, RingId.JOB, ref_nqe.pack(sock.reply(0)))
    send = ref_nqe.pack(NQE(op=Op.SEND, sock_id=5, data_ptr=0, size=100, tag=1))
    e, outs = fast.switch(e, t, 0, RingId.SEND, send)
    before = snapshot_fast(e)
    e2, outs = fast.switch(e, t, 0, RingId.SEND,
                           ref_nqe.pack(NQE(op=Op.SEND, sock_id=5, data_ptr=GRAIN, size=10,
                                            tag=2)))
    assert [ref_nqe.unpack(o.raw).result for o in outs] == [-105]  # ENOBUFS
    after = snapshot_fast(e2)
    assert after["counters"][t].rejected == before["counters"][t].rejected + 1
    del after["counters"], before["counters"]
    assert after == before


# -- the fuzz target (fastpath/csrc/fuzz/fuzz_engine.c) -----------------------------------------

CSRC = Path(__file__).resolve().parent.parent / "fastpath" / "csrc"
#: the fuzzer brings its own sanitizer runtime: not the one a sanitized Python run preloads
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}


def _fuzzer(tmp: Path, *defines: str) -> Path:
    exe = tmp / "fuzz_engine"
    subprocess.run(
        ["clang", "-g", "-O1", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", "include",
         "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined", *defines,
         "-o", str(exe), "fuzz/fuzz_engine.c", "engine.c"],
        cwd=CSRC, check=True, timeout=300, env=CLEAN_ENV)
    return exe


def _run_fuzzer(exe: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    work = tmp / "corpus"  # new inputs go here, never into the repository's seeds
    work.mkdir(exist_ok=True)
    return subprocess.run([str(exe), "-runs=2000", "-seed=1", f"-artifact_prefix={tmp}/",
                           str(work), str(CSRC / "fuzz" / "corpus" / "engine")],
                          capture_output=True, text=True, timeout=300, env=CLEAN_ENV)


@pytest.mark.skipif(shutil.which("clang") is None, reason="the fuzz target needs clang")
def test_fuzz_target_holds_its_invariants_on_the_seeds(tmp_path: Path) -> None:
    got = _run_fuzzer(_fuzzer(tmp_path), tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]


@pytest.mark.skipif(shutil.which("clang") is None, reason="the fuzz target needs clang")
def test_fuzz_target_catches_an_engine_that_does_not_stamp(tmp_path: Path) -> None:
    got = _run_fuzzer(_fuzzer(tmp_path, "-DNK_BROKEN_ENGINE_STAMP"), tmp_path)
    assert got.returncode != 0
    assert "fuzz_engine: output" in got.stderr


# -- the ledger on its own (fastpath/ledger.py over nk_ledger_*) ----------------------------------

LEDGER_GEO = Geometry(n_qsets=1, ring_entries=2, data_size=24 * 64, send_size=8 * 64,
                      buf_size=64, kind=Kind.TENANT)
ledger_calls = st.lists(st.one_of(
    st.tuples(st.just("grant"), st.integers(0, 4), st.integers(-64, 26 * 64),
              st.integers(-1, 8 * 64)),
    st.tuples(st.just("lend_send"), st.integers(-64, 10 * 64), st.integers(-1, 4 * 64)),
    st.tuples(st.just("settle_send"), st.integers(-64, 10 * 64), st.integers(-1, 4 * 64)),
    st.tuples(st.just("lend_receive"), st.integers(0, 4), st.integers(7 * 64, 26 * 64),
              st.integers(-1, 4 * 64)),
    st.tuples(st.just("return_receive"), st.integers(-64, 26 * 64), st.integers(-1, 4 * 64)),
), max_size=60)


def _ledger_differential(make: Any) -> None:
    @settings(max_examples=300, deadline=None, database=None)
    @given(calls=ledger_calls, data=st.data())
    def check(calls: list[tuple[Any, ...]], data: st.DataObject) -> None:
        want, got = bufpool.Ledger(LEDGER_GEO), make(LEDGER_GEO)
        done: list[tuple[Any, ...]] = []
        for call in calls:
            if call[0] in ("settle_send", "return_receive") and done and data.draw(st.booleans()):
                call = (call[0], *data.draw(st.sampled_from(done)))  # a span that was lent
            outcome = []
            for ledger in (want, got):
                try:
                    outcome.append(("ok", getattr(ledger, call[0])(*call[1:])))
                except bufpool.BufError as exc:
                    outcome.append(("err", exc.errno))
            assert outcome[0] == outcome[1], call
            if outcome[0][0] == "ok" and call[0] in ("lend_send", "lend_receive"):
                done.append(call[-2:])
            assert want.slices() == got.slices()
            assert want.lent_send() == got.lent_send()
            assert want.held_by_tenant() == got.held_by_tenant()

    check()


def test_c_ledger_matches_the_reference_ledger() -> None:
    _ledger_differential(fast_ledger.Ledger)


class _OverlappingLedger(fast_ledger.Ledger):
    """Lends a send buffer that overlaps one still lent (breaks BUF-3) by saying nothing."""

    def lend_send(self, offset: int, size: int) -> None:
        try:
            super().lend_send(offset, size)
        except bufpool.BufError as exc:
            if exc.errno != errno.EINVAL:
                raise


def test_the_ledger_differential_catches_a_ledger_that_double_lends() -> None:
    with pytest.raises(AssertionError):
        _ledger_differential(_OverlappingLedger)


def test_c_ledger_passes_the_conformance_ledger_machine() -> None:
    from netkernel.conformance.test_bufpool import LedgerMachine

    machine = type("CLedgerMachine", (LedgerMachine,),
                   {"pool": types.SimpleNamespace(Ledger=fast_ledger.Ledger), "dev": ref_device})
    run_state_machine_as_test(machine)


# -- the connection table on its own (fastpath/conntable.py over nk_table_*) ---------------------

table_keys = st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 255]), st.integers(0, 3))
table_ops = st.lists(st.one_of(
    st.tuples(st.just("insert"), table_keys, table_keys),
    st.tuples(st.just("remove_tenant"), table_keys),
    st.tuples(st.just("detach_vm"), st.integers(0, 3)),
    st.tuples(st.just("detach_nsm"), st.integers(0, 3)),
), max_size=40)


def _table_differential(ct: Any) -> None:
    @settings(max_examples=300, deadline=None, database=None)
    @given(ops=table_ops)
    def check(ops: list[tuple[Any, ...]]) -> None:
        want, got = ref_conntable.EMPTY, ct.EMPTY
        for op, *args in ops:
            try:
                w = getattr(ref_conntable, op)(want, *args)
            except ref_conntable.TableError:
                with pytest.raises(ref_conntable.TableError):
                    getattr(ct, op)(got, *args)
                continue
            g = getattr(ct, op)(got, *args)
            if isinstance(w, tuple):
                assert w[1] == g[1]
                w, g = w[0], g[0]
            want, got = w, g
            assert dict(want.fwd) == dict(got.fwd) and dict(want.rev) == dict(got.rev)
            for key in ((1, 0, 1), (2, 1, 3), (3, 0, 2)):
                assert ref_conntable.lookup_nsm(want, key) == ct.lookup_nsm(got, key)
                assert ref_conntable.translate(want, *key) == ct.translate(got, *key)
                assert ref_conntable.sockets_of_nsm(want, key[0]) == ct.sockets_of_nsm(got, key[0])

    check()


def test_c_table_matches_the_reference_table() -> None:
    _table_differential(fast_conntable)


def test_the_table_differential_catches_a_table_that_forgets_reverse_entries() -> None:
    broken = types.SimpleNamespace(**{k: getattr(fast_conntable, k)
                                      for k in fast_conntable.__all__})

    def lookup_nsm(table: Any, nkey: Any) -> Any:  # never finds the tenant of an NSM socket
        return None

    broken.lookup_nsm = lookup_nsm
    with pytest.raises(AssertionError):
        _table_differential(broken)
