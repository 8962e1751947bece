"""On-host pairing (spec/shm.md): the shm NSM carries tenant-to-tenant TCP in memory.

Bound to the ``nsm`` role of a target that claims the optional feature
``SHM_PAIRING`` (``--target fastpath``, whose NSM is the shm NSM); for other targets these
tests are reported unsupported. Raw tenants (conformance/runtime.py) drive
the NSM NQE by NQE through a real CoreEngine; Linux sockets on loopback are
the oracle of names and the other kind of peer. That a connection was paired
is read from the NSM's per-tenant counters (SHM-7: the stats file
``nsm-<ID>.stats.json`` in the runtime directory), never from timing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from netkernel.conformance.plugin import require_feature
from netkernel.conformance.runtime import (
    LOOP,
    LOOP6,
    STREAM,
    STREAM6,
    Instance,
    RawTenant,
    Runtime,
    opt,
    parse_sa,
    sa4,
    sa6,
    wait_until,
)
from netkernel.conformance.targets import Launcher, Target
from netkernel.reference.nqe import CLOSE_ABORT, NQE, Op

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
ACCEPT_NOWAIT = 1 << 32
MSG_DONTWAIT = 0x40
CHUNK = 32 << 10


def of(sock: int, op: Op | None = None) -> Any:
    return lambda e: e.sock_id == sock and (op is None or e.op == op)


# -- the NSM under test and its counters ---------------------------------------------------------


@pytest.fixture
def shm_nsm(target: Target, nsm: Any) -> Launcher:
    """The target's NSM, when it claims SHM_PAIRING (else the test is unsupported)."""
    require_feature(target, "SHM_PAIRING")
    assert isinstance(nsm, Launcher), "an NSM that pairs is a process (a Launcher)"
    return nsm


def variant(launcher: Launcher, placement: str) -> Launcher:
    """The same NSM with another placement (SHM-1): ``--placement X`` replaced, or the
    fast path's kernel NSM for ``kernel``."""
    argv = list(launcher.argv)
    if "--placement" not in argv:
        pytest.skip("the target's NSM takes no --placement: placements are not testable here")
    if placement == "kernel":
        i = argv.index("-m") + 1 if "-m" in argv else -1
        if i <= 0 or not argv[i].endswith("nsm_shm"):
            pytest.skip("no kernel NSM beside the target's shm NSM")
        argv[i] = argv[i].removesuffix("nsm_shm") + "nsm_kernel"
        j = argv.index("--placement")
        del argv[j:j + 2]
    else:
        argv[argv.index("--placement") + 1] = placement
    return Launcher(tuple(argv))


@pytest.fixture
def inst(shm_nsm: Launcher, nk_runtime: Runtime) -> Instance:
    return nk_runtime.shared()


@contextlib.contextmanager
def own_instance(nk_runtime: Runtime, launcher: Launcher) -> Iterator[Instance]:
    inst = Instance(nk_runtime.engine, nk_runtime.logs)
    try:
        inst.start_nsm(launcher)
        yield inst
    finally:
        inst.stop()


def stats(inst: Instance) -> dict[str, Any]:
    """The NSM's stats file (SHM-7): placement and per-tenant counters."""
    (entry,) = inst.status()["nsms"]
    path = inst.dir / f"nsm-{entry['id']}.stats.json"
    doc: dict[str, Any] = wait_until(f"{path.name} exists", lambda: _read(path), 5.0)
    return doc


def _read(path: Any) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc


def rejected(inst: Instance) -> int:
    """What the CoreEngine dropped of the NSM's outputs (CE-11, CE-12): an event of a
    socket it does not know yet or any more, a reply no call asked for."""
    (entry,) = inst.status()["nsms"]
    return int(entry["counters"]["rejected"])


def counters(inst: Instance, vm: int) -> dict[str, int]:
    got: dict[str, int] = stats(inst)["tenants"].get(str(vm), {})
    return got


def counters_reach(inst: Instance, vm: int, **want: int) -> dict[str, int]:
    """Wait until tenant vm's counters show ``want`` (the file is rewritten every ~0.25 s;
    a tenant's counters start at 0 when it is mapped, and each test's tenants are new, so
    exact values tell this tenant's from an earlier one's with the same VM ID)."""
    def ok() -> dict[str, int] | None:
        c = counters(inst, vm)
        return c if c and all(c.get(k, -1) == v for k, v in want.items()) else None
    got: dict[str, int] = wait_until(f"tenant {vm}'s counters reach {want}", ok, 5.0, 0.05)
    return got


