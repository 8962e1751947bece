"""The kernel-stack NSM and ServiceLib against a fake CoreEngine and real Linux sockets.

:class:`FakeCoreEngine` plays the CoreEngine (and the tenant's side of the
data area): it creates an NSM device and a tenant device in a temporary
runtime directory, writes calls into the NSM device's COMPLETION and RECEIVE
rings, and reads replies and events from its JOB and SEND rings. The peers are
plain kernel sockets on 127.0.0.1, and Linux is the oracle for every errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netkernel.conformance.runtime import wait_until
from netkernel.reference import bell, bufpool, ksock, shm
from netkernel.reference import device as dev
from netkernel.reference.nqe import NQE, NQE_STRUCT, OP_UNKNOWN_REPLY, REPLY_BIT, Op, pack, unpack
from netkernel.reference.nsm_kernel import KernelNSM
from netkernel.reference.servicelib import ServiceLib

VM = 3
GRANULE = 4096
LOOP = "127.0.0.1"
STREAM = socket.AF_INET | socket.SOCK_STREAM << 16
DGRAM = socket.AF_INET | socket.SOCK_DGRAM << 16
#: Calls the CoreEngine forwards on RECEIVE (DEV-8); everything else on COMPLETION.
ON_RECEIVE = {Op.SEND, Op.BUF_RETURN, Op.TENANT_MAP, Op.TENANT_UNMAP}
REPLY_RING = {dev.RingId.COMPLETION: dev.RingId.JOB, dev.RingId.RECEIVE: dev.RingId.SEND}


def sockaddr_in(host: str, port: int) -> bytes:
    """NQE-15: the Linux sockaddr_in byte image."""
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(host) \
        + bytes(8)


def sockaddr_in6(host: str, port: int) -> bytes:
    return (struct.pack("<H", socket.AF_INET6) + struct.pack(">HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("<I", 0))


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    family = struct.unpack_from("<H", raw)[0]
    port = struct.unpack_from(">H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntoa(raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def of_sock(sock: int) -> Callable[[NQE], bool]:
    """An event filter: any event of ``sock``."""
    return lambda e: e.sock_id == sock


def opt(level: int, name: int) -> int:
    return level | name << 32


class FakeCoreEngine:
    """The CoreEngine's side of one NSM device, and the tenant's side of one data area."""

    def __init__(self, runtime: Path, *, recv_size: int = 64 << 10,
                 send_size: int = 2 << 20, nsm_qsets: int = 1) -> None:
        self.runtime = runtime
        self.rang = False  # did the last push ring the NSM's bell (it was asleep)?
        self.nsm_geo = dev.Geometry(kind=dev.Kind.NSM, n_qsets=nsm_qsets, ring_entries=64,
                                    data_size=2 * GRANULE, send_size=GRANULE, buf_size=GRANULE)
        self.tenant_geo = dev.Geometry(kind=dev.Kind.TENANT, ring_entries=64,
                                       data_size=send_size + recv_size, send_size=send_size,
                                       buf_size=GRANULE)
        self.nsm_path = runtime / "nsm-1.nk"
        self.nsm = shm.create_device(self.nsm_path, self.nsm_geo, dev_id=1)
        self.nsm.set_header("state", dev.State.READY)
        self.tenant = shm.create_device(runtime / f"vm-{VM}.nk", self.tenant_geo, dev_id=VM)
        self.tenant.set_header("state", dev.State.READY)
        self.sendbufs = bufpool.SendAllocator(self.tenant_geo)
        self._tags = itertools.count(1)
        self._seq = itertools.count()
        self.replies: dict[tuple[int, int], tuple[int, dev.RingId, NQE]] = {}
        self.events: list[tuple[int, NQE]] = []
        self.consume = {dev.RingId.JOB: True, dev.RingId.SEND: True}
        self.bufs: dict[tuple[int, int], bufpool.Span] = {}

    def close(self) -> None:
        self.nsm.close()
        self.tenant.close()

    # -- calls -----------------------------------------------------------------------
    def push(self, nqe: NQE, ring: dev.RingId | None = None) -> None:
        if ring is None:
            ring = dev.RingId.RECEIVE if nqe.op in ON_RECEIVE else dev.RingId.COMPLETION
        r = self.nsm.ring(nqe.qset, ring)
        deadline = time.monotonic() + 5
        while not r.push(pack(nqe)):
            assert time.monotonic() < deadline, "NSM ring stayed full"
            self.pump()
            time.sleep(0.001)
        self.rang = bell.notify(r, self.nsm.bell(nqe.qset, dev.Bell.DEVICE))

    def post(self, op: Op, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
             out: int = 0, vm: int = VM, qset: int = 0) -> tuple[int, int]:
        """Send a request, with ``out`` bytes of room for a result; returns ``(sock, tag)``."""
        tag = next(self._tags) & 0xFFFF or next(self._tags)
        ptr = size = 0
        if data or out:
            span = self.sendbufs.alloc(max(len(data), out))
            assert span is not None
            ptr, size = span.offset, max(len(data), out)
            self.tenant.data()[ptr:ptr + len(data)] = data
            self.bufs[(sock, tag)] = span
        self.push(NQE(op=int(op), qset=qset, vm_id=vm, sock_id=sock, op_data=op_data,
                      data_ptr=ptr, size=size, tag=tag))
        return sock, tag

    def call(self, op: Op, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
             out: int = 0, vm: int = VM, qset: int = 0) -> NQE:
        """Send a request and wait for its reply."""
        return self.reply(*self.post(op, sock, op_data, data, out=out, vm=vm, qset=qset))

    def do(self, op: Op, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
           out: int = 0, vm: int = VM, qset: int = 0) -> int:
        """A call's signed result."""
        return self.call(op, sock, op_data, data, out=out, vm=vm, qset=qset).result

    def reply(self, sock: int, tag: int, timeout: float = 5.0) -> NQE:
        deadline = time.monotonic() + timeout
        while (sock, tag) not in self.replies:
            self.pump()
            if (sock, tag) in self.replies:
                break
            assert time.monotonic() < deadline, f"no reply for sock {sock} tag {tag}"
            time.sleep(0.0005)
        _, _, nqe = self.replies.pop((sock, tag))
        span = self.bufs.pop((sock, tag), None)
        if span is not None:
            self.last_out = bytes(self.tenant.data()[span.offset:span.offset + nqe.size])
            self.sendbufs.free(span.offset)
        return nqe

    def has_reply(self, sock: int, tag: int) -> bool:
        self.pump()
        return (sock, tag) in self.replies

    # -- outputs of the NSM --------------------------------------------------------------
    def pump(self) -> None:
        """Read the NSM's JOB and SEND rings (those being consumed), JOB first."""
        for qset, ring_id in itertools.product(range(self.nsm_geo.n_qsets),
                                               (dev.RingId.JOB, dev.RingId.SEND)):
            if not self.consume[ring_id]:
                continue
            for raw in self.nsm.ring(qset, ring_id).pop_many(64):
                nqe = unpack(raw)
                assert nqe.qset == qset, "outputs go on the queue set of their socket"
                seq = next(self._seq)
                if nqe.is_reply:
                    self.replies[(nqe.sock_id, nqe.tag)] = (seq, ring_id, nqe)
                else:
                    assert ring_id is dev.RingId.SEND, "DEV-8: events go on SEND"
                    self.events.append((seq, nqe))

    def event(self, pred: Callable[[NQE], bool], timeout: float = 5.0) -> NQE:
        """Take the first event matching ``pred``, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            for i, (_, ev) in enumerate(self.events):
                if pred(ev):
                    del self.events[i]
                    return ev
            assert time.monotonic() < deadline, f"no such event; have {self.events}"
            time.sleep(0.0005)

    def quiet(self, pred: Callable[[NQE], bool], seconds: float) -> bool:
        """True if no event matching ``pred`` arrives within ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump()
            if any(pred(ev) for _, ev in self.events):
                return False
            time.sleep(0.002)
        return True

    def payload(self, ev: NQE) -> bytes:
        return bytes(self.tenant.data()[ev.data_ptr:ev.data_ptr + ev.size])

    def buf_return(self, ev: NQE) -> None:
        self.push(NQE(op=Op.BUF_RETURN, vm_id=VM, data_ptr=ev.data_ptr, size=ev.size))

    def receive(self, sock: int, nbytes: int, timeout: float = 10.0) -> bytes:
        """Collect ``nbytes`` of stream data of ``sock``, returning each buffer at once."""
        out = bytearray()
        while len(out) < nbytes:
            ev = self.event(lambda e: e.sock_id == sock and e.op == Op.EV_DATA, timeout)
            out += self.payload(ev)
            self.buf_return(ev)
        return bytes(out)

    def grant(self) -> NQE:
        """TENANT_MAP of the whole receive half."""
        geo = self.tenant_geo
        self.push(NQE(op=Op.TENANT_MAP, op_data=VM, data_ptr=geo.send_size,
                      size=geo.data_size - geo.send_size, tag=999))
        return self.reply(0, 999)


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., tuple[FakeCoreEngine, KernelNSM]]]:
    """Start an in-thread kernel NSM on a fresh NSM device, with a fake CoreEngine."""
    made: list[tuple[FakeCoreEngine, KernelNSM, ServiceLib, threading.Thread]] = []

    def make(*, rx_cap: int | None = None, grant: bool = True,
             **geo: int) -> tuple[FakeCoreEngine, KernelNSM]:
        ce = FakeCoreEngine(tmp_path, **geo)
        lib = ServiceLib(shm.open_device(ce.nsm_path), tmp_path)
        nsm = KernelNSM(lib, rx_cap=rx_cap)
        t = threading.Thread(target=nsm.run, daemon=True)
        t.start()
        made.append((ce, nsm, lib, t))
        if grant:
            assert ce.grant().result == 0
        return ce, nsm

    yield make
    for ce, nsm, lib, t in made:
        nsm.stop()
        t.join(timeout=5)
        assert not t.is_alive()
        nsm.close()
        assert lib.counters["errors"] == 0, "the stack raised"
        lib.close()
        ce.close()


