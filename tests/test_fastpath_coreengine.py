"""The fast-path CoreEngine process (fastpath/coreengine.py, fastpath/csrc/ce.c), running.

``python -m netkernel.fastpath.coreengine`` must be a drop-in for the
reference's process. Three kinds of evidence:

* every test of tests/test_coreengine.py (control socket, hot-plug, switching
  against a fake NSM, full rings in both directions, detach) runs again here
  against the fast-path process (the ``inst`` fixture below replaces the
  reference's; the tests are the reference's own functions);
* system tests with the reference kernel NSM: bytes through real loopback
  sockets, the same NQE sequence giving the same status counters as the
  reference process, a tenant that stops reading holding up no one else, a
  broken ring detached;
* a build of ce.c with ``-DNK_BROKEN_CE_HOLD_ALL`` (an NSM's ring stopped for a
  slow tenant) fails the isolation test, so that test can fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket as std
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netkernel.conformance.runtime import RawTenant
from netkernel.reference import bell, coreengine, shm
from netkernel.reference import device as dev
from netkernel.reference.nqe import NQE, REPLY_BIT, Op, pack, unpack
from tests import test_coreengine as base
from tests.live import echo_server
from tests.test_coreengine import (  # noqa: F401  (fixtures the reused tests request)
    NSM_RING,
    TENANT_RING,
    FakeNsm,
    Instance,
    Tenant,
    _open_socket,
    _until,
    fake_nsm,
    start_engine,
    stop_engine,
    tenant,
)

pytest.importorskip("netkernel.fastpath._lib", reason="the C fast path is not built")

FAST = "netkernel.fastpath.coreengine"
REF = "netkernel.reference.coreengine"
STREAM = std.AF_INET | std.SOCK_STREAM << 16
DGRAM = std.AF_INET | std.SOCK_DGRAM << 16


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Instance]:
    """The fast-path CoreEngine on a fresh instance, with tests/test_coreengine.py's rings."""
    name = f"t-fce-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "engine.log"
    ce = start_engine(FAST, name, log, "--ring-entries", str(TENANT_RING),
                "--nsm-ring-entries", str(NSM_RING))
    try:
        yield Instance(name, ce)
    finally:
        stop_engine(ce, name, log)


# -- tests/test_coreengine.py, against the fast-path process ------------------------------

test_attach_creates_a_ready_device_and_eof_detaches_it = \
    base.test_attach_creates_a_ready_device_and_eof_detaches_it
test_killed_client_detaches_its_device = base.test_killed_client_detaches_its_device
test_bad_requests_get_a_clear_json_error = base.test_bad_requests_get_a_clear_json_error
test_one_device_per_connection = base.test_one_device_per_connection
test_status_json = base.test_status_json
test_shutdown_detaches_everything_and_exits = base.test_shutdown_detaches_everything_and_exits
test_calls_cross_to_the_nsm_and_replies_come_back = \
    base.test_calls_cross_to_the_nsm_and_replies_come_back
test_full_nsm_ring_holds_outputs_in_order_and_stops_reading = \
    base.test_full_nsm_ring_holds_outputs_in_order_and_stops_reading
test_full_tenant_ring_holds_events_in_order = base.test_full_tenant_ring_holds_events_in_order
test_tenant_detach_unmaps_it_from_the_nsm = base.test_tenant_detach_unmaps_it_from_the_nsm


def test_the_process_is_the_fast_path(inst: Instance) -> None:
    """The reused tests above ran against the C loop, not the reference's Python loop."""
    cmdline = Path(f"/proc/{inst.ce.pid}/cmdline").read_bytes().split(b"\0")
    assert FAST.encode() in cmdline
    maps = Path(f"/proc/{inst.ce.pid}/maps").read_text()
    assert "_nk" in maps, "the C extension is not loaded in the CoreEngine process"