# -- raw tenants -----------------------------------------------------------------------------------


class Raw:
    """Socket calls of a raw tenant, one NQE each."""

    def __init__(self, t: RawTenant) -> None:
        self.t = t

    @property
    def vm(self) -> int:
        return self.t.id

    def socket(self, op_data: int = STREAM) -> int:
        sid = self.t.new_id()
        assert self.t.do(Op.SOCKET, sid, op_data) == 0
        return sid

    def name(self, s: int, peer: bool = False) -> tuple[str, int]:
        rc = self.t.do(Op.GETPEERNAME if peer else Op.GETSOCKNAME, s, out=28)
        assert rc > 0, rc
        return parse_sa(self.t.last_out)

    def listener(self, family: int = AF_INET, backlog: int = 16,
                 host: str | None = None) -> tuple[int, int]:
        s = self.socket(STREAM if family == AF_INET else STREAM6)
        addr = sa4(host or LOOP, 0) if family == AF_INET else sa6(host or LOOP6, 0)
        assert self.t.do(Op.BIND, s, data=addr) == 0
        assert self.t.do(Op.LISTEN, s, backlog) == 0
        return s, self.name(s)[1]

    def connect(self, port: int, family: int = AF_INET, host: str | None = None) -> int:
        s = self.socket(STREAM if family == AF_INET else STREAM6)
        addr = sa4(host or LOOP, port) if family == AF_INET else sa6(host or LOOP6, port)
        assert self.t.do(Op.CONNECT, s, data=addr) == 0
        return s

    def accept(self, lst: int, out: int = 28) -> tuple[int, int]:
        sid = self.t.new_id()
        rc = self.t.do(Op.ACCEPT, lst, sid, out=out)
        assert rc >= 0, rc
        return sid, rc

    def send(self, s: int, data: bytes, flags: int = 0) -> int:
        return self.t.do(Op.SEND, s, flags, data)

    def recv(self, s: int, want: int, timeout: float = 10.0) -> tuple[bytes, bool]:
        """EV_DATA of s until ``want`` bytes or EV_FIN (True) came; buffers returned."""
        got = bytearray()
        fin = False
        while len(got) < want and not fin:
            ev = self.t.event(of(s), timeout)
            if ev.op == Op.EV_DATA:
                got += self.t.payload(ev)
                self.t.buf_return(ev)
            elif ev.op == Op.EV_FIN:
                fin = True
            else:
                raise AssertionError(f"unexpected event {ev}")
        return bytes(got), fin

    def close(self, s: int, op_data: int = 0) -> int:
        return self.t.do(Op.CLOSE, s, op_data)


@contextlib.contextmanager
def _raw(inst: Instance, name: str) -> Iterator[Raw]:
    t = RawTenant(inst.dir, name=name)
    try:
        yield Raw(t)
    finally:
        t.close()


@pytest.fixture
def a(inst: Instance) -> Iterator[Raw]:
    with _raw(inst, "shm-a") as t:
        yield t


@pytest.fixture
def b(inst: Instance) -> Iterator[Raw]:
    with _raw(inst, "shm-b") as t:
        yield t


def pair(server: Raw, client: Raw, family: int = AF_INET) -> tuple[int, int, int]:
    """A paired connection: (listener, server end, client end), server's tenant listening."""
    lst, port = server.listener(family)
    c = client.connect(port, family)
    s, _ = server.accept(lst)
    return lst, s, c


# -- SHM-1: placement ------------------------------------------------------------------------------


@pytest.mark.req("SHM-1", "SHM-7")
def test_the_placement_decides_whether_tenants_pair(shm_nsm: Launcher,
                                                    nk_runtime: Runtime) -> None:
    """kernel never pairs; auto and shm pair the same connection; every NSM's stats file
    names its placement, and is gone once the NSM exited."""
    for placement, paired in (("kernel", 0), ("auto", 1), ("shm", 1)):
        with own_instance(nk_runtime, variant(shm_nsm, placement)) as inst, \
                RawTenant(inst.dir) as ta, RawTenant(inst.dir) as tb:
            x, y = Raw(ta), Raw(tb)
            _, s, c = pair(x, y)
            assert y.send(c, b"ping") == 4
            assert x.recv(s, 4) == (b"ping", False)
            assert stats(inst)["placement"] == placement
            want = {"paired": paired, "shm_bytes_out": 4 * paired}
            got = counters_reach(inst, y.vm, **want)
            assert {k: got[k] for k in want} == want, (placement, got)
            if not paired:
                assert got["stack_bytes_out"] >= 4
            (entry,) = inst.status()["nsms"]
            path = inst.dir / f"nsm-{entry['id']}.stats.json"
            assert path.exists()
            assert inst.nsms[0].stop() == 0
            assert not path.exists(), "the stats file outlived its NSM"


