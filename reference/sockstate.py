"""Socket semantics: the state machine an application sees (spec/sockets.md, SOCK-*).

Rules of this file, in the manner of h11's ``_state.py``:

* Everything that decides what a socket call returns lives here: the states,
  the :data:`TABLE` of transitions, the guards the table consults, the effects
  it applies, and the small loopback :class:`Host` that carries packets between
  sockets. The spec's transition tables are rendered from :data:`TABLE`
  (:func:`render_table`) and a conformance test checks they agree.
* No I/O. :func:`step` takes a socket, an input (a call or a network event)
  and returns the new socket, the call's result and the packets it emits. The
  :class:`Host` turns emitted packets into events on other sockets.
* Linux is the authority. Every row was checked against Linux sockets on
  loopback (conformance/test_sockets.py runs random call sequences on both and
  requires the same results); where Linux is surprising the row says so in
  spec/sockets.md rather than being "fixed" here.

A row is ``(kinds, states, inputs, when) -> (next state, result, effect)``.
Rows are tried in order; the first whose kind, state and input match and whose
guard holds wins, so row order *is* the errno priority (SOCK-4).
"""

from __future__ import annotations

import dataclasses
import enum
import errno as _errno
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Final, Protocol

# -- vocabulary ---------------------------------------------------------------


class Kind(enum.Enum):
    """Socket type (SOCK-1)."""

    TCP = "tcp"  # SOCK_STREAM
    UDP = "udp"  # SOCK_DGRAM


class Family(enum.Enum):
    """Address family (SOCK-1)."""

    INET = "AF_INET"
    INET6 = "AF_INET6"


LOOPBACK: Final = {Family.INET: "127.0.0.1", Family.INET6: "::1"}
WILDCARD: Final = {Family.INET: "0.0.0.0", Family.INET6: "::"}


def family_of(host: str) -> Family:
    return Family.INET6 if ":" in host else Family.INET


