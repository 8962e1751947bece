"""The NSM role (spec/nsm.md) and its side of the control protocol (spec/runtime.md).

Two harnesses, both in :mod:`netkernel.conformance.runtime`:

* through a real CoreEngine: the session's instance runs the target's NSM and
  the suite attaches *raw tenants* that write NQEs into their own device and
  read the replies and events, with Linux sockets on loopback as the peers
  and as the oracle of every result. The CoreEngine's per-NSM counters show
  whatever it had to drop (a reply matching no call, an event of an unknown
  socket, a buffer outside the slice);
* :class:`~netkernel.conformance.runtime.EngineDouble`: the suite in the
  CoreEngine's place, for what a real CoreEngine would check first and so
  hide (bad buffers, malformed calls, the ring a reply takes, order across
  rings, TENANT_MAP itself).

``--target exec:CMD`` runs these tests on any NSM program (targets.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netkernel.conformance.plugin import _role
from netkernel.conformance.runtime import (
    DGRAM,
    GRANULE,
    LOOP,
    LOOP6,
    STREAM,
    STREAM6,
    EngineDouble,
    Instance,
    RawTenant,
    Runtime,
    opt,
    parse_sa,
    peer_sees,
    sa4,
    sa6,
    wait_until,
)
from netkernel.conformance.targets import Process, Target
from netkernel.reference import bufpool
from netkernel.reference import device as dev
from netkernel.reference.nqe import CLOSE_ABORT, NQE, Op

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
ACCEPT_NOWAIT = 1 << 32
REPLY = 0x80
#: DEV-8: the ring an NSM answers on, for the ring a call came in on.
PAIRED = {dev.RingId.COMPLETION: dev.RingId.JOB, dev.RingId.RECEIVE: dev.RingId.SEND}


def of(sock: int, op: Op | None = None) -> Callable[[NQE], bool]:
    return lambda e: e.sock_id == sock and (op is None or e.op == op)


def free_port(kind: int = socket.SOCK_STREAM, host: str = LOOP) -> int:
    with socket.socket(AF_INET6 if ":" in host else AF_INET, kind) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def nsm_counters(inst: Instance) -> dict[str, Any]:
    """The CoreEngine's counters of the instance's (first) NSM (CE-23)."""
    nsms = inst.status()["nsms"]
    assert nsms, "no NSM is attached"
    counters: dict[str, Any] = nsms[0]["counters"]
    return counters


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def inst(nsm: Any, nk_runtime: Runtime) -> Instance:
    """The session's instance: the reference CoreEngine (or the target's) and the NSM."""
    return nk_runtime.shared()


@pytest.fixture
def tenant(inst: Instance) -> Iterator[RawTenant]:
    t = RawTenant(inst.dir)
    try:
        yield t
    finally:
        t.close()


class Raw:
    """Socket calls of a raw tenant, one NQE each (spec/nqe.md op table)."""

    def __init__(self, t: RawTenant) -> None:
        self.t = t

    def socket(self, op_data: int = STREAM) -> int:
        sid = self.t.new_id()
        assert self.t.do(Op.SOCKET, sid, op_data) == 0
        return sid

    def bind(self, s: int, addr: bytes) -> int:
        return self.t.do(Op.BIND, s, data=addr)

    def name(self, s: int, peer: bool = False) -> tuple[str, int]:
        rc = self.t.do(Op.GETPEERNAME if peer else Op.GETSOCKNAME, s, out=28)
        assert rc > 0, rc
        return parse_sa(self.t.last_out)

    def listener(self, family: int = AF_INET) -> tuple[int, int]:
        s = self.socket(STREAM if family == AF_INET else STREAM6)
        assert self.bind(s, sa4(LOOP, 0) if family == AF_INET else sa6(LOOP6, 0)) == 0
        assert self.t.do(Op.LISTEN, s, 16) == 0
        return s, self.name(s)[1]

    def connected(self, server: socket.socket) -> tuple[int, socket.socket]:
        """A TCP connection from the NSM to a Linux listener: (socket ID, the Linux end)."""
        s = self.socket()
        assert self.t.do(Op.CONNECT, s, data=sa4(*server.getsockname())) == 0
        server.settimeout(5)
        peer, _ = server.accept()
        return s, peer

    def close(self, s: int) -> int:
        return self.t.do(Op.CLOSE, s)


@pytest.fixture
def raw(tenant: RawTenant) -> Raw:
    return Raw(tenant)


@pytest.fixture
def linux_listener() -> Iterator[socket.socket]:
    with socket.create_server((LOOP, 0), backlog=64) as srv:
        yield srv


# -- RT: the NSM as a client of the control protocol -------------------------------------------


def _is_or_descends_from(pid: int, ancestor: int) -> bool:
    """The attach names "the pid of its process": a wrapper's child counts as the process."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rpartition(")")[2].split()[1])
    return False


@pytest.mark.req("NSM-1", "RT-1", "RT-3")
def test_nsm_attaches_to_its_instance_and_serves(nsm: Any, inst: Instance,
                                                 raw: Raw) -> None:
    """Started with the instance's name only, the NSM attached as kind nsm with its pid,
    and serves: a raw tenant's first socket call is answered."""
    (entry,) = inst.status()["nsms"]
    assert _is_or_descends_from(int(entry["pid"]), inst.nsms[0].pid), entry
    assert Path(entry["path"]).parent == inst.dir
    s = raw.socket()
    assert raw.bind(s, sa4(LOOP, 0)) == 0
    assert raw.name(s)[0] == LOOP
    assert raw.close(s) == 0


# -- exactly one reply per call ---------------------------------------------------------------


@pytest.mark.req("NSM-3")
def test_every_call_is_answered_exactly_once(nsm: Any, inst: Instance, tenant: RawTenant,
                                             raw: Raw) -> None:
    """Hundreds of calls in flight at once, on many sockets and tags: each gets one reply,
    with its tag, and the CoreEngine never had to drop a reply (CE-11)."""
    before = nsm_counters(inst)
    socks = [raw.socket() for _ in range(8)]
    posted: list[tuple[Op, tuple[int, int]]] = []
    for round_ in range(12):  # 96 calls in flight: within the send half (128 granules)
        for s in socks:
            op = (Op.GETSOCKNAME, Op.SETSOCKOPT, Op.GETSOCKOPT)[round_ % 3]
            if op is Op.SETSOCKOPT:
                key = tenant.post(op, s, opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                                  struct.pack("i", 1))
            elif op is Op.GETSOCKOPT:
                key = tenant.post(op, s, opt(socket.SOL_SOCKET, socket.SO_TYPE), out=4)
            else:
                key = tenant.post(op, s, out=28)
            posted.append((op, key))
    for op, key in posted:
        rep = tenant.reply(*key)
        assert (rep.op, rep.sock_id, rep.tag) == (op | REPLY, *key)
        assert rep.result == (0 if op is Op.SETSOCKOPT else 4 if op is Op.GETSOCKOPT else 16)
    for s in socks:
        assert raw.close(s) == 0
    time.sleep(0.05)
    tenant.pump()
    assert not tenant.replies, f"replies nobody asked for: {tenant.replies}"
    after = nsm_counters(inst)
    assert after["rejected"] == before["rejected"], "the CoreEngine dropped NSM replies"
    assert inst.status()["in_flight"] == 0


