"""GuestLib, Python front end: :class:`socket`, a drop-in for the standard library's socket.

An application that creates ``guestlib.socket(AF_INET, SOCK_STREAM)`` where it
created ``socket.socket(...)`` keeps its calls, results and errnos; every call
travels as NQEs over this process's NK device to the CoreEngine and on to the
NSM that runs the real stack (RUNTIME.md, spec/nqe.md, spec/device.md).

Three layers, bottom up; everything GuestLib keeps lives in this file:

``_Device``  one per process and instance, created on the first socket: the
             attach over ``engine.sock`` (kept open: closing it detaches), the
             mapped ``vm-<id>.nk``, the dispatcher thread that consumes the
             COMPLETION and RECEIVE rings, submission to JOB and SEND, the
             send-half allocator (BUF-1, BUF-3) and the requests in flight,
             matched by ``(sock_id, tag)`` (NQE-9).
``_Conn``    what GuestLib knows of one NetKernel socket: received buffers
             it holds until the application consumed them (BUF-4), EOF, the
             pending asynchronous error (SO_ERROR), the part of Linux's TCP
             state machine that decides calls without asking the stack (recv
             on an unconnected socket, send after shutdown, a second connect),
             the accept queue, and the eventfd behind ``fileno()``.
``socket``   the API, shaped and behaving like :class:`socket.socket`.

Threads and locks. Application threads call ``socket`` methods; one daemon
dispatcher thread per device reads replies and events and never blocks on a
ring (what it must send waits in an outbox), so the CoreEngine can always
drain us. Lock order: ``_Conn.cond`` before ``_Device.lock`` before the send
pool's lock; nobody submits an NQE while holding a ``_Conn`` lock.

Readiness. ``fileno()`` is a real eventfd. GuestLib keeps it readable exactly
when Linux's poll would report the socket readable (data, EOF, a pending
connection, an error, an unconnected TCP socket's POLLHUP) and writable
unless a TCP connect is in progress. An eventfd cannot be neither, so a
connecting socket reads as readable-not-writable: ``select`` for writing,
what ``asyncio``'s ``sock_connect`` does, waits exactly as on Linux.

Sends are asynchronous like a kernel socket buffer: ``send`` copies the
payload into send-half buffers, publishes SEND NQEs and returns once they are
queued, up to a per-socket limit; an error the stack reports later becomes
the result of the next call. ``sendall`` also waits for the replies, and the
process waits for queued SENDs at exit. SHUTDOWN and CLOSE travel on JOB and
would overtake SENDs on SEND, so they wait for the socket's SENDs first.

Where GuestLib decides instead of the stack, it decides as Linux and CPython
do (tests/test_guestlib.py runs random call sequences on both):

* recv is local (data is pushed, EV_DATA): tcp_recvmsg's order of checks;
  send checks tcp_sendmsg's before queueing; SO_ERROR is the error GuestLib
  holds, else the stack's.
* accept is local: every listening socket keeps one waiting ACCEPT posted; its
  answer fills a local accept queue, so timeouts and non-blocking accepts
  lose no connection and the listener is readable exactly when Linux's is.
* connect follows ``sock->state``: a second connect after a completed
  handshake returns 0, after a failed one its error (ECONNABORTED once
  SO_ERROR read it), and then the NSM's socket is made to collect the
  failure too, so it ends up disconnected like the application's would.
* close with received data the application never read resets the connection
  as tcp_close does: the data already left the NSM's socket, so the CLOSE
  says so (op_data ABORT) and the NSM closes with SO_LINGER {on, 0}.
* CPython's three modes: blocking and non-blocking sockets make the call
  directly; a socket with a timeout first waits for poll readiness and
  treats EAGAIN as "wait more" (``sock_call_ex``), so e.g. ``send`` on a
  listening socket times out, and MSG_DONTWAIT only matters when blocking.
* A dead CoreEngine (engine.sock EOF) or NSM (EV_ERROR -ECONNRESET) fails
  every socket like a reset: blocked and next calls ECONNRESET, later sends
  EPIPE, within WAIT_SLICE of the news; a new socket then gets ENETDOWN.

Limits (by design): sockets are not shared across ``fork`` (the child gets a
device of its own on its first socket; inherited sockets are closed in it);
``fileno()`` is an eventfd, so ``os.read`` / ``os.write`` on it do not move
data, and the object is not a ``socket.socket`` (``ssl.wrap_socket`` needs
one: use ``ssl.MemoryBIO``); ``detach``, ``sendmsg``/``recvmsg`` are not
provided and ``sendfile`` uses ``sendall``; SO_RCVTIMEO/SO_SNDTIMEO reach the
stack but blocking is GuestLib's (use ``settimeout``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import enum
import errno as E
import io
import json
import operator
import os
import socket as _std
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import IO, Any, Final

from . import bell as _bell
from . import device as dev
from . import nqe as nq
from . import shm
from .bufpool import SendAllocator
from .device import RingId
from .nqe import Op
from .ring import Ring, RingError

QSET: Final = 0  # every NQE of a process goes through queue set 0 (NQE-16: SENDs stay ordered)
ATTACH_TIMEOUT: Final = 5.0
#: Longest a waiting thread sleeps before it re-checks that the device is alive.
WAIT_SLICE: Final = 0.05
#: How long after a fatal error on a socket a control call may still wait for its reply.
GRACE: Final = 0.5
#: Send-half granules kept for control calls (addresses, options): data sends leave them.
CONTROL_RESERVE: Final = 4
#: atexit: how long the process waits for queued SENDs and CLOSEs to be answered.
EXIT_FLUSH: Final = 5.0
DISPATCH_BATCH: Final = 64
#: Requests in flight kept free for control calls: data SENDs and posted ACCEPTs leave them.
CALL_HEADROOM: Final = 16
SPIN: Final = 30  # idle polls (each yielding the GIL) before the dispatcher sleeps on its bell

_INET: Final = (_std.AF_INET, _std.AF_INET6)
_TYPES: Final = (_std.SOCK_STREAM, _std.SOCK_DGRAM)
_TYPE_FLAGS: Final = _std.SOCK_NONBLOCK | _std.SOCK_CLOEXEC
_MSG_DONTWAIT: Final = _std.MSG_DONTWAIT
_MSG_PEEK: Final = _std.MSG_PEEK
_MSG_WAITALL: Final = _std.MSG_WAITALL
_SEND_LOCAL_FLAGS: Final = _std.MSG_DONTWAIT | _std.MSG_NOSIGNAL  # GuestLib's business
_SOCKADDR_ROOM: Final = 28  # sockaddr_in6 holds either family (NQE-15)
_EFD_MAX: Final = 0xFFFF_FFFF_FFFF_FFFE
_U64: Final = (1 << 64) - 1
_GLOBAL_DEFAULT_TIMEOUT: Final = object()



# -- errors ------------------------------------------------------------------------------

def _error(code: int) -> OSError:
    """``OSError(code, strerror)``: Python picks the subclass (ConnectionResetError, ...)."""
    return OSError(code, os.strerror(code))


def _timeout() -> TimeoutError:
    return TimeoutError("timed out")  # what the standard library raises


# -- the NQE on the wire -------------------------------------------------------------------

_ZERO3: Final = bytes(3)


def pack_nqe(op: int, sock_id: int, op_data: int = 0, data_ptr: int = 0, size: int = 0,
             tag: int = 0) -> bytes:
    """The 32 bytes of a request from this tenant (vm_id 0: the CoreEngine stamps it).

    Unchecked: GuestLib only builds well-formed NQEs; the packer is the codec's
    :data:`nq.WIRE`, derived from :data:`nq.NQE_STRUCT` (NQE-1..NQE-3).
    """
    return nq.WIRE.pack(op, QSET, 0, sock_id, op_data & _U64, data_ptr, size, tag, _ZERO3)


def _signed(op_data: int) -> int:
    """A reply's op_data as the signed result it carries (NQE-13)."""
    return op_data - (1 << 64) if op_data >> 63 else op_data


# -- addresses ---------------------------------------------------------------------------

_FAMILY_NAME: Final[dict[int, str]] = {_std.AF_INET: "AF_INET", _std.AF_INET6: "AF_INET6"}