@dataclasses.dataclass(frozen=True, order=True)
class Addr:
    """A socket address: host (``127.0.0.1``, ``::1``, ``0.0.0.0``, ``::``) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class State(enum.Enum):
    """What the socket is, as the application can observe it (SOCK-2).

    Linux keeps two state variables (the socket layer's ``SS_*`` and the
    protocol's ``TCP_*``); each state here is one reachable pair.
    """

    UNBOUND = "UNBOUND"  # no port held (SS_UNCONNECTED, TCP_CLOSE)
    BOUND = "BOUND"  # holds a port, not listening, not connected
    LISTENING = "LISTENING"  # TCP_LISTEN
    CONNECTING = "CONNECTING"  # SYN sent, no answer yet (SS_CONNECTING, SYN_SENT)
    HANDSHAKE_DONE = "HANDSHAKE_DONE"  # established, connect() has not yet reported it
    CONNECT_FAILED = "CONNECT_FAILED"  # the connection attempt ended before connect() reported
    CONNECTED = "CONNECTED"  # SS_CONNECTED, connection open in at least one direction
    ENDED = "ENDED"  # SS_CONNECTED, connection over (reset, or FIN both ways)
    DISCONNECTING = "DISCONNECTING"  # shutdown() on CONNECT_FAILED (SS_DISCONNECTING)
    CLOSED = "CLOSED"  # close() was called: every call fails EBADF


TCP_STATES: Final = tuple(State)
UDP_STATES: Final = (State.UNBOUND, State.BOUND, State.CONNECTED, State.CLOSED)
OPEN_TCP: Final = frozenset(TCP_STATES) - {State.CLOSED}
OPEN_UDP: Final = frozenset(UDP_STATES) - {State.CLOSED}
#: TCP states whose connection is synchronised (ESTABLISHED, CLOSE_WAIT, FIN_WAIT*).
SYNCED: Final = frozenset({State.HANDSHAKE_DONE, State.CONNECTED})
#: TCP states whose protocol state is TCP_CLOSE.
TCP_CLOSE: Final = frozenset(
    {State.UNBOUND, State.BOUND, State.CONNECT_FAILED, State.ENDED, State.DISCONNECTING}
)


class Call(enum.Enum):
    """Socket calls (SOCK-3). ``socket()`` itself is :meth:`Host.socket`."""

    BIND = "bind"
    LISTEN = "listen"
    CONNECT = "connect"
    ACCEPT = "accept"
    SEND = "send"
    RECV = "recv"
    SHUTDOWN = "shutdown"
    CLOSE = "close"
    GETSOCKNAME = "getsockname"
    GETPEERNAME = "getpeername"
    SETSOCKOPT = "setsockopt"
    GETSOCKOPT = "getsockopt"


class Event(enum.Enum):
    """What the network does to a socket (SOCK-5). Events have no result."""

    CONNECT_ACCEPTED = "connect_accepted"  # SYN answered by a listener
    CONNECT_REFUSED = "connect_refused"  # SYN answered by RST
    CONNECTION_PENDING = "connection_pending"  # a connection joined the accept queue
    PEER_DATA = "peer_data"
    PEER_FIN = "peer_fin"
    PEER_RESET = "peer_reset"
    PORT_UNREACHABLE = "port_unreachable"  # ICMP port unreachable for our datagram


Input = Call | Event


class Errno(enum.IntEnum):
    """The errnos this state machine produces, with Linux's numbers."""

    EBADF = _errno.EBADF
    EAGAIN = _errno.EAGAIN
    EINVAL = _errno.EINVAL
    EPIPE = _errno.EPIPE
    EDESTADDRREQ = _errno.EDESTADDRREQ
    ENOPROTOOPT = _errno.ENOPROTOOPT
    EOPNOTSUPP = _errno.EOPNOTSUPP
    EADDRINUSE = _errno.EADDRINUSE
    ECONNABORTED = _errno.ECONNABORTED
    ECONNRESET = _errno.ECONNRESET
    EISCONN = _errno.EISCONN
    ENOTCONN = _errno.ENOTCONN
    ECONNREFUSED = _errno.ECONNREFUSED
    EALREADY = _errno.EALREADY
    EINPROGRESS = _errno.EINPROGRESS


class Opt(enum.Enum):
    """SOL_SOCKET options v1 specifies (SOCK-16)."""

    SO_REUSEADDR = "SO_REUSEADDR"
    SO_LINGER = "SO_LINGER"  # value: seconds, or -1 for off; only 0 changes behaviour
    SO_RCVTIMEO = "SO_RCVTIMEO"  # value: milliseconds, 0 = wait forever
    SO_SNDTIMEO = "SO_SNDTIMEO"
    SO_ERROR = "SO_ERROR"  # read-only
    SO_TYPE = "SO_TYPE"  # read-only
    SO_ACCEPTCONN = "SO_ACCEPTCONN"  # read-only


READ_ONLY_OPTS: Final = frozenset({Opt.SO_ERROR, Opt.SO_TYPE, Opt.SO_ACCEPTCONN})
SOCK_STREAM: Final = 1
SOCK_DGRAM: Final = 2
SOMAXCONN: Final = 4096  # net.core.somaxconn default since Linux 5.4

# -- results --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ok:
    """A call succeeded: ``value`` is 0, a byte count, an option value, an
    address, a new socket handle, or (accept) ``(handle, peer address)``."""

    value: int | Addr | tuple[int, Addr] = 0


@dataclasses.dataclass(frozen=True)
class Err:
    """A call failed with ``errno``."""

    errno: int

    def __str__(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


@dataclasses.dataclass(frozen=True)
class Blocked:
    """The call waits and, in a world where nothing else happens, waits forever (SOCK-9)."""


Result = Ok | Err | Blocked


class Res(enum.Enum):
    """What a row returns, before it is turned into a :data:`Result`."""

    ZERO = "0"
    SIZE = "n"  # bytes sent / received
    NEW_SOCKET = "new socket"
    NAME = "local address"
    PEER = "peer address"
    OPTVAL = "option value"
    SO_ERROR = "pending error"  # fails with the pending error, which is cleared (SOCK-6)
    SO_ERROR_VALUE = "pending error or 0, as value"  # getsockopt(SO_ERROR); cleared
    SO_ERROR_OR_ECONNABORTED = "pending error, else ECONNABORTED"
    IN_PROGRESS = "EINPROGRESS on the call that sent the SYN, else EALREADY"
    WAIT = "waits for the network, then as the new state's row"
    BLOCKS = "blocks"


Outcome = Res | Errno


class To(enum.Enum):
    """Next-state values that are not a single state."""

    SAME = "="
    IDLE = "UNBOUND/BOUND"  # BOUND if a port is still held, else UNBOUND


# -- the socket -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sock:
    """One socket's state: the table's state plus the flags its guards read."""

    kind: Kind
    family: Family
    state: State = State.UNBOUND
    nonblock: bool = False  # O_NONBLOCK
    rcvtimeo: bool = False  # SO_RCVTIMEO set (finite wait)
    sndtimeo: bool = False  # SO_SNDTIMEO set (finite wait; also bounds connect)
    reuse: bool = False  # SO_REUSEADDR
    linger0: bool = False  # SO_LINGER on with 0 s: close() resets
    host: str = ""  # the local address getsockname reports ("" = wildcard)
    port: int = 0  # the local port getsockname reports
    holds_port: bool = False  # the port is reserved in the host's port table
    host_locked: bool = False  # bind() chose the address: kept across disconnect
    port_locked: bool = False  # bind() chose a non-zero port: kept across disconnect
    peer: Addr | None = None
    rd_shut: bool = False  # RCV_SHUTDOWN
    wr_shut: bool = False  # SEND_SHUTDOWN
    fin_sent: bool = False
    done: bool = False  # the peer's FIN arrived
    error: int = 0  # pending asynchronous error (SO_ERROR)
    rx: tuple[int, ...] = ()  # TCP: one byte count; UDP: datagram sizes, oldest first
    backlog: int = 0
    queue: tuple[int, ...] = ()  # listener: connections waiting for accept()

    @property
    def name(self) -> Addr:
        return Addr(self.host or WILDCARD[self.family], self.port)

    @property
    def source(self) -> Addr:
        """The address packets from this socket carry."""
        host = self.host if self.host and self.host != WILDCARD[self.family] else ""
        return Addr(host or LOOPBACK[self.family], self.port)


@dataclasses.dataclass(frozen=True)
class Args:
    """A call's arguments, or an event's data."""

    addr: Addr | None = None  # bind/connect address, send destination, connection's peer
    unspec: bool = False  # connect(AF_UNSPEC)
    size: int = 0  # send / recv / peer_data byte count
    how: int = 0  # shutdown: 0 SHUT_RD, 1 SHUT_WR, 2 SHUT_RDWR
    backlog: int = 0
    opt: Opt | None = None
    value: int = 0
    child: int = 0  # connection_pending: the queued connection's id
    first: bool = False  # connect(): this call sent the SYN (EINPROGRESS, not EALREADY)


class Net(Protocol):
    """What the table asks of the host it runs on."""

    def in_use(self, sock: Sock, host: str, port: int) -> bool:
        """Would ``sock`` holding ``host:port`` conflict with another holder (SOCK-13)?"""
        ...

    def ephemeral_port(self) -> int:
        """A free port for an automatic bind (SOCK-12)."""
        ...


# -- packets a step emits ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Syn:
    dst: Addr


@dataclasses.dataclass(frozen=True)
class Fin:
    pass


@dataclasses.dataclass(frozen=True)
class Rst:
    pass


@dataclasses.dataclass(frozen=True)
class Data:
    size: int


@dataclasses.dataclass(frozen=True)
class Dgram:
    size: int
    src: Addr
    dst: Addr


@dataclasses.dataclass(frozen=True)
class DropQueue:
    """A listener stopped listening: its unaccepted connections are reset."""

    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TimeWait:
    """The connection leaves a record that keeps holding the local port (SOCK-14).

    ``awaiting_fin``: the socket was closed after sending its FIN and before the
    peer's FIN (FIN_WAIT2); data arriving there is answered with a reset.
    """

    awaiting_fin: bool


Out = Syn | Fin | Rst | Data | Dgram | DropQueue | TimeWait

# -- guards -------------------------------------------------------------------------


class When(enum.Enum):
    """Row guards. The value is the text the spec's tables show."""

    ALWAYS = "—"
    NONBLOCK = "O_NONBLOCK"
    RCVTIMEO = "SO_RCVTIMEO set"
    SNDTIMEO = "SO_SNDTIMEO set"
    ERROR = "error pending"
    DATA = "data queued"
    PEER_FIN = "peer's FIN seen"
    RD_SHUT = "read side shut"
    WR_SHUT = "write side shut"
    HOLDS_PORT = "holds a port"
    ADDR_IN_USE = "address in use"
    UNSPEC = "AF_UNSPEC"
    NO_DEST = "no destination"
    DEST_PORT_0 = "destination port 0"
    QUEUED = "connection queued"
    LINGER0 = "SO_LINGER 0"
    HOW_INVALID = "how not 0, 1, 2"
    HOW_RD = "how includes SHUT_RD"
    LAST_FIN = "how includes SHUT_WR, peer's FIN seen, FIN not sent"
    FIN_SENT = "FIN sent"
    CLOSE_WAIT = "peer's FIN seen, FIN not sent"
    RD_SHUT_FIN_SENT = "read side shut, FIN sent"
    OPT_READONLY = "read-only option"
    OPT_SO_ERROR = "SO_ERROR"


def _guard(when: When, s: Sock, a: Args, net: Net) -> bool:
    match when:
        case When.ALWAYS:
            return True
        case When.NONBLOCK:
            return s.nonblock
        case When.RCVTIMEO:
            return s.rcvtimeo
        case When.SNDTIMEO:
            return s.sndtimeo
        case When.ERROR:
            return s.error != 0
        case When.DATA:
            return bool(s.rx)
        case When.PEER_FIN:
            return s.done
        case When.RD_SHUT:
            return s.rd_shut
        case When.WR_SHUT:
            return s.wr_shut
        case When.HOLDS_PORT:
            return s.holds_port
        case When.ADDR_IN_USE:
            if a.addr is not None:
                return a.addr.port != 0 and net.in_use(s, a.addr.host, a.addr.port)
            return net.in_use(dataclasses.replace(s, state=State.LISTENING), s.host, s.port)
        case When.UNSPEC:
            return a.unspec
        case When.NO_DEST:
            return a.addr is None
        case When.DEST_PORT_0:
            return a.addr is not None and a.addr.port == 0
        case When.QUEUED:
            return bool(s.queue)
        case When.LINGER0:
            return s.linger0
        case When.HOW_INVALID:
            return a.how not in (0, 1, 2)
        case When.HOW_RD:
            return a.how in (0, 2)
        case When.LAST_FIN:
            return a.how in (1, 2) and s.done and not s.fin_sent
        case When.FIN_SENT:
            return s.fin_sent
        case When.CLOSE_WAIT:
            return s.done and not s.fin_sent
        case When.RD_SHUT_FIN_SENT:
            return s.rd_shut and s.fin_sent
        case When.OPT_READONLY:
            return a.opt in READ_ONLY_OPTS
        case When.OPT_SO_ERROR:
            return a.opt is Opt.SO_ERROR


# -- effects: the transitions that don't fit in a table cell, written out ----------------

Effected = tuple[Sock, tuple[Out, ...]]


class Effect(enum.Enum):
    """Named side effects of a row. The value is the text the spec's tables show."""

    BIND = "take the address"
    BIND_FAILED = "address back to the wildcard"
    AUTOBIND = "bind an ephemeral port if none"
    LISTEN = "listen (bind an ephemeral port if none)"
    BACKLOG = "update backlog"
    SYN = "bind if needed, send SYN"
    UDP_CONNECT = "bind if needed, set peer"
    DISCONNECT = "disconnect"
    ACCEPT = "dequeue a connection"
    SEND = "send data"
    SEND_DGRAM = "bind if needed, send datagram"
    TAKE = "consume data"
    SHUT = "set shut flags, FIN if SHUT_WR"
    SHUT_FLAGS = "set shut flags"
    CLOSE_RESET = "send RST"
    CLOSE_FIN = "send FIN if not sent"
    CLOSE_LISTENER = "reset queued connections"
    SETOPT = "set option"
    ESTABLISH = "set peer"
    REFUSED = "error ECONNREFUSED, release port"
    QUEUE = "queue connection"
    RECEIVE = "queue data"
    FIN_IN = "mark peer's FIN"
    FIN_IN_TIME_WAIT = "mark peer's FIN, TIME_WAIT, release port"
    RESET_ECONNRESET = "error ECONNRESET, release port"
    RESET_EPIPE = "error EPIPE, release port"
    DATA_AFTER_SHUT = "error ECONNRESET, release port, answer RST"
    ICMP_ERROR = "error ECONNREFUSED"


def _release(s: Sock) -> Sock:
    """The protocol reaches TCP_CLOSE: unlocked ports go back (SOCK-12)."""
    holds = s.holds_port and s.port_locked
    return dataclasses.replace(s, holds_port=holds)


def _done(s: Sock, error: int) -> Sock:
    """tcp_done(): both directions shut, port released unless bind() chose it."""
    return _release(dataclasses.replace(s, rd_shut=True, wr_shut=True, error=error or s.error))


def _autobind(s: Sock, net: Net) -> Sock:
    if s.holds_port:
        return s
    return dataclasses.replace(s, port=net.ephemeral_port(), holds_port=True)


def _connect_source(s: Sock) -> Sock:
    """Connecting fixes the local address to the one packets carry (loopback)."""
    if s.host and s.host != WILDCARD[s.family]:
        return s
    return dataclasses.replace(s, host=LOOPBACK[s.family])


def _disconnect(s: Sock) -> Effected:
    """Dissolve a socket's association: ``connect(AF_UNSPEC)``, ``shutdown()`` of a
    listener or of a connect in progress, and a failed ``connect()`` reporting its
    error. Linux's tcp_disconnect() and udp_disconnect() (SOCK-11, SOCK-12)."""
    host = s.host if s.host_locked else ""
    if s.kind is Kind.UDP:  # udp_disconnect() keeps the shut flags and queued datagrams
        if s.port_locked:
            return dataclasses.replace(s, host=host, peer=None), ()
        return dataclasses.replace(s, host=host, port=0, holds_port=False, peer=None), ()
    outs: tuple[Out, ...] = ()
    error = s.error
    if s.state is State.LISTENING:
        outs = (DropQueue(s.queue),)
    elif s.state in SYNCED:  # the peer is reset, and so, in a way, are we (SOCK-6)
        outs, error = (Rst(),), Errno.ECONNRESET
    elif s.state is State.CONNECTING:
        error = Errno.ECONNRESET
    if s.state not in TCP_CLOSE:
        s = _release(s)
    return dataclasses.replace(
        s, host=host, peer=None, rd_shut=False, wr_shut=False, fin_sent=False, done=False,
        error=error, rx=(), queue=(),
    ), outs


def _take(s: Sock, size: int) -> Sock:
    if s.kind is Kind.UDP:
        return dataclasses.replace(s, rx=s.rx[1:])
    left = sum(s.rx) - min(size, sum(s.rx))
    return dataclasses.replace(s, rx=(left,) if left else ())


def _shut(s: Sock, how: int, fin: bool) -> Effected:
    s = dataclasses.replace(s, rd_shut=s.rd_shut or how in (0, 2), wr_shut=s.wr_shut or how >= 1)
    if fin and how >= 1 and not s.fin_sent:
        closing = s.done  # CLOSE_WAIT -> LAST_ACK -> CLOSE once our FIN is acked (loopback)
        s = dataclasses.replace(s, fin_sent=True)
        return (_done(s, 0) if closing else s), (Fin(),)
    return s, ()


def _setopt(s: Sock, opt: Opt | None, value: int) -> Sock:
    match opt:
        case Opt.SO_REUSEADDR:
            return dataclasses.replace(s, reuse=value != 0)
        case Opt.SO_LINGER:
            return dataclasses.replace(s, linger0=value == 0)
        case Opt.SO_RCVTIMEO:
            return dataclasses.replace(s, rcvtimeo=value > 0)
        case Opt.SO_SNDTIMEO:
            return dataclasses.replace(s, sndtimeo=value > 0)
        case _:
            return s


def _effect(e: Effect, s: Sock, a: Args, net: Net) -> Effected:
    match e:
        case Effect.BIND:
            assert a.addr is not None
            port = a.addr.port or net.ephemeral_port()
            wild = a.addr.host == WILDCARD[s.family]
            return dataclasses.replace(
                s, host="" if wild else a.addr.host, port=port, holds_port=True,
                host_locked=not wild, port_locked=a.addr.port != 0,
            ), ()
        case Effect.BIND_FAILED:  # Linux sets the address before it finds the port taken
            return dataclasses.replace(s, host=""), ()
        case Effect.AUTOBIND:
            return _autobind(s, net), ()
        case Effect.LISTEN:
            return dataclasses.replace(_autobind(s, net), backlog=_backlog(a.backlog)), ()
        case Effect.BACKLOG:
            return dataclasses.replace(s, backlog=_backlog(a.backlog)), ()
        case Effect.SYN:
            assert a.addr is not None
            s = _connect_source(_autobind(s, net))
            return dataclasses.replace(s, peer=a.addr), (Syn(a.addr),)
        case Effect.UDP_CONNECT:
            assert a.addr is not None
            return dataclasses.replace(_connect_source(_autobind(s, net)), peer=a.addr), ()
        case Effect.DISCONNECT:
            return _disconnect(s)
        case Effect.ACCEPT:
            return dataclasses.replace(s, queue=s.queue[1:]), ()
        case Effect.SEND:
            return s, ((Data(a.size),) if a.size else ())
        case Effect.SEND_DGRAM:
            s = _autobind(s, net)
            dst = a.addr or s.peer
            assert dst is not None
            return s, (Dgram(a.size, s.source, dst),)
        case Effect.TAKE:
            return _take(s, a.size), ()
        case Effect.SHUT:
            return _shut(s, a.how, fin=True)
        case Effect.SHUT_FLAGS:
            return _shut(s, a.how, fin=False)
        case Effect.CLOSE_RESET:
            return s, (Rst(),)
        case Effect.CLOSE_FIN:
            if s.fin_sent:
                return s, (TimeWait(awaiting_fin=True),)
            if s.done:
                return s, (Fin(),)  # LAST_ACK, gone once acked
            return s, (Fin(), TimeWait(awaiting_fin=True))
        case Effect.CLOSE_LISTENER:
            return s, (DropQueue(s.queue),)
        case Effect.SETOPT:
            return _setopt(s, a.opt, a.value), ()
        case Effect.ESTABLISH:
            return dataclasses.replace(s, peer=a.addr), ()
        case Effect.REFUSED:
            return _done(s, Errno.ECONNREFUSED), ()
        case Effect.QUEUE:
            return dataclasses.replace(s, queue=(*s.queue, a.child)), ()
        case Effect.RECEIVE:
            if s.kind is Kind.UDP:
                return dataclasses.replace(s, rx=(*s.rx, a.size)), ()
            return dataclasses.replace(s, rx=(sum(s.rx) + a.size,)), ()
        case Effect.FIN_IN:
            return dataclasses.replace(s, done=True, rd_shut=True), ()
        case Effect.FIN_IN_TIME_WAIT:
            s = _done(dataclasses.replace(s, done=True), 0)
            return s, (TimeWait(awaiting_fin=False),)
        case Effect.RESET_ECONNRESET:
            return _done(s, Errno.ECONNRESET), ()
        case Effect.RESET_EPIPE:
            return _done(s, Errno.EPIPE), ()
        case Effect.DATA_AFTER_SHUT:
            return _done(s, Errno.ECONNRESET), (Rst(),)
        case Effect.ICMP_ERROR:
            return dataclasses.replace(s, error=Errno.ECONNREFUSED), ()


def _backlog(backlog: int) -> int:
    """listen()'s backlog as Linux 6.x keeps it: a negative backlog acts as 0 (checked
    on Linux), a large one is capped at somaxconn (SOCK-10)."""
    return min(max(backlog, 0), SOMAXCONN)


# -- the table ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    kinds: frozenset[Kind]
    states: frozenset[State]
    inputs: frozenset[Input]
    when: When
    next: State | To
    result: Outcome | None  # None: an event, which has no result
    effect: Effect | None = None


TCP: Final = frozenset({Kind.TCP})
UDP: Final = frozenset({Kind.UDP})
BOTH: Final = frozenset(Kind)
ALL_CALLS: Final = frozenset(Call)
W = When
S = State
E = Errno
R = Res
F = Effect
_ = To.SAME


def _row(kinds: frozenset[Kind], states: Iterable[State], inputs: Input | Iterable[Input],
         when: When, nxt: State | To, result: Outcome | None,
         effect: Effect | None = None) -> Row:
    ins = frozenset([inputs]) if isinstance(inputs, Call | Event) else frozenset(inputs)
    return Row(kinds, frozenset(states), ins, when, nxt, result, effect)


_ANY_TCP = OPEN_TCP
_IDLE = (S.UNBOUND, S.BOUND)
_NOT_LISTENING = OPEN_TCP - {S.LISTENING}
_WAITING = (S.CONNECTING, S.HANDSHAKE_DONE, S.CONNECTED)  # recv may wait here

#: Every transition, in priority order (SOCK-4). spec/sockets.md renders these rows.
TABLE: Final[tuple[Row, ...]] = (
    # -- any socket after close() (SOCK-8)
    _row(BOTH, [S.CLOSED], ALL_CALLS, W.ALWAYS, _, E.EBADF),
    # -- bind (SOCK-12, SOCK-13)
    _row(TCP, [S.UNBOUND], Call.BIND, W.ADDR_IN_USE, _, E.EADDRINUSE, F.BIND_FAILED),
    _row(TCP, [S.UNBOUND], Call.BIND, W.ALWAYS, S.BOUND, R.ZERO, F.BIND),
    _row(TCP, [S.CONNECT_FAILED, S.ENDED, S.DISCONNECTING], Call.BIND, W.HOLDS_PORT, _, E.EINVAL),
    _row(TCP, [S.CONNECT_FAILED, S.ENDED, S.DISCONNECTING], Call.BIND, W.ADDR_IN_USE, _,
         E.EADDRINUSE, F.BIND_FAILED),
    _row(TCP, [S.CONNECT_FAILED, S.ENDED, S.DISCONNECTING], Call.BIND, W.ALWAYS, _, R.ZERO,
         F.BIND),
    _row(TCP, [S.BOUND, S.LISTENING, *_WAITING], Call.BIND, W.ALWAYS, _, E.EINVAL),
    _row(UDP, [S.UNBOUND], Call.BIND, W.ADDR_IN_USE, _, E.EADDRINUSE, F.BIND_FAILED),
    _row(UDP, [S.UNBOUND], Call.BIND, W.ALWAYS, S.BOUND, R.ZERO, F.BIND),
    _row(UDP, [S.BOUND, S.CONNECTED], Call.BIND, W.ALWAYS, _, E.EINVAL),
    # -- listen (SOCK-10)
    _row(TCP, [S.UNBOUND], Call.LISTEN, W.ALWAYS, S.LISTENING, R.ZERO, F.LISTEN),
    _row(TCP, [S.BOUND], Call.LISTEN, W.ADDR_IN_USE, _, E.EADDRINUSE),
    _row(TCP, [S.BOUND], Call.LISTEN, W.ALWAYS, S.LISTENING, R.ZERO, F.LISTEN),
    _row(TCP, [S.LISTENING], Call.LISTEN, W.ALWAYS, _, R.ZERO, F.BACKLOG),
    _row(TCP, OPEN_TCP - {S.UNBOUND, S.BOUND, S.LISTENING}, Call.LISTEN, W.ALWAYS, _, E.EINVAL),
    _row(UDP, OPEN_UDP, Call.LISTEN, W.ALWAYS, _, E.EOPNOTSUPP),
    # -- connect (SOCK-9, SOCK-11)
    _row(TCP, _ANY_TCP, Call.CONNECT, W.UNSPEC, To.IDLE, R.ZERO, F.DISCONNECT),
    _row(TCP, _IDLE, Call.CONNECT, W.NONBLOCK, S.CONNECTING, E.EINPROGRESS, F.SYN),
    _row(TCP, _IDLE, Call.CONNECT, W.ALWAYS, S.CONNECTING, R.WAIT, F.SYN),
    _row(TCP, [S.CONNECTING], Call.CONNECT, W.NONBLOCK, _, E.EALREADY),
    _row(TCP, [S.CONNECTING], Call.CONNECT, W.SNDTIMEO, _, R.IN_PROGRESS),
    _row(TCP, [S.CONNECTING], Call.CONNECT, W.ALWAYS, _, R.BLOCKS),
    _row(TCP, [S.HANDSHAKE_DONE], Call.CONNECT, W.ALWAYS, S.CONNECTED, R.ZERO),
    _row(TCP, [S.CONNECT_FAILED], Call.CONNECT, W.ALWAYS, To.IDLE, R.SO_ERROR_OR_ECONNABORTED,
         F.DISCONNECT),
    _row(TCP, [S.LISTENING, S.CONNECTED, S.ENDED], Call.CONNECT, W.ALWAYS, _, E.EISCONN),
    _row(TCP, [S.DISCONNECTING], Call.CONNECT, W.ALWAYS, _, E.EINVAL),
    _row(UDP, OPEN_UDP, Call.CONNECT, W.UNSPEC, To.IDLE, R.ZERO, F.DISCONNECT),
    _row(UDP, OPEN_UDP, Call.CONNECT, W.ALWAYS, S.CONNECTED, R.ZERO, F.UDP_CONNECT),
    # -- accept (SOCK-10)
    _row(TCP, [S.LISTENING], Call.ACCEPT, W.QUEUED, _, R.NEW_SOCKET, F.ACCEPT),
    _row(TCP, [S.LISTENING], Call.ACCEPT, W.NONBLOCK, _, E.EAGAIN),
    _row(TCP, [S.LISTENING], Call.ACCEPT, W.RCVTIMEO, _, E.EAGAIN),
    _row(TCP, [S.LISTENING], Call.ACCEPT, W.ALWAYS, _, R.BLOCKS),
    _row(TCP, _NOT_LISTENING, Call.ACCEPT, W.ALWAYS, _, E.EINVAL),
    _row(UDP, OPEN_UDP, Call.ACCEPT, W.ALWAYS, _, E.EOPNOTSUPP),
    # -- send (SOCK-7, SOCK-9, SOCK-15)
    _row(TCP, _ANY_TCP, Call.SEND, W.ERROR, _, R.SO_ERROR),
    _row(TCP, [S.CONNECTING], Call.SEND, W.NONBLOCK, _, E.EAGAIN),
    _row(TCP, [S.CONNECTING], Call.SEND, W.SNDTIMEO, _, E.EAGAIN),
    _row(TCP, [S.CONNECTING], Call.SEND, W.ALWAYS, _, R.BLOCKS),
    _row(TCP, SYNCED, Call.SEND, W.WR_SHUT, _, E.EPIPE),
    _row(TCP, SYNCED, Call.SEND, W.ALWAYS, _, R.SIZE, F.SEND),
    _row(TCP, OPEN_TCP - SYNCED - {S.CONNECTING}, Call.SEND, W.ALWAYS, _, E.EPIPE),
    _row(UDP, _IDLE, Call.SEND, W.DEST_PORT_0, S.BOUND, E.EINVAL, F.AUTOBIND),
    _row(UDP, _IDLE, Call.SEND, W.NO_DEST, S.BOUND, E.EDESTADDRREQ, F.AUTOBIND),
    _row(UDP, _IDLE, Call.SEND, W.ERROR, S.BOUND, R.SO_ERROR, F.AUTOBIND),
    _row(UDP, _IDLE, Call.SEND, W.WR_SHUT, S.BOUND, E.EPIPE, F.AUTOBIND),
    _row(UDP, _IDLE, Call.SEND, W.ALWAYS, S.BOUND, R.SIZE, F.SEND_DGRAM),
    _row(UDP, [S.CONNECTED], Call.SEND, W.DEST_PORT_0, _, E.EINVAL),
    _row(UDP, [S.CONNECTED], Call.SEND, W.ERROR, _, R.SO_ERROR),
    _row(UDP, [S.CONNECTED], Call.SEND, W.WR_SHUT, _, E.EPIPE),
    _row(UDP, [S.CONNECTED], Call.SEND, W.ALWAYS, _, R.SIZE, F.SEND_DGRAM),
    # -- recv (SOCK-6, SOCK-7, SOCK-9)
    _row(TCP, [S.LISTENING], Call.RECV, W.ALWAYS, _, E.ENOTCONN),
    _row(TCP, _NOT_LISTENING, Call.RECV, W.DATA, _, R.SIZE, F.TAKE),
    _row(TCP, _NOT_LISTENING, Call.RECV, W.PEER_FIN, _, R.ZERO),
    _row(TCP, _NOT_LISTENING, Call.RECV, W.ERROR, _, R.SO_ERROR),
    _row(TCP, _NOT_LISTENING, Call.RECV, W.RD_SHUT, _, R.ZERO),
    _row(TCP, TCP_CLOSE, Call.RECV, W.ALWAYS, _, E.ENOTCONN),
    _row(TCP, _WAITING, Call.RECV, W.NONBLOCK, _, E.EAGAIN),
    _row(TCP, _WAITING, Call.RECV, W.RCVTIMEO, _, E.EAGAIN),
    _row(TCP, _WAITING, Call.RECV, W.ALWAYS, _, R.BLOCKS),
    _row(UDP, OPEN_UDP, Call.RECV, W.ERROR, _, R.SO_ERROR),
    _row(UDP, OPEN_UDP, Call.RECV, W.DATA, _, R.SIZE, F.TAKE),
    _row(UDP, OPEN_UDP, Call.RECV, W.NONBLOCK, _, E.EAGAIN),
    _row(UDP, OPEN_UDP, Call.RECV, W.RD_SHUT, _, R.ZERO),
    _row(UDP, OPEN_UDP, Call.RECV, W.RCVTIMEO, _, E.EAGAIN),
    _row(UDP, OPEN_UDP, Call.RECV, W.ALWAYS, _, R.BLOCKS),
    # -- shutdown (SOCK-7)
    _row(BOTH, OPEN_TCP, Call.SHUTDOWN, W.HOW_INVALID, _, E.EINVAL),
    _row(TCP, [S.CONNECT_FAILED], Call.SHUTDOWN, W.ALWAYS, S.DISCONNECTING, E.ENOTCONN,
         F.SHUT_FLAGS),
    _row(TCP, TCP_CLOSE - {S.CONNECT_FAILED}, Call.SHUTDOWN, W.ALWAYS, _, E.ENOTCONN,
         F.SHUT_FLAGS),
    _row(TCP, [S.LISTENING], Call.SHUTDOWN, W.HOW_RD, To.IDLE, R.ZERO, F.DISCONNECT),
    _row(TCP, [S.LISTENING], Call.SHUTDOWN, W.ALWAYS, _, R.ZERO),
    _row(TCP, [S.CONNECTING], Call.SHUTDOWN, W.ALWAYS, To.IDLE, R.ZERO, F.DISCONNECT),
    _row(TCP, SYNCED, Call.SHUTDOWN, W.LAST_FIN, S.ENDED, R.ZERO, F.SHUT),
    _row(TCP, SYNCED, Call.SHUTDOWN, W.ALWAYS, S.CONNECTED, R.ZERO, F.SHUT),
    _row(UDP, _IDLE, Call.SHUTDOWN, W.ALWAYS, _, E.ENOTCONN, F.SHUT_FLAGS),
    _row(UDP, [S.CONNECTED], Call.SHUTDOWN, W.ALWAYS, _, R.ZERO, F.SHUT_FLAGS),
    # -- close (SOCK-8, SOCK-14)
    _row(TCP, [S.LISTENING], Call.CLOSE, W.ALWAYS, S.CLOSED, R.ZERO, F.CLOSE_LISTENER),
    _row(TCP, SYNCED, Call.CLOSE, W.DATA, S.CLOSED, R.ZERO, F.CLOSE_RESET),
    _row(TCP, SYNCED, Call.CLOSE, W.LINGER0, S.CLOSED, R.ZERO, F.CLOSE_RESET),
    _row(TCP, SYNCED, Call.CLOSE, W.ALWAYS, S.CLOSED, R.ZERO, F.CLOSE_FIN),
    _row(TCP, OPEN_TCP - SYNCED - {S.LISTENING}, Call.CLOSE, W.ALWAYS, S.CLOSED, R.ZERO),
    _row(UDP, OPEN_UDP, Call.CLOSE, W.ALWAYS, S.CLOSED, R.ZERO),
    # -- names and options (SOCK-16, SOCK-17)
    _row(BOTH, OPEN_TCP, Call.GETSOCKNAME, W.ALWAYS, _, R.NAME),
    _row(TCP, SYNCED, Call.GETPEERNAME, W.ALWAYS, _, R.PEER),
    _row(UDP, [S.CONNECTED], Call.GETPEERNAME, W.ALWAYS, _, R.PEER),
    _row(TCP, OPEN_TCP - SYNCED, Call.GETPEERNAME, W.ALWAYS, _, E.ENOTCONN),
    _row(UDP, _IDLE, Call.GETPEERNAME, W.ALWAYS, _, E.ENOTCONN),
    _row(BOTH, OPEN_TCP, Call.SETSOCKOPT, W.OPT_READONLY, _, E.ENOPROTOOPT),
    _row(BOTH, OPEN_TCP, Call.SETSOCKOPT, W.ALWAYS, _, R.ZERO, F.SETOPT),
    _row(BOTH, OPEN_TCP, Call.GETSOCKOPT, W.OPT_SO_ERROR, _, R.SO_ERROR_VALUE),
    _row(BOTH, OPEN_TCP, Call.GETSOCKOPT, W.ALWAYS, _, R.OPTVAL),
    # -- events (SOCK-5, SOCK-6)
    _row(TCP, [S.CONNECTING], Event.CONNECT_ACCEPTED, W.ALWAYS, S.HANDSHAKE_DONE, None,
         F.ESTABLISH),
    _row(TCP, [S.CONNECTING], Event.CONNECT_REFUSED, W.ALWAYS, S.CONNECT_FAILED, None, F.REFUSED),
    _row(TCP, [S.LISTENING], Event.CONNECTION_PENDING, W.ALWAYS, _, None, F.QUEUE),
    _row(TCP, SYNCED, Event.PEER_DATA, W.RD_SHUT_FIN_SENT, S.ENDED, None, F.DATA_AFTER_SHUT),
    _row(TCP, SYNCED, Event.PEER_DATA, W.ALWAYS, _, None, F.RECEIVE),
    _row(TCP, [S.CONNECTED], Event.PEER_FIN, W.FIN_SENT, S.ENDED, None, F.FIN_IN_TIME_WAIT),
    _row(TCP, SYNCED, Event.PEER_FIN, W.ALWAYS, _, None, F.FIN_IN),
    _row(TCP, [S.CONNECTED], Event.PEER_RESET, W.CLOSE_WAIT, S.ENDED, None, F.RESET_EPIPE),
    _row(TCP, [S.CONNECTED], Event.PEER_RESET, W.ALWAYS, S.ENDED, None, F.RESET_ECONNRESET),
    _row(TCP, [S.HANDSHAKE_DONE], Event.PEER_RESET, W.CLOSE_WAIT, S.CONNECT_FAILED, None,
         F.RESET_EPIPE),
    _row(TCP, [S.HANDSHAKE_DONE], Event.PEER_RESET, W.ALWAYS, S.CONNECT_FAILED, None,
         F.RESET_ECONNRESET),
    _row(UDP, [S.BOUND, S.CONNECTED], Event.PEER_DATA, W.ALWAYS, _, None, F.RECEIVE),
    _row(UDP, [S.CONNECTED], Event.PORT_UNREACHABLE, W.ALWAYS, _, None, F.ICMP_ERROR),
)


def _index(table: tuple[Row, ...]) -> dict[tuple[Kind, State, Input], tuple[Row, ...]]:
    index: dict[tuple[Kind, State, Input], list[Row]] = {}
    for row in table:
        for kind in row.kinds:
            valid = TCP_STATES if kind is Kind.TCP else UDP_STATES
            for state in row.states:
                if state not in valid:
                    continue
                for inp in row.inputs:
                    index.setdefault((kind, state, inp), []).append(row)
    return {key: tuple(rows) for key, rows in index.items()}


_INDEX: Final = _index(TABLE)


class NoTransition(LookupError):
    """No row matches: the input cannot happen in this state (a caller's bug)."""


@dataclasses.dataclass(frozen=True)
class Step:
    """What :func:`step` did: the new socket, the result (None for events), the packets."""

    sock: Sock
    result: Result | Res | None
    out: tuple[Out, ...]
    row: Row


def match(sock: Sock, inp: Input, args: Args, net: Net) -> Row:
    """The first row of :data:`TABLE` that applies (SOCK-4)."""
    for row in _INDEX.get((sock.kind, sock.state, inp), ()):
        if _guard(row.when, sock, args, net):
            return row
    raise NoTransition(f"{sock.kind.value} {sock.state.value}: no row for {inp}")


def step(sock: Sock, inp: Input, args: Args, net: Net) -> Step:
    """Apply one call or event to one socket. Pure: ``sock`` is not modified.

    A result of :attr:`Res.WAIT` means the call waits for the network: the
    caller delivers the emitted packets, then steps the same call again with
    ``first=True`` and takes that step's result (``connect()``, SOCK-9).
    """
    row = match(sock, inp, args, net)
    result: Result | Res | None = None
    if row.result is not None:
        result, sock = _resolve(row.result, sock, inp, args)
    out: tuple[Out, ...] = ()
    if row.effect is not None:
        sock, out = _effect(row.effect, sock, args, net)
    if row.next is To.IDLE:
        sock = dataclasses.replace(sock, state=State.BOUND if sock.holds_port else State.UNBOUND)
    elif isinstance(row.next, State):
        sock = dataclasses.replace(sock, state=row.next)
    if (sock.state is State.UNBOUND and sock.holds_port) or \
            (sock.state is State.BOUND and not sock.holds_port):
        raise AssertionError(f"TABLE row {row} leaves {sock.state.value} with {sock.holds_port=}")
    return Step(sock, result, out, row)


def _resolve(outcome: Outcome, s: Sock, inp: Input, a: Args) -> tuple[Result | Res, Sock]:
    """Turn a row's result into the call's result, consuming a pending error (SOCK-6)."""
    if isinstance(outcome, Errno):
        return Err(outcome), s
    match outcome:
        case Res.ZERO:
            return Ok(0), s
        case Res.SIZE:
            if inp is Call.SEND:
                return Ok(a.size), s
            available = s.rx[0] if s.kind is Kind.UDP else sum(s.rx)
            return Ok(min(a.size, available)), s
        case Res.NAME:
            return Ok(s.name), s
        case Res.PEER:
            assert s.peer is not None
            return Ok(s.peer), s
        case Res.OPTVAL:
            return Ok(_optval(s, a.opt)), s
        case Res.SO_ERROR:
            return Err(s.error), dataclasses.replace(s, error=0)
        case Res.SO_ERROR_VALUE:
            return Ok(s.error), dataclasses.replace(s, error=0)
        case Res.SO_ERROR_OR_ECONNABORTED:
            return Err(s.error or Errno.ECONNABORTED), dataclasses.replace(s, error=0)
        case Res.IN_PROGRESS:
            return Err(Errno.EINPROGRESS if a.first else Errno.EALREADY), s
        case Res.BLOCKS:
            return Blocked(), s
        case Res.NEW_SOCKET:
            return Ok(s.queue[0]), s
        case Res.WAIT:
            return outcome, s


#: Options getsockopt() reports in v1; the others are write-only here (SOCK-16).
GETTABLE_OPTS: Final = frozenset({Opt.SO_ERROR, Opt.SO_TYPE, Opt.SO_ACCEPTCONN, Opt.SO_REUSEADDR})


def _optval(s: Sock, opt: Opt | None) -> int:
    match opt:
        case Opt.SO_TYPE:
            return SOCK_STREAM if s.kind is Kind.TCP else SOCK_DGRAM
        case Opt.SO_ACCEPTCONN:
            return int(s.state is State.LISTENING)
        case Opt.SO_REUSEADDR:
            return int(s.reuse)
        case _:
            raise ValueError(f"getsockopt({opt}) is not specified by v1")


# -- the loopback host ----------------------------------------------------------------------

EPHEMERAL_LOW: Final = 32768  # net.ipv4.ip_local_port_range default low end


@dataclasses.dataclass
class _TimeWaitRecord:
    family: Family
    host: str
    port: int
    reuse: bool
    awaiting_fin: bool


class _View:
    """The :class:`Net` one socket sees while it steps: every holder but itself."""

    def __init__(self, host: Host, sid: int) -> None:
        self._host = host
        self._sid = sid

    def in_use(self, sock: Sock, host: str, port: int) -> bool:
        return self._host.conflicts(self._sid, sock, host, port)

    def ephemeral_port(self) -> int:
        return self._host.ephemeral_port()


class Host:
    """One loopback host: the sockets an application holds and the network between them.

    This is the ``sockets`` role's interface: a conformance target provides an
    object with these methods (each returns :data:`Result`) and the suite runs
    the same call sequences on it and on Linux. Handles are small integers that
    are never reused, so a call naming a closed socket fails EBADF (SOCK-8).

    Packets between sockets are delivered at once and in order, as on Linux
    loopback, where a send/connect/close has reached the peer by the time the
    call returns (SOCK-5).
    """

    def __init__(self) -> None:
        self._socks: dict[int, Sock] = {}
        self._peer: dict[int, int] = {}  # connection ends, both directions
        self._tw: dict[int, _TimeWaitRecord] = {}
        self._next_id = 3
        self._next_port = EPHEMERAL_LOW

    # -- the role's calls (SOCK-3) --------------------------------------------------------
    def socket(self, family: Family, kind: Kind, nonblock: bool = False) -> Result:
        sid = self._new(Sock(kind, family, nonblock=nonblock))
        return Ok(sid)

    def bind(self, fd: int, addr: Addr) -> Result:
        return self._call(fd, Call.BIND, Args(addr=addr))

    def listen(self, fd: int, backlog: int) -> Result:
        return self._call(fd, Call.LISTEN, Args(backlog=backlog))

    def connect(self, fd: int, addr: Addr | None) -> Result:
        """``addr=None`` is ``connect(AF_UNSPEC)``: dissolve the association (SOCK-11)."""
        args = Args(addr=_reachable(addr), unspec=addr is None)
        result = self._call_raw(fd, Call.CONNECT, args)
        if result is Res.WAIT:  # the SYN has been answered (or dropped): report (SOCK-9)
            result = self._call_raw(fd, Call.CONNECT, dataclasses.replace(args, first=True))
        return _final(result)

    def accept(self, fd: int, nonblock: bool = False) -> Result:
        """Take a queued connection; ``nonblock`` is accept4()'s SOCK_NONBLOCK (SOCK-10)."""
        result = self._call(fd, Call.ACCEPT, Args())
        if isinstance(result, Ok) and isinstance(result.value, int):
            child = result.value
            sock = dataclasses.replace(self._socks[child], nonblock=nonblock)
            self._socks[child] = sock
            assert sock.peer is not None
            return Ok((child, sock.peer))
        return result

    def send(self, fd: int, size: int, to: Addr | None = None) -> Result:
        return self._call(fd, Call.SEND, Args(addr=_reachable(to), size=size))

    def recv(self, fd: int, size: int) -> Result:
        return self._call(fd, Call.RECV, Args(size=size))

    def shutdown(self, fd: int, how: int) -> Result:
        return self._call(fd, Call.SHUTDOWN, Args(how=how))

    def close(self, fd: int) -> Result:
        return self._call(fd, Call.CLOSE, Args())

    def getsockname(self, fd: int) -> Result:
        return self._call(fd, Call.GETSOCKNAME, Args())

    def getpeername(self, fd: int) -> Result:
        return self._call(fd, Call.GETPEERNAME, Args())

    def setsockopt(self, fd: int, opt: Opt, value: int) -> Result:
        return self._call(fd, Call.SETSOCKOPT, Args(opt=opt, value=value))

    def getsockopt(self, fd: int, opt: Opt) -> Result:
        if opt not in GETTABLE_OPTS:
            raise ValueError(f"getsockopt({opt.value}) is not specified by v1")
        return self._call(fd, Call.GETSOCKOPT, Args(opt=opt))

    def unused_port(self, kind: Kind, family: Family) -> int:
        """A port nothing on this host uses: connecting there is refused (SOCK-5)."""
        port = 1
        while self._port_used(port):
            port += 1
        return port

    def state(self, fd: int) -> State:
        """The socket's state in :class:`State` terms (for tests and docs)."""
        return self._socks[fd].state

    # -- the port table (SOCK-12, SOCK-13, SOCK-14) ----------------------------------------------
    def _holders(self, exclude: int) -> Iterator[tuple[Kind, Family, str, int, bool, bool]]:
        for sid, s in self._socks.items():
            if sid != exclude and s.state is not State.CLOSED and s.holds_port:
                yield s.kind, s.family, s.host, s.port, s.reuse, s.state is State.LISTENING
        for tw in self._tw.values():
            yield Kind.TCP, tw.family, tw.host, tw.port, tw.reuse, False

    def conflicts(self, sid: int, sock: Sock, host: str, port: int) -> bool:
        """Linux's bind conflict rule: same port, overlapping addresses, unless both
        sockets set SO_REUSEADDR and (TCP) the other one is not listening."""
        host = "" if host == WILDCARD[sock.family] else host
        for kind, family, h, p, reuse, listening in self._holders(sid):
            if kind is not sock.kind or family is not sock.family or p != port:
                continue
            if host and h and host != h:
                continue
            shared = sock.reuse and reuse and not (kind is Kind.TCP and listening)
            if not shared:
                return True
        return False

    def _port_used(self, port: int) -> bool:
        return any(p == port for _, _, _, p, _, _ in self._holders(-1))

    def ephemeral_port(self) -> int:
        while self._port_used(self._next_port):
            self._next_port += 1
        self._next_port += 1
        return self._next_port - 1

    # -- stepping and routing ------------------------------------------------------------
    def _new(self, sock: Sock) -> int:
        sid = self._next_id
        self._next_id += 1
        self._socks[sid] = sock
        return sid

    def _call_raw(self, fd: int, call: Call, args: Args) -> Result | Res:
        if fd not in self._socks:
            return Err(Errno.EBADF)
        done = step(self._socks[fd], call, args, _View(self, fd))
        self._socks[fd] = done.sock
        self._route(fd, done.out)
        assert done.result is not None
        return done.result

    def _call(self, fd: int, call: Call, args: Args) -> Result:
        return _final(self._call_raw(fd, call, args))

    def _event(self, sid: int, event: Event, args: Args) -> list[tuple[int, Out]]:
        done = step(self._socks[sid], event, args, _View(self, sid))
        self._socks[sid] = done.sock
        return [(sid, out) for out in done.out]

    def _route(self, sid: int, outs: tuple[Out, ...]) -> None:
        work: deque[tuple[int, Out]] = deque((sid, out) for out in outs)
        while work:
            src, out = work.popleft()
            work.extend(self._deliver(src, out))

    def _synced(self, sid: int | None) -> bool:
        return sid is not None and sid in self._socks and self._socks[sid].state in SYNCED

    def _deliver(self, src: int, out: Out) -> list[tuple[int, Out]]:
        sender = self._socks[src]
        match out:
            case Syn(dst):
                return self._syn(src, sender, dst)
            case Dgram(size, from_, dst):
                return self._dgram(src, sender, size, from_, dst)
            case DropQueue(ids):
                outs: list[tuple[int, Out]] = []
                for child in ids:
                    if self._synced(child):
                        outs.append((child, Rst()))
                    self._socks[child] = dataclasses.replace(
                        self._socks[child], state=State.CLOSED, holds_port=False)
                return outs
            case TimeWait(awaiting_fin):
                self._tw[src] = _TimeWaitRecord(
                    sender.family, sender.host, sender.port, sender.reuse, awaiting_fin)
                return []
        peer = self._peer.get(src)
        if peer is not None and peer in self._tw:  # the peer left a TIME_WAIT record
            tw = self._tw[peer]
            match out:
                case Rst():
                    del self._tw[peer]
                case Fin():
                    tw.awaiting_fin = False
                case Data():
                    del self._tw[peer]  # data after close: answered with a reset (SOCK-14)
                    return self._event(src, Event.PEER_RESET, Args())
            return []
        if not self._synced(peer):
            if isinstance(out, Rst) or not self._synced(src):
                return []
            return self._event(src, Event.PEER_RESET, Args())
        assert peer is not None
        match out:
            case Data(size):
                return self._event(peer, Event.PEER_DATA, Args(size=size))
            case Fin():
                return self._event(peer, Event.PEER_FIN, Args())
            case Rst():
                return self._event(peer, Event.PEER_RESET, Args())
        return []

    def _syn(self, src: int, sender: Sock, dst: Addr) -> list[tuple[int, Out]]:
        listener = next(
            (sid for sid, s in self._socks.items()
             if s.kind is Kind.TCP and s.family is sender.family and s.state is State.LISTENING
             and s.port == dst.port and s.host in ("", dst.host)),
            None,
        )
        if listener is None:
            return self._event(src, Event.CONNECT_REFUSED, Args())
        lsock = self._socks[listener]
        if len(lsock.queue) > lsock.backlog:  # accept queue full: the SYN is dropped
            return []
        child = self._new(dataclasses.replace(
            lsock, state=State.CONNECTED, nonblock=False, host=dst.host, holds_port=True,
            peer=sender.source, backlog=0, queue=(), rx=(), error=0,
        ))
        self._peer[child], self._peer[src] = src, child
        outs = self._event(src, Event.CONNECT_ACCEPTED, Args(addr=dst))
        return outs + self._event(listener, Event.CONNECTION_PENDING, Args(child=child))

    def _dgram(self, src: int, sender: Sock, size: int, from_: Addr,
               dst: Addr) -> list[tuple[int, Out]]:
        for sid, s in self._socks.items():
            if (s.kind is Kind.UDP and s.family is sender.family and s.state in
                    (State.BOUND, State.CONNECTED) and s.holds_port and s.port == dst.port
                    and s.host in ("", dst.host) and (s.peer is None or s.peer == from_)):
                return self._event(sid, Event.PEER_DATA, Args(size=size))
        if sender.state is State.CONNECTED and sender.peer == dst:  # ICMP port unreachable
            return self._event(src, Event.PORT_UNREACHABLE, Args())
        return []


def _reachable(addr: Addr | None) -> Addr | None:
    """Connecting or sending to the wildcard address reaches loopback, as on Linux."""
    if addr is None or addr.host != WILDCARD[family_of(addr.host)]:
        return addr
    return Addr(LOOPBACK[family_of(addr.host)], addr.port)


def _final(result: Result | Res) -> Result:
    assert not isinstance(result, Res), result
    return result


# -- rendering (the spec's tables are generated from TABLE) ------------------------------------


def _cell_states(states: frozenset[State], kind: Kind) -> str:
    valid = TCP_STATES if kind is Kind.TCP else UDP_STATES
    chosen = [s for s in valid if s in states]
    everything = [s for s in valid if s is not State.CLOSED]
    if chosen == everything:
        return "any open"
    return ", ".join(s.value for s in chosen)


def _cell_inputs(inputs: frozenset[Input]) -> str:
    if inputs == ALL_CALLS:
        return "any call"
    order = [*Call, *Event]
    return ", ".join(i.value for i in order if i in inputs)


def _cell_result(result: Outcome | None) -> str:
    if result is None:
        return "—"
    if isinstance(result, Errno):
        return result.name
    return result.value


def render_rows(kind: Kind) -> list[str]:
    """The markdown table rows (no header) of :data:`TABLE` for one socket type."""
    lines = []
    for row in TABLE:
        if kind not in row.kinds:
            continue
        valid = TCP_STATES if kind is Kind.TCP else UDP_STATES
        if not any(s in row.states for s in valid):
            continue
        nxt = row.next.value
        cells = [
            _cell_states(row.states, kind), _cell_inputs(row.inputs), row.when.value, nxt,
            _cell_result(row.result), row.effect.value if row.effect else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


TABLE_HEADER: Final = (
    "| state | input | when | next | result | effect |",
    "|---|---|---|---|---|---|",
)


def render_table(kind: Kind) -> str:
    """The whole markdown table for one socket type, as spec/sockets.md holds it."""
    return "\n".join([*TABLE_HEADER, *render_rows(kind)])


def table_blocks(text: str) -> dict[Kind, str]:
    """The tables a document holds between ``<!-- TABLE tcp -->`` and ``<!-- /TABLE -->``."""
    found = {}
    for kind in Kind:
        start = f"<!-- TABLE {kind.value} -->"
        if start in text:
            body = text.split(start, 1)[1].split("<!-- /TABLE -->", 1)[0]
            found[kind] = body.strip()
    return found


def splice_tables(text: str) -> str:
    """``text`` with every table block replaced by the one rendered from :data:`TABLE`."""
    for kind, old in table_blocks(text).items():
        text = text.replace(old, render_table(kind), 1)
    return text


if __name__ == "__main__":  # python -m netkernel.reference.sockstate [spec/sockets.md]
    import sys

    if len(sys.argv) > 1:  # regenerate the tables inside a document, in place
        with open(sys.argv[1], encoding="utf-8") as f:
            doc = f.read()
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            f.write(splice_tables(doc))
    else:
        for k in Kind:
            print(f"<!-- TABLE {k.value} -->\n{render_table(k)}\n<!-- /TABLE -->\n")
