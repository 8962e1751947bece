"""Socket scripts (``.nkt``): socket-call sequences with expected results (docs/scripts.md).

A script is data, in the spirit of packetdrill's ``connect(3, ...) = -1 ECONNREFUSED``
lines and WebAssembly's ``.wast`` files: every engine replays the same files
through a thin harness. This module holds

* :func:`parse` — text to :class:`Script` (a :class:`ScriptError` names the line);
* :func:`replay` — run a script on a *host*: the ``sockets`` role's host object
  (``sockets.Host()``) or :class:`LinuxHost`, real Linux sockets on loopback,
  which is the oracle the spec was checked against (SOCK-1);
* :class:`LinuxHost` — the ``sockets`` role's interface over the ``socket`` module.

Both hosts take and return the vocabulary of :mod:`netkernel.reference.sockstate`
(``Addr``, ``Ok``/``Err``/``Blocked``, ``Opt``...), which is the role's interface.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from netkernel.reference.sockstate import (
    LOOPBACK,
    WILDCARD,
    Addr,
    Blocked,
    Err,
    Family,
    Kind,
    Ok,
    Opt,
    Result,
    family_of,
)

SCRIPTS_DIR: Final = Path(__file__).resolve().parent / "scripts"

# -- the host interface both backends provide -----------------------------------------------


class SocketHost(Protocol):
    """The ``sockets`` role's host: one object per test, handles are ints."""

    def socket(self, family: Family, kind: Kind, nonblock: bool = False) -> Result: ...
    def bind(self, fd: int, addr: Addr) -> Result: ...
    def listen(self, fd: int, backlog: int) -> Result: ...
    def connect(self, fd: int, addr: Addr | None) -> Result: ...
    def accept(self, fd: int, nonblock: bool = False) -> Result: ...
    def send(self, fd: int, size: int, to: Addr | None = None) -> Result: ...
    def recv(self, fd: int, size: int) -> Result: ...
    def shutdown(self, fd: int, how: int) -> Result: ...
    def close(self, fd: int) -> Result: ...
    def getsockname(self, fd: int) -> Result: ...
    def getpeername(self, fd: int) -> Result: ...
    def setsockopt(self, fd: int, opt: Opt, value: int) -> Result: ...
    def getsockopt(self, fd: int, opt: Opt) -> Result: ...
    def unused_port(self, kind: Kind, family: Family) -> int: ...


# -- Linux -----------------------------------------------------------------------------------

_AF = {Family.INET: socket.AF_INET, Family.INET6: socket.AF_INET6}
_TYPE = {Kind.TCP: socket.SOCK_STREAM, Kind.UDP: socket.SOCK_DGRAM}
_SO = {opt: getattr(socket, opt.value) for opt in Opt}
#: A blocking call with no timeout set would wait forever; LinuxHost bounds it by
#: this kernel timeout and reports :class:`Blocked` when it expires.
BLOCK_GRACE_MS: Final = 100
#: Loopback delivers within the sending call; this pause after a call that sends
#: packets covers the rare case of the kernel deferring that work to ksoftirqd.
SETTLE_S: Final = 0.0002
_libc = ctypes.CDLL(None, use_errno=True)


