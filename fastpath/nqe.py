"""The ``codec`` role in C: NQE v1 and its addresses (spec/nqe.md), a drop-in for the reference.

``from netkernel.fastpath import nqe`` gives the API of ``netkernel.reference.nqe``:
the data model (:class:`NQE`, :class:`Op`, :data:`OPS`, :class:`NQEError`,
:class:`Sockaddr`, the constants and the construct declaration) *is* the
reference's, re-exported, so there is one definition of each and an ``NQE``
from either module is the same class. The codec work is done in C
(csrc/nqe.c): :func:`pack` and :func:`unpack` run the checks of NQE-1..NQE-5,
NQE-10, NQE-11 there, :func:`error_reply` builds the reply of NQE-10..NQE-12
there, and the sockaddr bytes and the address text (NQE-15) are made and read
there. This file only moves values between Python objects and C structs and
turns a C status into the reference's :class:`NQEError` (same field, errno
and message).

Batch helpers for callers that hold many NQEs in one buffer:
:func:`unpack_many` / :func:`pack_many` (one C call each; the same results
and the same first error as the per-NQE functions in a loop).

Arguments of types the C side cannot hold (a non-integer field, a ``host``
that is not a ``str``) get the reference's treatment: a field that is no
``int`` is an :class:`NQEError` naming it, exactly as ``reference.pack``
says; a sockaddr with a non-``int``/``str`` member is handed to the
reference, whose own ``TypeError``/``NQEError`` is then the answer.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any, Final

from netkernel.reference import nqe as _ref
from netkernel.reference.nqe import (
    AF_INET,
    AF_INET6,
    CLOSE_ABORT,
    FIELD_DOC,
    FIELDS,
    NQE,
    NQE_SIZE,
    NQE_STRUCT,
    OP_UNKNOWN_REPLY,
    OPS,
    REPLY_BIT,
    SOCK_NONE,
    SOCKADDR_SIZE,
    U8_MAX,
    U16_MAX,
    U32_MAX,
    U64_MAX,
    WIRE,
    Dir,
    NQEError,
    Op,
    OpInfo,
    Sockaddr,
    encode_result,
    field_layout,
    op_name,
    wire_struct,
)

from ._lib import ffi, lib

__all__ = [
    "AF_INET",
    "AF_INET6",
    "CLOSE_ABORT",
    "FIELDS",
    "FIELD_DOC",
    "NQE",
    "NQE_SIZE",
    "NQE_STRUCT",
    "OPS",
    "OP_UNKNOWN_REPLY",
    "REPLY_BIT",
    "SOCKADDR_SIZE",
    "SOCK_NONE",
    "U8_MAX",
    "U16_MAX",
    "U32_MAX",
    "U64_MAX",
    "WIRE",
    "Dir",
    "NQEError",
    "Op",
    "OpInfo",
    "Sockaddr",
    "encode_result",
    "error_reply",
    "field_layout",
    "is_known_op",
    "op_name",
    "pack",
    "pack_many",
    "pack_sockaddr",
    "unpack",
    "unpack_many",
    "unpack_sockaddr",
    "unpack_unchecked",
    "wire_struct",
]

_ZERO3: Final = b"\x00\x00\x00"
#: stands for "reserved is not three zero bytes" in struct nk_nqe_wide (any value > 0xFFFFFF)
_RESERVED_BAD: Final = 1 << 24
_INT_FIELDS: Final = FIELDS[:-1]  # op .. tag, in the reference's check order
#: C field codes (enum nk_nqe_field, enum nk_nqe_wide_field) -> the reference's field names
_FIELD_NAME: Final = {
    lib.NK_FIELD_LENGTH: "length", lib.NK_FIELD_OP: "op", lib.NK_FIELD_RESERVED: "reserved",
    lib.NK_FIELD_QSET: "qset", lib.NK_FIELD_VM_ID: "vm_id", lib.NK_FIELD_SOCK_ID: "sock_id",
    lib.NK_FIELD_OP_DATA: "op_data", lib.NK_FIELD_DATA_PTR: "data_ptr", lib.NK_FIELD_SIZE: "size",
    lib.NK_FIELD_TAG: "tag",
}
_WIDTH: Final = {"op": U8_MAX, "qset": U8_MAX, "vm_id": U8_MAX, "sock_id": U32_MAX,
                 "op_data": U64_MAX, "data_ptr": U64_MAX, "size": U32_MAX, "tag": U16_MAX}


# -- NQEs ----------------------------------------------------------------------------------------


def _error(field: str, err: int, op: Any, reserved: Any, value: Any = None,
           length: int = 0) -> NQEError:
    """The reference's NQEError for a C rejection: same field, errno and message."""
    if field == "length":
        msg = f"an NQE is {NQE_SIZE} bytes, got {length}"
    elif field == "op" and err == errno.ENOSYS:
        msg = f"unknown op {op:#04x}"
    elif field == "reserved":
        msg = f"reserved bytes 29-31 must be zero, got {reserved.hex()}"
    else:
        msg = f"field {field}={value!r} does not fit in 0..{_WIDTH[field]:#x}"
    return NQEError(msg, field=field, errno=err)