def encode_address(family: int, address: Any, func: str) -> bytes:
    """A Python address tuple as the Linux sockaddr a data buffer carries (NQE-15).

    Parses the way the standard library does, with its exceptions: TypeError
    for a wrong shape, OverflowError for a port or flow info out of range,
    ``socket.gaierror`` for a host that does not resolve in ``family``.
    """
    name = _FAMILY_NAME[family]
    if not isinstance(address, tuple):
        raise TypeError(f"{func}(): {name} address must be tuple, not {type(address).__name__}")
    if family == _std.AF_INET:
        if len(address) != 2:
            raise TypeError("AF_INET address must be a pair (host, port)")
        host, port = address
        flowinfo = scope_id = 0
    else:
        if not 2 <= len(address) <= 4:
            raise TypeError("AF_INET6 address must be a tuple (host, port[, flowinfo[, scopeid]])")
        host, port = address[0], address[1]
        # the standard library parses both as C unsigned ints, wrapping silently
        flowinfo = (operator.index(address[2]) if len(address) > 2 else 0) & 0xFFFF_FFFF
        scope_id = (operator.index(address[3]) if len(address) > 3 else 0) & 0xFFFF_FFFF
    port = operator.index(port)
    if not 0 <= port <= 0xFFFF:
        raise OverflowError(f"{func}(): port must be 0-65535.")
    if flowinfo > 0xFFFFF:
        raise OverflowError(f"{func}(): flowinfo must be 0-1048575.")
    packed, resolved_scope = _host_address(family, host)
    text = _std.inet_ntop(family, packed)
    raw: bytes = nq.pack_sockaddr(nq.Sockaddr(family, text, port, flowinfo,
                                              scope_id or resolved_scope))
    return raw


def _host_address(family: int, host: Any) -> tuple[bytes, int]:
    """The packed address of ``host`` and the scope ID a ``%iface`` suffix named."""
    if isinstance(host, bytes | bytearray):
        host = bytes(host).decode("ascii")
    elif not isinstance(host, str):
        raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
    if host == "":
        return (b"\0" * (4 if family == _std.AF_INET else 16)), 0
    if host == "<broadcast>" and family == _std.AF_INET:
        return b"\xff\xff\xff\xff", 0
    with contextlib.suppress(OSError):
        return _std.inet_pton(family, host), 0
    infos = _std.getaddrinfo(host, None, family, _std.SOCK_DGRAM)
    sa: tuple[Any, ...] = tuple(infos[0][4])
    scope = int(sa[3]) if len(sa) > 3 else 0
    return _std.inet_pton(family, str(sa[0]).partition("%")[0]), scope


def decode_address(raw: bytes) -> tuple[Any, ...]:
    """A sockaddr the stack wrote, as the tuple the standard library returns (NQE-15)."""
    nq.unpack_sockaddr(raw)  # validates family and length (NQE-15)
    family = int.from_bytes(raw[0:2], "little")
    port = int.from_bytes(raw[2:4], "big")
    if family == _std.AF_INET:
        return (_std.inet_ntop(family, raw[4:8]), port)
    return (_std.inet_ntop(family, raw[8:24]), port, int.from_bytes(raw[4:8], "big"),
            int.from_bytes(raw[24:28], "little"))


# -- the send half --------------------------------------------------------------------------