def _timeval(ms: int) -> bytes:
    return struct.pack("ll", ms // 1000, (ms % 1000) * 1000)


@dataclasses.dataclass
class _LinuxSock:
    sock: socket.socket
    kind: Kind
    family: Family
    nonblock: bool
    rcvtimeo: int = 0  # what the caller set, in ms (0: wait forever)
    sndtimeo: int = 0
    closed: bool = False


class LinuxHost:
    """The ``sockets`` role's interface over real Linux sockets (the oracle).

    Loopback only. Each call is one system call on a real socket, with two
    adaptations, both stated in docs/scripts.md: a blocking call with no timeout
    set waits at most :data:`BLOCK_GRACE_MS` and is then reported as
    :class:`Blocked`; and a closed handle is a closed descriptor, so calls on it
    reach the kernel with fd -1 and fail EBADF.
    """

    def __init__(self) -> None:
        self._socks: dict[int, _LinuxSock] = {}
        self._next = 3
        self._unused: dict[tuple[Kind, Family], int] = {}

    def close_all(self) -> None:
        for entry in self._socks.values():
            entry.sock.close()

    def __enter__(self) -> LinuxHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    # -- helpers --------------------------------------------------------------------------
    def _add(self, entry: _LinuxSock) -> int:
        fd = self._next
        self._next += 1
        self._socks[fd] = entry
        self._apply_timeouts(entry)
        return fd

    def _apply_timeouts(self, e: _LinuxSock) -> None:
        for opt, ms in ((socket.SO_RCVTIMEO, e.rcvtimeo), (socket.SO_SNDTIMEO, e.sndtimeo)):
            e.sock.setsockopt(socket.SOL_SOCKET, opt, _timeval(ms or BLOCK_GRACE_MS))

    def _run(self, fd: int, fn: Callable[[_LinuxSock], Any], waits: str = "",
             sends: bool = False) -> Result:
        entry = self._socks.get(fd)
        if entry is None:
            return Err(errno.EBADF)
        try:
            value = fn(entry)
        except OSError as exc:
            code = exc.errno or 0
            if waits and self._grace_expired(entry, waits, code):
                return Blocked()
            return Err(code)
        finally:
            if sends:
                time.sleep(SETTLE_S)
        return Ok(0 if value is None else value)

    @staticmethod
    def _grace_expired(e: _LinuxSock, waits: str, code: int) -> bool:
        if e.nonblock or e.closed or code not in (errno.EAGAIN, errno.EINPROGRESS,
                                                  errno.EALREADY):
            return False
        return (e.rcvtimeo if waits == "rcv" else e.sndtimeo) == 0

    @staticmethod
    def _addr(raw: Any) -> Addr:
        return Addr(raw[0], raw[1])

    # -- the calls ------------------------------------------------------------------------
    def socket(self, family: Family, kind: Kind, nonblock: bool = False) -> Result:
        flags = socket.SOCK_NONBLOCK if nonblock else 0
        try:
            sock = socket.socket(_AF[family], _TYPE[kind] | flags)
        except OSError as exc:
            return Err(exc.errno or 0)
        return Ok(self._add(_LinuxSock(sock, kind, family, nonblock)))

    def bind(self, fd: int, addr: Addr) -> Result:
        return self._run(fd, lambda e: e.sock.bind((addr.host, addr.port)))

    def listen(self, fd: int, backlog: int) -> Result:
        return self._run(fd, lambda e: e.sock.listen(backlog))

    def connect(self, fd: int, addr: Addr | None) -> Result:
        if addr is None:
            return self._run(fd, self._connect_unspec, sends=True)
        return self._run(fd, lambda e: e.sock.connect((addr.host, addr.port)), "snd", True)

    @staticmethod
    def _connect_unspec(e: _LinuxSock) -> None:
        sockaddr = (ctypes.c_ubyte * 16)()  # sa_family = AF_UNSPEC (0)
        if _libc.connect(e.sock.fileno(), sockaddr, ctypes.sizeof(sockaddr)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def accept(self, fd: int, nonblock: bool = False) -> Result:
        result = self._run(fd, lambda e: e.sock._accept(), "rcv")  # type: ignore[attr-defined]
        if not isinstance(result, Ok):
            return result
        assert isinstance(result.value, tuple)
        newfd, raw = result.value
        parent = self._socks[fd]
        sock = socket.socket(_AF[parent.family], _TYPE[parent.kind], fileno=newfd)
        if nonblock:
            sock.setblocking(False)
        child = _LinuxSock(sock, parent.kind, parent.family, nonblock,
                           parent.rcvtimeo, parent.sndtimeo)
        return Ok((self._add(child), self._addr(raw)))

    def send(self, fd: int, size: int, to: Addr | None = None) -> Result:
        payload = b"\x00" * size
        if to is None:
            return self._run(fd, lambda e: e.sock.send(payload), "snd", True)
        return self._run(fd, lambda e: e.sock.sendto(payload, (to.host, to.port)), "snd", True)

    def recv(self, fd: int, size: int) -> Result:
        return self._run(fd, lambda e: len(e.sock.recv(size)), "rcv")

    def shutdown(self, fd: int, how: int) -> Result:
        return self._run(fd, lambda e: e.sock.shutdown(how), sends=True)

    def close(self, fd: int) -> Result:
        def close(e: _LinuxSock) -> None:
            if e.closed:
                os.close(-1)  # what the kernel answers for a descriptor no longer open
            e.closed = True
            e.sock.close()
        return self._run(fd, close, sends=True)

    def getsockname(self, fd: int) -> Result:
        return self._run(fd, lambda e: self._addr(e.sock.getsockname()))

    def getpeername(self, fd: int) -> Result:
        return self._run(fd, lambda e: self._addr(e.sock.getpeername()))

    def setsockopt(self, fd: int, opt: Opt, value: int) -> Result:
        def setopt(e: _LinuxSock) -> None:
            level, name = socket.SOL_SOCKET, _SO[opt]
            if opt is Opt.SO_LINGER:
                e.sock.setsockopt(level, name, struct.pack("ii", int(value >= 0), max(value, 0)))
            elif opt in (Opt.SO_RCVTIMEO, Opt.SO_SNDTIMEO):
                e.sock.setsockopt(level, name, _timeval(value or BLOCK_GRACE_MS))
                if opt is Opt.SO_RCVTIMEO:
                    e.rcvtimeo = value
                else:
                    e.sndtimeo = value
            else:
                e.sock.setsockopt(level, name, value)
        return self._run(fd, setopt)

    def getsockopt(self, fd: int, opt: Opt) -> Result:
        return self._run(fd, lambda e: e.sock.getsockopt(socket.SOL_SOCKET, _SO[opt]))

    def unused_port(self, kind: Kind, family: Family) -> int:
        """A port bound a moment ago and released: nothing listens there."""
        if (kind, family) not in self._unused:
            with socket.socket(_AF[family], _TYPE[kind]) as probe:
                probe.bind((LOOPBACK[family], 0))
                self._unused[kind, family] = probe.getsockname()[1]
        return self._unused[kind, family]


# -- the script format --------------------------------------------------------------------


class ScriptError(ValueError):
    """A script does not parse; the message names the file and line."""


class ScriptFailure(AssertionError):
    """A replayed line's result differs from the script's expectation."""


ERRNO_NAMES: Final = {name: getattr(errno, name) for name in (
    "EBADF", "EAGAIN", "EINVAL", "EPIPE", "EDESTADDRREQ", "ENOPROTOOPT", "EOPNOTSUPP",
    "EADDRINUSE", "ECONNABORTED", "ECONNRESET", "EISCONN", "ENOTCONN", "ECONNREFUSED",
    "EALREADY", "EINPROGRESS",
)}
CONSTANTS: Final[dict[str, int]] = {
    "SHUT_RD": 0, "SHUT_WR": 1, "SHUT_RDWR": 2, "SOCK_NONBLOCK": 1,
}
FAMILIES: Final = {"AF_INET": Family.INET, "AF_INET6": Family.INET6}
KINDS: Final = {"SOCK_STREAM": Kind.TCP, "SOCK_DGRAM": Kind.UDP}
NAME: Final = re.compile(r"^[a-z_][a-z0-9_]*$")
LINE: Final = re.compile(
    r"^(?:(?P<bind>[A-Za-z_]\w*)\s*=\s*)?(?P<call>[a-z]\w*)\s*\((?P<args>[^()]*)\)"
    r"\s*(?:=\s*(?P<expect>.+?))?\s*$"
)
ADDR: Final = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:]+)\]|(?P<v4>[0-9.]+)):(?P<port>\d+|\*|@\w+)$")
REQ: Final = re.compile(r"^#\s*req:\s*(?P<ids>.+)$")