# -- results are Linux's ----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


class LinuxCalls:
    """The oracle: the calls of the op table as system calls on real non-blocking sockets
    (NQE-level arguments: sockaddr bytes in, result or -errno out, like a reply's op_data).

    A connect that is in progress is completed as NSM-4 says: wait for writability, then
    the result is the pending error (SO_ERROR).
    """

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self.last_out = b""

    def _rc(self, rc: int) -> int:
        return -ctypes.get_errno() if rc < 0 else rc

    def do(self, op: Op, sock: int, op_data: int = 0, data: bytes = b"", out: int = 0) -> int:
        if op is Op.SOCKET:
            fd = _libc.socket(op_data & 0xFFFF, (op_data >> 16) & 0xFFFF | socket.SOCK_NONBLOCK,
                              op_data >> 32)
            if fd < 0:
                return -ctypes.get_errno()
            self.fds[sock] = fd
            return 0
        fd = self.fds[sock]
        buf = ctypes.create_string_buffer(data, max(len(data), out) or 1)
        size = ctypes.c_uint32(max(len(data), out))
        match op:
            case Op.BIND:
                return self._rc(_libc.bind(fd, buf, len(data)))
            case Op.CONNECT:
                rc = self._rc(_libc.connect(fd, buf, len(data)))
                if rc != -errno.EINPROGRESS:
                    return rc
                select.select([], [fd], [], 5.0)
                with socket.socket(fileno=os.dup(fd)) as view:
                    return -view.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            case Op.LISTEN:
                return self._rc(_libc.listen(fd, op_data))
            case Op.SHUTDOWN:
                return self._rc(_libc.shutdown(fd, op_data))
            case Op.SETSOCKOPT:
                return self._rc(_libc.setsockopt(fd, op_data & 0xFFFF_FFFF, op_data >> 32, buf,
                                                 len(data)))
            case Op.GETSOCKOPT | Op.GETSOCKNAME | Op.GETPEERNAME:
                if op is Op.GETSOCKOPT:
                    rc = _libc.getsockopt(fd, op_data & 0xFFFF_FFFF, op_data >> 32, buf,
                                          ctypes.byref(size))
                else:
                    fn = _libc.getsockname if op is Op.GETSOCKNAME else _libc.getpeername
                    rc = fn(fd, buf, ctypes.byref(size))
                if rc < 0:
                    return -ctypes.get_errno()
                self.last_out = buf.raw[:min(size.value, out)]
                return size.value  # the length Linux reports: the full one for an address
            case Op.CLOSE:
                os.close(self.fds.pop(sock))
                return 0
        raise AssertionError(f"no oracle for {op!r}")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


#: Call sequences: (op, op_data, data). Addresses: "LISTEN" (a Linux listener), "BUSY"
#: (a port a Linux socket holds), "CLOSED" (nothing listens), "UDP" (a Linux UDP socket).
SEQUENCES: dict[str, list[tuple[Op, int, Any]]] = {
    "tcp-bind-listen": [
        (Op.BIND, 0, ("v4", LOOP, 0)), (Op.BIND, 0, ("v4", LOOP, 0)), (Op.LISTEN, 5, None),
        (Op.GETSOCKNAME, 0, 28), (Op.GETPEERNAME, 0, 28), (Op.CONNECT, 0, "LISTEN"),
        (Op.SHUTDOWN, socket.SHUT_RDWR, None), (Op.LISTEN, 5, None),
        (Op.GETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 4),
    ],
    "tcp-refused": [
        (Op.CONNECT, 0, "CLOSED"), (Op.GETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_ERROR), 4),
        (Op.CONNECT, 0, "CLOSED"), (Op.GETPEERNAME, 0, 28), (Op.SHUTDOWN, socket.SHUT_WR, None),
        (Op.LISTEN, 1, None),
    ],
    "tcp-bad-addresses": [
        (Op.BIND, 0, "BUSY"), (Op.BIND, 0, ("v4", "192.0.2.1", 0)), (Op.BIND, 0, b"\x02\x00"),
        (Op.BIND, 0, ("v6", LOOP6, 0)), (Op.CONNECT, 0, b"\x02\x00\x00"),
        (Op.SHUTDOWN, 7, None), (Op.GETSOCKNAME, 0, 28),
    ],
    "tcp-connected": [
        (Op.CONNECT, 0, "LISTEN"), (Op.CONNECT, 0, "LISTEN"), (Op.CONNECT, 0, "LISTEN"),
        (Op.GETPEERNAME, 0, 28), (Op.GETPEERNAME, 0, 8),
        (Op.LISTEN, 5, None), (Op.BIND, 0, ("v4", LOOP, 0)),
        (Op.SHUTDOWN, socket.SHUT_WR, None), (Op.SHUTDOWN, socket.SHUT_RD, None),
    ],
    "udp": [
        (Op.LISTEN, 5, None), (Op.GETPEERNAME, 0, 28), (Op.CONNECT, 0, "UDP"),
        (Op.GETPEERNAME, 0, 28), (Op.SHUTDOWN, socket.SHUT_WR, None),
        (Op.CONNECT, 0, b"\x00" * 16), (Op.GETPEERNAME, 0, 28),
        (Op.GETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_TYPE), 4),
    ],
    "options": [
        (Op.SETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_REUSEADDR), struct.pack("i", 1)),
        (Op.GETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_REUSEADDR), 4),
        (Op.SETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_REUSEADDR), b"\x01"),
        (Op.SETSOCKOPT, opt(socket.IPPROTO_TCP, socket.TCP_NODELAY), struct.pack("i", 1)),
        (Op.GETSOCKOPT, opt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 4),
        (Op.SETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_ERROR), struct.pack("i", 1)),
        (Op.GETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_TYPE), 0),
        (Op.GETSOCKOPT, opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 2),
    ],
}
KINDS = {"udp": DGRAM}


@pytest.mark.req("NSM-4")
@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_results_are_linux_results(nsm: Any, raw: Raw, tenant: RawTenant,
                                   linux_listener: socket.socket, name: str) -> None:
    """The same calls, with the same bytes, on the NSM and on Linux: same results, errnos
    and output lengths (the port numbers aside)."""
    with socket.socket() as busy, socket.socket(AF_INET, socket.SOCK_DGRAM) as udp:
        busy.bind((LOOP, 0))
        udp.bind((LOOP, 0))
        named = {"LISTEN": sa4(*linux_listener.getsockname()), "BUSY": sa4(*busy.getsockname()),
                 "CLOSED": sa4(LOOP, free_port()), "UDP": sa4(*udp.getsockname())}
        linux = LinuxCalls()
        try:
            kind = KINDS.get(name, STREAM)
            s = tenant.new_id()
            assert linux.do(Op.SOCKET, 1, kind) == tenant.do(Op.SOCKET, s, kind) == 0
            for i, (op, op_data, arg) in enumerate(SEQUENCES[name]):
                data, out = b"", 0
                if isinstance(arg, str):
                    data = named[arg]
                elif isinstance(arg, tuple):
                    data = (sa4 if arg[0] == "v4" else sa6)(arg[1], arg[2])
                elif isinstance(arg, bytes):
                    data = arg
                elif isinstance(arg, int):
                    out = arg
                want = linux.do(op, 1, op_data, data, out)
                got = tenant.do(op, s, op_data, data, out=out)
                assert got == want, (f"{name} step {i} {op.name}: NSM {_show(got)}, "
                                     f"Linux {_show(want)}")
                if op is Op.GETSOCKOPT and out:
                    assert tenant.last_out == linux.last_out, (name, i)
                elif want > 0:
                    assert tenant.last_out[:2] == linux.last_out[:2], (name, i)  # the family
        finally:
            linux.close()
        assert raw.close(s) == 0