@pytest.mark.req("SHM-1", "SHM-3")
def test_a_full_accept_queue_goes_over_tcp_under_auto_and_is_refused_under_shm(
        shm_nsm: Launcher, nk_runtime: Runtime) -> None:
    """backlog 1: Linux's queue holds 2. The third CONNECT: auto carries it over TCP
    (stack counters), shm answers ECONNREFUSED; the two queued ones are paired."""
    for placement in ("auto", "shm"):
        with own_instance(nk_runtime, variant(shm_nsm, placement)) as inst, \
                RawTenant(inst.dir) as ta, RawTenant(inst.dir) as tb:
            x, y = Raw(ta), Raw(tb)
            lst, port = x.listener(backlog=1)
            first, second = y.connect(port), y.connect(port)
            counters_reach(inst, y.vm, paired=2)
            third = y.socket()
            rc = tb.do(Op.CONNECT, third, data=sa4(LOOP, port))
            if placement == "shm":
                assert rc == -errno.ECONNREFUSED
                assert counters(inst, y.vm)["paired"] == 2
                continue
            assert rc == 0
            ends = [x.accept(lst)[0] for _ in range(3)]  # FIFO: the paired ones first
            for c, s in zip((first, second, third), ends, strict=True):
                assert y.send(c, b"which?") == 6
                assert x.recv(s, 6) == (b"which?", False)
            got = counters_reach(inst, y.vm, stack_bytes_out=6)
            assert got["paired"] == 2 and got["shm_bytes_out"] == 12, got


# -- SHM-2, SHM-5: paired, one copy, both ways -----------------------------------------------------


def take(raw: Raw, sock: int) -> list[NQE]:
    """The events of ``sock`` read so far, taken out of the tenant's list."""
    raw.t.pump()
    mine = [e for e in raw.t.events if e.sock_id == sock]
    raw.t.events = [e for e in raw.t.events if e.sock_id != sock]
    return mine


def answered(raw: Raw, key: tuple[int, int]) -> int | None:
    """The result of a posted call once its reply came, else None."""
    if not raw.t.has_reply(*key):
        return None
    return raw.t.reply(*key).result


def transfer(tx: Raw, ts: int, rx: Raw, rs: int, data: bytes, window: int = 4,
             timeout: float = 20.0) -> bytes:
    """Stream ``data`` from tx's ts to rx's rs, SENDs of CHUNK, ``window`` in flight; the
    receiver reads (and returns every buffer) meanwhile. Returns what arrived."""
    off, inflight, got = 0, [], bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < len(data) or inflight:
        assert time.monotonic() < deadline, f"stuck: {len(got)} of {len(data)} arrived"
        while off < len(data) and len(inflight) < window:
            part = data[off:off + CHUNK]
            inflight.append((tx.t.post(Op.SEND, ts, 0, part), len(part)))
            off += len(part)
        still = []
        for key, size in inflight:
            rc = answered(tx, key)
            if rc is None:
                still.append((key, size))
            else:
                assert rc == size, f"SEND of {size} answered {rc}"
        inflight = still
        for ev in take(rx, rs):
            assert ev.op == Op.EV_DATA, ev
            got += rx.t.payload(ev)
            rx.t.buf_return(ev)
        time.sleep(0.0005)
    return bytes(got)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.req("SHM-2", "SHM-5", "SHM-7")
@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_tenants_connection_is_paired_and_carries_data_both_ways(inst: Instance, a: Raw, b: Raw,
                                                                 family: int) -> None:
    """A tenant connects to another's listener: paired (counters), every byte arrives once
    and in order both ways (sha256), counted as shm bytes and not as stack bytes."""
    dropped = rejected(inst)
    lst, s, c = pair(a, b, family)
    up, down = os.urandom(1_500_000), os.urandom(600_000)
    assert digest(transfer(b, c, a, s, up)) == digest(up)
    assert digest(transfer(a, s, b, c, down)) == digest(down)
    shared = {"paired": 1, "paired_now": 1, "stack_bytes_in": 0, "stack_bytes_out": 0}
    counters_reach(inst, a.vm, shm_bytes_in=len(up), shm_bytes_out=len(down), **shared)
    counters_reach(inst, b.vm, shm_bytes_in=len(down), shm_bytes_out=len(up), **shared)
    for raw, sock in ((a, s), (b, c), (a, lst)):
        assert raw.close(sock) == 0
    counters_reach(inst, a.vm, paired=1, paired_now=0, sockets=0)
    counters_reach(inst, b.vm, paired=1, paired_now=0, sockets=0)
    assert rejected(inst) == dropped, "the CoreEngine dropped outputs of the NSM (NSM-17)"