@dataclasses.dataclass(frozen=True)
class AddrRef:
    """An address operand: literal, ``@name`` (that socket's address), ``HOST:@name``
    (that socket's port), ``UNUSED`` (a port nothing listens on), or ``AF_UNSPEC``."""

    host: str | None = None  # None: take the host from ``ref``
    port: int | None = None  # None: take the port from ``ref``; -1: any (expectations)
    ref: str | None = None
    unused: bool = False
    unspec: bool = False


@dataclasses.dataclass(frozen=True)
class Expect:
    kind: str  # "value", "errno", "blocks", "addr"
    value: int = 0
    addr: AddrRef | None = None

    def __str__(self) -> str:
        if self.kind == "errno":
            return f"-1 {errno.errorcode[self.value]}"
        if self.kind == "blocks":
            return "BLOCKS"
        if self.kind == "addr":
            assert self.addr is not None
            return _addr_text(self.addr)
        return str(self.value)


@dataclasses.dataclass(frozen=True)
class Line:
    lineno: int
    text: str
    call: str
    args: tuple[str | int | AddrRef, ...]
    bind: str | None
    expect: Expect | None


@dataclasses.dataclass(frozen=True)
class Script:
    name: str
    reqs: tuple[str, ...]
    lines: tuple[Line, ...]