# -- with the reference kernel NSM -----------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``live(module)``: that CoreEngine plus the reference kernel NSM on a fresh instance."""
    procs: list[tuple[subprocess.Popen[bytes], str, Path]] = []

    def start(module: str, env: dict[str, str] | None = None) -> str:
        name = f"t-fce-{uuid.uuid4().hex[:8]}"
        log = tmp_path / f"{name}.log"
        procs.append((start_engine(module, name, log, env=env), name, log))
        with open(log, "ab") as err:
            nsm = subprocess.Popen([sys.executable, "-m", "netkernel.reference.nsm_kernel",
                                    "--instance", name], stdin=subprocess.DEVNULL, stderr=err)
        procs.append((nsm, name, log))
        _until("the NSM to attach", lambda: coreengine.request({"cmd": "status"}, name)["nsms"])
        return name

    yield start
    for proc, name, log in reversed(procs):
        stop_engine(proc, name, log)


#: A GuestLib tenant in its own process: echoes `size` random bytes through NetKernel to the
#: kernel server at `port`, then prints what it saw and its own status entry.
ECHO_CLIENT = r"""
import json, os, socket as std, sys
from netkernel.reference import coreengine, guestlib
name, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = os.urandom(size)
s = guestlib.socket(std.AF_INET, std.SOCK_STREAM, instance=name)
s.settimeout(10)
s.connect(("127.0.0.1", port))
s.sendall(payload)
got = bytearray()
while len(got) < size:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
doc = coreengine.request({"cmd": "status"}, name)
me = [t for t in doc["tenants"] if t["pid"] == os.getpid()]
s.close()
print(json.dumps({"same": bytes(got) == payload, "me": me}), flush=True)
"""


def test_bytes_cross_the_c_loop_to_the_kernel_nsm_and_back(live: Callable[..., str]) -> None:
    """GuestLib -> fast-path CoreEngine -> kernel NSM -> a real loopback socket, and back."""
    name = live(FAST)
    lst = std.create_server(("127.0.0.1", 0))
    th = echo_server(lst)
    size = 300_000
    try:
        done = subprocess.run([sys.executable, "-c", ECHO_CLIENT, name,
                               str(lst.getsockname()[1]), str(size)],
                              capture_output=True, text=True, timeout=60)
    finally:
        lst.close()
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["same"] is True
    (me,) = doc["me"]
    assert me["sockets"] == 1
    assert (me["counters"]["bytes_in"], me["counters"]["bytes_out"]) == (size, size)
    _until("the tenant's device to go", lambda: not coreengine.request(
        {"cmd": "status"}, name)["tenants"])
    th.join(5)


def _script(t: RawTenant) -> list[int]:
    """One NQE sequence with successes, refusals and errors; returns the results."""
    socks = [t.new_id() for _ in range(3)]
    out = [t.do(Op.SOCKET, s, DGRAM) for s in socks]
    out.append(t.do(Op.SOCKET, socks[0], DGRAM))  # -EEXIST (CE-10)
    out.append(t.do(Op.SEND, socks[1], 0, b"12345"))  # -EDESTADDRREQ from the stack
    out.append(t.do(Op.LISTEN, 4242, 1))  # -EBADF: no such socket (CE-9)
    out.append(t.do(Op.CLOSE, socks[2], 0))
    return out


def _counters(name: str, vm: int) -> dict[str, Any]:
    doc = coreengine.request({"cmd": "status"}, name)
    (me,) = [x for x in doc["tenants"] if x["id"] == vm]
    return {"results": None, "sockets": me["sockets"], "counters": me["counters"],
            "total_sockets": doc["sockets"], "in_flight": doc["in_flight"],
            "nsm_ops": doc["nsms"][0]["counters"]["ops"]}


def test_status_counters_match_the_reference_process(live: Callable[..., str]) -> None:
    """The same NQEs through each process: the same results and the same status (RT-5, CE-23)."""
    seen = {}
    for module in (REF, FAST):
        name = live(module)
        with RawTenant(shm.instance_dir(name)) as t:
            results = _script(t)
            doc = _counters(name, t.id)
        doc["results"] = results
        seen[module] = doc
    assert seen[FAST] == seen[REF]
    assert seen[FAST]["counters"]["rejected"] > 0 and seen[FAST]["sockets"] == 2  # not vacuous


# -- isolation: a tenant that stops reading ---------------------------------------------------