def _show(result: int) -> str:
    return f"-{errno.errorcode.get(-result, -result)}" if result < 0 else str(result)


@pytest.mark.req("NSM-5")
@pytest.mark.parametrize(("domain", "type_", "proto", "want"), [
    (AF_INET, socket.SOCK_STREAM, 0, 0),
    (AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP, 0),
    (AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, socket.IPPROTO_TCP, 0),
    (socket.AF_UNIX, socket.SOCK_STREAM, 0, -errno.EAFNOSUPPORT),
    (socket.AF_PACKET, socket.SOCK_DGRAM, 0, -errno.EAFNOSUPPORT),
    (AF_INET, socket.SOCK_RAW, 0, -errno.EPROTONOSUPPORT),
    (AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, -errno.EPERM),
    (AF_INET, socket.SOCK_SEQPACKET, 0, -errno.ESOCKTNOSUPPORT),
    (AF_INET, socket.SOCK_STREAM, socket.IPPROTO_UDP, -errno.EPROTONOSUPPORT),
    (AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_TCP, -errno.EPROTONOSUPPORT),
    (AF_INET, socket.SOCK_STREAM | 0x40, 0, -errno.EINVAL),
])
def test_socket_creates_v1_sockets_only(nsm: Any, tenant: RawTenant, domain: int, type_: int,
                                        proto: int, want: int) -> None:
    s = tenant.new_id()
    assert tenant.do(Op.SOCKET, s, domain | type_ << 16 | proto << 32) == want
    if want == 0:
        assert tenant.do(Op.CLOSE, s) == 0


# -- connections, data and events -------------------------------------------------------------


@pytest.mark.req("NSM-7", "NSM-15")
def test_connect_and_accept_are_answered_when_done(nsm: Any, raw: Raw, tenant: RawTenant,
                                                   linux_listener: socket.socket) -> None:
    assert tenant.do(Op.CONNECT, raw.socket(), data=sa4(LOOP, free_port())) \
        == -errno.ECONNREFUSED
    s, peer = raw.connected(linux_listener)
    with peer:
        assert raw.name(s, peer=True) == linux_listener.getsockname()
    lst, port = raw.listener()
    assert tenant.do(Op.ACCEPT, lst, tenant.new_id() | ACCEPT_NOWAIT, out=28) == -errno.EAGAIN
    first, second = tenant.new_id(), tenant.new_id()
    waiting = [tenant.post(Op.ACCEPT, lst, first, out=28),
               tenant.post(Op.ACCEPT, lst, second, out=0)]
    time.sleep(0.05)
    assert not tenant.has_reply(*waiting[0]), "ACCEPT answered before any connection came"
    with socket.create_connection((LOOP, port)) as c1, socket.create_connection((LOOP, port)) as c2:
        got = tenant.reply(*waiting[0])
        assert got.result == 16 and parse_sa(tenant.last_out) == c1.getsockname()
        assert tenant.reply(*waiting[1]).result == 0  # no buffer: no address, length 0
        c2.sendall(b"to the second")
        ev = tenant.event(of(second, Op.EV_DATA))
        assert tenant.payload(ev) == b"to the second" and ev.op_data == 0
        tenant.buf_return(ev)
        assert raw.name(first, peer=True) == c1.getsockname()
        # connections that wait for an ACCEPT are announced, then taken the same way
        c3, c4 = (socket.create_connection((LOOP, port)) for _ in range(2))
        wait_until("EV_ACCEPTABLE counts both connections",
                   lambda: tenant.event(of(lst, Op.EV_ACCEPTABLE)).op_data >= 2)
        third, fourth = tenant.new_id(), tenant.new_id()
        assert tenant.do(Op.ACCEPT, lst, third | ACCEPT_NOWAIT, out=28) == 16
        assert parse_sa(tenant.last_out) == c3.getsockname()
        assert tenant.do(Op.ACCEPT, lst, fourth | ACCEPT_NOWAIT, out=4) == 16  # truncated
        assert tenant.last_out == sa4(*c4.getsockname())[:4]
        c4.sendall(b"4")
        assert tenant.payload(tenant.event(of(fourth, Op.EV_DATA))) == b"4"
        c3.close()
        c4.close()
    for sid in (first, second, third, fourth, lst, s):
        assert raw.close(sid) == 0


@pytest.mark.req("NSM-15")
def test_each_connection_no_accept_takes_is_announced(nsm: Any, raw: Raw,
                                                      tenant: RawTenant) -> None:
    """After a non-blocking ACCEPT took the announced connection, the next one that
    arrives is announced again: a server that accepts on EV_ACCEPTABLE never stalls."""
    lst, port = raw.listener()
    taken = []
    with contextlib.ExitStack() as stack:
        for i in range(3):
            c = stack.enter_context(socket.create_connection((LOOP, port)))
            ev = tenant.event(of(lst, Op.EV_ACCEPTABLE))
            assert ev.op_data == 1, f"connection {i}: {ev}"
            sid = tenant.new_id()
            assert tenant.do(Op.ACCEPT, lst, sid | ACCEPT_NOWAIT, out=28) == 16
            assert parse_sa(tenant.last_out) == c.getsockname()
            taken.append(sid)
    for sid in (*taken, lst):
        assert raw.close(sid) == 0


@pytest.mark.req("NSM-15")
def test_stream_data_arrives_in_order_then_fin(nsm: Any, raw: Raw, tenant: RawTenant,
                                               linux_listener: socket.socket) -> None:
    s, peer = raw.connected(linux_listener)
    sent = os.urandom(300_000)
    with peer:
        peer.sendall(sent)
    got = bytearray()
    while True:
        ev = tenant.event(of(s))
        if ev.op == Op.EV_FIN:
            break
        assert ev.op == Op.EV_DATA and ev.op_data == 0, ev
        got += tenant.payload(ev)
        tenant.buf_return(ev)
    assert bytes(got) == sent, "stream bytes out of order, lost or duplicated"
    assert tenant.quiet(of(s), 0.05)
    assert raw.close(s) == 0