_NEW_NQE: Final = object.__new__
_SET_DICT: Final = object.__setattr__
_U64X8: Final = ffi.typeof("uint64_t[8]")
_RAW32: Final = ffi.typeof("char[32]")
_INTP: Final = ffi.typeof("int *")
_WIDE: Final = ffi.typeof("struct nk_nqe_wide *")


def _make_nqe(values: Sequence[int]) -> NQE:
    """``NQE(*values)`` (reserved zero) without the frozen dataclass's per-field
    ``object.__setattr__``: the same instance dictionary, built in one step.
    tests/test_fastpath_codec.py compares the results with the reference's NQEs."""
    op, qset, vm_id, sock_id, op_data, data_ptr, size, tag = values
    nqe = _NEW_NQE(NQE)
    _SET_DICT(nqe, "__dict__", {"op": op, "qset": qset, "vm_id": vm_id, "sock_id": sock_id,
                                "op_data": op_data, "data_ptr": data_ptr, "size": size,
                                "tag": tag, "reserved": _ZERO3})
    return nqe


def _from_wide(w: Any) -> NQE:
    return _make_nqe((w.op, w.qset, w.vm_id, w.sock_id, w.op_data, w.data_ptr, w.size, w.tag))


def unpack(buf: bytes | bytearray | memoryview) -> NQE:
    """Decode 32 bytes into an :class:`NQE` (NQE-1..NQE-4, NQE-10, NQE-11), in C.

    Raises :class:`NQEError` naming the field: ``length`` (not exactly 32
    bytes, EINVAL), ``op`` (unknown, ENOSYS) or ``reserved`` (non-zero, EINVAL).
    """
    raw = buf if type(buf) is bytes else bytes(buf)
    fields = ffi.new(_U64X8)
    err = lib.nk_nqe_decode_fields(raw, len(raw), fields, ffi.NULL)
    if err:
        # the field follows from the errno once the length is right (include/nk/nqe.h)
        name = "length" if len(raw) != NQE_SIZE else "op" if err == -errno.ENOSYS else "reserved"
        raise _error(name, -err, raw[0] if raw else 0, raw[29:32], length=len(raw))
    return _make_nqe(ffi.unpack(fields, 8))


def unpack_unchecked(buf: bytes | bytearray | memoryview) -> NQE:
    """The fields of 32 bytes as an :class:`NQE`, without the checks (the reference's)."""
    return _ref.unpack_unchecked(buf)


def _wide_values(nqe: NQE) -> list[Any]:
    """``op`` .. ``tag``, ``reserved``, ``overflow`` of a ``struct nk_nqe_wide`` for ``nqe``."""
    vals: list[Any] = [getattr(nqe, name) for name in _INT_FIELDS]
    overflow = 0
    for i, v in enumerate(vals):
        # a non-int (cffi would take a Decimal) or a value beyond 64 bits: C is told
        # it does not fit, and reports it in the reference's order (NQE-5)
        if not isinstance(v, int) or not 0 <= v <= U64_MAX:
            overflow |= 1 << i
            vals[i] = 0
    vals.append(0 if nqe.reserved == _ZERO3 else _RESERVED_BAD)
    vals.append(overflow)
    return vals


def _raise_pack_error(nqe: NQE, err: int, code: int) -> None:
    field = _FIELD_NAME[code]
    raise _error(field, -err, nqe.op, nqe.reserved,
                 value=getattr(nqe, field) if field in _WIDTH else None)


