"""The CoreEngine's buffer ledger over C (fastpath/csrc/engine.c, ``nk_ledger_*``).

The API of :class:`netkernel.reference.bufpool.Ledger` (BUF-3..BUF-5, BUF-8):
``grant``, ``lend_send``, ``settle_send``, ``lend_receive``, ``return_receive``
and the queries ``slices``, ``lent_send``, ``held_by_tenant``. A rejected call
raises :class:`~netkernel.reference.bufpool.BufError` with the reference's
errno and changes nothing. The C engine keeps one of these per tenant.

NSM IDs are one byte here (0..255), as on the wire; offsets and sizes that no
data area can hold (negative, or beyond 64 bits) are rejected as the
reference rejects them.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

from netkernel.reference.bufpool import BufError, Span

from ._lib import ffi, lib

__all__ = ["BufError", "Ledger", "Span"]

_U64 = (1 << 64) - 1
_NOWHERE = _U64  # an offset outside every half of every data area


def _u64(value: int) -> int:
    return value if 0 <= value <= _U64 else _NOWHERE


def _raise(code: int, what: str) -> None:
    if code < 0:
        raise BufError(f"{what}: {_errno.errorcode.get(-code, -code)}", errno=-code)


def _nsm(nsm: int) -> int:
    if not 0 <= nsm <= 0xFF:
        raise ValueError(f"NSM ID {nsm} does not fit in one byte")
    return nsm


class Ledger:
    """The record of buffers lent across one tenant device (BUF-3..BUF-5, BUF-8)."""

    def __init__(self, geo: Any) -> None:
        self.geo = geo
        g = ffi.new("struct nk_geometry *", {
            "n_qsets": geo.n_qsets, "ring_entries": geo.ring_entries,
            "data_size": geo.data_size, "send_size": geo.send_size,
            "buf_size": geo.buf_size, "kind": int(getattr(geo, "kind", 1))})
        h = lib.nk_ledger_new(g)
        if h == ffi.NULL:
            raise ValueError(f"the C ledger cannot hold geometry {geo}")
        self._h = ffi.gc(h, lib.nk_ledger_free)

    def _list(self, part: int) -> list[Any]:
        n = lib.nk_ledger_list(self._h, part, ffi.NULL, 0)
        buf = ffi.new("struct nk_span_info[]", max(n, 1))
        lib.nk_ledger_list(self._h, part, buf, n)
        return list(buf[0:n])

    # -- queries -----------------------------------------------------------------
    def slices(self) -> dict[int, Span]:
        return {s.nsm: Span(s.offset, s.size) for s in self._list(0)}

    def lent_send(self) -> list[Span]:
        """Send buffers lent to an NSM (the tenant must not touch them)."""
        return sorted(Span(s.offset, s.size) for s in self._list(1))

    def held_by_tenant(self) -> list[Span]:
        """Receive buffers the tenant holds (the NSM must not reuse them)."""
        return sorted(Span(s.offset, s.size) for s in self._list(2))

    # -- moves ---------------------------------------------------------------------
    def grant(self, nsm: int, offset: int, size: int) -> Span:
        """TENANT_MAP: ``nsm`` allocates in ``[offset, offset+size)`` (BUF-8)."""
        if size <= 0 or offset < 0 or offset > _U64 or size > _U64:
            _raise(-_errno.EFAULT, f"slice ({offset}, {size})")
        _raise(lib.nk_ledger_grant(self._h, _nsm(nsm), offset, size),
               f"grant of ({offset:#x}, {size}) to NSM {nsm}")
        return Span(offset, size)

    def lend_send(self, offset: int, size: int) -> None:
        """A SEND request lends its buffer to the NSM (BUF-3). Size 0: no buffer."""
        if size < 0 or size > _U64:
            _raise(-_errno.EFAULT, f"send buffer ({offset}, {size})")
        _raise(lib.nk_ledger_lend_send(self._h, _u64(offset), size),
               f"send buffer ({offset:#x}, {size})")

    def settle_send(self, offset: int, size: int) -> None:
        """The SEND's reply gives the buffer back to the tenant (BUF-3)."""
        if size == 0:
            return
        if size < 0 or size > _U64 or not 0 <= offset <= _U64:
            _raise(-_errno.EINVAL, f"send buffer ({offset}, {size}) is not lent")
        _raise(lib.nk_ledger_settle_send(self._h, offset, size),
               f"send buffer ({offset:#x}, {size}) is not lent")

    def lend_receive(self, nsm: int, offset: int, size: int) -> None:
        """An EV_DATA from ``nsm`` lends a receive buffer to the tenant (BUF-4, BUF-8)."""
        if size < 0 or size > _U64 or not 0 <= nsm <= 0xFF:
            _raise(-_errno.EFAULT, f"receive buffer ({offset}, {size}) of NSM {nsm}")
        _raise(lib.nk_ledger_lend_receive(self._h, nsm, _u64(offset), size),
               f"receive buffer ({offset:#x}, {size}) of NSM {nsm}")

    def return_receive(self, offset: int, size: int) -> int:
        """A BUF_RETURN gives a receive buffer back; returns the NSM to forward it to (BUF-5)."""
        if size < 0 or size > _U64:
            _raise(-_errno.EFAULT, f"receive buffer ({offset}, {size})")
        got = lib.nk_ledger_return_receive(self._h, _u64(offset), size)
        _raise(got, f"the tenant holds no receive buffer ({offset:#x}, {size})")
        return int(got)