@pytest.mark.req("NSM-15")
@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_datagrams_carry_their_source(nsm: Any, raw: Raw, tenant: RawTenant,
                                      family: int) -> None:
    host, sa = (LOOP, sa4) if family == AF_INET else (LOOP6, sa6)
    u = raw.socket(family | socket.SOCK_DGRAM << 16)
    assert raw.bind(u, sa(host, 0)) == 0
    port = raw.name(u)[1]
    with socket.socket(family, socket.SOCK_DGRAM) as peer:
        peer.bind((host, 0))
        for msg in (b"one", b"", b"three" * 100):
            peer.sendto(msg, (host, port))
            ev = tenant.event(of(u, Op.EV_DATA))
            prefix = 16 if family == AF_INET else 28
            assert ev.op_data == prefix
            data = tenant.payload(ev)
            assert parse_sa(data[:prefix]) == peer.getsockname()[:2]
            assert data[prefix:] == msg
            tenant.buf_return(ev)
    assert raw.close(u) == 0


@pytest.mark.req("NSM-15")
def test_asynchronous_errors_are_ev_error(nsm: Any, raw: Raw, tenant: RawTenant,
                                          linux_listener: socket.socket) -> None:
    s, peer = raw.connected(linux_listener)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset
    ev = tenant.event(of(s))
    assert (ev.op, ev.result) == (Op.EV_ERROR, -errno.ECONNRESET)
    u = raw.socket(DGRAM)
    assert tenant.do(Op.CONNECT, u, data=sa4(LOOP, free_port(socket.SOCK_DGRAM))) == 0
    assert tenant.do(Op.SEND, u, data=b"nobody listens") == len(b"nobody listens")
    ev = tenant.event(of(u))
    assert (ev.op, ev.result) == (Op.EV_ERROR, -errno.ECONNREFUSED)
    for sid in (s, u):
        assert raw.close(sid) == 0


class _Flood:
    """Peers that each write ``total`` bytes to a tenant socket, over small kernel
    buffers so that the stack holds little and the slice fills; what the tenant was
    lent is checked (inside the slice, on granules, no overlap) and counted."""

    def __init__(self, inst: Instance, raw: Raw, tenant: RawTenant,
                 listener: socket.socket, peers: int) -> None:
        self.tenant = tenant
        small = struct.pack("i", 64 << 10)
        self.conns: list[tuple[int, socket.socket]] = []
        for _ in range(peers):
            s = raw.socket()
            assert tenant.do(Op.SETSOCKOPT, s, opt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                             small) == 0
            assert tenant.do(Op.CONNECT, s, data=sa4(*listener.getsockname())) == 0
            peer, _ = listener.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
            self.conns.append((s, peer))
        (grant,) = [g for g in inst.status()["grants"] if g["vm_id"] == tenant.id]
        self.slice = bufpool.Span(grant["offset"], grant["size"])
        self.total = self.slice.size  # per peer: `peers` slices' worth in all
        self.written = [0] * peers
        self.sent = [hashlib.sha256() for _ in self.conns]
        self.received = [hashlib.sha256() for _ in self.conns]
        self.counts = [0] * peers
        self.index = {s: i for i, (s, _) in enumerate(self.conns)}
        self.held: list[NQE] = []
        self.threads = [threading.Thread(target=self._write, args=(i, p), daemon=True)
                        for i, (_, p) in enumerate(self.conns)]
        for t in self.threads:
            t.start()

    def _write(self, i: int, peer: socket.socket) -> None:
        for chunk in itertools.count():
            if self.written[i] >= self.total:
                break
            block = hashlib.sha256(f"{i}/{chunk}".encode()).digest() * 2048  # 64 KiB
            peer.sendall(block)
            self.sent[i].update(block)
            self.written[i] += len(block)
        peer.close()

    def ours(self, ev: NQE) -> bool:
        return ev.sock_id in self.index

    def hold(self) -> None:
        """Take EV_DATA and return nothing, until the NSM has nothing left to lend."""
        while not self.tenant.quiet(self.ours, 0.3):
            for ev in [e for e in self.tenant.events if self.ours(e)]:
                self.tenant.events.remove(ev)
                assert ev.op == Op.EV_DATA, ev
                assert bufpool.within(self.slice, ev.data_ptr, ev.size), (ev, self.slice)
                assert (ev.data_ptr - self.slice.offset) % self.tenant.geo.buf_size == 0, ev
                for other in self.held:
                    assert (ev.data_ptr + ev.size <= other.data_ptr
                            or other.data_ptr + other.size <= ev.data_ptr), (ev, other)
                self.held.append(ev)

    def _take(self, ev: NQE) -> None:
        i = self.index[ev.sock_id]
        self.received[i].update(self.tenant.payload(ev))
        self.counts[i] += ev.size
        self.tenant.buf_return(ev)

    def drain(self, raw: Raw) -> None:
        """Return what is held, read every byte to the FINs: each arrived, in order, once."""
        for ev in self.held:
            self._take(ev)
        fins = 0
        while fins < len(self.conns):
            ev = self.tenant.event(self.ours, 10.0)
            if ev.op == Op.EV_FIN:
                fins += 1
            else:
                assert ev.op == Op.EV_DATA, ev
                self._take(ev)
        for t in self.threads:
            t.join(5)
        assert self.counts == self.written == [self.total] * len(self.conns)
        assert [h.digest() for h in self.received] == [h.digest() for h in self.sent]
        for s, _ in self.conns:
            assert raw.close(s) == 0


@pytest.mark.req("NSM-16")
def test_a_full_slice_stops_reading_and_nothing_is_dropped(nsm: Any, inst: Instance, raw: Raw,
                                                           tenant: RawTenant,
                                                           linux_listener: socket.socket) -> None:
    """Three peers write more than the slice holds while the tenant returns nothing: the
    NSM lends at most the slice, on granules, without overlap, and stops; TCP holds the
    peers back; once buffers come back every byte arrives, in order, once."""
    before = nsm_counters(inst)
    flood = _Flood(inst, raw, tenant, linux_listener, 3)
    flood.hold()
    assert 0 < sum(e.size for e in flood.held) <= flood.slice.size
    assert all(w < flood.total for w in flood.written), "the NSM kept reading with no buffer free"
    flood.drain(raw)
    assert nsm_counters(inst)["rejected"] == before["rejected"], \
        "the CoreEngine dropped EV_DATA outside the slice or overlapping held buffers"


@pytest.mark.req("NSM-18", "NSM-16")
def test_a_socket_holding_nothing_still_receives_beside_full_ones(
        nsm: Any, inst: Instance, raw: Raw, tenant: RawTenant,
        linux_listener: socket.socket) -> None:
    """iperf3's control connection beside its unread data streams: three peers write more
    than the slice holds and the tenant returns nothing; then the peer of a fourth
    connection, which holds none of the slice, sends a few bytes: they arrive as EV_DATA
    while the others still hold everything they were lent. Then every byte arrives."""
    control = raw.socket()
    assert tenant.do(Op.CONNECT, control, data=sa4(*linux_listener.getsockname())) == 0
    control_peer, _ = linux_listener.accept()
    flood = _Flood(inst, raw, tenant, linux_listener, 3)
    flood.hold()
    assert all(w < flood.total for w in flood.written), "the NSM kept reading with no buffer free"
    message = b"TEST_END, send the results"
    control_peer.sendall(message)
    got = b""
    while len(got) < len(message):
        ev = tenant.event(lambda e: e.sock_id == control, 5.0)
        assert ev.op == Op.EV_DATA, ev
        got += tenant.payload(ev)
        tenant.buf_return(ev)
    assert got == message
    flood.drain(raw)
    control_peer.close()
    assert tenant.event(lambda e: e.sock_id == control, 5.0).op == Op.EV_FIN
    assert raw.close(control) == 0