def pack(nqe: NQE) -> bytes:
    """Encode ``nqe`` into its 32 bytes (NQE-1..NQE-5), in C.

    Raises :class:`NQEError` if a field does not fit its width (EINVAL, that
    field), the op is unknown (ENOSYS) or the reserved bytes are not zero
    (EINVAL): a conforming sender never produces such an NQE.
    """
    op, qset, vm_id, sock_id = nqe.op, nqe.qset, nqe.vm_id, nqe.sock_id
    op_data, data_ptr, size, tag = nqe.op_data, nqe.data_ptr, nqe.size, nqe.tag
    out = ffi.new(_RAW32)
    field = ffi.new(_INTP)
    try:
        # exact ints only: cffi would also convert a Decimal, which the reference refuses
        if not (type(op) is type(qset) is type(vm_id) is type(sock_id) is type(op_data)
                is type(data_ptr) is type(size) is type(tag) is int):
            raise OverflowError
        err = lib.nk_nqe_encode_fields(out, field, op, qset, vm_id, sock_id, op_data, data_ptr,
                                       size, tag, 0 if nqe.reserved == _ZERO3 else _RESERVED_BAD,
                                       0)
    except OverflowError:  # a value beyond 64 bits, or not an int: C learns which
        err = lib.nk_nqe_encode_wide(ffi.new(_WIDE, _wide_values(nqe)), out, field)
    if err:
        _raise_pack_error(nqe, err, field[0])
    data: bytes = ffi.unpack(out, NQE_SIZE)
    return data


def error_reply(buf: bytes | bytearray | memoryview) -> NQE | None:
    """What a receiver sends back for bytes :func:`unpack` rejected (NQE-10..NQE-12), in C.

    ``None``: drop without answer (not 32 bytes, a reply, an event). Raises
    ``ValueError`` if ``buf`` is a valid NQE: there is nothing to reject.
    """
    raw = bytes(buf)
    reply = ffi.new("struct nk_nqe *")
    rc = lib.nk_nqe_error_reply(raw, len(raw), reply)
    if rc < 0:
        raise ValueError("error_reply() called on a valid NQE")
    if rc == 0:
        return None
    return _make_nqe((reply.op, reply.qset, reply.vm_id, reply.sock_id, reply.op_data,
                      reply.data_ptr, reply.size, reply.tag))


def is_known_op(op: int) -> bool:
    """True if ``op`` is a defined request, event, control op or reply (NQE-7, NQE-8)."""
    if type(op) is int and 0 <= op <= U8_MAX:
        return bool(lib.nk_op_is_known(op))
    return _ref.is_known_op(op)  # not an op byte: the reference's set membership decides


# -- many NQEs in one buffer ---------------------------------------------------------------------


#: struct nk_nqe_wide is nine 64-bit words (op .. tag, then reserved | overflow << 32 on this
#: little-endian host): the batch helpers read and write arrays of them as flat uint64 lists.
_WIDE_WORDS: Final = 9
if ffi.sizeof("struct nk_nqe_wide") != 8 * _WIDE_WORDS:
    raise ImportError("struct nk_nqe_wide is not nine 64-bit words")


def unpack_many(buf: bytes | bytearray | memoryview) -> list[NQE]:
    """``[unpack(c) for c in 32-byte chunks of buf]`` in one C call (nk_nqe_decode_wide_batch).

    The same list, and the same error (the first chunk's that fails, a short
    last chunk included) as that loop.
    """
    raw = buf if type(buf) is bytes else bytes(buf)
    n, tail = divmod(len(raw), NQE_SIZE)
    words = ffi.new("uint64_t[]", max(n, 1) * _WIDE_WORDS)
    status = ffi.new("int32_t[]", max(n, 1))
    if lib.nk_nqe_decode_wide_batch(raw, n, ffi.cast("struct nk_nqe_wide *", words),
                                    status) != n:
        first = next(i for i in range(n) if status[i])
        unpack(raw[first * NQE_SIZE:(first + 1) * NQE_SIZE])  # raises the chunk's error
    if tail:
        unpack(raw[n * NQE_SIZE:])  # raises: not 32 bytes
    flat = ffi.unpack(words, n * _WIDE_WORDS)
    return [_make_nqe(flat[i:i + 8]) for i in range(0, n * _WIDE_WORDS, _WIDE_WORDS)]


def _words(nqe: NQE) -> list[Any]:
    vals = _wide_values(nqe)
    return [*vals[:8], vals[8] | vals[9] << 32]


