"""The kernel-stack NSM: NetKernel socket calls executed on real Linux sockets.

Run as ``python -m netkernel.reference.nsm_kernel --instance NAME`` (``netkernel
up`` does, possibly under ``ip netns exec``): it attaches to the instance's
CoreEngine through :class:`~netkernel.reference.servicelib.ServiceLib` and
serves every tenant the CoreEngine maps to it, until the CoreEngine goes away
or it gets SIGTERM/SIGINT.

Every socket of a tenant is one non-blocking Linux socket; one thread waits on
all of them and on the device's bells with ``selectors`` (epoll). The calls go
to the kernel through :mod:`netkernel.reference.ksock`, with the tenant's
buffers passed in place, so every result and errno is the kernel's own.

What the NSM adds on top of the kernel (spec/nqe.md op table):

=================  ==========================================================
call / condition    what happens
=================  ==========================================================
SOCKET              AF_INET/AF_INET6, SOCK_STREAM/SOCK_DGRAM only (a tenant
                    never gets a raw or foreign-family socket of the NSM)
CONNECT             answered when the connection is up or has failed
ACCEPT              answered when a connection is taken; -EAGAIN at once with
                    op_data bit 32 and none pending
listening socket    connections are accepted eagerly up to the backlog and
                    announced with EV_ACCEPTABLE (pending count)
readable socket     data goes straight into a receive buffer of the tenant's
                    slice (one copy, by the kernel) and out as EV_DATA; UDP
                    data is prefixed with the source sockaddr; EOF is EV_FIN,
                    an error EV_ERROR(-errno)
no buffer / cap     the socket is not read (no read interest) until a
                    BUF_RETURN frees room: data stays in the kernel (BUF-7)
SEND                the kernel takes the tenant's bytes in place; on EAGAIN
                    the SEND waits in the socket's queue (in order, NQE-16)
                    and is answered when done; MSG_DONTWAIT answers at once
SHUTDOWN(WR)        with SENDs queued: answered at once, done after them
CLOSE               pending calls of the socket are answered -EBADF; the reply
                    follows the socket's last event (NQE-16); with ABORT (bit
                    0: the tenant held unread data) SO_LINGER {on, 0} makes
                    close(2) reset the connection, as Linux does (NSM-8)
socket options      an allowlist of plain-valued options; others -ENOPROTOOPT
=================  ==========================================================

Order across rings (NQE-16): a reply that creates a connection (CONNECT,
ACCEPT) goes out on JOB and the connection's events on SEND, so the NSM reads
a new connection only once the CoreEngine has consumed the reply; a CLOSE
reply is published only once the CoreEngine has consumed the socket's events.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import errno
import logging
import resource
import selectors
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Final

from . import ksock, shm
from .nqe import CLOSE_ABORT, Op
from .servicelib import (
    EVENT_RING,
    AttachError,
    Call,
    ServiceLib,
    TenantArea,
    Ticket,
    serve,
)

log = logging.getLogger("netkernel.nsm_kernel")

AF_INET: Final = 2
AF_INET6: Final = 10
SOCK_STREAM: Final = 1
SOCK_DGRAM: Final = 2
SOCK_RAW: Final = 3
SOCK_TYPE_MASK: Final = 0xF
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
ACCEPT_NOWAIT: Final = 1 << 32
#: sockaddr size per family: the UDP address prefix of EV_DATA (NQE-15).
SOCKADDR_SIZE: Final = {AF_INET: 16, AF_INET6: 28}
#: Protocols allowed per socket type (0 = the type's default).
PROTOCOLS: Final = {SOCK_STREAM: frozenset({0, IPPROTO_TCP}),
                    SOCK_DGRAM: frozenset({0, IPPROTO_UDP})}
#: MSG_* flags a SEND may carry: OOB, DONTROUTE, DONTWAIT, EOR, CONFIRM, MORE.
SEND_FLAGS: Final = 0x1 | 0x4 | ksock.MSG_DONTWAIT | 0x80 | 0x800 | 0x8000
MAX_BACKLOG: Final = 4096  # net.core.somaxconn's default
READS_PER_EVENT: Final = 8
RX_CHUNK: Final = 64 << 10  # largest TCP EV_DATA buffer
TRANSIENT_ACCEPT: Final = frozenset({-errno.ECONNABORTED, -errno.EPROTO, -errno.EINTR})

SOL_SOCKET: Final = 1
SOL_IP: Final = 0
SOL_TCP: Final = 6
SOL_IPV6: Final = 41
#: (level, optname) a tenant may set or get: options whose value is plain data and
#: whose effect stays on the tenant's own socket. Options that take pointers or
#: file descriptors (SO_ATTACH_FILTER, TCP_ZEROCOPY_RECEIVE), load modules
#: (TCP_ULP, TCP_CONGESTION) or use the NSM's privileges (SO_MARK,
#: SO_BINDTODEVICE, IP_TRANSPARENT, SO_*BUFFORCE) are refused with -ENOPROTOOPT, and so
#: is SO_REUSEPORT (15): every NSM socket has the NSM's uid, so a tenant setting it could
#: join another tenant's listener (NSM-9, NSM-14).
SOCKOPTS: Final = frozenset(
    [(SOL_SOCKET, o) for o in (
        2,   # SO_REUSEADDR
        3,   # SO_TYPE
        4,   # SO_ERROR
        5,   # SO_DONTROUTE
        6,   # SO_BROADCAST
        7,   # SO_SNDBUF
        8,   # SO_RCVBUF
        9,   # SO_KEEPALIVE
        10,  # SO_OOBINLINE
        12,  # SO_PRIORITY (values above 6 need CAP_NET_ADMIN: the kernel checks)
        13,  # SO_LINGER
        18,  # SO_RCVLOWAT
        19,  # SO_SNDLOWAT
        20,  # SO_RCVTIMEO (the NSM's socket never blocks; GuestLib keeps the timeout)
        21,  # SO_SNDTIMEO
        30,  # SO_ACCEPTCONN
        38,  # SO_PROTOCOL
        39,  # SO_DOMAIN
    )]
    + [(SOL_TCP, o) for o in (
        1,   # TCP_NODELAY
        2,   # TCP_MAXSEG
        3,   # TCP_CORK
        4,   # TCP_KEEPIDLE
        5,   # TCP_KEEPINTVL
        6,   # TCP_KEEPCNT
        7,   # TCP_SYNCNT
        8,   # TCP_LINGER2
        9,   # TCP_DEFER_ACCEPT
        10,  # TCP_WINDOW_CLAMP
        11,  # TCP_INFO (get)
        12,  # TCP_QUICKACK
        18,  # TCP_USER_TIMEOUT
        23,  # TCP_FASTOPEN
        25,  # TCP_NOTSENT_LOWAT
    )]
    + [(SOL_IP, o) for o in (
        1,   # IP_TOS
        2,   # IP_TTL
        10,  # IP_MTU_DISCOVER
        14,  # IP_MTU (get)
        15,  # IP_FREEBIND
        24,  # IP_BIND_ADDRESS_NO_PORT
        32,  # IP_MULTICAST_IF
        33,  # IP_MULTICAST_TTL
        34,  # IP_MULTICAST_LOOP
        35,  # IP_ADD_MEMBERSHIP
        36,  # IP_DROP_MEMBERSHIP
    )]
    + [(SOL_IPV6, o) for o in (
        16,  # IPV6_UNICAST_HOPS
        17,  # IPV6_MULTICAST_IF
        18,  # IPV6_MULTICAST_HOPS
        19,  # IPV6_MULTICAST_LOOP
        20,  # IPV6_JOIN_GROUP
        21,  # IPV6_LEAVE_GROUP
        26,  # IPV6_V6ONLY
        67,  # IPV6_TCLASS
    )]
)


@dataclasses.dataclass(eq=False)
class PendingSend:
    """A SEND the kernel has not taken whole yet (addresses in the tenant's send half)."""

    call: Call
    payload: int
    length: int
    dest: int
    dest_len: int
    flags: int
    done: int = 0

    @property
    def nowait(self) -> bool:
        return bool(self.flags & ksock.MSG_DONTWAIT)


@dataclasses.dataclass(eq=False)
class Sock:
    """One tenant socket: its Linux socket and what the NSM keeps about it."""

    sock_id: int
    vm_id: int
    qset: int
    fd: int
    family: int
    stream: bool
    reading: bool = False  # stream: connected, not at EOF or error; datagram: always
    paused: bool = False  # no receive buffer, or the socket's cap reached (BUF-7)
    gate: Ticket | None = None  # reading waits until the CoreEngine read this reply
    connect: Call | None = None  # the CONNECT waiting for the handshake
    listening: bool = False
    backlog_cap: int = 0
    accept_stalled: bool = False  # accept failed hard (EMFILE...): wait for the next ACCEPT
    backlog: collections.deque[tuple[int, bytes]] = dataclasses.field(
        default_factory=collections.deque)  # connections accepted ahead, with peer sockaddr
    accepts: collections.deque[Call] = dataclasses.field(default_factory=collections.deque)
    sendq: collections.deque[PendingSend] = dataclasses.field(default_factory=collections.deque)
    shut_wr_later: bool = False  # SHUT_WR once the queued SENDs are done
    rx_bytes: int = 0  # receive buffers the tenant holds from this socket
    mask: int = 0  # the selector interest registered now
    closed: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.vm_id, self.sock_id

    @property
    def prefix(self) -> int:
        """Bytes of the source sockaddr before a datagram's data in EV_DATA (NQE-15)."""
        return 0 if self.stream else SOCKADDR_SIZE[self.family]


_WAKE: Final = "wake"
_CONTROL: Final = "control"


class KernelNSM:
    """The stack behind a :class:`ServiceLib`: tenant sockets on Linux sockets.

    ``rx_cap`` bounds the receive buffers one socket may hold (bytes; default
    half the tenant's slice) so one busy socket cannot starve the others.
    """

    def __init__(self, lib: ServiceLib, *, rx_chunk: int = RX_CHUNK,
                 rx_cap: int | None = None) -> None:
        self.lib = lib
        self.rx_chunk = rx_chunk
        self.rx_cap = rx_cap
        self.socks: dict[tuple[int, int], Sock] = {}
        self.sel = selectors.DefaultSelector()
        self.sel.register(lib.wake_fd, selectors.EVENT_READ, _WAKE)
        if lib.control is not None:
            self.sel.register(lib.control, selectors.EVENT_READ, _CONTROL)
        self._starved: dict[int, set[Sock]] = collections.defaultdict(set)
        # per tenant: its sockets, and those that hold some of its slice (NSM-18)
        self._sockets: collections.Counter[int] = collections.Counter()
        self._holders: collections.Counter[int] = collections.Counter()
        self._gated: list[Sock] = []
        self._scratch = ctypes.create_string_buffer(ksock.SOCKADDR_MAX)
        self._scratch_addr = ctypes.addressof(self._scratch)
        self._stop = threading.Event()
        self.lost = False

    # -- running -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until :meth:`stop` or until the CoreEngine goes away."""
        self.lib.start_watcher()
        serve(self.lib, self.step, self._stop.is_set)

    def stop(self) -> None:
        self._stop.set()

    def step(self, timeout: float) -> bool:
        """One round: calls in, gates, socket readiness, outputs out; True if anything happened."""
        worked = self.lib.poll(self) > 0
        self._open_gates()
        if worked or self._gated:
            timeout = 0.0 if worked else min(timeout, 0.001)
        self.lib.flush()
        events = self.sel.select(timeout)
        for key, mask in events:
            self._ready(key.data, mask)
        self.lib.flush()
        return worked or bool(events)

    def _ready(self, what: object, mask: int) -> None:
        if what is _WAKE:
            self.lib.drain_wake()
        elif what is _CONTROL:
            if self.lib.control_lost():
                log.warning("the CoreEngine went away: closing every socket")
                self.lost = True
                self.stop()
        elif isinstance(what, Sock) and not what.closed:
            if mask & selectors.EVENT_WRITE:
                self._writable(what)
            if mask & selectors.EVENT_READ and not what.closed:
                self._readable(what)

    def close(self) -> None:
        """Close every socket and the selector (the ServiceLib is closed by its owner)."""
        for s in list(self.socks.values()):
            self._destroy(s)
        self.sel.close()

    # -- the Stack protocol (ServiceLib calls these) ----------------------------------------
    def call(self, call: Call, area: TenantArea) -> None:
        """Execute one socket call (spec/nqe.md op table)."""
        op = Op(call.op)
        if op in _CREATE:
            _CREATE[op](self, call, area)
            return
        s = self.socks.get((call.nqe.vm_id, call.nqe.sock_id))
        if s is None:
            self.lib.reply(call, -errno.EBADF)
            return
        _CALLS[op](self, call, area, s)

    def tenant_unmapped(self, vm_id: int) -> None:
        for s in [s for s in self.socks.values() if s.vm_id == vm_id]:
            self._destroy(s)
        self._starved.pop(vm_id, None)

    def buffers_returned(self, vm_id: int, returned: list[tuple[object, int]]) -> None:
        """BUF_RETURN: the owners hold less; starved sockets of the tenant may read again."""
        for owner, size in returned:
            if isinstance(owner, Sock):
                owner.rx_bytes -= size
                if owner.rx_bytes == 0 and not owner.closed:
                    self._holders[owner.vm_id] -= 1
        area = self.lib.tenants.get(vm_id)
        starved = self._starved.get(vm_id)
        if not starved or area is None:
            return
        for s in list(starved):
            if self._room(s, area) > 0:
                starved.discard(s)
                s.paused = False
                self._update(s)

    # -- creating sockets ------------------------------------------------------------------
    def _socket(self, call: Call, area: TenantArea) -> None:
        """SOCKET: op_data = domain | type << 16 | protocol << 32 (spec/nqe.md)."""
        nqe = call.nqe
        domain, type_, proto = (nqe.op_data & 0xFFFF, (nqe.op_data >> 16) & 0xFFFF,
                                (nqe.op_data >> 32) & 0xFFFF)
        err = self._new_id_error(call, nqe.sock_id) or _socket_policy(domain, type_, proto)
        if err:
            self.lib.reply(call, -err)
            return
        base = type_ & SOCK_TYPE_MASK
        fd = ksock.socket(domain, base, proto)
        if fd < 0:
            self.lib.reply(call, fd)
            return
        s = Sock(nqe.sock_id, nqe.vm_id, call.qset, fd, domain, base == SOCK_STREAM)
        s.reading = not s.stream
        self._add(s)
        self._update(s)
        self.lib.reply(call, 0)

    def _add(self, s: Sock) -> None:
        self.socks[s.key] = s
        self._sockets[s.vm_id] += 1

    def _new_id_error(self, call: Call, sock_id: int) -> int:
        if sock_id == 0 or sock_id > 0xFFFF_FFFF:
            return errno.EINVAL  # NQE-7: a socket is never given ID 0
        if (call.nqe.vm_id, sock_id) in self.socks:
            return errno.EEXIST
        return 0

    def _accept(self, call: Call, area: TenantArea, s: Sock) -> None:
        """ACCEPT: take a connection now, or wait for one (unless op_data bit 32)."""
        nqe = call.nqe
        new_id = nqe.op_data & 0xFFFF_FFFF
        err = self._new_id_error(call, new_id)
        addr = area.address(nqe.data_ptr, nqe.size)
        if addr is None:
            err = err or errno.EFAULT
        if err or addr is None:
            self.lib.reply(call, -err)
            return
        nowait = bool(nqe.op_data & ACCEPT_NOWAIT)
        s.accept_stalled = False
        if s.accepts:  # earlier ACCEPTs wait: none is pending, and order is kept
            self._wait_accept(call, s, nowait)
            return
        if s.backlog:
            fd, peer = s.backlog.popleft()
            if addr:
                ctypes.memmove(addr, peer, min(len(peer), nqe.size))
            self._connection(s, call, fd, len(peer) if addr else 0)  # NSM-7: no buffer, 0
            self._update(s)
            return
        fd, alen = ksock.accept(s.fd, addr, nqe.size)
        if fd >= 0:
            self._connection(s, call, fd, alen)
        elif fd == -errno.EAGAIN:
            self._wait_accept(call, s, nowait)
        else:
            self.lib.reply(call, fd)

    def _wait_accept(self, call: Call, s: Sock, nowait: bool) -> None:
        if nowait:
            self.lib.reply(call, -errno.EAGAIN)
        else:
            s.accepts.append(call)
            self._update(s)

    def _connection(self, listener: Sock, call: Call, fd: int, addr_len: int) -> None:
        """A new connection named by the ACCEPT's op_data; it reads once the reply is read."""
        new = Sock(call.nqe.op_data & 0xFFFF_FFFF, call.nqe.vm_id, call.qset, fd,
                   listener.family, True)
        self._add(new)
        self._start_reading(new, self.lib.reply(call, addr_len))

    def _start_reading(self, s: Sock, ticket: Ticket) -> None:
        """Read ``s`` once the CoreEngine has consumed ``ticket`` (NQE-16, see module doc)."""
        s.reading = True
        s.gate = ticket
        self._gated.append(s)

    def _open_gates(self) -> None:
        if not self._gated:
            return
        waiting = []
        for s in self._gated:
            if s.closed or s.gate is None:
                continue
            if self.lib.consumed(s.gate):
                s.gate = None
                self._update(s)
            else:
                waiting.append(s)
        self._gated = waiting

    # -- calls on a socket -------------------------------------------------------------------
    def _bind(self, call: Call, area: TenantArea, s: Sock) -> None:
        addr = area.address(call.nqe.data_ptr, call.nqe.size)
        self.lib.reply(call, -errno.EFAULT if addr is None
                       else ksock.bind(s.fd, addr, call.nqe.size))

    def _listen(self, call: Call, area: TenantArea, s: Sock) -> None:
        backlog = call.nqe.op_data & 0xFFFF_FFFF
        backlog -= (backlog >> 31) << 32  # signed 32-bit
        rc = ksock.listen(s.fd, backlog)
        if rc == 0:
            s.listening = True
            s.backlog_cap = max(1, min(backlog, MAX_BACKLOG))
            self._update(s)
        self.lib.reply(call, rc)

    def _connect(self, call: Call, area: TenantArea, s: Sock) -> None:
        """CONNECT: answered once the handshake is over (spec/nqe.md)."""
        addr = area.address(call.nqe.data_ptr, call.nqe.size)
        if addr is None:
            self.lib.reply(call, -errno.EFAULT)
            return
        rc = ksock.connect(s.fd, addr, call.nqe.size)
        if rc == -errno.EINPROGRESS and s.stream:
            s.connect = call
            self._update(s)
        elif rc == 0 and s.stream:
            self._start_reading(s, self.lib.reply(call, 0))
        else:
            self.lib.reply(call, rc)

    def _send(self, call: Call, area: TenantArea, s: Sock) -> None:
        """SEND: op_data = MSG_* flags | destination sockaddr length << 32 (spec/nqe.md)."""
        nqe = call.nqe
        dest_len = (nqe.op_data >> 32) & 0xFFFF
        buf = area.address(nqe.data_ptr, nqe.size)
        if buf is None:
            self.lib.reply(call, -errno.EFAULT)
            return
        if dest_len > nqe.size:
            self.lib.reply(call, -errno.EINVAL)
            return
        p = PendingSend(call, buf + dest_len if nqe.size else 0, nqe.size - dest_len,
                        buf if dest_len else 0, dest_len, nqe.op_data & SEND_FLAGS)
        if s.sendq:  # NQE-16: behind the SENDs already waiting
            if p.nowait:
                self.lib.reply(call, -errno.EAGAIN)
            else:
                s.sendq.append(p)
            return
        if not self._try_send(s, p):
            s.sendq.append(p)
            self._update(s)

    def _try_send(self, s: Sock, p: PendingSend) -> bool:
        """Hand the kernel what it takes of ``p``; True once ``p`` is answered."""
        while True:
            n = ksock.send(s.fd, p.payload + p.done if p.payload else 0, p.length - p.done,
                           p.flags, p.dest, p.dest_len)
            if n >= 0:
                p.done += n
                if p.done >= p.length or not s.stream:
                    self.lib.reply(p.call, p.done)
                    return True
            elif n == -errno.EAGAIN:
                if p.nowait:
                    self.lib.reply(p.call, p.done or -errno.EAGAIN)
                    return True
                return False
            elif n != -errno.EINTR:
                self.lib.reply(p.call, p.done or n)
                return True

    def _shutdown(self, call: Call, area: TenantArea, s: Sock) -> None:
        how = call.nqe.op_data
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            self.lib.reply(call, -errno.EINVAL)
            return
        if s.sendq and how != SHUT_RD:  # the FIN goes after the queued bytes
            s.shut_wr_later = True
            self.lib.reply(call, ksock.shutdown(s.fd, SHUT_RD) if how == SHUT_RDWR else 0)
            return
        rc = ksock.shutdown(s.fd, how)
        self.lib.reply(call, rc)
        if rc == 0 and s.listening and how != SHUT_WR:
            # Linux stops listening: queued connections are dropped, accept() fails EINVAL
            s.listening = False
            self._drop_backlog(s)
            self._serve_accepts(s)
            self._update(s)

    def _close(self, call: Call, area: TenantArea, s: Sock) -> None:
        """CLOSE: answered after the socket's last event has been read (NQE-16).

        With ABORT the tenant held data its application never read: Linux
        resets a connection closed so (tcp_close), and SO_LINGER {on, 0} makes
        our close(2) do that too. Bytes still in our own socket make close(2)
        reset it without help (NSM-8).
        """
        if s.stream and call.nqe.op_data & CLOSE_ABORT:
            ksock.linger_reset(s.fd)
        self._destroy(s, reason=-errno.EBADF)
        self.lib.reply_after(self.lib.last_ticket(s.qset, EVENT_RING), call, 0)

    def _setsockopt(self, call: Call, area: TenantArea, s: Sock) -> None:
        self._sockopt(call, area, s, ksock.setsockopt)

    def _getsockopt(self, call: Call, area: TenantArea, s: Sock) -> None:
        self._sockopt(call, area, s, ksock.getsockopt)

    def _sockopt(self, call: Call, area: TenantArea, s: Sock,
                 op: Callable[[int, int, int, int, int], int]) -> None:
        """SETSOCKOPT / GETSOCKOPT: op_data = level | optname << 32, allowlisted (SOCKOPTS)."""
        nqe = call.nqe
        level, name = nqe.op_data & 0xFFFF_FFFF, nqe.op_data >> 32
        addr = area.address(nqe.data_ptr, nqe.size)
        if addr is None:
            self.lib.reply(call, -errno.EFAULT)
        elif (level, name) not in SOCKOPTS:
            self.lib.reply(call, -errno.ENOPROTOOPT)
        else:
            self.lib.reply(call, op(s.fd, level, name, addr, nqe.size))

    def _getsockname(self, call: Call, area: TenantArea, s: Sock) -> None:
        self._name(call, area, s, peer=False)

    def _getpeername(self, call: Call, area: TenantArea, s: Sock) -> None:
        self._name(call, area, s, peer=True)

    def _name(self, call: Call, area: TenantArea, s: Sock, *, peer: bool) -> None:
        addr = area.address(call.nqe.data_ptr, call.nqe.size)
        self.lib.reply(call, -errno.EFAULT if addr is None
                       else ksock.sockname(s.fd, addr, call.nqe.size, peer=peer))

    # -- readiness ---------------------------------------------------------------------------
    def _writable(self, s: Sock) -> None:
        if s.connect is not None:
            call, s.connect = s.connect, None
            err = ksock.pending_error(s.fd)
            if err:
                self.lib.reply(call, err)
            else:
                self._start_reading(s, self.lib.reply(call, 0))
        while s.sendq and self._try_send(s, s.sendq[0]):
            s.sendq.popleft()
        if not s.sendq and s.shut_wr_later:
            s.shut_wr_later = False
            ksock.shutdown(s.fd, SHUT_WR)
        self._update(s)

    def _readable(self, s: Sock) -> None:
        if s.listening or s.accepts:
            self._serve_accepts(s)
            return
        area = self.lib.tenants.get(s.vm_id)
        if area is None or not s.reading or s.paused or s.gate is not None:
            return
        for _ in range(READS_PER_EVENT):
            if not (self._read_stream(s, area) if s.stream else self._read_datagram(s, area)):
                break
        self._update(s)

    def _cap(self, area: TenantArea) -> int:
        return self.rx_cap if self.rx_cap is not None else max(area.geo.buf_size,
                                                               area.grant.size // 2)

    def _room(self, s: Sock, area: TenantArea) -> int:
        """NSM-16, NSM-18: what ``s`` may be lent now."""
        empty = self._sockets[s.vm_id] - self._holders[s.vm_id]
        return area.pool.room(s.rx_bytes, self._cap(area), empty)

    def _read_stream(self, s: Sock, area: TenantArea) -> bool:
        """One recv into a fresh receive buffer; True if more may be waiting."""
        room = self._room(s, area)
        if room <= 0:
            return self._pause(s)
        avail = ksock.pending_bytes(s.fd)
        if avail <= 0:
            state = ksock.peek_state(s.fd)
            if state == -errno.EAGAIN:
                return False
            if state <= 0:
                return self._end(s, state)
            avail = state
        want = min(avail, self.rx_chunk, room, area.pool.largest_free())
        got = area.lend(want, s) if want > 0 else None
        if got is None:
            return self._pause(s)
        offset, addr = got
        n, _ = ksock.recv(s.fd, addr, want)
        if n <= 0:
            area.unsend(offset)
            return False if n == -errno.EAGAIN else self._end(s, n)
        self._data(s, area, offset, want, n, 0)
        return n == want

    def _read_datagram(self, s: Sock, area: TenantArea) -> bool:
        """One datagram, behind its source sockaddr, into a fresh receive buffer."""
        room = self._room(s, area)
        if room <= 0:
            return self._pause(s)
        size = ksock.datagram_size(s.fd)
        if size == -errno.EAGAIN:
            return False
        if size < 0:  # an ICMP error (ECONNREFUSED...): the socket stays usable
            self.lib.event(s.qset, s.vm_id, s.sock_id, Op.EV_ERROR, size)
            return True
        want = min(s.prefix + size, area.grant.size)  # larger than the slice: truncated
        if want > room and s.rx_bytes:  # never split: whole to one holding none (NSM-18)
            return self._pause(s)
        got = area.lend(want, s)
        if got is None:
            return self._pause(s)
        offset, addr = got
        n, _ = ksock.recv(s.fd, addr + s.prefix, want - s.prefix, 0, addr, s.prefix)
        if n < 0:
            area.unsend(offset)
            if n != -errno.EAGAIN:
                self.lib.event(s.qset, s.vm_id, s.sock_id, Op.EV_ERROR, n)
            return n != -errno.EAGAIN
        self._data(s, area, offset, want, s.prefix + n, s.prefix)
        return True

    def _data(self, s: Sock, area: TenantArea, offset: int, lent: int, size: int,
              prefix: int) -> None:
        area.named(offset, size)
        if s.rx_bytes == 0:
            self._holders[s.vm_id] += 1
        s.rx_bytes += lent
        self.lib.event(s.qset, s.vm_id, s.sock_id, Op.EV_DATA, prefix, offset, size)

    def _pause(self, s: Sock) -> bool:
        """BUF-7: no buffer (or the cap): stop reading until a BUF_RETURN."""
        s.paused = True
        self._starved[s.vm_id].add(s)
        return False

    def _end(self, s: Sock, result: int) -> bool:
        """A stream's end: EOF (0) is EV_FIN, an error EV_ERROR(-errno); reading stops."""
        s.reading = False
        if result == 0:
            self.lib.event(s.qset, s.vm_id, s.sock_id, Op.EV_FIN)
        else:
            self.lib.event(s.qset, s.vm_id, s.sock_id, Op.EV_ERROR, result)
        return False

    def _serve_accepts(self, s: Sock) -> None:
        """Hand pending connections to waiting ACCEPTs, else keep them and say EV_ACCEPTABLE."""
        grew = False
        while True:
            if s.accepts:
                call = s.accepts[0]
                area = self.lib.tenants.get(call.nqe.vm_id)
                addr = None if area is None else area.address(call.nqe.data_ptr, call.nqe.size)
                fd, alen = ksock.accept(s.fd, addr or 0, call.nqe.size if addr else 0)
                if fd >= 0:
                    s.accepts.popleft()
                    self._connection(s, call, fd, alen)
                    continue
                if fd == -errno.EAGAIN:
                    break
                if fd not in TRANSIENT_ACCEPT:
                    s.accepts.popleft()
                    self.lib.reply(call, fd)
                continue
            if not s.listening or len(s.backlog) >= s.backlog_cap:
                break
            fd, alen = ksock.accept(s.fd, self._scratch_addr, ksock.SOCKADDR_MAX)
            if fd >= 0:
                s.backlog.append((fd, self._scratch.raw[:min(alen, ksock.SOCKADDR_MAX)]))
                grew = True
            elif fd == -errno.EAGAIN:
                break
            elif fd not in TRANSIENT_ACCEPT:
                log.warning("accept on socket %s failed: %s", s.key, errno.errorcode.get(-fd))
                s.accept_stalled = True  # the next ACCEPT call retries and gets the errno
                break
        if grew:
            self.lib.event(s.qset, s.vm_id, s.sock_id, Op.EV_ACCEPTABLE, len(s.backlog))
        self._update(s)

    # -- interest and teardown ---------------------------------------------------------------
    def _update(self, s: Sock) -> None:
        """Register exactly the readiness ``s`` can act on now (no read while paused, BUF-7)."""
        if s.closed:
            return
        read = ((s.listening and not s.accept_stalled
                 and (bool(s.accepts) or len(s.backlog) < s.backlog_cap))
                or bool(s.accepts)
                or (s.reading and not s.paused and s.gate is None))
        write = s.connect is not None or bool(s.sendq)
        mask = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        if mask == s.mask:
            return
        if s.mask == 0:
            self.sel.register(s.fd, mask, s)
        elif mask == 0:
            self.sel.unregister(s.fd)
        else:
            self.sel.modify(s.fd, mask, s)
        s.mask = mask

    def _drop_backlog(self, s: Sock) -> None:
        while s.backlog:
            _close_fd(s.backlog.popleft()[0])

    def _destroy(self, s: Sock, *, reason: int | None = None) -> None:
        """Close ``s``; with ``reason``, its pending calls are answered with it."""
        if s.closed:
            return
        if reason is not None:
            pending = ([s.connect] if s.connect else []) + list(s.accepts)
            pending += [p.call for p in s.sendq]
            for call in pending:
                self.lib.reply(call, reason)
        if s.mask:
            self.sel.unregister(s.fd)
            s.mask = 0
        s.closed = True
        s.connect = None
        s.accepts.clear()
        s.sendq.clear()
        self._drop_backlog(s)
        self.socks.pop(s.key, None)
        self._sockets[s.vm_id] -= 1
        if s.rx_bytes:  # its buffers come back to no socket
            self._holders[s.vm_id] -= 1
        self._starved.get(s.vm_id, set()).discard(s)
        _close_fd(s.fd)


def _close_fd(fd: int) -> None:
    """close(2), in a helper thread when SO_LINGER would make it block the NSM."""
    if ksock.lingers(fd):
        threading.Thread(target=ksock.close, args=(fd,), daemon=True).start()
    else:
        ksock.close(fd)


def _socket_policy(domain: int, type_: int, proto: int) -> int:
    """The errno for a socket the NSM does not create, in Linux's order; 0 if allowed."""
    base, flags = type_ & SOCK_TYPE_MASK, type_ & ~SOCK_TYPE_MASK
    if flags & ~(ksock.SOCK_NONBLOCK | ksock.SOCK_CLOEXEC) & 0xFFFF:
        return errno.EINVAL
    if domain not in SOCKADDR_SIZE:
        return errno.EAFNOSUPPORT
    if base == SOCK_RAW:
        return errno.EPROTONOSUPPORT if proto == 0 else errno.EPERM  # as for a non-root caller
    if base not in PROTOCOLS:
        return errno.ESOCKTNOSUPPORT
    if proto not in PROTOCOLS[base]:
        return errno.EPROTONOSUPPORT
    return 0


_CREATE: Final[dict[Op, Callable[[KernelNSM, Call, TenantArea], None]]] = {
    Op.SOCKET: KernelNSM._socket,
}
_CALLS: Final[dict[Op, Callable[[KernelNSM, Call, TenantArea, Sock], None]]] = {
    Op.BIND: KernelNSM._bind,
    Op.LISTEN: KernelNSM._listen,
    Op.CONNECT: KernelNSM._connect,
    Op.ACCEPT: KernelNSM._accept,
    Op.SEND: KernelNSM._send,
    Op.SHUTDOWN: KernelNSM._shutdown,
    Op.CLOSE: KernelNSM._close,
    Op.SETSOCKOPT: KernelNSM._setsockopt,
    Op.GETSOCKOPT: KernelNSM._getsockopt,
    Op.GETSOCKNAME: KernelNSM._getsockname,
    Op.GETPEERNAME: KernelNSM._getpeername,
}


def _raise_fd_limit() -> None:
    """One fd per tenant socket: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start(argv: Sequence[str] | None, *, prog: str, description: str) -> argparse.Namespace:
    """The NSM command line (``--instance``, ``--name``, ``--log-level``), logging set up
    and the fd limit raised: the start shared by this NSM and the fast path's."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--instance", default=None,
                        help="instance name (default: $NETKERNEL_INSTANCE or 'default')")
    parser.add_argument("--name", default="kernel", help="NSM name given to the CoreEngine")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s nsm[%(process)d] %(levelname)s %(message)s")
    _raise_fd_limit()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m netkernel.reference.nsm_kernel --instance NAME``: attach and serve."""
    args = start(argv, prog="python -m netkernel.reference.nsm_kernel",
                 description="NetKernel kernel-stack NSM: serves tenants' sockets on Linux sockets")
    try:
        runtime = shm.instance_dir(args.instance)
        lib = ServiceLib.attach(runtime, name=args.name)
    except (AttachError, ValueError) as exc:
        print(f"nsm_kernel: {exc}", file=sys.stderr)
        return 1
    nsm = KernelNSM(lib)

    def _stop(signum: int, frame: FrameType | None) -> None:
        nsm.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        nsm.run()
    finally:
        nsm.close()
        lib.close()
    log.info("NSM %d stopped%s", lib.nsm_id, " (CoreEngine lost)" if nsm.lost else "")
    return 0


__all__ = ["KernelNSM", "Sock", "main"]

if __name__ == "__main__":
    sys.exit(main())