@pytest.fixture
def rig(make_rig: Callable[..., tuple[FakeCoreEngine, KernelNSM]]) -> FakeCoreEngine:
    return make_rig()[0]


def kernel_server(handler: Callable[[socket.socket], None], family: int = socket.AF_INET,
                  ) -> tuple[socket.socket, int, threading.Thread]:
    """A real kernel TCP server on loopback running ``handler`` for one connection."""
    srv = socket.create_server((LOOP if family == socket.AF_INET else "::1", 0), family=family)
    srv.settimeout(10)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, contextlib.suppress(ConnectionResetError):  # RST: the NSM closed with data
            handler(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, srv.getsockname()[1], t


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def echo_and_close(conn: socket.socket) -> None:
    with conn:
        echo(conn)


def closed_port() -> int:
    s = socket.socket()
    s.bind((LOOP, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def connect(ce: FakeCoreEngine, sock: int, port: int) -> None:
    assert ce.do(Op.SOCKET, sock, STREAM) == 0
    assert ce.do(Op.CONNECT, sock, 0, sockaddr_in(LOOP, port)) == 0


# -- TCP ---------------------------------------------------------------------------------------

def test_tcp_echo_with_a_kernel_server(rig: FakeCoreEngine) -> None:
    srv, port, t = kernel_server(echo)
    connect(rig, 1, port)
    data = random.Random(1).randbytes(300_000)
    sock, tag = rig.post(Op.SEND, 1, 0, data)
    got = rig.receive(1, len(data))
    assert rig.reply(sock, tag).result == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # names: GETSOCKNAME / GETPEERNAME write the kernel's sockaddr
    assert rig.do(Op.GETPEERNAME, 1, out=28) == 16
    assert parse_sockaddr(rig.last_out) == (LOOP, port)
    assert rig.do(Op.GETSOCKNAME, 1, out=28) == 16
    assert parse_sockaddr(rig.last_out)[0] == LOOP
    # SHUT_WR: the server sees EOF, closes, and the NSM reports EV_FIN
    assert rig.do(Op.SHUTDOWN, 1, socket.SHUT_WR) == 0
    t.join(5)
    fin = rig.event(lambda e: e.sock_id == 1 and e.op in (Op.EV_FIN, Op.EV_DATA))
    assert fin.op == Op.EV_FIN
    assert rig.do(Op.CLOSE, 1) == 0
    assert rig.do(Op.GETSOCKNAME, 1, out=28) == -errno.EBADF  # the socket is gone
    srv.close()


def test_tcp_v6_and_many_concurrent_connections(rig: FakeCoreEngine) -> None:
    """30 connections at once (v4, and v6 where ::1 exists), interleaved, all echoed intact."""
    srv = socket.create_server((LOOP, 0))
    port = srv.getsockname()[1]
    stop = threading.Event()

    def accept_all() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo_and_close, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept_all, daemon=True)
    t.start()
    socks = range(1, 31)
    for i in socks:
        assert rig.do(Op.SOCKET, i, STREAM) == 0
    connects = [rig.post(Op.CONNECT, i, 0, sockaddr_in(LOOP, port)) for i in socks]
    for pending in connects:
        assert rig.reply(*pending).result == 0
    msgs = {i: random.Random(i).randbytes(5000 + 97 * i) for i in socks}
    sends = [rig.post(Op.SEND, i, 0, msgs[i]) for i in socks]
    got: dict[int, bytearray] = {i: bytearray() for i in socks}
    while any(len(got[i]) < len(msgs[i]) for i in socks):
        ev = rig.event(lambda e: e.op == Op.EV_DATA)
        got[ev.sock_id] += rig.payload(ev)
        rig.buf_return(ev)
    for pending in sends:
        assert rig.reply(*pending).result > 0
    assert {i: bytes(b) for i, b in got.items()} == msgs
    for i in socks:
        assert rig.do(Op.CLOSE, i) == 0
    stop.set()
    t.join(2)
    srv.close()
    try:
        srv6, port6, t6 = kernel_server(echo, socket.AF_INET6)
    except OSError:
        return
    assert rig.do(Op.SOCKET, 40, socket.AF_INET6 | socket.SOCK_STREAM << 16) == 0
    assert rig.do(Op.CONNECT, 40, 0, sockaddr_in6("::1", port6)) == 0
    assert rig.do(Op.SEND, 40, 0, b"six") == 3
    assert rig.receive(40, 3) == b"six"
    assert rig.do(Op.GETPEERNAME, 40, out=28) == 28
    assert parse_sockaddr(rig.last_out) == ("::1", port6)
    assert rig.do(Op.CLOSE, 40) == 0
    t6.join(2)
    srv6.close()


def test_queue_sets_and_bell_wakeups(
        make_rig: Callable[..., tuple[FakeCoreEngine, KernelNSM]]) -> None:
    """A socket's replies and events stay on its queue set; a sleeping NSM is woken by
    its bells (DEV-9), here on two queue sets (futex_waitv)."""
    ce, nsm = make_rig(nsm_qsets=2)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((LOOP, 0))
    for qset, sock in ((1, 7), (0, 8)):
        ring = ce.nsm.ring(qset, dev.RingId.COMPLETION)
        for _ in range(20):
            # let the NSM fall asleep: it has set NEED_WAKEUP on the ring this call goes to
            wait_until("the NSM sleeps", ring.consumer_sleeping)
            before = nsm.lib.counters["bell_wakeups"]
            assert ce.do(Op.SOCKET, sock, DGRAM, qset=qset) == 0
            if ce.rang:  # else its bounded sleep ended just before the call: try again
                break
            assert ce.do(Op.CLOSE, sock, qset=qset) == 0
        else:
            pytest.fail("the NSM was never asleep when a call arrived")
        wait_until("the bell wakes the NSM", lambda b=before: nsm.lib.counters["bell_wakeups"] > b)
        assert ce.do(Op.BIND, sock, 0, sockaddr_in(LOOP, 0), qset=qset) == 0
        assert ce.do(Op.GETSOCKNAME, sock, out=28, qset=qset) == 16
        peer.sendto(b"q%d" % qset, parse_sockaddr(ce.last_out))
        ev = ce.event(of_sock(sock))
        assert ev.qset == qset and ce.payload(ev)[16:] == b"q%d" % qset
        ce.buf_return(ev)
    peer.close()


def test_replies_go_on_the_ring_paired_with_the_call(rig: FakeCoreEngine) -> None:
    """DEV-8: COMPLETION calls are answered on JOB, RECEIVE calls on SEND."""
    assert rig.do(Op.SOCKET, 1, DGRAM) == 0
    for op, data, ring in ((Op.GETSOCKNAME, b"", dev.RingId.COMPLETION),
                           (Op.SEND, sockaddr_in(LOOP, 9) + b"x", dev.RingId.RECEIVE)):
        tag = 500 + op
        ptr = 0
        if data:
            rig.tenant.data()[ptr:ptr + len(data)] = data
        rig.push(NQE(op=op, vm_id=VM, sock_id=1, op_data=(16 << 32) if data else 0,
                     data_ptr=ptr, size=len(data) or 28, tag=tag), ring)
        deadline = time.monotonic() + 5
        while (1, tag) not in rig.replies:
            rig.pump()
            assert time.monotonic() < deadline
        assert rig.replies[(1, tag)][1] is REPLY_RING[ring]
        assert rig.replies.pop((1, tag))[2].result >= 0


def test_tcp_server_accept_and_acceptable(rig: FakeCoreEngine) -> None:
    assert rig.do(Op.SOCKET, 10, STREAM) == 0
    assert rig.do(Op.SETSOCKOPT, 10, opt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
                  struct.pack("i", 1)) == 0
    assert rig.do(Op.BIND, 10, 0, sockaddr_in(LOOP, 0)) == 0
    assert rig.do(Op.LISTEN, 10, 8) == 0
    assert rig.do(Op.GETSOCKNAME, 10, out=28) == 16
    port = parse_sockaddr(rig.last_out)[1]
    # nothing pending: a non-waiting ACCEPT fails at once
    assert rig.do(Op.ACCEPT, 10, 11 | 1 << 32, out=28) == -errno.EAGAIN
    # a waiting ACCEPT is answered when a client connects
    sock, tag = rig.post(Op.ACCEPT, 10, 11, out=28)
    time.sleep(0.05)
    assert not rig.has_reply(sock, tag)
    c1 = socket.create_connection((LOOP, port))
    c1.sendall(b"first")
    seq_reply = None
    deadline = time.monotonic() + 5
    while seq_reply is None:
        rig.pump()
        if (sock, tag) in rig.replies:
            seq_reply = rig.replies[(sock, tag)][0]
        assert time.monotonic() < deadline
    assert rig.reply(sock, tag).result == 16
    assert parse_sockaddr(rig.last_out) == c1.getsockname()
    rig.pump()
    ev = rig.event(lambda e: e.sock_id == 11)
    assert ev.op == Op.EV_DATA and rig.payload(ev) == b"first"
    rig.buf_return(ev)
    # a connection with no ACCEPT waiting is announced, then taken without waiting
    c2 = socket.create_connection((LOOP, port))
    acc = rig.event(lambda e: e.sock_id == 10)
    assert acc.op == Op.EV_ACCEPTABLE and acc.result == 1
    assert rig.do(Op.ACCEPT, 10, 12 | 1 << 32, out=28) == 16
    assert parse_sockaddr(rig.last_out) == c2.getsockname()
    assert rig.do(Op.ACCEPT, 10, 12 | 1 << 32, out=28) == -errno.EEXIST  # ID in use
    rig.call(Op.SEND, 12, 0, b"to c2")
    assert c2.recv(10) == b"to c2"
    for s in (10, 11, 12):
        assert rig.do(Op.CLOSE, s) == 0
    assert c1.recv(10) == b""
    c1.close()
    c2.close()


def test_new_connection_events_wait_for_the_reply_to_be_read(rig: FakeCoreEngine) -> None:
    """NQE-16: no event of an accepted connection before the CoreEngine read its ACCEPT reply."""
    srv_port = listen(rig, 20)
    rig.consume[dev.RingId.JOB] = False
    sock, tag = rig.post(Op.ACCEPT, 20, 21, out=28)
    c = socket.create_connection((LOOP, srv_port))
    c.sendall(b"early")
    assert rig.quiet(lambda e: e.sock_id == 21, 0.2)
    rig.consume[dev.RingId.JOB] = True
    assert rig.reply(sock, tag).result == 16
    ev = rig.event(lambda e: e.sock_id == 21)
    assert rig.payload(ev) == b"early"
    rig.buf_return(ev)
    # CLOSE is answered only after the socket's events were read
    c.sendall(b"late")
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.1)
    rig.consume[dev.RingId.SEND] = False
    time.sleep(0.1)
    sock, tag = rig.post(Op.CLOSE, 21)
    time.sleep(0.2)
    assert not rig.has_reply(sock, tag)
    rig.consume[dev.RingId.SEND] = True
    assert rig.reply(sock, tag).result == 0
    c.close()


def listen(ce: FakeCoreEngine, sock: int) -> int:
    assert ce.do(Op.SOCKET, sock, STREAM) == 0
    assert ce.do(Op.BIND, sock, 0, sockaddr_in(LOOP, 0)) == 0
    assert ce.do(Op.LISTEN, sock, 16) == 0
    assert ce.do(Op.GETSOCKNAME, sock, out=28) == 16
    return parse_sockaddr(ce.last_out)[1]


def test_connect_refused_and_other_kernel_errnos(rig: FakeCoreEngine) -> None:
    """Errnos are the kernel's: each is compared with the same call on a plain socket."""
    port = closed_port()
    oracle = socket.socket()
    assert oracle.connect_ex((LOOP, port)) == errno.ECONNREFUSED
    oracle.close()
    assert rig.do(Op.SOCKET, 1, STREAM) == 0
    assert rig.do(Op.CONNECT, 1, 0, sockaddr_in(LOOP, port)) == -errno.ECONNREFUSED
    # unconnected TCP socket
    assert rig.do(Op.GETPEERNAME, 2, out=28) == -errno.EBADF
    assert rig.do(Op.SOCKET, 2, STREAM) == 0
    assert rig.do(Op.GETPEERNAME, 2, out=28) == -errno.ENOTCONN
    assert rig.do(Op.SHUTDOWN, 2, socket.SHUT_WR) == -errno.ENOTCONN
    assert rig.do(Op.SHUTDOWN, 2, 7) == -errno.EINVAL
    assert rig.do(Op.SEND, 2, 0, b"x") == -errno.EPIPE
    assert rig.do(Op.ACCEPT, 2, 3, out=28) == -errno.EINVAL
    assert rig.do(Op.BIND, 2, 0, sockaddr_in(LOOP, 0)[:3]) == -errno.EINVAL
    assert rig.do(Op.BIND, 2, 0, sockaddr_in6("::1", 0)) == -raw_errno(
        socket.AF_INET, socket.SOCK_STREAM, lambda fd, a, n: ksock.bind(fd, a, n),
        sockaddr_in6("::1", 0))
    # an address in use
    taken = socket.socket()
    taken.bind((LOOP, 0))
    taken.listen()
    assert rig.do(Op.BIND, 2, 0, sockaddr_in(*taken.getsockname())) == -errno.EADDRINUSE
    taken.close()
    # UDP cannot listen or accept
    assert rig.do(Op.SOCKET, 4, DGRAM) == 0
    assert rig.do(Op.LISTEN, 4, 5) == -errno.EOPNOTSUPP
    assert rig.do(Op.ACCEPT, 4, 5, out=28) == -errno.EOPNOTSUPP
    # SEND without a destination on an unconnected UDP socket
    assert rig.do(Op.SEND, 4, 0, b"x") == -errno.EDESTADDRREQ
    # getsockopt answers the value's length and writes it
    assert rig.do(Op.GETSOCKOPT, 2, opt(socket.SOL_SOCKET, socket.SO_TYPE), out=4) == 4
    assert struct.unpack("i", rig.last_out)[0] == socket.SOCK_STREAM
    assert rig.do(Op.GETSOCKOPT, 1, opt(socket.SOL_SOCKET, socket.SO_ERROR), out=4) == 4
    assert rig.do(Op.GETSOCKOPT, 2, opt(socket.IPPROTO_TCP, 9999), out=4) == -errno.ENOPROTOOPT


def raw_errno(family: int, type_: int, call: Callable[[int, int, int], int],
              data: bytes) -> int:
    """The errno Linux gives for ``call`` with ``data`` on a fresh plain socket."""
    with socket.socket(family, type_) as s:
        buf = ctypes.create_string_buffer(data, len(data))
        rc = call(s.fileno(), ctypes.addressof(buf), len(data))
    assert rc < 0
    return -rc


def test_nsm_policy_and_protocol_errors(rig: FakeCoreEngine) -> None:
    """Sockets and options the NSM refuses, ID clashes, malformed NQEs, bad buffers."""
    assert rig.do(Op.SOCKET, 1, socket.AF_UNIX | socket.SOCK_STREAM << 16) \
        == -errno.EAFNOSUPPORT
    assert rig.do(Op.SOCKET, 1, socket.AF_INET | socket.SOCK_RAW << 16 | 1 << 32) == -errno.EPERM
    assert rig.do(Op.SOCKET, 1, STREAM | socket.IPPROTO_UDP << 32) == -errno.EPROTONOSUPPORT
    assert rig.do(Op.SOCKET, 1, socket.AF_INET | socket.SOCK_SEQPACKET << 16) \
        == -errno.ESOCKTNOSUPPORT
    assert rig.do(Op.SOCKET, 0, STREAM) == -errno.EINVAL
    assert rig.do(Op.SOCKET, 1, STREAM | socket.SOCK_NONBLOCK << 16) == 0
    assert rig.do(Op.SOCKET, 1, STREAM) == -errno.EEXIST
    # options that would use the NSM's privileges or pointers are refused
    for name in (36, 25, 26):  # SO_MARK, SO_BINDTODEVICE, SO_ATTACH_FILTER
        assert rig.do(Op.SETSOCKOPT, 1, opt(socket.SOL_SOCKET, name),
                      struct.pack("i", 1)) == -errno.ENOPROTOOPT
    # defence in depth: buffers outside the send half are refused, never dereferenced
    geo = rig.tenant_geo
    for ptr, size in ((geo.send_size - 8, 16), (geo.send_size, 16), (geo.data_size, 4),
                      (2**64 - 8, 16)):
        rig.push(NQE(op=Op.BIND, vm_id=VM, sock_id=1, data_ptr=ptr, size=size, tag=77))
        assert rig.reply(1, 77).result == -errno.EFAULT
    # a tenant the NSM has no area for
    assert rig.do(Op.SOCKET, 5, STREAM, vm=VM + 1) == -errno.EFAULT
    # unknown op: 0xFF -ENOSYS; non-zero reserved bytes: op|0x80 -EINVAL (NQE-10..12)
    raw = bytearray(pack(NQE(op=Op.GETSOCKNAME, vm_id=VM, sock_id=1, tag=88)))
    raw[0] = 0x30
    push_raw(rig, bytes(raw))
    r = rig.reply(1, 88)
    assert r.op == OP_UNKNOWN_REPLY and r.result == -errno.ENOSYS
    raw[0] = Op.GETSOCKNAME
    raw[30] = 1
    push_raw(rig, bytes(raw))
    r = rig.reply(1, 88)
    assert r.op == Op.GETSOCKNAME | REPLY_BIT and r.result == -errno.EINVAL
    # BUF_RETURN of a buffer never lent: EINVAL; outside the slice: EFAULT (BUF-5)
    rig.push(NQE(op=Op.BUF_RETURN, vm_id=VM, data_ptr=geo.send_size, size=10, tag=5))
    r = rig.reply(0, 5)
    assert r.op == Op.BUF_RETURN | REPLY_BIT and r.result == -errno.EINVAL
    rig.push(NQE(op=Op.BUF_RETURN, vm_id=VM, data_ptr=0, size=10, tag=6))
    assert rig.reply(0, 6).result == -errno.EFAULT


def push_raw(ce: FakeCoreEngine, raw: bytes) -> None:
    assert NQE_STRUCT.sizeof() == len(raw)
    r = ce.nsm.ring(0, dev.RingId.COMPLETION)
    assert r.push(raw)
    bell.notify(r, ce.nsm.bell(0, dev.Bell.DEVICE))


# -- UDP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_udp_datagrams_carry_their_address(rig: FakeCoreEngine, family: int) -> None:
    host = LOOP if family == socket.AF_INET else "::1"
    make = sockaddr_in if family == socket.AF_INET else sockaddr_in6
    alen = 16 if family == socket.AF_INET else 28
    try:
        peer = socket.socket(family, socket.SOCK_DGRAM)
        peer.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    peer.settimeout(5)
    assert rig.do(Op.SOCKET, 1, family | socket.SOCK_DGRAM << 16) == 0
    assert rig.do(Op.BIND, 1, 0, make(host, 0)) == 0
    assert rig.do(Op.GETSOCKNAME, 1, out=28) == alen
    port = parse_sockaddr(rig.last_out)[1]
    for payload in (b"hello", b"", os.urandom(30000)):
        peer.sendto(payload, (host, port))
        ev = rig.event(lambda e: e.sock_id == 1)
        assert ev.op == Op.EV_DATA and ev.result == alen
        got = rig.payload(ev)
        assert parse_sockaddr(got[:alen]) == (host, peer.getsockname()[1])
        assert got[alen:] == payload
        rig.buf_return(ev)
    # sendto: the destination sockaddr prefixes the payload
    dest = make(host, peer.getsockname()[1])
    assert rig.do(Op.SEND, 1, len(dest) << 32, dest + b"pong") == 4
    data, src = peer.recvfrom(100)
    assert data == b"pong" and src[1] == port
    peer.close()


def test_udp_connected_error_is_an_event(rig: FakeCoreEngine) -> None:
    """An ICMP port unreachable on a connected UDP socket becomes EV_ERROR(-ECONNREFUSED)."""
    assert rig.do(Op.SOCKET, 1, DGRAM) == 0
    assert rig.do(Op.CONNECT, 1, 0, sockaddr_in(LOOP, closed_port())) == 0
    assert rig.do(Op.SEND, 1, 0, b"anyone?") == 7
    ev = rig.event(lambda e: e.sock_id == 1)
    assert ev.op == Op.EV_ERROR and ev.result == -errno.ECONNREFUSED


# -- flow control ------------------------------------------------------------------------------

def test_full_slice_stops_reading_and_loses_nothing(
        make_rig: Callable[..., tuple[FakeCoreEngine, KernelNSM]]) -> None:
    """BUF-7: with the slice full the NSM stops reading; BUF_RETURN resumes it; no byte lost."""
    slice_size = 4 * GRANULE
    ce, _ = make_rig(recv_size=slice_size, rx_cap=slice_size)
    data = random.Random(7).randbytes(1 << 20)
    done = threading.Event()

    def blast(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn.sendall(data)
        done.set()
        conn.recv(1)

    srv, port, t = kernel_server(blast)
    assert ce.do(Op.SOCKET, 1, STREAM) == 0
    assert ce.do(Op.SETSOCKOPT, 1, opt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                 struct.pack("i", 4096)) == 0
    assert ce.do(Op.CONNECT, 1, 0, sockaddr_in(LOOP, port)) == 0
    held: list[NQE] = []
    while True:  # take EV_DATA without returning anything until it stops
        try:
            held.append(ce.event(lambda e: e.sock_id == 1, timeout=0.3))
        except AssertionError:
            break
    granules = sum(-(-ev.size // GRANULE) for ev in held)
    assert granules == slice_size // GRANULE, "the slice was filled"
    assert all(ev.op == Op.EV_DATA for ev in held)
    assert not done.is_set(), "the sender is held back by TCP's window"
    got = bytearray()
    for ev in held:
        got += ce.payload(ev)
        ce.buf_return(ev)
    got += ce.receive(1, len(data) - len(got), timeout=20)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert done.wait(5)
    assert ce.do(Op.CLOSE, 1) == 0
    t.join(5)
    srv.close()


def test_per_socket_cap(make_rig: Callable[..., tuple[FakeCoreEngine, KernelNSM]]) -> None:
    """A socket holding its cap is not read, while another socket still is."""
    ce, _ = make_rig(recv_size=8 * GRANULE, rx_cap=2 * GRANULE)
    blob = b"z" * (256 << 10)

    def send_blob(conn: socket.socket) -> None:
        conn.sendall(blob)
        conn.recv(1)

    servers = [kernel_server(send_blob) for _ in range(2)]
    for i, (_, port, _) in enumerate(servers, start=1):
        connect(ce, i, port)
    held: dict[int, list[NQE]] = {1: [], 2: []}
    while True:
        try:
            ev = ce.event(lambda e: e.op == Op.EV_DATA, timeout=0.3)
        except AssertionError:
            break
        held[ev.sock_id].append(ev)
    for sock in (1, 2):
        assert 0 < sum(ev.size for ev in held[sock]) <= 2 * GRANULE
    for ev in held[1]:
        ce.buf_return(ev)
    ev = ce.event(lambda e: e.op == Op.EV_DATA, timeout=5)
    assert ev.sock_id == 1  # only the socket with room resumed
    for sock in (1, 2):
        assert ce.do(Op.CLOSE, sock) == 0
    for srv, _, _ in servers:
        srv.close()


def test_send_waits_for_the_kernel_in_order(rig: FakeCoreEngine) -> None:
    """SEND on EAGAIN stays queued, in order; SHUT_WR waits behind it; nothing is lost."""
    received = bytearray()
    go = threading.Event()

    def slow(conn: socket.socket) -> None:
        go.wait(10)
        while data := conn.recv(1 << 20):
            received.extend(data)

    srv, port, t = kernel_server(slow)
    assert rig.do(Op.SOCKET, 1, STREAM) == 0
    assert rig.do(Op.SETSOCKOPT, 1, opt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                  struct.pack("i", 4096)) == 0
    assert rig.do(Op.CONNECT, 1, 0, sockaddr_in(LOOP, port)) == 0
    chunks = [bytes([i]) * (64 << 10) for i in range(24)]
    pending = [rig.post(Op.SEND, 1, 0, c) for c in chunks]
    time.sleep(0.2)
    assert not rig.has_reply(*pending[-1]), "the kernel cannot have taken it all"
    assert rig.do(Op.SEND, 1, socket.MSG_DONTWAIT, b"x") == -errno.EAGAIN
    assert rig.do(Op.SHUTDOWN, 1, socket.SHUT_WR) == 0  # answered now, done after the data
    go.set()
    for (sock, tag), c in zip(pending, chunks, strict=True):
        assert rig.reply(sock, tag, timeout=20).result == len(c)
    t.join(10)
    assert bytes(received) == b"".join(chunks)
    assert rig.do(Op.CLOSE, 1) == 0
    srv.close()


def test_close_answers_pending_calls(rig: FakeCoreEngine) -> None:
    port = listen(rig, 1)
    pending = rig.post(Op.ACCEPT, 1, 2, out=28)
    assert rig.do(Op.CLOSE, 1) == 0
    assert rig.reply(*pending).result == -errno.EBADF
    assert socket.socket().connect_ex((LOOP, port)) == errno.ECONNREFUSED


def test_listener_shutdown_fails_waiting_accepts(rig: FakeCoreEngine) -> None:
    listen(rig, 1)
    pending = rig.post(Op.ACCEPT, 1, 2, out=28)
    assert rig.do(Op.SHUTDOWN, 1, socket.SHUT_RDWR) == 0
    assert rig.reply(*pending).result == -errno.EINVAL
    assert rig.do(Op.ACCEPT, 1, 2, out=28) == -errno.EINVAL


# -- tenants and the CoreEngine ------------------------------------------------------------------

def test_tenant_unmap_closes_its_sockets(rig: FakeCoreEngine) -> None:
    eof = threading.Event()

    def wait_eof(conn: socket.socket) -> None:
        if conn.recv(10) == b"":
            eof.set()

    srv, port, t = kernel_server(wait_eof)
    connect(rig, 1, port)
    rig.push(NQE(op=Op.TENANT_UNMAP, op_data=VM, tag=3))
    r = rig.reply(0, 3)
    assert r.result == 0
    assert eof.wait(1), "the tenant's connection was closed"
    assert rig.do(Op.GETSOCKNAME, 1, out=28) == -errno.EFAULT  # no area any more
    assert rig.grant().result == 0  # the VM ID can be mapped again
    t.join(5)
    srv.close()


def test_tenant_map_errors(rig: FakeCoreEngine) -> None:
    geo = rig.tenant_geo
    rig.push(NQE(op=Op.TENANT_MAP, op_data=VM + 1, data_ptr=geo.send_size, size=GRANULE, tag=1))
    assert rig.reply(0, 1).result == -errno.ENOENT  # no such device file
    rig.push(NQE(op=Op.TENANT_MAP, op_data=VM, data_ptr=geo.send_size, size=GRANULE, tag=2))
    assert rig.reply(0, 2).result == -errno.EEXIST  # mapped already, with another slice
    rig.push(NQE(op=Op.TENANT_UNMAP, op_data=VM, tag=3))
    assert rig.reply(0, 3).result == 0
    rig.push(NQE(op=Op.TENANT_MAP, op_data=VM, data_ptr=0, size=GRANULE, tag=4))
    assert rig.reply(0, 4).result == -errno.EFAULT  # not in the receive half (BUF-8)
    rig.push(NQE(op=Op.TENANT_MAP, op_data=VM, data_ptr=geo.send_size + 1, size=GRANULE, tag=5))
    assert rig.reply(0, 5).result == -errno.EINVAL  # off granules


@pytest.fixture
def nsm_module() -> str:
    """The NSM the entry-point tests start (tests/test_fastpath_nsm.py: the C one)."""
    return "netkernel.reference.nsm_kernel"


class NSMProcess:
    """``python -m MODULE --instance NAME`` (optionally under a command prefix such as
    ``unshare -n``), attached to a fake engine.sock."""

    def __init__(self, tmp_path: Path, module: str, prefix: tuple[str, ...] = ()) -> None:
        instance = "t1"
        runtime = tmp_path / instance
        runtime.mkdir()
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl.bind(str(runtime / shm.ENGINE_SOCK))
        self.ctl.listen()
        self.ctl.settimeout(10)
        self.ce = FakeCoreEngine(runtime)
        env = dict(os.environ, NETKERNEL_ROOT=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", module,
                                      "--instance", instance],
                                     env=env, stderr=subprocess.PIPE)
        self.conn, _ = self.ctl.accept()
        self.hello = json.loads(self.conn.makefile("rb").readline())
        self.conn.sendall(json.dumps({"ok": True, "id": 1, "path": str(self.ce.nsm_path)}).encode()
                          + b"\n")
        assert self.ce.grant().result == 0

    def close(self) -> str:
        """Stop (if still running) and clean up; returns the NSM's stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        self.proc.stderr.close()
        self.conn.close()
        self.ce.close()
        self.ctl.close()
        return err


def test_entry_point_attaches_and_exits_when_the_coreengine_goes(
        tmp_path: Path, nsm_module: str) -> None:
    """Attach over engine.sock, serve over shared memory across processes (bells included),
    close the tenant's sockets and exit when the CoreEngine's connection drops (NSM-2)."""
    nsm = NSMProcess(tmp_path, nsm_module)
    try:
        assert nsm.hello == {"cmd": "attach", "kind": "nsm", "pid": nsm.proc.pid,
                             "name": "kernel"}
        srv, port, t = kernel_server(echo)
        connect(nsm.ce, 1, port)
        for i in range(20):  # request/response: the NSM sleeps and is woken in between
            msg = b"across processes %d" % i
            assert nsm.ce.do(Op.SEND, 1, 0, msg) == len(msg)
            assert nsm.ce.receive(1, len(msg)) == msg
        bulk = random.Random(3).randbytes(1 << 20)  # both processes on the rings at once
        sends = [nsm.ce.post(Op.SEND, 1, 0, bulk[i:i + 32768])
                 for i in range(0, len(bulk), 32768)]
        assert nsm.ce.receive(1, len(bulk)) == bulk
        assert sum(nsm.ce.reply(*p).result for p in sends) == len(bulk)
        nsm.conn.close()  # the CoreEngine is gone (NSM-2)
        assert nsm.proc.wait(timeout=2) == 0
        t.join(2)
        assert not t.is_alive(), "the NSM left the tenant's connection open"
        srv.close()
    finally:
        err = nsm.close()
    assert "Traceback" not in err, err


def test_entry_point_inside_a_network_namespace(tmp_path: Path, nsm_module: str) -> None:
    """Started under ``unshare -n`` the NSM uses that namespace's stack: its loopback is
    down, so a connect to 127.0.0.1 fails ENETUNREACH there (and works outside)."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("cannot create a network namespace here")
    nsm = NSMProcess(tmp_path, nsm_module, ("unshare", "-n"))
    try:
        assert nsm.ce.do(Op.SOCKET, 1, STREAM) == 0
        assert nsm.ce.do(Op.CONNECT, 1, 0, sockaddr_in(LOOP, 80)) == -errno.ENETUNREACH
        nsm.proc.send_signal(15)
        assert nsm.proc.wait(timeout=2) == 0  # SIGTERM: a clean exit
    finally:
        err = nsm.close()
    assert "Traceback" not in err, err


def test_entry_point_without_a_coreengine_fails_cleanly(tmp_path: Path, nsm_module: str) -> None:
    env = dict(os.environ, NETKERNEL_ROOT=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", nsm_module, "--instance", "none"], env=env,
                       capture_output=True, timeout=20)
    assert r.returncode == 1
    assert b"cannot attach" in r.stderr and b"Traceback" not in r.stderr