@pytest.mark.req("SHM-2")
def test_a_tenant_pairs_with_its_own_listener_and_a_wildcard_one(inst: Instance, a: Raw) -> None:
    """The caller's own tenant counts; a listener on the wildcard address is found by a
    CONNECT to loopback, as TCP's would be, and not by one to another host's address."""
    lst, s, c = pair(a, a)
    wild = a.socket()
    assert a.t.do(Op.BIND, wild, data=sa4("0.0.0.0", 0)) == 0
    assert a.t.do(Op.LISTEN, wild, 4) == 0
    c2 = a.connect(a.name(wild)[1])
    s2, _ = a.accept(wild)
    for x, y in ((c, s), (c2, s2)):
        assert a.send(x, b"self") == 4
        assert a.recv(y, 4) == (b"self", False)
    counters_reach(inst, a.vm, paired=4, paired_now=4, shm_bytes_out=8, shm_bytes_in=8)
    # the same port at an address that is not the host's: TCP's business, never paired
    far = a.socket()
    key = a.t.post(Op.CONNECT, far, data=sa4("192.0.2.1", a.name(wild)[1]))
    time.sleep(0.3)
    if a.t.has_reply(*key):
        assert a.t.reply(*key).result < 0  # unreachable, as TCP finds
        assert a.close(far) == 0
    else:
        assert a.close(far) == 0
        assert a.t.reply(*key).result == -errno.EBADF  # NSM-8: the SYN was still out
    assert counters(inst, a.vm)["paired"] == 4
    for sock in (s, c, lst, s2, c2, wild):
        assert a.close(sock) == 0


@pytest.mark.req("SHM-2")
def test_a_linux_client_still_reaches_a_tenants_listener(inst: Instance, a: Raw, b: Raw) -> None:
    """The listener stays a Linux listening socket: a non-tenant's TCP connection and a
    tenant's paired one reach it side by side, each in its own way."""
    lst, port = a.listener()
    c = b.connect(port)
    with socket.create_connection((LOOP, port), timeout=5) as linux:
        s1, _ = a.accept(lst)
        s2, _ = a.accept(lst)
        linux.sendall(b"over tcp")
        assert b.send(c, b"in memory") == 9
        got = {}
        for sid in (s1, s2):
            ev = a.t.event(of(sid, Op.EV_DATA))
            got[sid] = a.t.payload(ev)
            a.t.buf_return(ev)
        assert sorted(got.values()) == [b"in memory", b"over tcp"]
        tcp_end = s1 if got[s1] == b"over tcp" else s2
        assert a.send(tcp_end, b"back") == 4
        assert linux.recv(4) == b"back"
    counters_reach(inst, a.vm, stack_bytes_in=8, stack_bytes_out=4, shm_bytes_in=9, paired=1)
    for sock in (s1, s2, lst):
        assert a.close(sock) == 0
    assert b.close(c) == 0


# -- SHM-3, SHM-4: the connection's start and names ----------------------------------------------


@pytest.mark.req("SHM-3", "SHM-5")
def test_connect_is_answered_at_once_and_joins_the_accept_queue_in_order(
        inst: Instance, a: Raw, b: Raw) -> None:
    """No ACCEPT is waiting: the paired CONNECT is answered 0 anyway, behind a Linux
    connection that came first; EV_ACCEPTABLE counts both; ACCEPTs take them in order; the
    client's SEND before the ACCEPT waits, then arrives."""
    lst, port = a.listener()
    with socket.create_connection((LOOP, port), timeout=5) as linux:
        wait_until("the Linux connection is announced",
                   lambda: a.t.event(of(lst, Op.EV_ACCEPTABLE)).op_data == 1)
        c = b.connect(port)
        ev = a.t.event(of(lst, Op.EV_ACCEPTABLE))
        assert ev.op_data == 2, ev
        early = b.t.post(Op.SEND, c, 0, b"before accept")
        time.sleep(0.1)
        assert not b.t.has_reply(*early), "a SEND was answered before the server existed"
        s1, n1 = a.accept(lst)
        assert parse_sa(a.t.last_out[:n1]) == linux.getsockname()
        s2, n2 = a.accept(lst)
        assert parse_sa(a.t.last_out[:n2]) == b.name(c)
        assert b.t.reply(*early).result == len(b"before accept")
        assert a.recv(s2, 13) == (b"before accept", False)
        assert a.t.do(Op.ACCEPT, lst, a.t.new_id() | ACCEPT_NOWAIT, out=28) == -errno.EAGAIN
    counters_reach(inst, a.vm, paired=1, shm_bytes_in=13)
    for sock in (s1, s2, lst):
        assert a.close(sock) == 0
    assert b.close(c) == 0