# call -> (operand kinds, may bind a name, expectation required)
#   operand kinds: "sock" a bound name, "int", "addr", "how", "opt", "family", "type", "flags"
SIGNATURES: Final[dict[str, tuple[tuple[str, ...], bool, bool]]] = {
    "socket": (("family", "type"), True, False),
    "bind": (("sock", "addr"), False, True),
    "listen": (("sock", "int"), False, True),
    "connect": (("sock", "addr"), False, True),
    "accept": (("sock", "?flags"), True, True),
    "send": (("sock", "int"), False, True),
    "sendto": (("sock", "int", "addr"), False, True),
    "recv": (("sock", "int"), False, True),
    "shutdown": (("sock", "how"), False, True),
    "close": (("sock",), False, True),
    "getsockname": (("sock",), False, True),
    "getpeername": (("sock",), False, True),
    "setsockopt": (("sock", "opt", "int"), False, True),
    "getsockopt": (("sock", "opt"), False, True),
}


def _addr_text(a: AddrRef) -> str:
    if a.unspec:
        return "AF_UNSPEC"
    if a.unused:
        return "UNUSED"
    if a.host is None:
        return f"@{a.ref}"
    host = f"[{a.host}]" if ":" in a.host else a.host
    port = "*" if a.port == -1 else (f"@{a.ref}" if a.port is None else str(a.port))
    return f"{host}:{port}"


def parse_addr(text: str, expectation: bool = False) -> AddrRef:
    """One address operand; raises ValueError with a reason."""
    if text == "AF_UNSPEC" and not expectation:
        return AddrRef(unspec=True)
    if text == "UNUSED" and not expectation:
        return AddrRef(unused=True)
    if text.startswith("@") and NAME.match(text[1:]):
        return AddrRef(ref=text[1:])
    m = ADDR.match(text)
    if not m:
        raise ValueError(f"not an address: {text!r}")
    host = m.group("v6") or m.group("v4")
    try:
        socket.inet_pton(socket.AF_INET6 if m.group("v6") else socket.AF_INET, host)
    except OSError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if host not in (*LOOPBACK.values(), *WILDCARD.values()):
        raise ValueError(f"{host} is neither loopback nor the wildcard address (loopback only)")
    port = m.group("port")
    if port == "*":
        if not expectation:
            raise ValueError("':*' (any port) is only allowed in an expected result")
        return AddrRef(host=host, port=-1)
    if port.startswith("@"):
        return AddrRef(host=host, ref=port[1:])
    if int(port) > 65535:
        raise ValueError(f"port {port} out of range")
    return AddrRef(host=host, port=int(port))