def pack_many(nqes: Iterable[NQE]) -> bytes:
    """``b"".join(pack(n) for n in nqes)`` in one C call (nk_nqe_encode_wide_batch).

    The same bytes, and the same error (the first NQE's that fails) as that loop.
    """
    items: Sequence[NQE] = nqes if isinstance(nqes, Sequence) else list(nqes)
    flat: list[Any] = []
    for n in items:
        vals = (n.op, n.qset, n.vm_id, n.sock_id, n.op_data, n.data_ptr, n.size, n.tag)
        if all(type(v) is int for v in vals):
            flat.extend(vals)
            flat.append(0 if n.reserved == _ZERO3 else _RESERVED_BAD)
        else:
            flat.extend(_words(n))
    try:
        words = ffi.new("uint64_t[]", flat or [0])
    except OverflowError:  # some value beyond 64 bits: C is told which, NQE by NQE
        words = ffi.new("uint64_t[]", [w for n in items for w in _words(n)] or [0])
    out = ffi.new("uint8_t[]", max(len(items), 1) * NQE_SIZE)
    status = ffi.new("int32_t[]", max(len(items), 1))
    if lib.nk_nqe_encode_wide_batch(ffi.cast("struct nk_nqe_wide *", words), len(items), out,
                                    status) != len(items):
        first = next(i for i in range(len(items)) if status[i])
        pack(items[first])  # raises that NQE's error
    return bytes(ffi.buffer(out, len(items) * NQE_SIZE))


# -- addresses in data buffers (NQE-15) ----------------------------------------------------------

#: Python >= 3.13 writes IPv4-mapped IPv6 addresses as ``::ffff:1.2.3.4``; the C
#: formatter writes them as earlier Pythons do. Where the two differ, that one
#: class of address is formatted by the running Python, as the reference does.
_MAPPED_DOTTED: Final = str(ipaddress.IPv6Address("::ffff:1.2.3.4")) != "::ffff:102:304"


def _sockaddr_error(err: int, addr: Any) -> NQEError:
    if err == -errno.EAFNOSUPPORT:
        msg = f"address family {addr.family} is not AF_INET or AF_INET6"
    else:
        msg = f"address {addr} is not valid"
    return NQEError(msg, field="sockaddr", errno=-err)


def pack_sockaddr(addr: Sockaddr) -> bytes:
    """The Linux ``sockaddr_in`` (16 B) or ``sockaddr_in6`` (28 B) bytes of ``addr``, in C.

    Raises :class:`NQEError` (field ``sockaddr``): EAFNOSUPPORT for another
    family, EINVAL for a value out of range, a host that is not the family's
    address text, or flow info / scope ID on AF_INET.
    """
    family, host, nums = addr.family, addr.host, (addr.port, addr.flowinfo, addr.scope_id)
    if type(host) is not str or not all(isinstance(v, int) for v in (family, *nums)):
        return _ref.pack_sockaddr(addr)
    # a value that does not fit 64 bits cannot fit its field either: C sees U64_MAX
    f, port, flow, scope = (v if 0 <= v <= U64_MAX else U64_MAX for v in (family, *nums))
    text = host.encode("utf-8", "surrogatepass")  # non-ASCII is never an address
    out = ffi.new("uint8_t[28]")
    n = lib.nk_sockaddr_pack_text(f, text, len(text), port, flow, scope, out, 28)
    if n < 0:
        raise _sockaddr_error(n, addr)
    return bytes(ffi.buffer(out, n))


def unpack_sockaddr(buf: bytes | bytearray | memoryview) -> Sockaddr:
    """Decode a data buffer's address (NQE-15) in C; ``sin_zero`` is ignored, as Linux does.

    Raises :class:`NQEError`: EINVAL for fewer than 2 bytes or a length that
    is not the family's size, EAFNOSUPPORT for another family.
    """
    raw = bytes(buf)
    sa = ffi.new("struct nk_sockaddr *")
    err = lib.nk_sockaddr_unpack(raw, len(raw), sa)
    if err:
        family = int.from_bytes(raw[:2], "little")
        if len(raw) < 2:
            msg = f"an address needs at least 2 bytes, got {len(raw)}"
        elif err == -errno.EAFNOSUPPORT:
            msg = f"address family {family} is not AF_INET or AF_INET6"
        else:
            msg = (f"address of family {family} is {SOCKADDR_SIZE[family]} bytes,"
                   f" got {len(raw)}")
        raise NQEError(msg, field="sockaddr", errno=-err)
    text = ffi.new("char[]", lib.NK_HOST_MAX)
    lib.nk_inet_format(sa.family, sa.addr, text, lib.NK_HOST_MAX)
    host = ffi.string(text).decode("ascii")
    if sa.family == AF_INET:
        return Sockaddr(AF_INET, host, sa.port)
    if _MAPPED_DOTTED and host.startswith("::ffff:") and "." not in host:
        host = str(ipaddress.IPv6Address(bytes(sa.addr)))
    return Sockaddr(AF_INET6, host, sa.port, sa.flowinfo, sa.scope_id)