@pytest.mark.req("SHM-3")
def test_a_waiting_accept_takes_the_paired_connection(inst: Instance, a: Raw, b: Raw) -> None:
    lst, port = a.listener()
    sid = a.t.new_id()
    waiting = a.t.post(Op.ACCEPT, lst, sid, out=16)
    time.sleep(0.05)
    assert not a.t.has_reply(*waiting)
    c = b.connect(port)
    assert a.t.reply(*waiting).result == 16
    assert parse_sa(a.t.last_out) == b.name(c)
    assert b.send(c, b"hi") == 2
    assert a.recv(sid, 2) == (b"hi", False)
    counters_reach(inst, a.vm, paired=1)
    for raw, sock in ((a, sid), (a, lst), (b, c)):
        assert raw.close(sock) == 0


@pytest.mark.req("SHM-4", "SHM-3")
@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_the_ends_names_are_those_tcp_gives(inst: Instance, a: Raw, b: Raw, family: int) -> None:
    """Client: bound at CONNECT to an ephemeral port of the address it connected to (the port
    is taken on the host), its peer the listener's address; server: the reverse. The shape
    is Linux's own (a Linux connection on the same host is the oracle)."""
    host = LOOP if family == AF_INET else LOOP6
    lst, port = a.listener(family)
    c = b.connect(port, family)
    s, alen = a.accept(lst)
    accepted = parse_sa(a.t.last_out[:alen])
    with socket.create_server((host, 0), family=family) as srv, \
            socket.create_connection((host, srv.getsockname()[1])) as lc:
        ls, _ = srv.accept()
        with ls:
            assert alen == (16 if family == AF_INET else 28)
            cname, lname = b.name(c), lc.getsockname()[:2]
            assert cname[0] == lname[0] and cname[1] != 0
            assert accepted == cname
            assert b.name(c, peer=True) == (host, port)
            assert a.name(s) == (host, port)
            assert a.name(s, peer=True) == cname
            assert ls.getpeername()[0] == lname[0]
    with socket.socket(family) as probe:  # the client's port is reserved on the host
        with pytest.raises(OSError) as exc:
            probe.bind((host, cname[1]))
        assert exc.value.errno == errno.EADDRINUSE
    # calls that a connected TCP socket answers so
    assert a.t.do(Op.CONNECT, s, data=sa4(LOOP, port) if family == AF_INET
                  else sa6(LOOP6, port)) == -errno.EISCONN
    assert b.t.do(Op.CONNECT, c, data=sa4(LOOP, port) if family == AF_INET
                  else sa6(LOOP6, port)) == 0  # NSM-4: 0 once after the handshake
    assert b.t.do(Op.CONNECT, c, data=sa4(LOOP, port) if family == AF_INET
                  else sa6(LOOP6, port)) == -errno.EISCONN
    assert a.t.do(Op.LISTEN, s, 5) == -errno.EINVAL
    assert b.t.do(Op.GETPEERNAME, c, out=4) == alen  # truncated: the full length
    for raw, sock in ((a, s), (a, lst), (b, c)):
        assert raw.close(sock) == 0


