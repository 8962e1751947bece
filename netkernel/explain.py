"""What an NQE says, field by field.

The one explanation behind ``netkernel nqe decode`` and the worked examples of
the documentation site: both render the rows :func:`explain` returns, so the
tool and the docs cannot drift apart. Every fact comes from the reference
codec (:mod:`netkernel.reference.nqe`): the layout from ``field_layout()``,
the field meanings from ``FIELD_DOC``, the per-op meanings from ``OPS``.

Sans-IO: no printing here, only data.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import Final

from netkernel.reference import nqe as ref

#: Where Linux has two names for one errno, the one the spec and the socket API use.
_PREFERRED_ERRNO_NAME: Final[dict[int, str]] = {
    errno.EAGAIN: "EAGAIN",
    errno.EOPNOTSUPP: "EOPNOTSUPP",
    errno.EDEADLK: "EDEADLK",
}

#: Fields a reply copies from its request (NQE-8, NQE-9).
_ECHOED: Final = frozenset({"qset", "sock_id", "tag"})

_KNOWN_OPS: Final = frozenset(int(op) for op in ref.Op)

#: Ops whose op_data carries a signed result or -errno even though they are not replies.
_SIGNED_OP_DATA: Final = frozenset({int(ref.Op.EV_ERROR)})


@dataclasses.dataclass(frozen=True)
class FieldView:
    """One field of one NQE, explained."""

    name: str
    offset: int
    size: int
    value: int | bytes  #: as on the wire (unsigned integer, or raw bytes)
    hex: str  #: the value in hex, zero-padded to the field's width
    reads_as: str  #: what the value means here ("SEND", "-111 (ECONNREFUSED)"), or ""
    meaning: str  #: what the field is (FIELD_DOC)
    op_says: str  #: what this op puts in the field (OPS), or ""


def errno_name(number: int) -> str:
    """The symbolic name of a positive errno number, e.g. ``ECONNREFUSED``; ``E?`` if unknown."""
    return _PREFERRED_ERRNO_NAME.get(number) or errno.errorcode.get(number, "E?")


def errno_number(name: str) -> int:
    """The number of an errno given by name (``ECONNREFUSED``) or digits (``111``)."""
    if name.isdigit():
        return int(name)
    value = getattr(errno, name.upper(), None)
    if not isinstance(value, int) or not name.upper().startswith("E"):
        raise ValueError(f"unknown errno {name!r}")
    return value


def result_text(result: int) -> str:
    """A signed result as text: ``100``, or ``-111 (ECONNREFUSED)`` for -errno (NQE-13)."""
    return f"{result} ({errno_name(-result)})" if result < 0 else str(result)


def op_info(op: int) -> ref.OpInfo | None:
    """The op table's entry for an op byte or for the request a reply answers."""
    base = op & ~ref.REPLY_BIT & ref.U8_MAX
    if op == ref.OP_UNKNOWN_REPLY or base not in _KNOWN_OPS:
        return None
    return ref.OPS[ref.Op(base)]


def op_summary(op: int) -> str:
    """One line saying what kind of NQE an op byte makes."""
    if op == ref.OP_UNKNOWN_REPLY:
        return "UNKNOWN_REPLY: reply to a request whose op the receiver does not know (-ENOSYS)"
    info = op_info(op)
    if info is None:
        return f"{op:#04x}: not an NQE v1 op"
    name = ref.op_name(op)
    if op & ref.REPLY_BIT:
        return f"{name}: reply to {ref.Op(op & ~ref.REPLY_BIT).name}"
    answered = "answered by a reply" if info.replied else "not replied to"
    return f"{name}: {info.direction.value} on the {info.ring} ring, {answered}"


def _op_says(n: ref.NQE, name: str) -> str:
    """What ``n``'s op puts in field ``name`` (the op table, read per field)."""
    if n.op == ref.OP_UNKNOWN_REPLY:
        return {
            "op_data": "-ENOSYS: the request's op is not known",
            **{f: "echoed from the request" for f in _ECHOED},
        }.get(name, "")
    info = op_info(n.op)
    if info is None:
        return ""
    if n.is_reply:
        per_field = {
            "op_data": info.reply,
            "data_ptr": f"the request's buffer: {info.data}",
            "size": f"the request's buffer: {info.data}",
            **{f: "echoed from the request" for f in _ECHOED},
        }
    else:
        per_field = {"op_data": info.op_data, "data_ptr": info.data, "size": info.data}
    return per_field.get(name, "")


def _reads_as(n: ref.NQE, name: str) -> str:
    if name == "op":
        return ref.op_name(n.op)
    if name == "op_data" and (n.is_reply or n.op in _SIGNED_OP_DATA):
        return result_text(n.result)
    return ""


def explain(n: ref.NQE) -> list[FieldView]:
    """Every field of ``n`` in wire order, with its offset, size, value and meaning."""
    rows: list[FieldView] = []
    for name, offset, size in ref.field_layout():
        value: int | bytes = getattr(n, name)
        text = value.hex() if isinstance(value, bytes) else f"{value:0{2 * size}x}"
        rows.append(FieldView(
            name=name, offset=offset, size=size, value=value, hex="0x" + text,
            reads_as=_reads_as(n, name), meaning=ref.FIELD_DOC[name], op_says=_op_says(n, name),
        ))
    return rows