def _parse_expect(text: str) -> Expect:
    if text == "BLOCKS":
        return Expect("blocks")
    m = re.match(r"^-1\s+(E[A-Z]+)$", text)
    if m:
        if m.group(1) not in ERRNO_NAMES:
            raise ValueError(f"unknown errno {m.group(1)}")
        return Expect("errno", ERRNO_NAMES[m.group(1)])
    if re.match(r"^\d+$", text):
        return Expect("value", int(text))
    if text in ERRNO_NAMES:  # getsockopt(SO_ERROR) = ECONNREFUSED: the errno as a value
        return Expect("value", ERRNO_NAMES[text])
    return Expect("addr", addr=parse_addr(text, expectation=True))


def _parse_operand(kind: str, text: str, names: set[str]) -> str | int | AddrRef:
    optional = kind.startswith("?")
    kind = kind.lstrip("?")
    if kind == "sock":
        if text not in names:
            raise ValueError(f"{text!r} names no socket (bind one with 'name = socket(...)')")
        return text
    if kind == "int":
        if not re.match(r"^-?\d+$", text):
            raise ValueError(f"expected an integer, got {text!r}")
        return int(text)
    if kind == "addr":
        return parse_addr(text)
    if kind == "how":
        if text in CONSTANTS and text.startswith("SHUT_"):
            return CONSTANTS[text]
        if re.match(r"^-?\d+$", text):
            return int(text)
        raise ValueError(f"expected SHUT_RD, SHUT_WR, SHUT_RDWR or an integer, got {text!r}")
    if kind == "opt":
        if text not in Opt.__members__:
            raise ValueError(f"unknown option {text!r} (one of {', '.join(Opt.__members__)})")
        return text
    if kind == "family":
        if text not in FAMILIES:
            raise ValueError(f"expected AF_INET or AF_INET6, got {text!r}")
        return text
    if kind == "type":
        parts = [p.strip() for p in text.split("|")]
        if parts[0] not in KINDS or any(p != "SOCK_NONBLOCK" for p in parts[1:]):
            raise ValueError(f"expected SOCK_STREAM or SOCK_DGRAM [| SOCK_NONBLOCK], got {text!r}")
        return text
    if kind == "flags" and (optional and text in ("SOCK_NONBLOCK", "0")):
        return text
    raise ValueError(f"unexpected operand {text!r}")


def parse(text: str, name: str = "<script>") -> Script:
    """Parse a script. Raises :class:`ScriptError` naming ``name:line`` on bad syntax."""
    reqs: list[str] = []
    lines: list[Line] = []
    names: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = REQ.match(stripped)
            if m:
                reqs.extend(r.strip() for r in m.group("ids").split(",") if r.strip())
            continue
        try:
            line = _parse_line(lineno, stripped, names)
        except ValueError as exc:
            raise ScriptError(f"{name}:{lineno}: {exc}\n    {stripped}") from None
        if line.bind:
            names.add(line.bind)
        lines.append(line)
    if not lines:
        raise ScriptError(f"{name}: the script has no calls")
    return Script(name, tuple(reqs), tuple(lines))