@pytest.mark.req("SHM-4")
def test_the_server_starts_with_the_listeners_options(inst: Instance, a: Raw, b: Raw) -> None:
    lst = a.socket()
    values = {
        (socket.SOL_SOCKET, socket.SO_RCVBUF): struct.pack("i", 32768),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE): struct.pack("i", 1),
        (socket.SOL_SOCKET, socket.SO_REUSEADDR): struct.pack("i", 1),
        (socket.IPPROTO_TCP, socket.TCP_NODELAY): struct.pack("i", 1),
        (socket.SOL_SOCKET, socket.SO_LINGER): struct.pack("ii", 1, 5),
    }
    for (level, name), value in values.items():
        assert a.t.do(Op.SETSOCKOPT, lst, opt(level, name), value) == 0
    assert a.t.do(Op.BIND, lst, data=sa4(LOOP, 0)) == 0
    assert a.t.do(Op.LISTEN, lst, 4) == 0
    c = b.connect(a.name(lst)[1])
    s, _ = a.accept(lst)
    with socket.socket() as linux:  # the oracle: what Linux reads back for the same values
        for (level, name), value in values.items():
            linux.setsockopt(level, name, value)
            want = linux.getsockopt(level, name, len(value))
            assert a.t.do(Op.GETSOCKOPT, s, opt(level, name), out=len(value)) == len(value)
            assert a.t.last_out == want, (level, name)
    # and options work on both ends
    assert b.t.do(Op.SETSOCKOPT, c, opt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                  struct.pack("i", 1)) == 0
    assert b.t.do(Op.GETSOCKOPT, c, opt(socket.SOL_SOCKET, socket.SO_ERROR), out=4) == 4
    assert b.t.last_out == bytes(4)
    counters_reach(inst, a.vm, paired=1)
    for raw, sock in ((a, s), (a, lst), (b, c)):
        assert raw.close(sock) == 0


# -- SHM-6: flow control --------------------------------------------------------------------------


@pytest.mark.req("SHM-6", "SHM-5")
def test_a_reader_that_stops_stops_its_writer_and_nothing_is_lost(inst: Instance, a: Raw,
                                                                  b: Raw) -> None:
    """The server reads but returns no buffer: the client's SENDs stop being answered once
    the server's share of its slice is full; MSG_DONTWAIT then gets EAGAIN; when the
    buffers come back the SENDs go on, and every byte arrives once, in order."""
    lst, s, c = pair(a, b)
    data = os.urandom(16 << 20)
    off, inflight, held = 0, [], []
    got = bytearray()
    deadline = time.monotonic() + 10
    while True:  # fill: post while answered, hold every EV_DATA
        assert time.monotonic() < deadline, "the writer never had to wait"
        while len(inflight) < 4 and off < len(data):
            inflight.append(b.t.post(Op.SEND, c, 0, data[off:off + CHUNK]))
            off += CHUNK
        time.sleep(0.05)
        inflight = [k for k in inflight if answered(b, k) is None]
        for ev in take(a, s):
            assert ev.op == Op.EV_DATA
            held.append(ev)
        if len(inflight) == 4:
            time.sleep(0.2)
            inflight = [k for k in inflight if answered(b, k) is None]
            if len(inflight) == 4:
                break
    assert off < len(data), "16 MiB fitted: nothing made the writer wait"
    held += take(a, s)
    assert b.t.do(Op.SEND, c, MSG_DONTWAIT, b"x") == -errno.EAGAIN  # behind waiting SENDs
    for ev in held:
        got += a.t.payload(ev)
        a.t.buf_return(ev)
    assert len(got) <= off
    rest = transfer_tail(b, c, a, s, data, off, inflight, len(got))
    got += rest
    assert digest(bytes(got)) == digest(data)
    counters_reach(inst, b.vm, shm_bytes_out=len(data))
    for raw, sock in ((a, s), (a, lst), (b, c)):
        assert raw.close(sock) == 0


def transfer_tail(tx: Raw, ts: int, rx: Raw, rs: int, data: bytes, off: int,
                  inflight: list[tuple[int, int]], have: int, timeout: float = 30.0) -> bytes:
    """Continue a transfer: SENDs still in flight, then data[off:]; what arrives (``have``
    bytes arrived before)."""
    got = bytearray()
    need = len(data) - have
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "stuck"
        while len(inflight) < 4 and off < len(data):
            inflight.append(tx.t.post(Op.SEND, ts, 0, data[off:off + CHUNK]))
            off += CHUNK
        inflight = [k for k in inflight if answered(tx, k) is None]
        for ev in take(rx, rs):
            assert ev.op == Op.EV_DATA, ev
            got += rx.t.payload(ev)
            rx.t.buf_return(ev)
        if off >= len(data) and not inflight and len(got) >= need:
            return bytes(got)
        time.sleep(0.0005)


# -- SHM-8, SHM-9: ends ---------------------------------------------------------------------------