def _take_some(t: Tenant, ring: dev.RingId) -> list[NQE]:
    """What is in the ring now, after at most a short sleep on the tenant's bell."""
    got = [unpack(raw) for raw in t.rings[ring].pop_many(64)]
    if not got:
        bell.sleep_until_work(t.device_bell, [t.rings[ring]], 0.01)
    return got


def _slow_tenant_scenario(inst: Instance, fake: FakeNsm) -> None:
    """Tenant 1 stops reading with 100 events for it; tenant 2 is still served."""
    slow = Tenant(inst.name)
    try:
        _open_socket(slow, fake, sock_id=7)
        fake.tell("events 100")  # 64 fill slow's RECEIVE ring, 36 wait in the CoreEngine
        _until("slow's ring to fill", lambda: len(slow.rings[dev.RingId.RECEIVE]) == TENANT_RING)
        _until("the rest held", lambda: inst.status()["pending"] > 0)
        fast = Tenant(inst.name)
        try:
            fake.tell("allow 2")
            fast.push(dev.RingId.JOB, NQE(op=Op.SOCKET, sock_id=9, op_data=STREAM, tag=3))
            deadline = time.monotonic() + 3.0
            got: list[NQE] = []
            while not got and time.monotonic() < deadline:
                got = _take_some(fast, dev.RingId.COMPLETION)
            assert [(r.op, r.result, r.sock_id) for r in got] == [(Op.SOCKET | REPLY_BIT, 0, 9)]
            fake.tell("events 3")  # on the NSM's last socket: fast's
            events = fast.take(dev.RingId.RECEIVE, 3)
            assert [(e.op, e.sock_id, e.vm_id) for e in events] == [(Op.EV_DATA, 9, fast.a.id)] * 3
            assert len(slow.rings[dev.RingId.RECEIVE]) == TENANT_RING  # still unread
        finally:
            fast.close()
        late = slow.take(dev.RingId.RECEIVE, 100)  # nothing of slow's was lost either
        assert [e.size for e in late] == [100 + i for i in range(100)]
    finally:
        slow.close()


def test_a_tenant_that_stops_reading_holds_up_no_other(inst: Instance) -> None:
    with base.running_fake_nsm(inst.name) as fake:
        _slow_tenant_scenario(inst, fake)