def _parse_line(lineno: int, text: str, names: set[str]) -> Line:
    m = LINE.match(text)
    if not m:
        raise ValueError("expected '[name =] call(args) [= result]'")
    call = m.group("call")
    if call not in SIGNATURES:
        raise ValueError(f"unknown call {call!r} (one of {', '.join(SIGNATURES)})")
    kinds, binds, needs_expect = SIGNATURES[call]
    raw_args = [a.strip() for a in m.group("args").split(",")] if m.group("args").strip() else []
    required = [k for k in kinds if not k.startswith("?")]
    if not len(required) <= len(raw_args) <= len(kinds):
        raise ValueError(f"{call}() takes {len(required)} operand(s), got {len(raw_args)}")
    args = tuple(_parse_operand(k, a, names) for k, a in zip(kinds, raw_args, strict=False))
    if m.group("bind") and not binds:
        raise ValueError(f"{call}() returns no socket to name")
    if m.group("bind") and not NAME.match(m.group("bind")):
        raise ValueError(f"socket names are lower-case identifiers, got {m.group('bind')!r}")
    expect = _parse_expect(m.group("expect")) if m.group("expect") else None
    if expect is None and needs_expect:
        raise ValueError(f"{call}() needs an expected result: '= 0', '= -1 EINVAL', ...")
    if call == "socket" and expect is not None and expect.kind != "errno":
        raise ValueError("socket() can only be expected to fail ('= -1 E...')")
    if call == "socket" and not m.group("bind") and (expect is None or expect.kind != "errno"):
        raise ValueError("name the socket: 's = socket(...)'")
    return Line(lineno, text, call, args, m.group("bind"), expect)


def load(path: Path) -> Script:
    return parse(path.read_text(encoding="utf-8"), path.name)


def scripts(directory: Path = SCRIPTS_DIR) -> list[Script]:
    """Every ``*.nkt`` script in ``directory``, sorted by file name."""
    return [load(p) for p in sorted(directory.glob("*.nkt"))]


# -- replay -------------------------------------------------------------------------------