@pytest.mark.req("SHM-8")
def test_shutdown_and_close_give_the_peer_fin_after_the_data(inst: Instance, a: Raw,
                                                             b: Raw) -> None:
    """SENDs wait in the NSM (no ACCEPT yet) when SHUT_WR comes: it is answered at once,
    and the server gets every byte, then EV_FIN. CLOSE gives the client EV_FIN too."""
    lst, port = a.listener()
    c = b.connect(port)
    payload = os.urandom(200_000)
    sends = [b.t.post(Op.SEND, c, 0, payload[i:i + CHUNK]) for i in range(0, len(payload), CHUNK)]
    time.sleep(0.1)  # SHUTDOWN travels on JOB: the SENDs (on SEND) are in the NSM by now
    assert not any(b.t.has_reply(*k) for k in sends)
    assert b.t.do(Op.SHUTDOWN, c, socket.SHUT_WR) == 0  # answered; the FIN follows the bytes
    s, _ = a.accept(lst)
    got, fin = a.recv(s, len(payload) + 1)
    assert fin and got == payload
    assert all(b.t.reply(*k).result > 0 for k in sends)
    assert b.send(c, b"late") == -errno.EPIPE
    assert a.send(s, b"half open") == 9  # the other direction still works
    assert b.recv(c, 9) == (b"half open", False)
    assert a.close(s) == 0
    assert b.recv(c, 1) == (b"", True)
    assert a.t.quiet(of(s), 0.05)
    assert b.close(c) == 0
    assert a.close(lst) == 0
    counters_reach(inst, a.vm, paired=1, paired_now=0)


@pytest.mark.req("SHM-8")
def test_sends_waiting_at_close_are_ebadf(inst: Instance, a: Raw, b: Raw) -> None:
    lst, port = a.listener()
    c = b.connect(port)  # never accepted: its SENDs wait (SHM-5)
    waiting = [b.t.post(Op.SEND, c, 0, b"x" * 100) for _ in range(3)]
    time.sleep(0.05)
    assert not any(b.t.has_reply(*k) for k in waiting)
    assert b.close(c) == 0
    assert {b.t.reply(*k).result for k in waiting} == {-errno.EBADF}
    s, _ = a.accept(lst)  # the connection was queued: the server sees it end
    assert a.recv(s, 1) == (b"", True)
    for sock in (s, lst):
        assert a.close(sock) == 0


@pytest.mark.req("SHM-9")
def test_an_abortive_close_resets_the_peer(inst: Instance, a: Raw, b: Raw) -> None:
    lst, s, c = pair(a, b)
    assert b.send(c, b"unread") == 6
    ev = a.t.event(of(s, Op.EV_DATA))
    a.t.buf_return(ev)
    assert a.close(s, CLOSE_ABORT) == 0
    ev = b.t.event(of(c))
    assert (ev.op, ev.result) == (Op.EV_ERROR, -errno.ECONNRESET), ev
    assert b.t.quiet(of(c), 0.05)
    assert b.close(c) == 0
    assert a.close(lst) == 0


@pytest.mark.req("SHM-9")
def test_data_sent_to_a_closed_end_resets_the_sender(inst: Instance, a: Raw, b: Raw) -> None:
    lst, s, c = pair(a, b)
    assert a.close(s) == 0
    assert b.t.event(of(c)).op == Op.EV_FIN
    assert b.send(c, b"to nobody") == 9  # taken, as TCP takes it before the RST comes
    ev = b.t.event(of(c))
    assert (ev.op, ev.result) == (Op.EV_ERROR, -errno.ECONNRESET), ev
    assert b.send(c, b"again") == -errno.EPIPE
    assert b.close(c) == 0
    assert a.close(lst) == 0
    counters_reach(inst, b.vm, shm_bytes_out=0)


@pytest.mark.req("SHM-9")
def test_a_listener_closed_with_paired_connections_queued_resets_their_clients(
        inst: Instance, a: Raw, b: Raw) -> None:
    lst, port = a.listener()
    clients = [b.connect(port) for _ in range(3)]
    counters_reach(inst, b.vm, paired=3)
    waiting = b.t.post(Op.SEND, clients[0], 0, b"never accepted")
    time.sleep(0.1)  # in the NSM, waiting for an ACCEPT (SHM-5)
    assert not b.t.has_reply(*waiting)
    assert a.close(lst) == 0
    for c in clients:
        ev = b.t.event(of(c, Op.EV_ERROR))
        assert ev.result == -errno.ECONNRESET
    assert b.t.reply(*waiting).result == 14
    for c in clients:
        assert b.close(c) == 0
    counters_reach(inst, b.vm, paired=3, paired_now=0)