@pytest.fixture(scope="module")
def hold_all_build(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The extension built with -DNK_BROKEN_CE_HOLD_ALL (no TENANT_BACKLOG exception)."""
    out = tmp_path_factory.mktemp("hold-all")
    build = Path(__file__).resolve().parents[1] / "fastpath" / "build.py"
    env = {**os.environ, "CFLAGS": "-DNK_BROKEN_CE_HOLD_ALL"}
    done = subprocess.run([sys.executable, str(build), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_the_isolation_test_fails_a_loop_that_stops_the_nsm_for_a_slow_tenant(
        tmp_path: Path, hold_all_build: str) -> None:
    name = f"t-fce-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "engine.log"
    ce = start_engine(FAST, name, log, "--ring-entries", str(TENANT_RING), "--nsm-ring-entries",
                str(NSM_RING), env={"NETKERNEL_FASTPATH_EXT": hold_all_build})
    try:
        inst = Instance(name, ce)
        with base.running_fake_nsm(inst.name) as fake, pytest.raises(AssertionError) as failed:
            _slow_tenant_scenario(inst, fake)
        assert "assert [] == [(" in str(failed.value), "not the SOCKET reply that failed"
    finally:
        stop_engine(ce, name, log)


# -- a broken ring -------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["JOB tail", "COMPLETION head"])
def test_a_device_that_breaks_its_ring_is_detached(inst: Instance, broken: str) -> None:
    """RING-10: an index more than `entries` away from the other one, on a ring the
    CoreEngine reads (JOB's tail) or writes (COMPLETION's head), gets the device unplugged;
    another tenant stays."""
    t = Tenant(inst.name)
    other = Tenant(inst.name)
    try:
        path = t.a.path
        ring_id, field = (dev.RingId.JOB, 0) if broken == "JOB tail" else (
            dev.RingId.COMPLETION, 64)
        struct.pack_into("<I", t.a.dmap.buf, t.geo.ring_offset(0, ring_id) + field,
                         t.rings[ring_id].tail + TENANT_RING + 5)
        if ring_id is dev.RingId.JOB:
            t.engine_bell.ring()
        else:  # the CoreEngine finds out when it answers (-ENETDOWN: no NSM here)
            t.push(dev.RingId.JOB, NQE(op=Op.SOCKET, sock_id=1, op_data=STREAM, tag=1))
        _until("the broken device's file to go", lambda: not path.exists())
        assert [x["id"] for x in inst.status()["tenants"]] == [other.a.id]
        assert other.a.path.exists()
    finally:
        t.close()
        other.close()


def test_the_bench_runs_at_a_tiny_size() -> None:
    """bench/coreengine.py end to end (no timing is asserted: only that it ran and agreed)."""
    from bench import coreengine as bench

    fast = bench.run_fastpath(sends=2000, window=16)
    ref = bench.run_reference(sends=200, window=16)
    assert (fast.nqes, ref.nqes) == (4000, 400)
    assert fast.elapsed > 0 and ref.polling > 0
    assert "goal >= 10 M NQE/s" in bench.format_table({"fastpath": [fast], "reference": [ref]})
    json.dumps([fast.__dict__, ref.__dict__])


# -- the loop against the reference's, step by step (in this process) -----------------------

SMALL = {
    dev.Kind.TENANT: dev.Geometry(kind=dev.Kind.TENANT, ring_entries=4, data_size=64 << 10,
                                  send_size=32 << 10, buf_size=4 << 10),
    dev.Kind.NSM: dev.Geometry(kind=dev.Kind.NSM, ring_entries=2, data_size=64 << 10,
                               send_size=32 << 10, buf_size=4 << 10),
}
TENANT_OUT = (dev.RingId.COMPLETION, dev.RingId.RECEIVE)
Step = tuple[Any, ...]
UNKNOWN = 0x3F  # an op byte no version defines


@contextlib.contextmanager
def _in_process(impl: str, tenants: int) -> Iterator[tuple[Any, list[Any], Any]]:
    """A CoreEngine object (no threads) with ``tenants`` tenants and one NSM attached."""
    from netkernel.fastpath.coreengine import CoreEngine as Fast

    name = f"t-fce-{uuid.uuid4().hex[:8]}"
    ce = (Fast if impl == "fastpath" else coreengine.CoreEngine)(name, SMALL)
    ce.dir.mkdir(parents=True, exist_ok=True)
    conns: list[std.socket] = []
    try:
        for kind in ["tenant"] * tenants + ["nsm"]:
            ours, theirs = std.socketpair()
            conns += [ours, theirs]
            assert ce.attach(ours, {"cmd": "attach", "kind": kind, "pid": os.getpid()})["ok"]
        ts = [a for k, a in sorted(ce.devices.items()) if k.kind is dev.Kind.TENANT]
        (nsm,) = [a for k, a in ce.devices.items() if k.kind is dev.Kind.NSM]
        yield ce, ts, nsm
    finally:
        ce.close()
        for c in conns:
            c.close()
        shm.remove_instance(name)


def _play(impl: str, program: list[Step]) -> list[Any]:
    """Run ``program`` on one implementation; the trace of everything the sides saw."""
    trace: list[Any] = []
    with _in_process(impl, 2) as (ce, ts, nsm):
        outbox: list[bytes] = []  # replies, for the NSM's JOB ring
        events: list[bytes] = []  # for its SEND ring
        for step in program:
            what = step[0]
            if what == "call":  # a tenant writes one NQE (if its ring has room)
                _, t, ring, op, sock, tag, size = step
                msg = NQE(op=Op.SOCKET if op == UNKNOWN else op, sock_id=sock,
                          op_data=DGRAM if op == Op.SOCKET else 0,
                          data_ptr=tag * 4096 if size else 0, size=size, tag=tag)
                raw = bytes([op]) + pack(msg)[1:]  # UNKNOWN: answered -ENOSYS (NQE-11)
                trace.append(ts[t].dmap.ring(0, ring).push(raw))
            elif what == "nsm":  # the NSM answers what it read, and sends events
                _, k, n_events = step
                for ring in TENANT_OUT:
                    for raw in nsm.dmap.ring(0, ring).pop_many(k):
                        msg = unpack(raw)
                        trace.append(("nsm got", raw))
                        if msg.op != Op.BUF_RETURN:
                            outbox.append(pack(msg.reply(msg.size if msg.op == Op.SEND else 0)))
                events += [pack(NQE(op=Op.EV_ACCEPTABLE, sock_id=s % 2 + 1))
                           for s in range(n_events)]
                for queue, ring in ((outbox, dev.RingId.JOB), (events, dev.RingId.SEND)):
                    del queue[:nsm.dmap.ring(0, ring).push_many(queue)]
            elif what == "read":  # a tenant reads k of its replies and events
                _, t, k = step
                for ring in TENANT_OUT:
                    got = ts[t].dmap.ring(0, ring).pop_many(k)
                    trace += [("tenant got", t, raw) for raw in got]
            else:
                trace.append(("moved", ce.poll_once() > 0))
                st = ce.status()
                trace.append({k: st[k] for k in ("pending", "blocked_sources", "sockets",
                                                  "in_flight", "tenants", "nsms")})
                for d in st["tenants"] + st["nsms"]:
                    d.pop("path")
    return trace


STEPS = st.one_of(
    st.tuples(st.just("call"), st.integers(0, 1), st.sampled_from([dev.RingId.JOB,
                                                                    dev.RingId.SEND]),
              st.sampled_from([Op.SOCKET, Op.SEND, Op.CLOSE, Op.GETSOCKNAME, UNKNOWN]),
              st.integers(1, 3), st.integers(0, 3), st.sampled_from([0, 1, 100])),
    st.tuples(st.just("nsm"), st.integers(0, 3), st.integers(0, 6)),
    st.tuples(st.just("read"), st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.just("poll")),
)


J, S = dev.RingId.JOB, dev.RingId.SEND
#: A socket; four SENDs for an NSM ring of 2 that is not read (two wait, their source is
#: held); six events (and six for no socket) for a tenant ring of 4 that is not read (two
#: wait, nobody is held); then both sides read and everything drains.
BACKLOGS: list[Step] = [
    ("call", 0, J, Op.SOCKET, 1, 0, 0), ("poll",), ("nsm", 4, 0), ("poll",), ("nsm", 4, 0),
    ("poll",), ("read", 0, 4), *[("call", 0, S, Op.SEND, 1, i, 100) for i in range(4)],
    ("poll",), ("poll",), ("nsm", 0, 12), ("poll",), *[("nsm", 0, 0), ("poll",)] * 5,
    *[("nsm", 4, 0), ("poll",), ("read", 0, 4), ("poll",)] * 4,
]


@example(BACKLOGS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEPS, min_size=1, max_size=60))
def test_the_c_loop_sees_and_delivers_what_the_reference_loop_does(program: list[Step]) -> None:
    """Same NQEs in, same NQEs out in the same order on every ring, same status after every
    pass: backlogs, held sources and the TENANT_BACKLOG rule included (rings of 4 and 2).

    An explicit example (:data:`BACKLOGS`) makes sure both kinds of backlog occur."""
    program = [*program, ("poll",), ("nsm", 4, 0), ("poll",), ("read", 0, 8), ("read", 1, 8),
               ("poll",)]
    assert _play("fastpath", program) == _play("reference", program)


def test_the_differential_program_fills_both_kinds_of_backlog() -> None:
    """BACKLOGS is not vacuous: outputs wait, a source is held, and everything drains."""
    states = [(d["pending"], d["blocked_sources"]) for d in _play("fastpath", BACKLOGS)
              if isinstance(d, dict)]
    assert any(p and b for p, b in states), states  # SENDs held for the NSM's ring
    assert any(p and not b for p, b in states), states  # events for the tenant, nobody held


def test_the_differential_test_fails_a_loop_that_stops_the_nsm_for_a_slow_tenant(
        hold_all_build: str) -> None:
    """The NK_BROKEN_CE_HOLD_ALL build, run through the differential program, disagrees."""
    code = ("from tests.test_fastpath_coreengine import _play, BACKLOGS\n"
            "print(_play('fastpath', BACKLOGS) == _play('reference', BACKLOGS))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "NETKERNEL_FASTPATH_EXT": hold_all_build})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