def _stalled_connection(raw: Raw, tenant: RawTenant,
                        server: socket.socket) -> tuple[int, socket.socket]:
    """A connection whose peer does not read, with small buffers on both ends."""
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s = raw.socket()
    assert tenant.do(Op.SETSOCKOPT, s, opt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                     struct.pack("i", 4096)) == 0
    assert tenant.do(Op.CONNECT, s, data=sa4(*server.getsockname())) == 0
    peer, _ = server.accept()
    return s, peer


@pytest.mark.req("NSM-6")
def test_sends_wait_for_the_stack_in_order_and_fin_follows(
        nsm: Any, raw: Raw, tenant: RawTenant) -> None:
    with socket.socket() as server:
        server.bind((LOOP, 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.listen(1)
        s, peer = _stalled_connection(raw, tenant, server)
    chunks = [bytes([i]) * (64 << 10) for i in range(16)]
    posted = [tenant.post(Op.SEND, s, 0, c) for c in chunks]
    time.sleep(0.2)
    answered = [p for p in posted if tenant.has_reply(*p)]
    assert len(answered) < len(posted), "every SEND was answered although the peer reads nothing"
    for p in answered:
        assert tenant.replies[p][1].result == 64 << 10, "a SEND answered before it was done"
    assert tenant.do(Op.SEND, s, socket.MSG_DONTWAIT, b"later") == -errno.EAGAIN
    assert tenant.do(Op.SHUTDOWN, s, socket.SHUT_WR) == 0  # at once, with SENDs waiting
    got = bytearray()
    with peer:
        peer.settimeout(10)
        while data := peer.recv(1 << 20):
            got += data
    assert bytes(got) == b"".join(chunks), "bytes lost, reordered, or the FIN overtook them"
    assert [tenant.reply(*p).result for p in posted] == [64 << 10] * len(chunks)
    assert raw.close(s) == 0


@pytest.mark.req("NSM-8")
def test_close_answers_waiting_calls_ebadf(nsm: Any, raw: Raw, tenant: RawTenant) -> None:
    lst, _ = raw.listener()
    accept = tenant.post(Op.ACCEPT, lst, tenant.new_id(), out=28)
    with socket.socket() as server:
        server.bind((LOOP, 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.listen(1)
        s, peer = _stalled_connection(raw, tenant, server)
    sends = [tenant.post(Op.SEND, s, 0, bytes(64 << 10)) for _ in range(8)]
    time.sleep(0.1)
    waiting = [p for p in sends if not tenant.has_reply(*p)]
    assert waiting, "no SEND is waiting: the test cannot show what CLOSE does to them"
    close = tenant.post(Op.CLOSE, s)
    assert tenant.reply(*close).result == 0
    assert {tenant.reply(*p).result for p in waiting} == {-errno.EBADF}
    assert not tenant.has_reply(*accept)
    assert raw.close(lst) == 0
    assert tenant.reply(*accept).result == -errno.EBADF
    with peer:
        peer.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while peer.recv(1 << 20):
                pass  # the connection ended: its peer sees it end
    assert tenant.quiet(of(s), 0.05)


@pytest.mark.req("NSM-8")
def test_close_with_unread_data_resets_the_stream(nsm: Any, raw: Raw, tenant: RawTenant,
                                                   linux_listener: socket.socket) -> None:
    with socket.create_connection(linux_listener.getsockname()) as mine:  # Linux, the oracle
        peer, _ = linux_listener.accept()
        with peer:
            peer.sendall(b"never read")
            time.sleep(0.05)
            mine.close()
            assert peer_sees(peer) == "reset"
    for abort, seen in ((CLOSE_ABORT, "reset"), (0, "eof")):
        s, peer = raw.connected(linux_listener)
        with peer:
            peer.sendall(b"never read")
            ev = tenant.event(of(s, Op.EV_DATA))
            assert tenant.payload(ev) == b"never read"
            tenant.buf_return(ev)  # out of the stack either way: ABORT alone says "unread"
            assert tenant.do(Op.CLOSE, s, abort) == 0
            assert peer_sees(peer) == seen, f"CLOSE with op_data {abort}"
        assert tenant.quiet(of(s), 0.05)


@pytest.mark.req("NSM-9")
@pytest.mark.parametrize(("level", "name", "value"), [
    (socket.SOL_SOCKET, socket.SO_REUSEADDR, struct.pack("i", 1)),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, struct.pack("i", 1)),
    (socket.SOL_SOCKET, socket.SO_RCVBUF, struct.pack("i", 32768)),
    (socket.SOL_SOCKET, socket.SO_SNDBUF, struct.pack("i", 32768)),
    (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
    (socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 10_000)),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, struct.pack("i", 1)),
    (socket.SOL_SOCKET, socket.SO_TYPE, struct.pack("i", 1)),
])
def test_options_of_the_tenants_socket_are_the_stacks(nsm: Any, raw: Raw, tenant: RawTenant,
                                                       level: int, name: int,
                                                       value: bytes) -> None:
    s = raw.socket()
    with socket.socket() as linux:
        try:
            linux.setsockopt(level, name, value)
            want = 0
        except OSError as exc:
            want = -(exc.errno or 0)
        assert tenant.do(Op.SETSOCKOPT, s, opt(level, name), value) == want
        room = len(value)
        assert tenant.do(Op.GETSOCKOPT, s, opt(level, name), out=room) == room
        assert tenant.last_out == linux.getsockopt(level, name, room)
    assert raw.close(s) == 0


SO_ATTACH_BPF, SO_MARK, SO_BINDTODEVICE, SO_ATTACH_FILTER = 50, 36, 25, 26
SO_SNDBUFFORCE, SO_RCVBUFFORCE, IP_TRANSPARENT, TCP_CONGESTION, TCP_ULP = 32, 33, 19, 13, 31


@pytest.mark.req("NSM-9")
@pytest.mark.parametrize(("level", "name", "value"), [
    (socket.SOL_SOCKET, SO_BINDTODEVICE, b"lo\0"),
    (socket.SOL_SOCKET, SO_MARK, struct.pack("i", 7)),
    (socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(16)),
    (socket.SOL_SOCKET, SO_ATTACH_BPF, struct.pack("i", 3)),
    (socket.SOL_SOCKET, SO_SNDBUFFORCE, struct.pack("i", 1 << 20)),
    (socket.SOL_SOCKET, SO_RCVBUFFORCE, struct.pack("i", 1 << 20)),
    (socket.SOL_IP, IP_TRANSPARENT, struct.pack("i", 1)),
    (socket.IPPROTO_TCP, TCP_CONGESTION, b"reno\0"),
    (socket.IPPROTO_TCP, TCP_ULP, b"tls\0"),
    (socket.SOL_SOCKET, socket.SO_REUSEPORT, struct.pack("i", 1)),  # joins other tenants
    (0x7777, 1, struct.pack("i", 1)),
])
def test_options_beyond_the_tenants_socket_are_refused(nsm: Any, raw: Raw, tenant: RawTenant,
                                                        level: int, name: int,
                                                        value: bytes) -> None:
    s = raw.socket()
    assert tenant.do(Op.SETSOCKOPT, s, opt(level, name), value) == -errno.ENOPROTOOPT
    assert tenant.do(Op.GETSOCKOPT, s, opt(level, name), out=16) == -errno.ENOPROTOOPT
    assert raw.close(s) == 0


# -- tenants coming and going -------------------------------------------------------------------


@pytest.mark.req("NSM-12", "RT-4")
def test_a_detached_tenants_sockets_are_closed_within_a_second(
        nsm: Any, inst: Instance, linux_listener: socket.socket) -> None:
    """A tenant hangs up engine.sock: the CoreEngine detaches it (RT-4) and its NSM closes
    its connection, listener and UDP socket (NSM-12) - within 1 s - and answers the
    TENANT_UNMAP."""
    rejected = nsm_counters(inst)["rejected"]
    t = RawTenant(inst.dir)
    r = Raw(t)
    _, peer = r.connected(linux_listener)
    _, port = r.listener()
    u = r.socket(DGRAM)
    assert r.bind(u, sa4(LOOP, 0)) == 0
    uport = r.name(u)[1]
    path = t.path
    gone = time.monotonic()
    t.close()
    wait_until("the device file is removed", lambda: not path.exists(), 1.0)
    peer.settimeout(1.0)
    with peer, contextlib.suppress(ConnectionResetError):
        assert peer.recv(10) == b""
    assert time.monotonic() - gone < 1.0

    def free(kind: int, p: int) -> bool:
        with socket.socket(AF_INET, kind) as probe:
            try:
                probe.bind((LOOP, p))
            except OSError:
                return False
            return True
    wait_until("the tenant's ports are free", lambda: free(socket.SOCK_STREAM, port)
               and free(socket.SOCK_DGRAM, uport), 1.0 - (time.monotonic() - gone))

    def unmapped() -> bool:  # every TENANT_MAP answered is matched by a grant or an unmap
        st = inst.status()
        ops = st["nsms"][0]["counters"]["ops"]
        return (ops.get("TENANT_MAP|REPLY", 0) - ops.get("TENANT_UNMAP|REPLY", 0)
                == len(st["grants"]))
    wait_until("the NSM answers TENANT_UNMAP", unmapped, 1.0)
    assert not any(x["id"] == t.id for x in inst.status()["tenants"])
    time.sleep(0.05)
    assert nsm_counters(inst)["rejected"] == rejected, "events of a tenant that is gone"


# -- the suite in the CoreEngine's place ---------------------------------------------------------


@pytest.fixture(scope="module")
def double_nsm(target: Target, nk_runtime: Runtime) -> Iterator[tuple[EngineDouble, Process]]:
    """The target's NSM, attached to the suite's engine double (one for the module)."""
    launcher = _role(target, "nsm")
    d = EngineDouble()
    proc = launcher.start(d.name, nk_runtime.logs / f"{d.name}-nsm.log")
    try:
        d.serve_attach()
        yield d, proc
    finally:
        proc.stop(2.0)
        d.close()


_vms = itertools.count(2)


@pytest.fixture
def double(nsm: Any, double_nsm: tuple[EngineDouble, Process]) -> EngineDouble:
    d, proc = double_nsm
    assert proc.alive(), "the NSM died"
    return d


@pytest.fixture
def vm(double: EngineDouble) -> int:
    """A tenant of its own for the test, mapped into the NSM."""
    v = next(_vms)
    assert double.map_tenant(v) == 0
    return v


def wire(op: int, *, qset: int = 0, vm: int = 0, sock: int = 0, op_data: int = 0,
         ptr: int = 0, size: int = 0, tag: int = 0, reserved: bytes = bytes(3)) -> bytes:
    """32 bytes of an NQE as they are (NQE-2), malformed ones included."""
    return struct.pack("<BBBIQQIH3s", op, qset, vm, sock, op_data & ((1 << 64) - 1),
                       ptr & ((1 << 64) - 1), size, tag, reserved)


@pytest.mark.req("NSM-1", "RT-3")
def test_nsm_attaches_with_its_kind_and_pid(double: EngineDouble,
                                            double_nsm: tuple[EngineDouble, Process]) -> None:
    hello = double.hello
    assert hello["cmd"] == "attach" and hello["kind"] == "nsm"
    assert isinstance(hello.get("name", ""), str)
    assert _is_or_descends_from(int(hello["pid"]), double_nsm[1].pid), hello


@pytest.mark.req("NSM-3")
def test_replies_echo_the_call_on_the_paired_ring(double: EngineDouble, vm: int) -> None:
    for qset in (0, 1):
        sock = 40 + qset
        ring, rep = double.call(Op.SOCKET, vm, sock, STREAM, qset=qset, tag=0xBEEF)
        assert (ring, rep.op, rep.qset, rep.sock_id, rep.tag, rep.result) == (
            dev.RingId.JOB, Op.SOCKET | REPLY, qset, sock, 0xBEEF, 0)
        ring, rep = double.call(Op.SEND, vm, sock, socket.MSG_DONTWAIT, b"x", qset=qset, tag=7)
        assert (ring, rep.op, rep.qset, rep.sock_id, rep.tag) == (
            dev.RingId.SEND, Op.SEND | REPLY, qset, sock, 7)
        assert rep.result == -errno.EPIPE  # what Linux says to a send before connect
        ring, rep = double.call(Op.CLOSE, vm, sock, qset=qset, tag=0xFFFF)
        assert (ring, rep.op, rep.qset, rep.sock_id, rep.tag, rep.result) == (
            dev.RingId.JOB, Op.CLOSE | REPLY, qset, sock, 0xFFFF, 0)
    time.sleep(0.05)
    double.port.pump()
    extra = [n for _, n in double.port.replies.values() if n.vm_id == vm]
    extra += [e for e in double.port.events if e.vm_id == vm]
    assert not extra, f"an answer nobody asked for: {extra}"


@pytest.mark.req("NSM-12")
def test_unmapping_a_tenant_that_is_not_mapped_changes_nothing(double: EngineDouble,
                                                               vm: int) -> None:
    stranger = next(_vms)  # never mapped
    assert double.call(Op.TENANT_UNMAP, 0, 0, stranger, tag=stranger)[1].result == 0
    assert double.call(Op.SOCKET, vm, 1, DGRAM)[1].result == 0  # the mapped tenant goes on
    assert double.call(Op.TENANT_UNMAP, 0, 0, vm, tag=vm)[1].result == 0
    assert double.call(Op.TENANT_UNMAP, 0, 0, vm, tag=vm)[1].result == 0  # again: nothing


@pytest.mark.req("NSM-11")
def test_tenant_map_maps_the_area_and_takes_the_slice(double: EngineDouble) -> None:
    v = next(_vms)
    half = double.receive_half()
    assert double.map_tenant(v) == 0
    assert double.map_tenant(v) == 0  # the same slice again: nothing changes
    ring, rep = double.call(Op.TENANT_MAP, 0, 0, v, ptr=half.offset, size=GRANULE, tag=v)
    assert (ring, rep.tag, rep.result) == (dev.RingId.SEND, v, -errno.EEXIST)
    missing = next(_vms)  # no device file for it
    _, rep = double.call(Op.TENANT_MAP, 0, 0, missing, ptr=half.offset, size=half.size,
                         tag=missing)
    assert rep.result == -errno.ENOENT
    assert double.call(Op.SOCKET, missing, 1, STREAM)[1].result == -errno.EFAULT  # not mapped
    for ptr, size, want in ((0, GRANULE, -errno.EFAULT),  # the send half
                            (half.offset + 100, GRANULE, -errno.EINVAL)):  # off the granules
        w = next(_vms)
        double.add_tenant(w)
        _, rep = double.call(Op.TENANT_MAP, 0, 0, w, ptr=ptr, size=size, tag=w)
        assert rep.result == want, (ptr, size)
    # the slice is where EV_DATA buffers come from
    sl = bufpool.Span(half.offset + 4 * GRANULE, 8 * GRANULE)
    w = next(_vms)
    double.add_tenant(w)
    assert double.call(Op.TENANT_MAP, 0, 0, w, ptr=sl.offset, size=sl.size, tag=w)[1].result == 0
    assert double.call(Op.SOCKET, w, 1, DGRAM)[1].result == 0
    assert double.call(Op.BIND, w, 1, data=sa4(LOOP, 0))[1].result == 0
    _, rep = double.call(Op.GETSOCKNAME, w, 1, out=16)
    port = parse_sa(bytes(double.tenants[w].data()[rep.data_ptr:rep.data_ptr + 16]))[1]
    with socket.socket(AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"into the slice", (LOOP, port))
        ev = double.port.event(lambda e: e.vm_id == w and e.op == Op.EV_DATA)
    assert bufpool.within(sl, ev.data_ptr, ev.size), (ev, sl)
    assert double.call(Op.CLOSE, w, 1)[1].result == 0


@pytest.mark.req("NSM-17")
def test_a_new_connections_events_wait_for_its_reply(double: EngineDouble, vm: int) -> None:
    port = double.port
    assert double.call(Op.SOCKET, vm, 1, STREAM)[1].result == 0
    assert double.call(Op.BIND, vm, 1, data=sa4(LOOP, 0))[1].result == 0
    assert double.call(Op.LISTEN, vm, 1, 8)[1].result == 0
    _, rep = double.call(Op.GETSOCKNAME, vm, 1, out=16)
    lport = parse_sa(bytes(double.tenants[vm].data()[rep.data_ptr:rep.data_ptr + 16]))[1]
    with socket.create_server((LOOP, 0)) as server:
        port.consume[dev.RingId.JOB] = False  # the CoreEngine is slow to read replies
        try:
            accept = double.post(Op.ACCEPT, vm, 1, 2)
            client = socket.create_connection((LOOP, lport))
            client.sendall(b"early")
            assert double.call(Op.SOCKET, vm, 3, STREAM, ring=dev.RingId.RECEIVE)[1].result == 0
            connect = double.post(Op.CONNECT, vm, 3, data=sa4(*server.getsockname()))
            peer, _ = server.accept()
            peer.sendall(b"early too")
            assert port.quiet(lambda e: e.vm_id == vm and e.sock_id in (2, 3), 0.2), \
                "events of a connection before the CoreEngine read the reply that made it"
        finally:
            port.consume[dev.RingId.JOB] = True
        assert port.wait_reply(*accept)[1].result == 0  # no buffer: no address
        assert port.wait_reply(*connect)[1].result == 0
        for sock, data in ((2, b"early"), (3, b"early too")):
            ev = port.event(lambda e, s=sock: e.vm_id == vm and e.sock_id == s)
            assert ev.op == Op.EV_DATA
            assert bytes(double.tenants[vm].data()[ev.data_ptr:ev.data_ptr + ev.size]) == data
        client.close()
        peer.close()
        for sock in (2, 3):
            ev = port.event(lambda e, s=sock: e.vm_id == vm and e.sock_id == s)
            assert ev.op == Op.EV_FIN, ev
        # a CLOSE is answered only once the socket's events were read
        port.consume[dev.RingId.SEND] = False
        try:
            assert double.call(Op.SOCKET, vm, 4, DGRAM)[1].result == 0
            assert double.call(Op.BIND, vm, 4, data=sa4(LOOP, 0))[1].result == 0
            _, rep = double.call(Op.GETSOCKNAME, vm, 4, out=16)
            uport = parse_sa(bytes(double.tenants[vm].data()[rep.data_ptr:rep.data_ptr + 16]))[1]
            with socket.socket(AF_INET, socket.SOCK_DGRAM) as u:
                u.sendto(b"last words", (LOOP, uport))
            # the NSM has read the datagram and published its EV_DATA, still unread
            wait_until("the NSM publishes the datagram's EV_DATA", lambda: any(
                len(r) for (_, rid), r in port.inp.items() if rid == dev.RingId.SEND), 5.0)
            close = double.post(Op.CLOSE, vm, 4)
            time.sleep(0.2)
            assert not port.has_reply(*close), "CLOSE answered before the socket's events"
        finally:
            port.consume[dev.RingId.SEND] = True
        assert port.wait_reply(*close)[1].result == 0
        order = [(r, n) for r, n in port.seen if n.vm_id == vm and n.sock_id == 4]
        assert [n.op for _, n in order][-2:] == [Op.EV_DATA, Op.CLOSE | REPLY], order
    for sock in (1, 2, 3):
        assert double.call(Op.CLOSE, vm, sock)[1].result == 0


@pytest.mark.req("NSM-8")
def test_a_closed_socket_id_is_ebadf_then_free(double: EngineDouble, vm: int) -> None:
    assert double.call(Op.SOCKET, vm, 7, STREAM)[1].result == 0
    assert double.call(Op.SOCKET, vm, 7, STREAM)[1].result == -errno.EEXIST
    assert double.call(Op.CLOSE, vm, 7)[1].result == 0
    assert double.call(Op.BIND, vm, 7, data=sa4(LOOP, 0))[1].result == -errno.EBADF
    assert double.call(Op.CLOSE, vm, 7)[1].result == -errno.EBADF
    assert double.call(Op.SOCKET, vm, 7, DGRAM)[1].result == 0
    _, rep = double.call(Op.GETSOCKOPT, vm, 7, opt(socket.SOL_SOCKET, socket.SO_TYPE), out=4)
    assert rep.result == 4
    assert struct.unpack("i", bytes(double.tenants[vm].data()[rep.data_ptr:rep.data_ptr + 4])) \
        == (socket.SOCK_DGRAM,)
    assert double.call(Op.CLOSE, vm, 7)[1].result == 0


@pytest.mark.req("NSM-13")
def test_buffers_outside_the_send_half_are_efault_and_untouched(double: EngineDouble,
                                                                vm: int) -> None:
    g = double.TENANT_GEO
    area = double.tenants[vm].data()
    assert double.call(Op.SOCKET, vm, 1, STREAM)[1].result == 0
    sentinel = b"\xa5" * 64
    recv_at = g.send_size + 3 * GRANULE
    area[recv_at:recv_at + 64] = sentinel
    area[g.send_size - 8:g.send_size] = sentinel[:8]
    bad = [(recv_at, 28, "in the receive half"),
           (g.send_size - 8, 28, "across the end of the send half"),
           (g.data_size - 8, 28, "across the end of the area"),
           (g.data_size + GRANULE, 28, "beyond the area"),
           ((1 << 64) - 8, 28, "wrapping around 2**64")]
    for ptr, size, where in bad:
        for op, op_data in ((Op.GETSOCKNAME, 0), (Op.GETPEERNAME, 0), (Op.BIND, 0),
                            (Op.CONNECT, 0), (Op.SETSOCKOPT, opt(1, socket.SO_REUSEADDR)),
                            (Op.GETSOCKOPT, opt(1, socket.SO_TYPE)), (Op.SEND, 0),
                            (Op.ACCEPT, 9)):
            _, rep = double.call(op, vm, 1, op_data, ptr=ptr, size=size)
            assert rep.result == -errno.EFAULT, (op.name, where, rep)
    assert bytes(area[recv_at:recv_at + 64]) == sentinel, "the NSM wrote outside the send half"
    assert bytes(area[g.send_size - 8:g.send_size]) == sentinel[:8]
    # a BUF_RETURN outside the slice, and one of a buffer never lent
    _, rep = double.call(Op.BUF_RETURN, vm, 0, ptr=0, size=GRANULE)
    assert (rep.op, rep.result) == (Op.BUF_RETURN | REPLY, -errno.EFAULT)
    _, rep = double.call(Op.BUF_RETURN, vm, 0, ptr=g.send_size, size=GRANULE)
    assert rep.result == -errno.EINVAL
    assert double.call(Op.CLOSE, vm, 1)[1].result == 0


@pytest.mark.req("NSM-10")
def test_malformed_calls_get_a_receivers_answer(double: EngineDouble, vm: int) -> None:
    port = double.port
    assert double.call(Op.SOCKET, vm, 1, STREAM)[1].result == 0
    cases = [
        (wire(0x3E, vm=vm, sock=1, tag=1), Op.GETSOCKNAME, (0xFF, -errno.ENOSYS)),
        (wire(0x3E, vm=vm, sock=1, tag=2, reserved=b"\x01\0\0"), Op.GETSOCKNAME,
         (0xFF, -errno.ENOSYS)),
        (wire(Op.GETSOCKNAME, vm=vm, sock=1, tag=3, reserved=b"\0\0\x09"), Op.GETSOCKNAME,
         (Op.GETSOCKNAME | REPLY, -errno.EINVAL)),
        (wire(Op.ATTACH, vm=vm, tag=4, op_data=1), Op.ATTACH, (Op.ATTACH | REPLY, -errno.EINVAL)),
        (wire(Op.DETACH, vm=vm, tag=5), Op.DETACH, (Op.DETACH | REPLY, -errno.EINVAL)),
    ]
    for raw, op, want in cases:
        double.post(op, vm, raw=raw)
        sock = struct.unpack_from("<I", raw, 3)[0]
        _, rep = port.wait_reply(sock, raw[27] | raw[28] << 8)
        assert (rep.op, rep.result) == want, (raw.hex(), rep)
    for raw in (wire(Op.SOCKET | REPLY, vm=vm, sock=1, tag=6),
                wire(Op.EV_DATA, vm=vm, sock=1, tag=7, size=GRANULE, ptr=0),
                wire(0xFE, vm=vm, sock=1, tag=8)):
        double.post(Op.SEND, vm, raw=raw)
    time.sleep(0.1)
    port.pump()
    answered = [n for _, n in port.replies.values() if n.vm_id == vm]
    assert not answered and not [e for e in port.events if e.vm_id == vm], \
        f"a reply or an event was answered: {answered}"
    assert double.call(Op.GETSOCKNAME, vm, 1, out=16)[1].result == 16  # still serving
    assert double.call(Op.CLOSE, vm, 1)[1].result == 0


@pytest.mark.req("NSM-14")
def test_tenants_are_kept_apart(double: EngineDouble, vm: int) -> None:
    other = next(_vms)
    assert double.map_tenant(other) == 0
    for v in (vm, other):
        assert double.call(Op.SOCKET, v, 9, STREAM)[1].result == 0
    assert double.call(Op.SOCKET, vm, 11, STREAM)[1].result == 0
    # the same offset in both areas: an IPv4 address in one, an IPv6 one in the other
    ptr = 5 * GRANULE
    double.tenants[vm].data()[ptr:ptr + 16] = sa4(LOOP, 0)
    double.tenants[other].data()[ptr:ptr + 28] = sa6(LOOP6, 0)
    assert double.call(Op.BIND, vm, 9, ptr=ptr, size=16)[1].result == 0
    assert double.call(Op.BIND, other, 9, ptr=ptr, size=16)[1].result == -errno.EAFNOSUPPORT
    _, rep = double.call(Op.GETSOCKNAME, other, 9, out=16)
    assert parse_sa(bytes(double.tenants[other].data()[rep.data_ptr:rep.data_ptr + 16])) \
        == ("0.0.0.0", 0), "tenant B's socket 9 was bound by tenant A's call"
    assert double.call(Op.GETSOCKNAME, other, 11, out=16)[1].result == -errno.EBADF
    for v, socks in ((vm, (9, 11)), (other, (9,))):
        for s in socks:
            assert double.call(Op.CLOSE, v, s)[1].result == 0


# -- the NSM's life ------------------------------------------------------------------------------


@pytest.fixture
def own_instance(nsm: Any, nk_runtime: Runtime) -> Iterator[Instance]:
    """An instance of the test's own: the test ends its processes."""
    inst = nk_runtime.new()
    try:
        yield inst
    finally:
        inst.stop()


@pytest.mark.req("NSM-2", "RT-4")
def test_an_nsm_ends_on_sigterm_and_is_unplugged(own_instance: Instance,
                                                 linux_listener: socket.socket) -> None:
    with RawTenant(own_instance.dir) as t:
        _, peer = Raw(t).connected(linux_listener)
        proc = own_instance.nsms[0]
        proc.signal(signal.SIGTERM)
        assert proc.wait(2.0) == 0, "the NSM did not exit with status 0 on SIGTERM"
        wait_until("the CoreEngine unplugs the NSM (RT-4)",
                   lambda: not own_instance.status()["nsms"], 1.0)
        peer.settimeout(1.0)
        with peer, contextlib.suppress(ConnectionResetError):
            assert peer.recv(10) == b"", "the NSM exited without closing its sockets"


@pytest.mark.req("NSM-2")
def test_an_nsm_ends_with_its_coreengine(own_instance: Instance,
                                         linux_listener: socket.socket) -> None:
    """The CoreEngine crashes: its NSM closes its tenants' sockets and exits within 2 s."""
    t = RawTenant(own_instance.dir)
    _, peer = Raw(t).connected(linux_listener)
    proc = own_instance.nsms[0]
    own_instance.engine.signal(signal.SIGKILL)
    assert own_instance.engine.wait(2.0) is not None
    assert proc.wait(2.0) is not None, "the NSM outlived its CoreEngine by 2 s"
    peer.settimeout(1.0)
    with peer, contextlib.suppress(ConnectionResetError):
        assert peer.recv(10) == b""
    t.close()