@pytest.mark.req("SHM-8", "NSM-12")
def test_a_detached_tenants_paired_ends_close_their_peers(inst: Instance, b: Raw) -> None:
    """A tenant hangs up engine.sock: its paired ends close as close(2) would: the peers
    get EV_FIN within a second; a client still queued at its listener is reset."""
    t = RawTenant(inst.dir, name="shm-leaving")
    x = Raw(t)
    lst, s, c = pair(x, b)
    lst2, port2 = x.listener()
    queued = b.connect(port2)
    mine, other_port = b.listener()
    out = x.connect(other_port)
    theirs, _ = b.accept(mine)
    dropped = rejected(inst)
    gone = time.monotonic()
    t.close()
    assert b.t.event(of(c), 1.0).op == Op.EV_FIN
    assert b.t.event(of(theirs), 1.0).op == Op.EV_FIN
    ev = b.t.event(of(queued), 1.0)
    assert (ev.op, ev.result) == (Op.EV_ERROR, -errno.ECONNRESET)
    assert time.monotonic() - gone < 1.0
    for sock in (c, queued, theirs, mine):
        assert b.close(sock) == 0
    time.sleep(0.05)
    assert rejected(inst) == dropped, "events of a tenant that is gone (NSM-12)"
    del lst, s, lst2, out


@pytest.mark.req("SHM-2", "NSM-4")
def test_a_connect_that_collects_a_failed_one_is_linuxs(inst: Instance, a: Raw, b: Raw) -> None:
    """After a refused connect, Linux's next connect() collects the failure (ECONNABORTED,
    the socket disconnected), even to a listening address; only the one after pairs."""
    lst, port = a.listener()
    with socket.socket() as probe:
        probe.bind((LOOP, 0))
        closed = probe.getsockname()[1]
    with socket.socket() as linux:  # the oracle
        linux.setblocking(False)
        assert linux.connect_ex((LOOP, closed)) == errno.EINPROGRESS
        time.sleep(0.1)
        assert linux.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
        assert linux.connect_ex((LOOP, port)) == errno.ECONNABORTED
    c = b.socket()
    assert b.t.do(Op.CONNECT, c, data=sa4(LOOP, closed)) == -errno.ECONNREFUSED
    assert b.t.do(Op.CONNECT, c, data=sa4(LOOP, port)) == -errno.ECONNABORTED
    assert b.t.do(Op.CONNECT, c, data=sa4(LOOP, port)) == 0
    s, _ = a.accept(lst)
    counters_reach(inst, b.vm, paired=1)
    for raw, sock in ((a, s), (a, lst), (b, c)):
        assert raw.close(sock) == 0


# -- through GuestLib -----------------------------------------------------------------------------


@pytest.mark.req("SHM-2", "SHM-5", "SHM-8", "SHM-7")
def test_two_guestlib_processes_talk_over_a_paired_connection(
        inst: Instance, guestlib: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes, two tenants, the target's GuestLib: 8 MiB each way through a paired
    connection (sha256), the end of stream after the data, counted as shm bytes."""
    monkeypatch.setenv("NETKERNEL_INSTANCE", inst.name)
    size = 8 << 20
    data = os.urandom(1 << 20) * 8
    with guestlib.create_server((LOOP, 0)) as srv:
        srv.settimeout(10)
        port = srv.getsockname()[1]
        (entry,) = [t for t in inst.status()["tenants"] if t["pid"] == os.getpid()
                    and not str(t["name"]).startswith(("shm-", "conformance-"))]
        vm = int(entry["id"])  # this process's GuestLib device: the server's tenant
        before = counters(inst, vm)
        code = f"import importlib\ngl = importlib.import_module({guestlib.__name__!r})\n"
        code += textwrap.dedent(f"""
            import hashlib, socket, sys
            data = sys.stdin.buffer.read()
            c = gl.create_connection(("{LOOP}", {port}), timeout=20)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            got, n = hashlib.sha256(), 0
            while chunk := c.recv(1 << 16):
                got.update(chunk)
                n += len(chunk)
            c.close()
            print(n, got.hexdigest())
        """)
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=False,
                                env=dict(os.environ, NETKERNEL_INSTANCE=inst.name))
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(data)
        proc.stdin.close()
        s, _ = srv.accept()
        with s:
            s.settimeout(20)
            got = bytearray()
            while chunk := s.recv(1 << 20):
                got += chunk
            assert len(got) == size and digest(bytes(got)) == digest(data)
            s.sendall(bytes(got))
        out = proc.stdout.read().decode().split()
        assert proc.wait(20) == 0
    assert out == [str(size), digest(data)]

    def grew() -> bool:
        now = counters(inst, vm)
        return (now.get("shm_bytes_in", 0) - before.get("shm_bytes_in", 0) >= size
                and now.get("shm_bytes_out", 0) - before.get("shm_bytes_out", 0) >= size)
    wait_until("the tenant's shm byte counters grew", grew, 5.0, 0.05)