class Replayer:
    """Runs one script's lines on one host, resolving names and address operands."""

    def __init__(self, host: SocketHost, name: str = "<script>") -> None:
        self.host = host
        self.name = name
        self.fds: dict[str, int] = {}
        self.kinds: dict[str, tuple[Kind, Family]] = {}
        self.last_name: dict[str, Addr] = {}

    def address_of(self, ref: str) -> Addr:
        """``@ref``: the socket's local address (its last one once it is closed)."""
        result = self.host.getsockname(self.fds[ref])
        if isinstance(result, Ok) and isinstance(result.value, Addr):
            self.last_name[ref] = result.value
        if ref not in self.last_name:
            raise ScriptFailure(f"@{ref}: the socket has no address")
        return self.last_name[ref]

    def resolve(self, a: AddrRef, family: Family, kind: Kind, reachable: bool) -> Addr | None:
        """An address operand as a concrete address; ``reachable`` maps the wildcard
        host to loopback (a destination, or an expected peer)."""
        if a.unspec:
            return None
        if a.unused:
            return Addr(LOOPBACK[family], self.host.unused_port(kind, family))
        base = self.address_of(a.ref) if a.ref is not None else None
        host = a.host if a.host is not None else (base.host if base else "")
        port = a.port if a.port is not None else (base.port if base else 0)
        if reachable and host == WILDCARD[family_of(host)]:
            host = LOOPBACK[family_of(host)]
        return Addr(host, port)

    def run(self, line: Line) -> Result:
        args = line.args

        def num(i: int) -> int:
            value = args[i]
            assert isinstance(value, int), value
            return value

        if line.call == "socket":
            family, type_ = FAMILIES[str(args[0])], str(args[1])
            kind = KINDS[type_.split("|")[0].strip()]
            result = self.host.socket(family, kind, "SOCK_NONBLOCK" in type_)
            if isinstance(result, Ok) and line.bind:
                assert isinstance(result.value, int)
                self.fds[line.bind] = result.value
                self.kinds[line.bind] = (kind, family)
            return result
        sock = str(args[0])
        fd = self.fds[sock]
        kind, family = self.kinds[sock]

        def addr(i: int, reachable: bool) -> Addr | None:
            op = args[i]
            assert isinstance(op, AddrRef)
            return self.resolve(op, family, kind, reachable)

        match line.call:
            case "bind":
                target = addr(1, reachable=False)
                if target is None:
                    raise ScriptFailure("bind() needs an address, not AF_UNSPEC")
                return self.host.bind(fd, target)
            case "listen":
                return self.host.listen(fd, num(1))
            case "connect":
                return self.host.connect(fd, addr(1, reachable=True))
            case "accept":
                result = self.host.accept(fd, len(args) > 1 and args[1] == "SOCK_NONBLOCK")
                if isinstance(result, Ok) and line.bind:
                    assert isinstance(result.value, tuple)
                    self.fds[line.bind] = result.value[0]
                    self.kinds[line.bind] = (kind, family)
                return result
            case "send":
                return self.host.send(fd, num(1))
            case "sendto":
                return self.host.send(fd, num(1), addr(2, reachable=True))
            case "recv":
                return self.host.recv(fd, num(1))
            case "shutdown":
                return self.host.shutdown(fd, num(1))
            case "close":
                self.address_of(sock)  # remember it: '@name' still works after close
                return self.host.close(fd)
            case "getsockname":
                return self.host.getsockname(fd)
            case "getpeername":
                return self.host.getpeername(fd)
            case "setsockopt":
                return self.host.setsockopt(fd, Opt[str(args[1])], num(2))
            case "getsockopt":
                return self.host.getsockopt(fd, Opt[str(args[1])])
        raise ScriptError(f"{self.name}:{line.lineno}: cannot run {line.call}()")

    def check(self, line: Line, result: Result) -> str | None:
        """None when ``result`` meets the line's expectation, else what went wrong."""
        exp = line.expect
        if exp is None:
            return None if isinstance(result, Ok) else f"expected success, got {show(result)}"
        if exp.kind == "blocks":
            return None if isinstance(result, Blocked) else f"expected BLOCKS, got {show(result)}"
        if exp.kind == "errno":
            ok = isinstance(result, Err) and result.errno == exp.value
            return None if ok else f"expected {exp}, got {show(result)}"
        if not isinstance(result, Ok):
            return f"expected {exp}, got {show(result)}"
        value = result.value
        if isinstance(value, tuple):  # accept: (handle, peer)
            value = value[1]
        if exp.kind == "value":
            return None if value == exp.value else f"expected {exp}, got {show(result)}"
        assert exp.addr is not None
        if not isinstance(value, Addr):
            return f"expected an address {exp}, got {show(result)}"
        sock = str(line.args[0])
        kind, family = self.kinds[sock]
        if exp.addr.port == -1:
            ok = value.host == exp.addr.host and value.port != 0
        else:
            want = self.resolve(exp.addr, family, kind, reachable=exp.addr.host is None)
            ok = value == want
        return None if ok else f"expected {exp}, got {show(result)}"


def show(result: Result) -> str:
    if isinstance(result, Err):
        return f"-1 {errno.errorcode.get(result.errno, result.errno)}"
    if isinstance(result, Blocked):
        return "BLOCKS"
    value = result.value
    if isinstance(value, tuple):
        return f"fd {value[0]}, peer {value[1]}"
    return str(value)


def replay(script: Script, host: SocketHost) -> None:
    """Run every line on ``host``; raise :class:`ScriptFailure` at the first line whose
    result differs from the expectation, naming the script, line and both results."""
    runner = Replayer(host, script.name)
    for line in script.lines:
        result = runner.run(line)
        problem = runner.check(line, result)
        if problem:
            raise ScriptFailure(f"{script.name}:{line.lineno}: {line.text}\n    {problem}")


def replay_linux(script: Script) -> None:
    """Replay on real Linux sockets, closing them afterwards."""
    with LinuxHost() as host:
        replay(script, host)