class _SendPool:
    """The tenant's send half (BUF-1, BUF-3), shared by the threads of a process.

    :class:`SendAllocator` is the sans-IO allocator; this adds the lock, the
    waiting when the half is full (BUF-7: ``send()`` blocks or fails with
    EAGAIN) and a small reserve that data sends leave to control calls, so a
    socket whose peer stopped reading cannot starve ``getsockname``.
    """

    def __init__(self, geo: dev.Geometry) -> None:
        self._alloc = SendAllocator(geo)
        self.granule = geo.buf_size
        self.capacity = geo.send_size
        self._reserve = min(CONTROL_RESERVE, geo.send_size // geo.buf_size // 2) * geo.buf_size
        self.cond = threading.Condition(threading.Lock())

    def try_alloc(self, size: int, *, control: bool) -> int | None:
        """Offset of a buffer of ``size`` bytes, or None if the half is too full now."""
        with self.cond:
            need = -(-size // self.granule) * self.granule
            if not control and self._alloc.free_bytes() - need < self._reserve:
                return None
            span = self._alloc.alloc(size)
            return None if span is None else span.offset

    def free(self, offset: int) -> None:
        with self.cond:
            self._alloc.free(offset)
            self.cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait(timeout)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


# -- requests in flight ------------------------------------------------------------------------

class _Call:
    """One request in flight, matched to its reply by ``(sock_id, tag)`` (NQE-9)."""

    __slots__ = ("buf", "conn", "done", "extra", "on_done", "op", "out", "result", "size",
                 "tag", "waited")

    def __init__(self, op: Op, conn: _Conn, buf: int | None, size: int,
                 on_done: Callable[[_Call], None] | None = None) -> None:
        self.op = op
        self.conn = conn
        self.buf = buf  # send-half offset lent with the request, freed on the reply (BUF-3)
        self.size = size
        self.on_done = on_done
        self.tag = 0
        self.result: int | None = None
        self.out = b""  # bytes the stack wrote into the buffer (addresses, option values)
        self.done = threading.Event()
        self.waited = True  # an application thread still waits for this reply
        self.extra: Any = None


# -- the local part of the socket state machine ------------------------------------------------

class St(enum.Enum):
    """The TCP states GuestLib tells apart (Linux's ``sk_state``, coarsened)."""

    CLOSE = "close"  # never connected, or the connection is over
    SYN_SENT = "syn_sent"  # CONNECT in flight
    ESTABLISHED = "established"  # ESTABLISHED and CLOSE_WAIT
    LISTEN = "listen"


class Sk(enum.Enum):
    """Linux's ``sock->state`` for connect(): what a second connect() returns."""

    UNCONNECTED = "unconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTING = "disconnecting"  # shutdown() of a failed connect: connect() is EINVAL


RCV_SHUTDOWN: Final = 1
SEND_SHUTDOWN: Final = 2
SHUTDOWN_MASK: Final = 3
_NOT_WRITABLE: Final = 2


class _Rx:
    """A receive buffer lent by EV_DATA until the application has read it (BUF-4)."""

    __slots__ = ("addr", "end", "offset", "pos", "size")

    def __init__(self, offset: int, size: int, prefix: int) -> None:
        self.offset = offset
        self.size = size
        self.pos = offset + prefix  # next unread byte
        self.end = offset + size
        self.addr = prefix  # length of a source address prefix (UDP)


class _Conn:
    """GuestLib's half of one NetKernel socket (shared by its ``socket`` objects)."""

    def __init__(self, device: _Device, sock_id: int, family: int, type_: int,
                 proto: int) -> None:
        self.device = device
        self.sock_id = sock_id
        self.family = family
        self.type = type_
        self.proto = proto
        self.stream = type_ == _std.SOCK_STREAM
        self.cond = threading.Condition(threading.Lock())
        self.evfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ready = 0  # what the eventfd shows: 0 writable, 1 both, 2 readable only
        self.refs = 1
        self.closed = False
        self.close_sent = False
        self.unread = False  # closed with received data unread: CLOSE asks for a reset (GL-2)
        self.st = St.CLOSE
        self.sk = Sk.UNCONNECTED
        self.shutdown = 0
        self.done = False  # EOF from the peer (EV_FIN): recv returns 0 once the data is read
        self.error = 0  # pending asynchronous error (SO_ERROR)
        self.reset = False  # a fatal error ended the connection; later errors are its echoes
        self.rx: collections.deque[_Rx] = collections.deque()
        self.inflight = 0  # bytes of SENDs not yet answered
        self.inflight_n = 0
        self.acceptq: collections.deque[tuple[_Conn, tuple[Any, ...] | None]] = \
            collections.deque()
        self.listen_gen = 0  # one more each time the socket starts listening
        self.posted_gen = -1  # the generation whose ACCEPT is posted, -1 none
        self.accept_err = 0
        self.collected = 0  # the errno of the last failed connect() collected
        self.tag = 0
        self.refresh()

    # -- readiness: what Linux's poll() says (tcp_poll, datagram_poll) ----------------------
    def readable(self) -> bool:
        """POLLIN or POLLHUP or POLLERR: what select() counts as readable."""
        if self.error:
            return True
        if not self.stream:
            return bool(self.rx) or bool(self.shutdown & RCV_SHUTDOWN)
        if self.st is St.LISTEN:
            return bool(self.acceptq) or bool(self.accept_err)
        return (bool(self.rx) or self.done or bool(self.shutdown & RCV_SHUTDOWN)
                or self.st is St.CLOSE)

    def writable(self) -> bool:
        """POLLOUT or POLLERR: a listener never, a connecting socket not yet, a full one not."""
        if self.error or not self.stream:
            return True
        if self.st in (St.SYN_SENT, St.LISTEN):
            return False
        if self.st is St.ESTABLISHED and not self.shutdown & SEND_SHUTDOWN:
            return self.inflight < self.device.send_limit
        return True

    def refresh(self) -> None:
        """Make the eventfd show the socket's readiness. Caller holds ``cond`` (or owns us).

        Readable is exact. An eventfd is writable unless readable-only, so only a
        connecting socket (never readable yet on Linux either) shows not writable;
        a listener or a full send queue shows writable (send then says EAGAIN).
        """
        if self.evfd < 0:
            return
        want = 0
        if self.stream and self.st is St.SYN_SENT and not self.error:
            want = _NOT_WRITABLE
        elif self.readable():
            want = 1
        if want == self.ready:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.evfd)
        if want:
            os.eventfd_write(self.evfd, 1 if want == 1 else _EFD_MAX)
        self.ready = want

    def changed(self) -> None:
        """After a change of state: update readiness and wake waiters. Caller holds ``cond``."""
        self.refresh()
        self.cond.notify_all()

    # -- errors --------------------------------------------------------------------------
    def take_error(self) -> int:
        err, self.error = self.error, 0
        return err

    def fatal(self, err: int) -> None:
        """An asynchronous error ends a TCP connection as a reset does (tcp_done).

        Caller holds ``cond``.
        """
        if self.stream:
            if self.reset:
                return  # the same failure seen again (EV_ERROR after a failed SEND)
            self.reset = True
            if self.st is St.SYN_SENT:
                self.st = St.CLOSE  # a failed connect: the next connect() collects it
            elif self.st is St.ESTABLISHED:
                self.st = St.CLOSE
                self.shutdown = SHUTDOWN_MASK
        self.error = err
        self.changed()

    def next_tag(self) -> int:
        self.tag = (self.tag + 1) & 0xFFFF
        return self.tag


# -- the device ----------------------------------------------------------------------------------

class _Outbox:
    """A ring we produce on, its producer lock, and NQEs waiting for room.

    Application threads may wait for room; the dispatcher never does: what it
    cannot publish at once waits here and is published before anything newer.
    """

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.lock = threading.Lock()
        self.waiting: collections.deque[bytes] = collections.deque()

    def flush_locked(self) -> bool:
        """Publish what waits; True if nothing is left waiting. Caller holds ``lock``."""
        if self.waiting:
            batch = list(self.waiting)
            for _ in range(self.ring.push_many(batch)):
                self.waiting.popleft()
        return not self.waiting


class _Device:
    """This process's NK device on one instance (RUNTIME.md: attach, rings, dispatcher)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.pid = os.getpid()
        self.control, self.vm_id, path = _attach(instance)
        try:
            self.map = shm.open_device(path)
            geo = self.map.geo
            if geo.kind is not dev.Kind.TENANT or self.map.state is not dev.State.READY:
                raise OSError(E.EPROTO, f"{path} is not a ready tenant device")
        except BaseException:
            self.control.close()
            raise
        self.geo = geo
        self.data = self.map.data()
        self.completion = self.map.ring(QSET, RingId.COMPLETION)
        self.receive = self.map.ring(QSET, RingId.RECEIVE)
        self.outbox = {rid: _Outbox(self.map.ring(QSET, rid)) for rid in (RingId.JOB,
                                                                          RingId.SEND)}
        self.device_bell = self.map.bell(QSET, dev.Bell.DEVICE)
        self.engine_bell = self.map.bell(QSET, dev.Bell.ENGINE)
        self.pool = _SendPool(geo)
        self.send_limit = max(geo.buf_size, min(geo.send_size // 4, 1 << 20))
        self.lock = threading.Lock()
        self.slots = threading.Condition(self.lock)  # notified when a request is answered
        self.conns: dict[int, _Conn] = {}
        self.pending: dict[tuple[int, int], _Call] = {}
        # the CoreEngine answers ENOBUFS beyond one ring's worth of requests in flight (SEC-5);
        # staying under it also means every reply finds room in COMPLETION
        self.max_inflight = geo.n_qsets * geo.ring_entries
        self.repost: set[_Conn] = set()  # listeners whose ACCEPT the dispatcher could not post
        self._next_id = 0
        self.dead = 0  # errno once the CoreEngine or our device is gone
        self.stale = False  # inherited over fork: unusable in this process
        self.why = ""
        self.counters: collections.Counter[str] = collections.Counter()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"netkernel-guestlib-{instance}-vm{self.vm_id}")
        self.thread.start()

    # -- sockets ------------------------------------------------------------------------
    def new_conn(self, family: int, type_: int, proto: int) -> _Conn:
        """Register a socket ID of ours (non-zero, unused: NQE-7) with fresh state."""
        with self.lock:
            while True:
                self._next_id = self._next_id % nq.U32_MAX + 1
                if self._next_id not in self.conns:
                    break
            conn = _Conn(self, self._next_id, family, type_, proto)
            self.conns[conn.sock_id] = conn
        return conn

    def forget(self, conn: _Conn) -> None:
        """The socket ID is free again (CLOSE answered, or never created)."""
        with self.lock:
            if self.conns.get(conn.sock_id) is conn:
                del self.conns[conn.sock_id]
            stale = [k for k, c in self.pending.items() if c.conn is conn]
            calls = [self.pending.pop(k) for k in stale]
            self.slots.notify_all()
        for call in calls:
            self._complete(call, -E.EBADF)

    # -- submission ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise unless requests can still travel: EBADF after fork, ECONNRESET once dead."""
        if self.stale:
            raise _error(E.EBADF)
        if self.dead:
            raise _error(E.ECONNRESET)

    def submit(self, ring: RingId, raw: bytes, *, block: bool = True) -> None:
        """Publish one NQE on JOB or SEND and ring the CoreEngine's bell if it sleeps (RING-6).

        ``block=False`` never waits (the dispatcher, BUF_RETURN): a full ring
        leaves the NQE in the outbox, published by whoever comes next.
        """
        box = self.outbox[ring]
        if not block:
            box.waiting.append(raw)
            self._flush(box)
            return
        while True:
            self.check()
            with box.lock:
                done = box.flush_locked() and box.ring.push(raw)
                _bell.notify(box.ring, self.engine_bell)
            if done:
                return
            time.sleep(0.0002)  # the ring is full: the CoreEngine drains it soon

    def _flush(self, box: _Outbox) -> None:
        if box.waiting and box.lock.acquire(blocking=False):
            try:
                before = len(box.waiting)
                box.flush_locked()
                if len(box.waiting) != before:
                    _bell.notify(box.ring, self.engine_bell)
            finally:
                box.lock.release()

    def call(self, call: _Call, op_data: int = 0, *, ring: RingId = RingId.JOB,
             block: bool = True) -> _Call:
        """Register ``call`` under a free tag of its socket and publish it (NQE-9).

        Waits while the tenant has its quota of requests in flight (data
        requests leave :data:`CALL_HEADROOM` to control calls); ``block=False``
        (the dispatcher) never waits.
        """
        conn = call.conn
        limit = self.max_inflight - (CALL_HEADROOM if call.op in (Op.SEND, Op.ACCEPT) else 0)
        with self.lock:
            while block and len(self.pending) >= limit:
                if self.dead or self.stale:
                    raise _error(E.EBADF if self.stale else E.ECONNRESET)
                self.slots.wait(WAIT_SLICE)
            for _ in range(0x10000):
                tag = conn.next_tag()
                if (conn.sock_id, tag) not in self.pending:
                    break
            else:
                raise _error(E.ENOBUFS)
            call.tag = tag
            self.pending[(conn.sock_id, tag)] = call
        raw = pack_nqe(call.op, conn.sock_id, op_data, call.buf or 0,
                       call.size if call.buf is not None else 0, tag)
        try:
            self.submit(ring, raw, block=block)
        except BaseException:
            with self.lock:
                self.pending.pop((conn.sock_id, tag), None)
            if call.buf is not None:
                self.pool.free(call.buf)
            raise
        self.counters[call.op.name] += 1
        return call

    def buf_return(self, rx: _Rx) -> None:
        """Give a receive buffer back to its NSM (BUF-4): exactly the EV_DATA's span."""
        self.counters["BUF_RETURN"] += 1
        self.submit(RingId.SEND, pack_nqe(Op.BUF_RETURN, nq.SOCK_NONE, 0, rx.offset, rx.size),
                    block=False)

    def alloc(self, size: int, *, control: bool, deadline: float | None = None,
              conn: _Conn | None = None) -> int | None:
        """A send-half buffer; waits for one (BUF-7) until ``deadline`` (None: forever)."""
        while True:
            self.check()
            off = self.pool.try_alloc(size, control=control)
            if off is not None:
                return off
            if conn is not None and (conn.error or conn.closed):
                return None
            left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            self.pool.wait(min(left, WAIT_SLICE))

    # -- the dispatcher -----------------------------------------------------------------
    def _run(self) -> None:
        idle = 0
        next_check = 0.0
        rings = (self.completion, self.receive)
        try:
            while not self.dead and not self.stale:
                got = self.completion.pop_many(DISPATCH_BATCH)
                got += self.receive.pop_many(DISPATCH_BATCH)
                for raw in got:
                    self._dispatch(raw)
                for box in self.outbox.values():
                    self._flush(box)
                if self.repost:
                    for listener in list(self.repost):
                        self.repost.discard(listener)
                        _post_accept(listener, block=False)
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + WAIT_SLICE
                    self._check_alive()
                if got:
                    idle = 0
                elif idle < SPIN:
                    idle += 1
                    time.sleep(0)
                else:
                    waiting = self.repost or any(box.waiting for box in self.outbox.values())
                    _bell.sleep_until_work(self.device_bell, rings,
                                           0.001 if waiting else _bell.MAX_SLEEP)
        except (RingError, ValueError, OSError) as exc:
            # a broken ring (SEC-6) or a mapping gone: nothing more will arrive
            self._die(E.ECONNRESET, f"dispatcher stopped: {exc}")
        except Exception as exc:  # a bug here must fail the sockets, never hang them
            self._die(E.ECONNRESET, f"dispatcher crashed: {exc!r}")
            raise

    def _check_alive(self) -> None:
        try:
            data = self.control.recv(4096)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":
            self._die(E.ECONNRESET, "the CoreEngine closed engine.sock")
        elif self.map.state is dev.State.DETACHED:
            self._die(E.ECONNRESET, "the CoreEngine detached the device")

    def _dispatch(self, raw: bytes) -> None:
        op, _q, _vm, sock_id, op_data, ptr, size, tag, _r = nq.WIRE.unpack(raw)
        try:
            if op & nq.REPLY_BIT:
                self._reply(op, sock_id, tag, _signed(op_data))
            else:
                handler = _EVENTS.get(op)
                if handler is None:
                    self.counters["dropped"] += 1
                else:
                    handler(self, sock_id, _signed(op_data), ptr, size)
        except Exception as exc:  # one bad NQE must not stop the dispatcher
            self.counters["dropped"] += 1
            print(f"netkernel guestlib: dropped {nq.op_name(op)} for socket {sock_id}: {exc!r}",
                  file=sys.stderr)

    def _reply(self, op: int, sock_id: int, tag: int, result: int) -> None:
        with self.lock:
            call = self.pending.pop((sock_id, tag), None)
            self.slots.notify()
        if call is None:
            # BUF_RETURN|0x80 (a rejected return, BUF-5) or a reply nobody waits for
            self.counters["unmatched_replies"] += 1
            return
        self._complete(call, result)

    def _complete(self, call: _Call, result: int) -> None:
        if call.buf is not None:
            if result > 0 and call.op in _OUTPUT_OPS:
                n = min(result, call.size)
                call.out = bytes(self.data[call.buf:call.buf + n])
            self.pool.free(call.buf)  # the reply gives the buffer back (BUF-3)
            call.buf = None
        call.result = result
        try:
            if call.on_done is not None:
                call.on_done(call)
        finally:
            call.done.set()

    def _conn(self, sock_id: int) -> _Conn | None:
        return self.conns.get(sock_id)

    def _ev_data(self, sock_id: int, prefix: int, ptr: int, size: int) -> None:
        rx = _Rx(ptr, size, prefix)
        conn = self._conn(sock_id)
        if conn is not None:
            with conn.cond:
                if not conn.closed:
                    conn.rx.append(rx)
                    conn.changed()
                    return
                conn.unread = conn.unread or conn.stream  # Linux resets on data after close
        self.buf_return(rx)  # nobody will read it

    def _ev_fin(self, sock_id: int, _arg: int, _ptr: int, _size: int) -> None:
        conn = self._conn(sock_id)
        if conn is not None:
            with conn.cond:
                conn.done = True
                conn.shutdown |= RCV_SHUTDOWN
                conn.changed()

    def _ev_error(self, sock_id: int, arg: int, _ptr: int, _size: int) -> None:
        err = -arg if arg < 0 else E.EIO
        conns = list(self.conns.values()) if sock_id == nq.SOCK_NONE else [self._conn(sock_id)]
        for conn in conns:
            if conn is not None and not conn.closed:
                with conn.cond:
                    conn.fatal(err)

    def _ev_acceptable(self, sock_id: int, _arg: int, _ptr: int, _size: int) -> None:
        """A hint only: GuestLib keeps an ACCEPT posted on every listening socket."""
        conn = self._conn(sock_id)
        if conn is not None:
            with conn.cond:
                conn.changed()

    def _die(self, err: int, why: str) -> None:
        """The CoreEngine is gone: every socket fails like a reset one; nothing hangs."""
        if self.dead:
            return
        self.dead = err
        self.counters["died"] += 1
        with self.lock:
            conns = list(self.conns.values())
            calls = list(self.pending.values())
            self.pending.clear()
            self.slots.notify_all()
        for call in calls:
            self._complete(call, -err)
        for conn in conns:
            with conn.cond:
                conn.fatal(err)
                conn.changed()
        self.pool.wake()
        with contextlib.suppress(OSError):
            self.control.close()
        self.why = why  # for debugging; applications see it as ECONNRESET / EPIPE

    # -- process life -------------------------------------------------------------------
    def drain(self, timeout: float) -> None:
        """Wait until every SEND and CLOSE of this process is answered (exit, BUF-3)."""
        deadline = time.monotonic() + timeout
        while not self.dead and time.monotonic() < deadline:
            with self.lock:
                busy = any(c.op in (Op.SEND, Op.CLOSE) for c in self.pending.values())
                closing = any(c.closed and not c.close_sent for c in self.conns.values())
            if not busy and not closing:
                return
            time.sleep(0.005)

    def disown(self) -> None:
        """In a forked child: this device belongs to the parent; drop our copies."""
        self.stale = True
        with contextlib.suppress(OSError):
            self.control.close()  # our copy only: the parent stays attached
        for conn in list(self.conns.values()):
            if conn.evfd >= 0:
                with contextlib.suppress(OSError):
                    os.close(conn.evfd)
                conn.evfd = -1
            conn.closed = True


_EVENTS: Final[dict[int, Callable[[_Device, int, int, int, int], None]]] = {
    Op.EV_DATA: _Device._ev_data,
    Op.EV_FIN: _Device._ev_fin,
    Op.EV_ERROR: _Device._ev_error,
    Op.EV_ACCEPTABLE: _Device._ev_acceptable,
}
#: Requests whose reply says how many bytes the stack wrote into the lent buffer.
_OUTPUT_OPS: Final = frozenset({Op.ACCEPT, Op.GETSOCKOPT, Op.GETSOCKNAME, Op.GETPEERNAME})


def _attach(instance: str) -> tuple[_std.socket, int, str]:
    """Hotplug: ask the CoreEngine for a tenant device over ``engine.sock`` (RUNTIME.md).

    The connection stays open for the device's lifetime; its EOF is our detach.
    """
    path = shm.engine_socket(instance)
    s = _std.socket(_std.AF_UNIX, _std.SOCK_STREAM)
    try:
        s.settimeout(ATTACH_TIMEOUT)
        s.connect(str(path))
        name = os.path.basename(sys.argv[0] or "python") if sys.argv else "python"
        s.sendall(json.dumps({"cmd": "attach", "kind": "tenant", "pid": os.getpid(),
                              "name": name}).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise OSError(E.ECONNRESET, "engine.sock closed during attach")
            line += chunk
        reply = json.loads(line)
    except OSError as exc:
        s.close()
        raise OSError(E.ENETDOWN, f"NetKernel instance {instance!r} is not reachable at"
                                  f" {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        s.close()
        raise OSError(E.EPROTO, f"bad attach reply from {path}: {exc}") from None
    if not reply.get("ok"):
        s.close()
        raise OSError(E.ENETDOWN, f"NetKernel instance {instance!r} refused the attach:"
                                  f" {reply.get('error', reply)}")
    s.setblocking(False)
    return s, int(reply["id"]), str(reply["path"])


# -- one device per process and instance ----------------------------------------------------

_registry_lock = threading.Lock()
_devices: dict[str, _Device] = {}


def device(instance: str | None = None) -> _Device:
    """This process's device on ``instance`` (default: ``$NETKERNEL_INSTANCE``), attaching once.

    A device whose CoreEngine died is replaced by a fresh attach.
    """
    name = shm.instance_name(instance)
    with _registry_lock:
        found = _devices.get(name)
        if found is None or found.dead or found.stale:
            found = _devices[name] = _Device(name)
        return found


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for d in _devices.values():
        d.disown()
    _devices.clear()


_exiting = False


def _at_exit() -> None:
    """Let queued SENDs and CLOSEs reach the stack before the process (and its device) goes."""
    global _exiting
    for d in list(_devices.values()):
        if not d.stale and d.pid == os.getpid():
            d.drain(EXIT_FLUSH)
    _exiting = True


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


# -- the socket ----------------------------------------------------------------------------------

_TIMED_OUT: Final = -1  # internal: a connect whose deadline passed
_COLLECTED: Final = -2  # internal: a failed connect collected; its errno is conn.collected
#: connect() errors Linux returns at once, even on a non-blocking socket (no handshake ran).
_IMMEDIATE_CONNECT_ERRORS: Final = frozenset({
    E.EINVAL, E.EAFNOSUPPORT, E.EADDRNOTAVAIL, E.EADDRINUSE, E.EACCES, E.EPERM,
    E.ENETUNREACH, E.EISCONN, E.EALREADY, E.EFAULT, E.ENOBUFS, E.EBADF,
})
#: How long a non-blocking connect() waits for such an error before saying EINPROGRESS.
_QUICK: Final = 0.005


class socket:
    """A NetKernel socket, used like :class:`socket.socket` (AF_INET/AF_INET6, TCP/UDP).

    ``instance`` picks the NetKernel instance (default ``$NETKERNEL_INSTANCE``,
    else ``default``). Families other than AF_INET/AF_INET6 raise
    EAFNOSUPPORT, types other than SOCK_STREAM/SOCK_DGRAM ESOCKTNOSUPPORT;
    with no instance running the constructor raises OSError(ENETDOWN).
    """

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 *, instance: str | None = None) -> None:
        family = _std.AF_INET if family == -1 else operator.index(family)
        type = _std.SOCK_STREAM if type == -1 else operator.index(type)
        proto = 0 if proto == -1 else operator.index(proto)
        self._io_refs = 0
        self._closed = True
        self._conn: _Conn | None = None
        self._fd = -1
        self._family, self._type, self._proto = family, type & ~_TYPE_FLAGS, proto
        self._timeout: float | None = None
        if family not in _INET:
            raise _error(E.EAFNOSUPPORT)
        if self._type not in _TYPES:
            raise _error(E.ESOCKTNOSUPPORT)
        d = device(instance)
        d.check()
        conn = d.new_conn(family, self._type, proto)
        try:
            # op_data: domain | type << 16 | protocol << 32, type without SOCK_CLOEXEC
            # (it does not fit 16 bits) and SOCK_NONBLOCK: blocking is GuestLib's business.
            _sync(d, _Call(Op.SOCKET, conn, None, 0),
                  family | (self._type << 16) | ((proto & 0xFFFF) << 32))
        except BaseException:
            d.forget(conn)
            _close_evfd(conn)
            raise
        self._conn, self._fd, self._closed = conn, conn.evfd, False
        self._timeout = 0.0 if type & _std.SOCK_NONBLOCK else _std.getdefaulttimeout()

    @classmethod
    def _wrap(cls, conn: _Conn, fd: int) -> socket:
        """A socket object on an existing NetKernel socket (accept, dup)."""
        sock = cls.__new__(cls)
        sock._io_refs = 0
        sock._conn, sock._fd, sock._closed = conn, fd, False
        sock._family, sock._type, sock._proto = conn.family, conn.type, conn.proto
        sock._timeout = _std.getdefaulttimeout()
        return sock

    # -- attributes -------------------------------------------------------------------------
    @property
    def family(self) -> _std.AddressFamily:
        return _std.AddressFamily(self._family)

    @property
    def type(self) -> _std.SocketKind:
        return _std.SocketKind(self._type)

    @property
    def proto(self) -> int:
        return self._proto

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def fileno(self) -> int:
        """A real eventfd, readable when the socket is (module docstring); -1 once closed
        (and in a forked child, where the parent's sockets are not usable)."""
        conn = self._conn
        return -1 if conn is None or conn.device.stale else self._fd

    def _brief(self) -> str:
        return (f"<{type(self).__module__}.{type(self).__qualname__}"
                f"{' [closed]' if self._closed else ''} fd={self._fd}, family={self.family!s},"
                f" type={self.type!s}, proto={self.proto}")

    def __repr__(self) -> str:
        s = self._brief()
        if not self._closed:
            with contextlib.suppress(OSError):
                s += f", laddr={self.getsockname()}"
            with contextlib.suppress(OSError):
                s += f", raddr={self.getpeername()}"
        return s + ">"

    def __getstate__(self) -> None:
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __enter__(self) -> socket:
        return self

    def __exit__(self, *args: object) -> None:
        if not self._closed:
            self.close()

    def __del__(self) -> None:
        if getattr(self, "_conn", None) is None or self._closed:
            return
        with contextlib.suppress(Exception):  # no round trip here: no getsockname in repr
            warnings.warn(f"unclosed {self._brief()}>", ResourceWarning, source=self,
                          stacklevel=2)
        if _exiting:
            # interpreter shutdown: the dispatcher may be frozen holding a lock; the
            # CoreEngine closes every socket of the device when the process is gone
            self._conn = None
            self._closed = True
            return
        with contextlib.suppress(Exception):
            self._real_close()

    # -- timeouts ---------------------------------------------------------------------------
    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = value if isinstance(value, float) else float(operator.index(value))
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def _deadline(self, dontwait: int = 0) -> float | None:
        """None: block; 0.0: do not wait; else a ``time.monotonic`` deadline.

        With a timeout, CPython retries a call that says EAGAIN until the
        deadline, so MSG_DONTWAIT (``dontwait``) changes only a blocking socket.
        """
        if self._timeout is None:
            return 0.0 if dontwait else None
        if self._timeout == 0.0:
            return 0.0
        return time.monotonic() + self._timeout

    # -- life -------------------------------------------------------------------------------
    def _live(self) -> _Conn:
        conn = self._conn  # None only after the real close: makefile() streams keep it
        if conn is None or conn.closed or conn.device.stale:
            raise _error(E.EBADF)
        return conn

    def close(self) -> None:
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed:
            self.close()

    def _real_close(self) -> None:
        conn, self._conn = self._conn, None
        fd, self._fd = self._fd, -1
        self._closed = True
        if conn is None:
            return
        if fd >= 0 and fd != conn.evfd:
            with contextlib.suppress(OSError):
                os.close(fd)  # a dup()'s own descriptor
        _release(conn)

    def dup(self) -> socket:
        """Another socket object on the same NetKernel socket, with a descriptor of its own."""
        conn = self._live()
        with conn.cond:
            conn.refs += 1
        copy = socket._wrap(conn, os.dup(conn.evfd))
        copy._timeout = self._timeout
        return copy

    def get_inheritable(self) -> bool:
        self._live()
        return os.get_inheritable(self._fd)

    def set_inheritable(self, inheritable: bool) -> None:
        self._live()
        os.set_inheritable(self._fd, inheritable)

    # -- control calls ------------------------------------------------------------------------
    def bind(self, address: Any) -> None:
        conn = self._live()
        _sync_out(conn, Op.BIND, encode_address(conn.family, address, "bind"))

    def listen(self, backlog: int = min(_std.SOMAXCONN, 128)) -> None:
        conn = self._live()
        backlog = max(0, min(operator.index(backlog), 0x7FFF_FFFF))
        _sync(conn.device, _Call(Op.LISTEN, conn, None, 0), backlog)
        with conn.cond:
            if conn.stream and conn.st is not St.LISTEN:
                conn.st = St.LISTEN
                conn.listen_gen += 1  # answers to ACCEPTs of an earlier listen are stale
                conn.changed()
        _post_accept(conn)

    def accept(self) -> tuple[socket, tuple[Any, ...] | None]:
        """A connection from the local accept queue (an ACCEPT is always posted)."""
        conn = self._live()
        deadline = self._deadline()
        _ready_first(conn, False, deadline)
        err = 0
        with conn.cond:
            while True:
                if not conn.stream:
                    raise _error(E.EOPNOTSUPP)
                if conn.acceptq:
                    new, addr = conn.acceptq.popleft()
                    conn.changed()
                    break
                if conn.reset and conn.st is St.LISTEN:  # its NSM or the CoreEngine died
                    raise _error(conn.take_error() or E.ECONNRESET)
                if conn.accept_err:
                    err, conn.accept_err = conn.accept_err, 0
                    conn.changed()
                    break
                if conn.st is not St.LISTEN:
                    raise _error(E.EINVAL)
                _wait(conn, deadline)
        _post_accept(conn)
        if err:
            raise _error(err)
        return socket._wrap(new, new.evfd), addr

    def _connect(self, address: Any) -> int:
        """connect() as Linux decides it: 0, an errno, or ``_TIMED_OUT``."""
        conn = self._live()
        raw = encode_address(conn.family, address, "connect")
        err = self._connect_local(conn, raw)
        if err == _COLLECTED:
            _collect(conn, raw)
            return conn.collected
        return err

    def _connect_local(self, conn: _Conn, raw: bytes) -> int:
        deadline = self._deadline()
        if not conn.stream:
            return _sync_out(conn, Op.CONNECT, raw, raise_=False)
        with conn.cond:
            if conn.sk is Sk.CONNECTED:
                return E.EISCONN
            if conn.sk is Sk.DISCONNECTING:
                return E.EINVAL
            start = conn.sk is Sk.UNCONNECTED
            if start:
                if conn.st is not St.CLOSE:
                    return E.EISCONN  # a listening socket
                conn.st, conn.sk, conn.reset, conn.error = St.SYN_SENT, Sk.CONNECTING, False, 0
                conn.changed()
            elif conn.st is St.SYN_SENT and deadline is not None:
                return E.EALREADY  # a second connect on a non-blocking socket
        if start:
            call = _Call(Op.CONNECT, conn, None, len(raw), on_done=_connected)
            call.waited = False
            try:
                _lend(conn, call, raw)
                conn.device.call(call)
            except BaseException:
                with conn.cond:
                    _disconnect(conn)
                raise
            if deadline == 0.0:
                call.done.wait(_QUICK)
                with conn.cond:
                    if conn.st is not St.CLOSE or conn.error not in _IMMEDIATE_CONNECT_ERRORS:
                        return E.EINPROGRESS
        with conn.cond:
            while conn.st is St.SYN_SENT:
                try:
                    _wait(conn, deadline)
                except TimeoutError:
                    return _TIMED_OUT  # the attempt goes on; a later connect() collects it
            if start and deadline is not None:
                # timeout mode: CPython polls, then reads SO_ERROR; the kernel socket stays
                # "connecting" until a later connect() collects it (0, or ECONNABORTED)
                err = 0 if conn.st is St.ESTABLISHED else conn.take_error()
                conn.changed()
                return err
            if conn.st is St.ESTABLISHED:
                conn.sk = Sk.CONNECTED
                return 0
            # Linux's sock_error path: the pending error (ECONNABORTED once SO_ERROR read it),
            # and the socket is disconnected - the NSM's too, by a CONNECT of its own
            conn.collected = conn.take_error() or E.ECONNABORTED
            _disconnect(conn)
            return _COLLECTED

    def connect(self, address: Any) -> None:
        err = self._connect(address)
        if err == _TIMED_OUT:
            raise _timeout()
        if err:
            raise _error(err)

    def connect_ex(self, address: Any) -> int:
        err = self._connect(address)
        return E.EAGAIN if err == _TIMED_OUT else err  # the standard library's value

    def shutdown(self, how: int) -> None:
        conn = self._live()
        how = operator.index(how)
        if how not in (_std.SHUT_RD, _std.SHUT_WR, _std.SHUT_RDWR):
            raise _error(E.EINVAL)
        if how != _std.SHUT_RD:
            _drain_sends(conn, None)  # SHUTDOWN travels on JOB: it must not overtake SENDs
        call = _sync(conn.device, _Call(Op.SHUTDOWN, conn, None, 0), how, raise_=False)
        result = call.result if call.result is not None else -E.ECONNRESET
        with conn.cond:
            if conn.stream and conn.sk is Sk.CONNECTING:  # inet_shutdown, before anything
                conn.sk = Sk.DISCONNECTING if conn.st in (St.SYN_SENT, St.CLOSE) else \
                    Sk.CONNECTED
            if conn.st is St.LISTEN:
                if result == 0 and how != _std.SHUT_WR:
                    conn.st, conn.shutdown = St.CLOSE, 0  # stops listening (tcp_disconnect)
                    conn.listen_gen += 1  # the posted ACCEPT's answer is stale now
                    conn.accept_err = 0
            elif conn.st is St.SYN_SENT:
                if result == 0:
                    _disconnect(conn)  # shutdown aborts a connect in progress
            elif result == 0 or (result == -E.ENOTCONN and conn.st is St.CLOSE):
                conn.shutdown |= how + 1  # Linux sets the flags even on ENOTCONN
            conn.changed()
        if result < 0:
            raise _error(-result)

    def getsockname(self) -> tuple[Any, ...]:
        conn = self._live()
        return decode_address(_sync_in(conn, Op.GETSOCKNAME, _SOCKADDR_ROOM))

    def getpeername(self) -> tuple[Any, ...]:
        conn = self._live()
        return decode_address(_sync_in(conn, Op.GETPEERNAME, _SOCKADDR_ROOM))

    def setsockopt(self, level: int, optname: int, value: int | bytes | None,
                   optlen: int | None = None) -> None:
        conn = self._live()
        if value is None:
            if optlen is None:
                raise TypeError("a bytes-like object is required, not 'NoneType'")
            raise _error(E.EFAULT)  # Linux reads a NULL option value
        raw = struct.pack("=i", value) if isinstance(value, int) else bytes(memoryview(value))
        _sync_out(conn, Op.SETSOCKOPT, raw, op_data=_optkey(level, optname))

    def getsockopt(self, level: int, optname: int, buflen: int = 0) -> int | bytes:
        """Forwarded to the stack; SO_ERROR first returns the error GuestLib holds."""
        conn = self._live()
        buflen = operator.index(buflen)
        if level == _std.SOL_SOCKET and optname == _std.SO_ERROR and not buflen:
            with conn.cond:
                err = conn.take_error()
                conn.changed()
            if err or conn.device.dead:
                return err
        if buflen:
            if not 0 < buflen <= 1024:
                raise OSError("getsockopt buflen out of range")
            return _sync_in(conn, Op.GETSOCKOPT, buflen, op_data=_optkey(level, optname))
        got = _sync_in(conn, Op.GETSOCKOPT, 4, op_data=_optkey(level, optname))
        value: int = struct.unpack("=i", got.ljust(4, b"\0")[:4])[0]
        return value

    # -- data -------------------------------------------------------------------------------
    def send(self, data: Any, flags: int = 0) -> int:
        conn = self._live()
        view = memoryview(data).cast("B")
        _ready_first(conn, True, self._deadline())
        if not conn.stream:
            return _send_datagram(conn, view, flags, None)
        return _send_stream(conn, view, flags, self._deadline(flags & _MSG_DONTWAIT),
                            all_=False)

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Queue everything, then wait until the stack took it (errors surface here)."""
        conn = self._live()
        view = memoryview(data).cast("B")
        deadline = self._deadline(flags & _MSG_DONTWAIT)
        _ready_first(conn, True, self._deadline())
        if not conn.stream:
            _send_datagram(conn, view, flags, None)
            return
        _send_stream(conn, view, flags, deadline, all_=True)
        _drain_sends(conn, deadline, raise_=True)

    def sendto(self, data: Any, flags_or_addr: Any, address: Any = None) -> int:
        if address is None:
            flags, address = 0, flags_or_addr
        else:
            flags = operator.index(flags_or_addr)
        conn = self._live()
        view = memoryview(data).cast("B")
        raw = encode_address(conn.family, address, "sendto")
        _ready_first(conn, True, self._deadline())
        if conn.stream:  # Linux ignores the address of a TCP sendto
            return _send_stream(conn, view, flags, self._deadline(flags & _MSG_DONTWAIT),
                                all_=False)
        return _send_datagram(conn, view, flags, raw)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        bufsize = operator.index(bufsize)
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        if bufsize == 0:
            return b""  # the standard library makes no call at all
        out = bytearray(bufsize)
        n, _ = self._recv(memoryview(out), flags)
        del out[n:]
        return bytes(out)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(view):
            raise ValueError("buffer too small for requested bytes")
        view = view[:nbytes or len(view)]
        if not len(view):
            return 0
        return self._recv(view, flags)[0]

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, tuple[Any, ...] | None]:
        bufsize = operator.index(bufsize)
        if bufsize < 0:
            raise ValueError("negative buffersize in recvfrom")
        out = bytearray(bufsize)
        n, addr = self._recv(memoryview(out), flags)
        del out[n:]
        return bytes(out), addr

    def recvfrom_into(self, buffer: Any, nbytes: int = 0,
                      flags: int = 0) -> tuple[int, tuple[Any, ...] | None]:
        view = memoryview(buffer).cast("B")
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError("negative buffersize in recvfrom_into")
        if nbytes > len(view):
            raise ValueError("nbytes is greater than the length of the buffer")
        return self._recv(view[:nbytes or len(view)], flags)

    def _recv(self, into: memoryview, flags: int) -> tuple[int, tuple[Any, ...] | None]:
        conn = self._live()
        _ready_first(conn, False, self._deadline())
        deadline = self._deadline(flags & _MSG_DONTWAIT)
        take = _take_stream if conn.stream else _take_datagram
        returned: list[_Rx] = []
        # datagrams: -1 says "blocking", where a read shutdown ends the wait with 0
        have = -1 if not conn.stream and deadline is None else 0
        try:
            with conn.cond:
                while True:
                    have, addr, finished = take(conn, into, flags, returned, have)
                    if finished:
                        conn.refresh()
                        return max(have, 0), addr
                    try:
                        _wait(conn, deadline)
                    except (TimeoutError, BlockingIOError):
                        if have > 0:  # MSG_WAITALL: what arrived before the deadline
                            conn.refresh()
                            return have, None
                        raise
        finally:
            for rx in returned:
                conn.device.buf_return(rx)  # consumed: back to its NSM (BUF-4)

    # -- files ------------------------------------------------------------------------------
    def makefile(self, mode: str = "r", buffering: int | None = None, *,
                 encoding: str | None = None, errors: str | None = None,
                 newline: str | None = None) -> IO[Any]:
        """As :meth:`socket.socket.makefile`, over :class:`socket.SocketIO`."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = _std.SocketIO(self, rawmode)  # type: ignore[arg-type]
        self._io_refs += 1
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw  # type: ignore[return-value]
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer  # type: ignore[no-any-return]
        text = io.TextIOWrapper(buffer, io.text_encoding(encoding), errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def sendfile(self, file: IO[bytes], offset: int = 0, count: int | None = None) -> int:
        """Send a binary file with :meth:`sendall` (the standard library's fallback path)."""
        if self._timeout == 0.0:
            raise ValueError("non-blocking sockets are not supported")
        if offset:
            file.seek(offset)
        total = 0
        while count is None or total < count:
            block = file.read(min(65536, count - total) if count else 65536)
            if not block:
                break
            self.sendall(block)
            total += len(block)
        return total


# -- call helpers ---------------------------------------------------------------------------------

def _optkey(level: int, optname: int) -> int:
    """SETSOCKOPT / GETSOCKOPT op_data: level in bits 0-31, optname in bits 32-63."""
    return (operator.index(level) & 0xFFFF_FFFF) | ((operator.index(optname) & 0xFFFF_FFFF) << 32)


def _wait(conn: _Conn, deadline: float | None) -> None:
    """Sleep on ``conn.cond`` for a slice (caller holds it); raise when the deadline passed."""
    if deadline is None:
        left = WAIT_SLICE
    else:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timeout() if deadline != 0.0 else _error(E.EAGAIN)
    if conn.closed:
        raise _error(E.EBADF)
    conn.cond.wait(min(left, WAIT_SLICE))


def _ready_first(conn: _Conn, writing: bool, deadline: float | None) -> None:
    """The standard library's timeout mode: poll for readiness, then make the call.

    CPython (``sock_call_ex``) waits for POLLIN / POLLOUT *before* a recv, send
    or accept when the socket has a timeout, so e.g. ``send`` on a listening
    socket times out rather than failing EPIPE. Blocking and non-blocking
    sockets make the call directly.
    """
    if deadline is None or deadline == 0.0:
        return
    with conn.cond:
        while not (conn.writable() if writing else conn.readable()):
            _wait(conn, deadline)


def _await(call: _Call) -> bool:
    """Wait for a control call's reply. Never hangs: a dead device completes every call,
    and a socket whose stack failed (EV_ERROR) gets :data:`GRACE` seconds more."""
    conn = call.conn
    d = conn.device
    grace: float | None = None
    while not call.done.wait(WAIT_SLICE):
        if d.stale:
            return False
        if conn.reset and call.op not in (Op.CLOSE, Op.SEND, Op.SOCKET):
            grace = grace or time.monotonic() + GRACE
            if time.monotonic() >= grace:
                return False
    return True


def _sync(d: _Device, call: _Call, op_data: int = 0, *, raise_: bool = True) -> _Call:
    """Publish a control call and wait for its reply; raise its error if ``raise_``."""
    d.call(call, op_data)
    if not _await(call) or call.result is None:
        call.result = -(d.dead or E.ECONNRESET)
    if raise_ and call.result < 0:
        raise _error(-call.result)
    return call


def _lend(conn: _Conn, call: _Call, payload: bytes, *, block: bool = True) -> None:
    """Allocate ``call``'s send-half buffer and write ``payload`` into it (BUF-1, BUF-3)."""
    d = conn.device
    size = max(call.size, len(payload), 1)
    off = d.alloc(size, control=True, deadline=None if block else 0.0)
    if off is None:
        raise _error(E.ENOBUFS)
    d.data[off:off + len(payload)] = payload
    call.buf, call.size = off, size


def _sync_out(conn: _Conn, op: Op, payload: bytes, *, op_data: int = 0,
              raise_: bool = True) -> int:
    """A control call lending the stack ``payload`` (BIND, UDP CONNECT, SETSOCKOPT); errno."""
    call = _Call(op, conn, None, len(payload))
    _lend(conn, call, payload)
    _sync(conn.device, call, op_data, raise_=raise_)
    result = call.result if call.result is not None else -E.ECONNRESET
    return -result if result < 0 else 0


def _sync_in(conn: _Conn, op: Op, room: int, *, op_data: int = 0) -> bytes:
    """A control call whose reply fills ``room`` bytes of a lent buffer (names, options)."""
    call = _Call(op, conn, None, room)
    _lend(conn, call, b"")
    _sync(conn.device, call, op_data)
    return call.out


def _disconnect(conn: _Conn) -> None:
    """A failed connect collected: the socket is fresh again (tcp_disconnect). Holds cond."""
    conn.st, conn.sk, conn.shutdown, conn.done, conn.reset = (St.CLOSE, Sk.UNCONNECTED, 0,
                                                              False, False)
    conn.changed()


def _collect(conn: _Conn, raw: bytes) -> None:
    """Make the NSM's socket collect a failed connect as the application's kernel just did.

    The NSM learnt the failure from SO_ERROR, which leaves its socket
    "connecting"; a second connect() takes Linux's sock_error path and
    disconnects it, so a later listen() or connect() behaves as on Linux. The
    reply is not awaited: calls after it travel on the same JOB ring.
    """
    call = _Call(Op.CONNECT, conn, None, len(raw))
    call.waited = False
    with contextlib.suppress(OSError):
        _lend(conn, call, raw)
        conn.device.call(call)


def _connected(call: _Call) -> None:
    """CONNECT answered (dispatcher): established, or failed as tcp_done leaves a socket."""
    conn = call.conn
    result = call.result if call.result is not None else -E.ECONNRESET
    with conn.cond:
        if conn.st is not St.SYN_SENT:
            return  # closed, or an EV_ERROR / a dead device failed it first
        if result >= 0:
            conn.st = St.ESTABLISHED
        else:
            conn.st, conn.error, conn.reset, conn.shutdown = St.CLOSE, -result, True, \
                SHUTDOWN_MASK
        conn.changed()


# -- accept: an ACCEPT stays posted on every listening socket -----------------------------------

def _post_accept(listener: _Conn, *, block: bool = True) -> None:
    """Post a waiting ACCEPT on ``listener`` unless one is posted.

    The ACCEPT names the new connection's ID (op_data bits 0-31) and lends room
    for the peer's address; its reply puts the connection in the local accept
    queue, which makes the listener readable. Timeouts and non-blocking accepts
    are thus local, and an accept that timed out loses no connection. The
    dispatcher posts with ``block=False``; what it cannot post now it retries.
    """
    d = listener.device
    with listener.cond:
        gen = listener.listen_gen
        if (listener.posted_gen == gen or listener.closed or listener.st is not St.LISTEN
                or listener.reset or d.dead):
            return
        listener.posted_gen = gen
    new = d.new_conn(listener.family, listener.type, listener.proto)
    call = _Call(Op.ACCEPT, listener, None, _SOCKADDR_ROOM, on_done=_accepted)
    call.extra = (new, gen)
    call.waited = False
    try:
        _lend(listener, call, b"", block=block)
        d.call(call, new.sock_id, block=block)
    except OSError:
        d.forget(new)
        _close_evfd(new)
        with listener.cond:
            if listener.posted_gen == gen:
                listener.posted_gen = -1
        if not block and not d.dead:
            d.repost.add(listener)  # no buffer or no room now: the dispatcher retries


def _accepted(call: _Call) -> None:
    """ACCEPT answered (dispatcher): queue the connection, or keep the error for accept()."""
    listener = call.conn
    new: _Conn
    new, gen = call.extra
    result = call.result if call.result is not None else -E.ECONNRESET
    addr: tuple[Any, ...] | None = None
    if result >= 0 and call.out:
        with contextlib.suppress(ValueError):
            addr = decode_address(call.out)
    with listener.cond:
        if listener.posted_gen == gen:
            listener.posted_gen = -1
        current = gen == listener.listen_gen and listener.st is St.LISTEN
        queued = result >= 0 and not listener.closed
        if queued:
            with new.cond:
                new.st, new.sk = St.ESTABLISHED, Sk.CONNECTED
                new.changed()
            listener.acceptq.append((new, addr))
        elif result < 0 and current and not listener.closed and result != -E.EBADF:
            listener.accept_err = -result  # accept() raises it, then posts again
        listener.changed()
    if queued or not current:
        _post_accept(listener, block=False)  # the next one (no-op unless listening)
    elif result >= 0:
        _release(new)  # the listener was closed meanwhile: close the connection too
    else:
        listener.device.forget(new)
        _close_evfd(new)


# -- data ----------------------------------------------------------------------------------------

def _take_stream(conn: _Conn, into: memoryview, flags: int, returned: list[_Rx],
                 have: int) -> tuple[int, None, bool]:
    """recv on TCP with Linux's order of checks (tcp_recvmsg). Caller holds cond.

    Returns ``(bytes in into, None, finished)``; raises the errno of a failed recv.
    """
    if conn.st is St.LISTEN:
        raise _error(E.ENOTCONN)
    peek = flags & _MSG_PEEK
    want = len(into)
    for rx in list(conn.rx):
        if have == want:
            break
        k = min(want - have, rx.end - rx.pos)
        into[have:have + k] = conn.device.data[rx.pos:rx.pos + k]
        have += k
        if not peek:
            rx.pos += k
            if rx.pos == rx.end:
                conn.rx.popleft()
                returned.append(rx)
    if have and (have == want or peek or not flags & _MSG_WAITALL):
        return have, None, True
    if conn.done:
        return have, None, True
    if conn.error:
        if have:
            return have, None, True  # the error stays for the next call
        raise _error(conn.take_error())
    if conn.shutdown & RCV_SHUTDOWN:
        return have, None, True
    if conn.st is St.CLOSE:
        if have:
            return have, None, True
        raise _error(E.ENOTCONN)
    return have, None, False


def _take_datagram(conn: _Conn, into: memoryview, flags: int, returned: list[_Rx],
                   have: int) -> tuple[int, tuple[Any, ...] | None, bool]:
    """recv on UDP: a pending error first, then one datagram, truncated (udp_recvmsg)."""
    if conn.error:
        err = conn.take_error()
        conn.changed()
        raise _error(err)
    if not conn.rx:
        # RCV_SHUTDOWN ends only a blocking wait: a non-blocking recv says EAGAIN first
        return have, None, bool(conn.shutdown & RCV_SHUTDOWN and have < 0)
    rx = conn.rx[0]
    data = conn.device.data
    addr = decode_address(bytes(data[rx.offset:rx.offset + rx.addr])) if rx.addr else None
    k = min(len(into), rx.end - rx.pos)
    into[:k] = data[rx.pos:rx.pos + k]
    if not flags & _MSG_PEEK:
        conn.rx.popleft()
        returned.append(rx)
    return k, addr, True


def _stream_send_error(conn: _Conn) -> int:
    """The errno a TCP send gets before anything is queued, or 0 (tcp_sendmsg's order)."""
    if conn.error:
        return conn.take_error()
    if conn.st in (St.CLOSE, St.LISTEN) or conn.shutdown & SEND_SHUTDOWN:
        return E.EPIPE
    return 0


def _send_stream(conn: _Conn, view: memoryview, flags: int, deadline: float | None,
                 *, all_: bool) -> int:
    """Queue ``view`` as SENDs of at most one granule each; returns the bytes queued.

    A blocking send queues everything, waiting for room under the per-socket
    limit and in the send half (BUF-7); with a timeout or non-blocking it
    queues what fits and returns that count (EAGAIN / timeout if nothing fit),
    except ``sendall`` (``all_``), which waits until its deadline.
    """
    d = conn.device
    total = 0
    wire_flags = flags & ~_SEND_LOCAL_FLAGS & 0xFFFF_FFFF
    while True:
        with conn.cond:
            while True:
                err = _stream_send_error(conn)
                if err:
                    conn.changed()
                    if total:
                        conn.error = conn.error or (err if err != E.EPIPE else 0)
                        return total  # the error is the next call's
                    raise _error(err)
                if total >= len(view):
                    return total
                chunk = min(d.pool.granule, len(view) - total)
                if conn.st is not St.SYN_SENT and (
                        conn.inflight == 0 or conn.inflight + chunk <= d.send_limit):
                    break
                if total and deadline is not None and not all_:
                    return total
                _wait(conn, deadline)
        # a send that already queued something returns rather than wait (unless sendall)
        partial = total and deadline is not None and not all_
        off = d.alloc(chunk, control=False, deadline=0.0 if partial else deadline, conn=conn)
        if off is None:
            with conn.cond:
                if conn.error or conn.closed or conn.shutdown & SEND_SHUTDOWN:
                    continue
            if total:
                return total
            raise _timeout() if deadline else _error(E.EAGAIN)
        d.data[off:off + chunk] = view[total:total + chunk]
        call = _Call(Op.SEND, conn, off, chunk, on_done=_sent)
        call.waited = False
        with conn.cond:
            conn.inflight += chunk
            conn.inflight_n += 1
        try:
            d.call(call, wire_flags, ring=RingId.SEND)
        except OSError:
            with conn.cond:
                conn.inflight -= chunk
                conn.inflight_n -= 1
            if total:
                return total
            raise
        total += chunk


def _sent(call: _Call) -> None:
    """SEND answered (dispatcher): the buffer is ours again (BUF-3); a failure is kept."""
    conn = call.conn
    result = call.result if call.result is not None else -E.ECONNRESET
    with conn.cond:
        conn.inflight -= call.size
        conn.inflight_n -= 1
        if not conn.closed:
            if result < 0:
                conn.fatal(-result)
            elif result < call.size:
                conn.fatal(E.EPIPE)  # the stack took part of it: the connection broke
        close = conn.closed and not conn.close_sent and conn.inflight_n == 0
        conn.changed()
    if close:
        _send_close(conn)


def _drain_sends(conn: _Conn, deadline: float | None, *, raise_: bool = False) -> None:
    """Wait until every SEND of ``conn`` is answered (sendall, shutdown)."""
    with conn.cond:
        while conn.inflight_n and not conn.device.dead:
            if conn.error and raise_:
                break
            _wait(conn, deadline)
        if raise_ and conn.error:
            err = conn.take_error()
            conn.changed()
            raise _error(err)


def _send_datagram(conn: _Conn, view: memoryview, flags: int, addr: bytes | None) -> int:
    """One datagram = one SEND with the address as prefix, answered before we return."""
    with conn.cond:
        if conn.error:  # an ICMP error reported earlier (sock_alloc_send_pskb's order)
            err = conn.take_error()
            conn.changed()
            raise _error(err)
    prefix = addr or b""
    d = conn.device
    call = _Call(Op.SEND, conn, None, len(prefix) + len(view))
    if call.size > d.pool.capacity:
        raise _error(E.EMSGSIZE)
    if call.size:
        off = d.alloc(call.size, control=True)
        if off is None:
            raise _error(E.ENOBUFS)
        d.data[off:off + len(prefix)] = prefix
        d.data[off + len(prefix):off + call.size] = view
        call.buf = off
    wire_flags = (flags & ~_SEND_LOCAL_FLAGS & 0xFFFF_FFFF) | (len(prefix) << 32)
    _sync(d, call, wire_flags)
    return call.result or 0


# -- close -----------------------------------------------------------------------------------------

def _close_evfd(conn: _Conn) -> None:
    if conn.evfd >= 0:
        with contextlib.suppress(OSError):
            os.close(conn.evfd)
        conn.evfd = -1


def _release(conn: _Conn) -> None:
    """One socket object fewer; the last one closes the NetKernel socket.

    Like close(2) this does not wait: received buffers go back at once, and
    CLOSE follows the SENDs still in flight (on JOB it would overtake them).
    A stream closed with received data unread is reset, as Linux's tcp_close
    does: the CLOSE carries ABORT (GL-2, NSM-8).
    """
    with conn.cond:
        conn.refs -= 1
        if conn.refs > 0 or conn.closed:
            return
        conn.closed = True
        held = list(conn.rx)
        conn.rx.clear()
        conn.unread = conn.stream and any(rx.pos < rx.end for rx in held)
        queued = [c for c, _ in conn.acceptq]
        conn.acceptq.clear()
        _close_evfd(conn)
        now = conn.inflight_n == 0
        conn.cond.notify_all()
    d = conn.device
    if d.stale:
        return
    for rx in held:
        d.buf_return(rx)
    for c in queued:
        _release(c)
    if now:
        _send_close(conn)


def _send_close(conn: _Conn) -> None:
    d = conn.device
    with conn.cond:
        if conn.close_sent:
            return
        conn.close_sent = True
    if d.dead or d.stale:
        d.forget(conn)
        return
    call = _Call(Op.CLOSE, conn, None, 0, on_done=lambda c: d.forget(c.conn))
    call.waited = False
    try:
        d.call(call, nq.CLOSE_ABORT if conn.unread else 0, block=False)
    except OSError:
        d.forget(conn)


# -- module helpers, as in the standard library ------------------------------------------------

def create_connection(address: tuple[str, int], timeout: Any = _GLOBAL_DEFAULT_TIMEOUT,
                      source_address: tuple[str, int] | None = None, *,
                      all_errors: bool = False) -> socket:
    """:func:`socket.create_connection` over NetKernel sockets."""
    host, port = address
    errors: list[OSError] = []
    for family, type_, proto, _name, sa in _std.getaddrinfo(host, port, 0, _std.SOCK_STREAM):
        if family not in _INET:
            continue
        sock = None
        try:
            sock = socket(family, type_, proto)
            if timeout is not _GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sa)
            return sock
        except OSError as exc:
            errors.append(exc)
            if sock is not None:
                sock.close()
    if not errors:
        raise OSError("getaddrinfo returns an empty list")
    if all_errors:
        raise ExceptionGroup("create_connection failed", errors)
    raise errors[0]


def create_server(address: tuple[str, int], *, family: int = _std.AF_INET,
                  backlog: int | None = None, reuse_port: bool = False) -> socket:
    """:func:`socket.create_server` over NetKernel sockets (no dual-stack)."""
    sock = socket(family, _std.SOCK_STREAM)
    try:
        sock.setsockopt(_std.SOL_SOCKET, _std.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(_std.SOL_SOCKET, _std.SO_REUSEPORT, 1)
        sock.bind(address)
        if backlog is None:
            sock.listen()
        else:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def counters(instance: str | None = None) -> dict[str, int]:
    """NQEs this process published per op, and dispatcher counts, on ``instance``'s device."""
    d = _devices.get(shm.instance_name(instance))
    return dict(d.counters) if d else {}
