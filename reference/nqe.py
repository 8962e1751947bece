"""NQE v1: the 32-byte NetKernel Queue Element (spec/nqe.md).

Everything about the bytes of an NQE lives in this file: the construct
``Struct`` below is the one source of truth for the layout (the docs' wire
format table and the C fast path's ``offsetof`` checks are generated from or
tested against it), ``Op`` is the op-code table, and :func:`pack` /
:func:`unpack` are the public codec that later roles and outside checks call.

This file knows nothing about rings, devices or socket semantics; the one
piece of socket knowledge here is the byte encoding of the addresses that
data buffers carry (:func:`pack_sockaddr`, NQE-15).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import struct
from typing import Final, NamedTuple

import construct as cs

NQE_SIZE: Final = 32  # NQE-1
REPLY_BIT: Final = 0x80  # NQE-8: a reply's op is its request's op with bit 7 set
CLOSE_ABORT: Final = 1  # CLOSE op_data bit 0: closed with received data unread (NSM-8)
SOCK_NONE: Final = 0  # NQE-7: socket ID 0 names no socket (control ops)
U8_MAX: Final = 0xFF
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

#: The NQE v1 layout (NQE-1, NQE-2). Field names, offsets and sizes are the
#: slides' ones; bytes 27-28 of the slides' reserved field carry the request
#: tag (NQE-9), bytes 29-31 stay reserved and zero (NQE-4).
NQE_STRUCT: Final = cs.Struct(
    "op" / cs.Int8ul,
    "qset" / cs.Int8ul,
    "vm_id" / cs.Int8ul,
    "sock_id" / cs.Int32ul,
    "op_data" / cs.Int64ul,
    "data_ptr" / cs.Int64ul,
    "size" / cs.Int32ul,
    "tag" / cs.Int16ul,
    "reserved" / cs.Bytes(3),
)

#: Human descriptions of each field, used by the CLI and the docs.
FIELD_DOC: Final[dict[str, str]] = {
    "op": "op type: which call, event or control message (see the op table)",
    "qset": "queue set ID: the queue set (vCPU / thread group) the NQE belongs to",
    "vm_id": "VM ID: the tenant; stamped by the CoreEngine from the device it read (never trusted)",
    "sock_id": "socket ID: the socket on the sender's side of the connection table (0 = none)",
    "op_data": "op_data: per-op argument in a request; signed result (>= 0) or -errno in a reply",
    "data_ptr": "data pointer: offset into the tenant device's data area (never a pointer)",
    "size": "size: length in bytes of the buffer at data_ptr (0 = no buffer)",
    "tag": "tag: chosen by the requester, echoed in the reply to match it (reserved bytes 27-28)",
    "reserved": "reserved: bytes 29-31, MUST be zero in NQE v1",
}


class Dir(enum.Enum):
    """Who sends an op (NQE-7)."""

    REQUEST = "request"  # device side -> CoreEngine (-> NSM)
    EVENT = "event"  # NSM -> CoreEngine -> tenant, unsolicited
    CONTROL = "control"  # device <-> CoreEngine, never reaches an NSM from a tenant


class Op(enum.IntEnum):
    """NQE v1 op codes (NQE-7). Replies are ``op | REPLY_BIT`` (NQE-8)."""

    # socket calls: tenant job ring (control calls) or send ring (data calls)
    SOCKET = 0x01
    BIND = 0x02
    LISTEN = 0x03
    CONNECT = 0x04
    ACCEPT = 0x05
    SEND = 0x06
    SHUTDOWN = 0x07
    CLOSE = 0x08
    SETSOCKOPT = 0x09
    GETSOCKOPT = 0x0A
    GETSOCKNAME = 0x0B
    GETPEERNAME = 0x0C
    # events: NSM -> tenant receive ring
    EV_DATA = 0x40
    EV_FIN = 0x41
    EV_ERROR = 0x42
    EV_ACCEPTABLE = 0x43
    # control: device <-> CoreEngine
    ATTACH = 0x60
    DETACH = 0x61
    BUF_RETURN = 0x62
    TENANT_MAP = 0x63
    TENANT_UNMAP = 0x64


#: The reply op used when the request's op is not known (NQE-11).
OP_UNKNOWN_REPLY: Final = 0xFF


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """What one op means, field by field (NQE-7). Rendered into spec tables and docs."""

    direction: Dir
    ring: str
    replied: bool
    op_data: str
    data: str
    reply: str


OPS: Final[dict[Op, OpInfo]] = {
    Op.SOCKET: OpInfo(
        Dir.REQUEST, "job", True,
        "domain (bits 0-15) | type (bits 16-31: SOCK_STREAM/SOCK_DGRAM, optionally | SOCK_NONBLOCK;"
        " SOCK_CLOEXEC stays with the tenant, errata E-1)"
        " | protocol (bits 32-47); Linux numbering",
        "none (size 0)",
        "0, or -errno (EAFNOSUPPORT, EPROTONOSUPPORT, EINVAL, EMFILE, EEXIST)",
    ),
    Op.BIND: OpInfo(
        Dir.REQUEST, "job", True,
        "0",
        "the address: a Linux sockaddr_in (16 B) or sockaddr_in6 (28 B)",
        "0, or -errno (EINVAL, EADDRINUSE, EADDRNOTAVAIL, EAFNOSUPPORT, EACCES)",
    ),
    Op.LISTEN: OpInfo(
        Dir.REQUEST, "job", True,
        "backlog, as a signed 32-bit integer in bits 0-31",
        "none",
        "0, or -errno (EOPNOTSUPP on UDP, EINVAL, EADDRINUSE)",
    ),
    Op.CONNECT: OpInfo(
        Dir.REQUEST, "job", True,
        "0",
        "the peer address: sockaddr_in or sockaddr_in6",
        "sent once the connection is established or has failed: 0, or -errno"
        " (ECONNREFUSED, ETIMEDOUT, ENETUNREACH, EISCONN, EALREADY, EINVAL)",
    ),
    Op.ACCEPT: OpInfo(
        Dir.REQUEST, "job", True,
        "bits 0-31: the socket ID the requester gives the new connection;"
        " bit 32: do not wait (O_NONBLOCK)",
        "a buffer for the peer's address (size 0: not wanted)",
        "sent once a connection is taken: the peer address length written (>= 0),"
        " or -errno (EAGAIN when bit 32 is set and none is pending, EINVAL if not listening)",
    ),
    Op.SEND: OpInfo(
        Dir.REQUEST, "send", True,
        "bits 0-31: MSG_* flags; bits 32-47: length of a destination sockaddr that"
        " prefixes the payload (sendto), 0 for none",
        "the payload (after the address prefix, if any), in the tenant's send half",
        "bytes accepted by the stack (>= 0) or -errno (EPIPE, ECONNRESET, EDESTADDRREQ,"
        " EMSGSIZE); the buffer is back in the tenant's hands once the reply is read",
    ),
    Op.SHUTDOWN: OpInfo(
        Dir.REQUEST, "job", True,
        "how: 0 SHUT_RD, 1 SHUT_WR, 2 SHUT_RDWR",
        "none",
        "0, or -errno (ENOTCONN, EINVAL)",
    ),
    Op.CLOSE: OpInfo(
        Dir.REQUEST, "job", True,
        "bit 0: ABORT, the application closed with received data unread (a stream"
        " is reset, as Linux does); bits 1-63: 0",
        "none",
        "0; the socket ID is free for reuse once the reply is read",
    ),
    Op.SETSOCKOPT: OpInfo(
        Dir.REQUEST, "job", True,
        "level (bits 0-31) | optname (bits 32-63)",
        "the option value as Linux takes it (e.g. a 4-byte int)",
        "0, or -errno (ENOPROTOOPT, EINVAL)",
    ),
    Op.GETSOCKOPT: OpInfo(
        Dir.REQUEST, "job", True,
        "level (bits 0-31) | optname (bits 32-63)",
        "a buffer for the value; size = the caller's optlen",
        "the value length written (>= 0), or -errno (ENOPROTOOPT, EINVAL)",
    ),
    Op.GETSOCKNAME: OpInfo(
        Dir.REQUEST, "job", True,
        "0",
        "a buffer for the address (28 bytes hold either family)",
        "the address length written (>= 0), or -errno",
    ),
    Op.GETPEERNAME: OpInfo(
        Dir.REQUEST, "job", True,
        "0",
        "a buffer for the address",
        "the address length written (>= 0), or -errno (ENOTCONN)",
    ),
    Op.EV_DATA: OpInfo(
        Dir.EVENT, "receive", False,
        "length of a source sockaddr that prefixes the payload (UDP), else 0",
        "data that arrived, in the tenant's receive half; the tenant owns the buffer"
        " until it sends BUF_RETURN",
        "none (events are not replied to)",
    ),
    Op.EV_FIN: OpInfo(
        Dir.EVENT, "receive", False,
        "0",
        "none",
        "none: the peer shut its sending side; recv returns 0 once buffered data is read",
    ),
    Op.EV_ERROR: OpInfo(
        Dir.EVENT, "receive", False,
        "-errno of an error that arrived asynchronously (ECONNRESET, ECONNREFUSED,"
        " ETIMEDOUT, EHOSTUNREACH, EPIPE)",
        "none",
        "none: the error becomes SO_ERROR and the result of the next call",
    ),
    Op.EV_ACCEPTABLE: OpInfo(
        Dir.EVENT, "receive", False,
        "number of connections pending on the listening socket (>= 1)",
        "none",
        "none: the listening socket is readable",
    ),
    Op.ATTACH: OpInfo(
        Dir.CONTROL, "job", True,
        "the NQE version the device speaks (1) in bits 0-15",
        "none",
        "the VM ID or NSM ID the CoreEngine assigned (>= 0), or -errno (EPROTO: version)",
    ),
    Op.DETACH: OpInfo(
        Dir.CONTROL, "job", True,
        "0",
        "none",
        "0 once every socket of the device is closed and its buffers reclaimed",
    ),
    Op.BUF_RETURN: OpInfo(
        Dir.CONTROL, "send", False,
        "0",
        "a receive buffer the tenant got in EV_DATA and no longer needs",
        "none on success; a rejected return is answered with BUF_RETURN|0x80 and -errno",
    ),
    Op.TENANT_MAP: OpInfo(
        Dir.CONTROL, "receive", True,
        "the VM ID of the tenant the NSM will serve",
        "the slice of that tenant's receive half granted to this NSM (offset, size)",
        "0 once the NSM has mapped the tenant's data area, or -errno",
    ),
    Op.TENANT_UNMAP: OpInfo(
        Dir.CONTROL, "receive", True,
        "the VM ID of a tenant that detached",
        "none",
        "0 once the NSM has closed every socket of that tenant and unmapped its area",
    ),
}


class NQEError(ValueError):
    """Raised by :func:`unpack` (and :func:`pack`) for a malformed NQE.

    ``errno`` is the error a receiver reports for it (spec/nqe.md, NQE-10..NQE-12),
    ``field`` names the offending field.
    """

    def __init__(self, message: str, *, field: str, errno: int) -> None:
        super().__init__(message)
        self.field = field
        self.errno = errno


@dataclasses.dataclass(frozen=True)
class NQE:
    """One NQE, decoded. Integer fields are unsigned as on the wire."""

    op: int
    qset: int = 0
    vm_id: int = 0
    sock_id: int = 0
    op_data: int = 0
    data_ptr: int = 0
    size: int = 0
    tag: int = 0
    reserved: bytes = b"\x00\x00\x00"

    @property
    def is_reply(self) -> bool:
        """True for a reply (NQE-8)."""
        return bool(self.op & REPLY_BIT)

    @property
    def request_op(self) -> int:
        """The op this NQE is about: the op itself, or the request a reply answers."""
        return self.op & ~REPLY_BIT & U8_MAX

    @property
    def result(self) -> int:
        """op_data read as a signed 64-bit result (NQE-13): >= 0 success, < 0 is -errno."""
        return self.op_data - (1 << 64) if self.op_data >> 63 else self.op_data

    def reply(self, result: int, *, size: int | None = None) -> NQE:
        """The reply to this request carrying ``result`` (NQE-8, NQE-9, NQE-13)."""
        return dataclasses.replace(
            self,
            op=(self.op | REPLY_BIT) if (self.op | REPLY_BIT) in _REPLY_OPS else OP_UNKNOWN_REPLY,
            op_data=encode_result(result),
            size=self.size if size is None else size,
            reserved=b"\x00\x00\x00",  # NQE-4: a reply is sent with zero reserved bytes
        )


_KNOWN_OPS: Final = frozenset(int(op) for op in Op)
#: Ops that can be answered: every replied op, and BUF_RETURN (rejections only).
_REPLY_OPS: Final = frozenset(
    int(op) | REPLY_BIT for op, info in OPS.items() if info.replied or op is Op.BUF_RETURN
)


def encode_result(result: int) -> int:
    """A signed result as the unsigned op_data that carries it (NQE-13)."""
    if not -(1 << 63) <= result < (1 << 63):
        raise ValueError(f"result {result} does not fit in a signed 64-bit op_data")
    return result & U64_MAX


def is_known_op(op: int) -> bool:
    """True if ``op`` is a defined request, event, control op or reply (NQE-7, NQE-8)."""
    return op in _KNOWN_OPS or op in _REPLY_OPS or op == OP_UNKNOWN_REPLY


def wire_struct(declared: cs.Struct) -> struct.Struct:
    """The :class:`struct.Struct` that reads and writes the same bytes as ``declared``.

    Derived field by field from the construct declaration (a ``FormatField``
    gives its format character, a fixed-length ``Bytes`` a ``Ns`` field), so
    the layout is still typed once; raises ``TypeError`` for a field it
    cannot translate or a mix of byte orders. tests/test_nqe_wire.py checks
    the twin against the declaration on random inputs.
    """
    order = ""
    codes: list[str] = []
    for sub in declared.subcons:
        field = sub.subcon if isinstance(sub, cs.Renamed) else sub
        if isinstance(field, cs.FormatField):
            byte_order, code = field.fmtstr[0], field.fmtstr[1:]
            if order and byte_order != order:
                raise TypeError(f"field {sub.name}: byte order {byte_order!r} after {order!r}")
            order = byte_order
        elif isinstance(field, cs.Bytes) and isinstance(field.length, int):
            code = f"{field.length}s"
        else:
            raise TypeError(f"field {sub.name}: {type(field).__name__} has no struct twin")
        codes.append(code)
    twin = struct.Struct((order or "<") + "".join(codes))
    if twin.size != declared.sizeof():
        raise TypeError(f"struct twin is {twin.size} bytes, the declaration {declared.sizeof()}")
    return twin


#: :data:`NQE_STRUCT` as a :class:`struct.Struct` (NQE-1, NQE-2), derived from it: the one
#: packer of the reference. ``WIRE.unpack(raw)`` is the field tuple in declaration order,
#: unchecked; :func:`pack` and :func:`unpack` add the checks.
WIRE: Final = wire_struct(NQE_STRUCT)
FIELDS: Final = tuple(sub.name for sub in NQE_STRUCT.subcons)
# NQE(*WIRE.unpack(raw)) relies on the dataclass listing the fields in the declaration's order
if tuple(f.name for f in dataclasses.fields(NQE)) != FIELDS:
    raise TypeError(f"NQE fields {FIELDS} are not in the declaration's order")


def pack(nqe: NQE) -> bytes:
    """Encode ``nqe`` into its 32 bytes (NQE-1..NQE-4).

    Raises :class:`NQEError` if a field does not fit its width, the op is
    unknown, or the reserved bytes are not zero: a conforming sender never
    produces such an NQE.
    """
    _check(nqe)
    return WIRE.pack(nqe.op, nqe.qset, nqe.vm_id, nqe.sock_id, nqe.op_data, nqe.data_ptr,
                     nqe.size, nqe.tag, nqe.reserved)


def unpack(buf: bytes | bytearray | memoryview) -> NQE:
    """Decode 32 bytes into an :class:`NQE` (NQE-1..NQE-4, NQE-10, NQE-11).

    Raises :class:`NQEError` (a ``ValueError``) with a message naming the field
    for: a buffer that is not exactly 32 bytes, an unknown op, or non-zero
    reserved bytes.
    """
    raw = buf if type(buf) is bytes else bytes(buf)
    if len(raw) != NQE_SIZE:
        raise NQEError(
            f"an NQE is {NQE_SIZE} bytes, got {len(raw)}", field="length", errno=_EINVAL
        )
    fields = WIRE.unpack(raw)  # every integer fits its width by construction
    _check_op_reserved(fields[0], fields[-1])
    return NQE(*fields)


def unpack_unchecked(buf: bytes | bytearray | memoryview) -> NQE:
    """The fields of 32 bytes as an :class:`NQE`, without the checks of :func:`unpack`.

    For a receiver that must answer an NQE :func:`unpack` rejected (NQE-10..NQE-12).
    Raises ``struct.error`` if ``buf`` is not 32 bytes.
    """
    return NQE(*WIRE.unpack(buf))


_EINVAL: Final = 22
_ENOSYS: Final = 38
_EAFNOSUPPORT: Final = 97

_WIDTH: Final[dict[str, int]] = {
    "op": U8_MAX, "qset": U8_MAX, "vm_id": U8_MAX, "sock_id": U32_MAX,
    "op_data": U64_MAX, "data_ptr": U64_MAX, "size": U32_MAX, "tag": U16_MAX,
}


def _check(nqe: NQE) -> None:
    for name, top in _WIDTH.items():
        value = getattr(nqe, name)
        if not isinstance(value, int) or not 0 <= value <= top:
            raise NQEError(
                f"field {name}={value!r} does not fit in 0..{top:#x}", field=name, errno=_EINVAL
            )
    _check_op_reserved(nqe.op, nqe.reserved)


def _check_op_reserved(op: int, reserved: bytes) -> None:
    """The checks left once every field fits its width, as it does after ``WIRE.unpack``."""
    if not is_known_op(op):
        raise NQEError(f"unknown op {op:#04x}", field="op", errno=_ENOSYS)  # NQE-11
    if reserved != b"\x00\x00\x00":  # NQE-4, NQE-10
        raise NQEError(
            f"reserved bytes 29-31 must be zero, got {reserved.hex()}",
            field="reserved", errno=_EINVAL,
        )


def op_name(op: int) -> str:
    """A readable name for any op byte: ``SEND``, ``SEND|REPLY``, ``UNKNOWN_REPLY`` or hex."""
    if op == OP_UNKNOWN_REPLY:
        return "UNKNOWN_REPLY"
    base = op & ~REPLY_BIT
    if base in _KNOWN_OPS:
        return Op(base).name + ("|REPLY" if op & REPLY_BIT else "")
    return f"{op:#04x}"


def field_layout() -> list[tuple[str, int, int]]:
    """``(name, offset, size)`` of every field, read off :data:`NQE_STRUCT` (NQE-2)."""
    out: list[tuple[str, int, int]] = []
    offset = 0
    for sub in NQE_STRUCT.subcons:
        size = sub.sizeof()
        out.append((sub.name, offset, size))
        offset += size
    return out


def error_reply(buf: bytes | bytearray | memoryview) -> NQE | None:
    """What a receiver sends back for 32 bytes :func:`unpack` rejected (NQE-10..NQE-12).

    Returns the reply to send, or ``None`` when the NQE must be dropped
    without an answer: a buffer that is not 32 bytes (no field can be
    trusted), a reply (op bit 7 set: answering it could loop), or an event
    (events are never answered). An unknown op is answered with
    ``OP_UNKNOWN_REPLY`` and -ENOSYS; a known op with non-zero reserved
    bytes with its own reply op and -EINVAL. The reply echoes qset, vm_id,
    sock_id, tag, data_ptr and size, so the requester can match it (NQE-9).
    Raises ``ValueError`` if ``buf`` is a valid NQE: there is nothing to reject.
    """
    raw = bytes(buf)
    if len(raw) != NQE_SIZE:
        return None
    try:
        unpack(raw)
    except NQEError as exc:
        err = exc
    else:
        raise ValueError("error_reply() called on a valid NQE")
    c = unpack_unchecked(raw)
    if c.op & REPLY_BIT or (c.op in _KNOWN_OPS and (c.op | REPLY_BIT) not in _REPLY_OPS):
        return None
    request = NQE(op=c.op, qset=c.qset, vm_id=c.vm_id, sock_id=c.sock_id, op_data=0,
                  data_ptr=c.data_ptr, size=c.size, tag=c.tag)
    return request.reply(-err.errno)


# -- addresses in data buffers (NQE-15) ------------------------------------------------

AF_INET: Final = 2  # Linux numbering
AF_INET6: Final = 10
#: Bytes of the Linux ``struct sockaddr_in`` / ``struct sockaddr_in6`` (NQE-15).
SOCKADDR_SIZE: Final[dict[int, int]] = {AF_INET: 16, AF_INET6: 28}


class Sockaddr(NamedTuple):
    """An INET address as a data buffer carries it (NQE-15)."""

    family: int
    host: str
    port: int
    flowinfo: int = 0
    scope_id: int = 0


def pack_sockaddr(addr: Sockaddr) -> bytes:
    """The Linux ``sockaddr_in`` (16 B) or ``sockaddr_in6`` (28 B) bytes of ``addr`` (NQE-15).

    Family and scope ID in host order (little-endian), port, address and
    flow info in network order, ``sin_zero`` zero. Raises :class:`NQEError`
    (EAFNOSUPPORT for another family, EINVAL for a value out of range).
    """
    if addr.family not in SOCKADDR_SIZE:
        raise NQEError(f"address family {addr.family} is not AF_INET or AF_INET6",
                       field="sockaddr", errno=_EAFNOSUPPORT)
    if not 0 <= addr.port <= U16_MAX or not 0 <= addr.flowinfo <= U32_MAX \
            or not 0 <= addr.scope_id <= U32_MAX or "%" in addr.host:
        raise NQEError(f"address {addr} has a field out of range", field="sockaddr",
                       errno=_EINVAL)
    try:
        ip = (ipaddress.IPv4Address if addr.family == AF_INET else ipaddress.IPv6Address)(
            addr.host)
    except ValueError as exc:
        raise NQEError(f"bad host {addr.host!r}: {exc}", field="sockaddr", errno=_EINVAL) from None
    head = addr.family.to_bytes(2, "little") + addr.port.to_bytes(2, "big")
    if addr.family == AF_INET:
        if addr.flowinfo or addr.scope_id:
            raise NQEError("AF_INET has no flow info or scope ID", field="sockaddr",
                           errno=_EINVAL)
        return head + ip.packed + bytes(8)
    return (head + addr.flowinfo.to_bytes(4, "big") + ip.packed
            + addr.scope_id.to_bytes(4, "little"))


def unpack_sockaddr(buf: bytes | bytearray | memoryview) -> Sockaddr:
    """Decode a data buffer's address (NQE-15); ``sin_zero`` is ignored, as Linux does.

    Raises :class:`NQEError`: EINVAL for fewer than 2 bytes or a length that
    is not exactly the family's size, EAFNOSUPPORT for another family.
    """
    raw = bytes(buf)
    if len(raw) < 2:
        raise NQEError(f"an address needs at least 2 bytes, got {len(raw)}", field="sockaddr",
                       errno=_EINVAL)
    family = int.from_bytes(raw[0:2], "little")
    if family not in SOCKADDR_SIZE:
        raise NQEError(f"address family {family} is not AF_INET or AF_INET6",
                       field="sockaddr", errno=_EAFNOSUPPORT)
    if len(raw) != SOCKADDR_SIZE[family]:
        raise NQEError(f"address of family {family} is {SOCKADDR_SIZE[family]} bytes,"
                       f" got {len(raw)}", field="sockaddr", errno=_EINVAL)
    port = int.from_bytes(raw[2:4], "big")
    if family == AF_INET:
        return Sockaddr(family, str(ipaddress.IPv4Address(raw[4:8])), port)
    return Sockaddr(family, str(ipaddress.IPv6Address(raw[8:24])), port,
                    int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[24:28], "little"))
