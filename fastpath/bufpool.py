"""The ``bufpool`` role over C: who may touch which bytes of a data area (spec/device.md BUF-*).

The data (:class:`Span`, :class:`Half`, :class:`BufError`) and the pure
bounds helpers (:func:`within`, :func:`check_span`, :func:`half_bounds`,
:func:`check_slice`) are the reference's, re-exported: one data model. The
allocators run in C (csrc/bufpool.c): the same first fit over granules as the
reference, so the same offsets, and the same errors (this module words them
as the reference does). The CoreEngine's :class:`Ledger` is the C one of
:mod:`netkernel.fastpath.ledger` once that module exists.
"""

from __future__ import annotations

import errno
import threading
from typing import Any, Final

from netkernel.reference import bufpool as _ref
from netkernel.reference.bufpool import (
    EFAULT,
    EINVAL,
    BufError,
    Half,
    Span,
    check_slice,
    check_span,
    half_bounds,
    within,
)

from ._lib import ffi, lib

try:  # noqa: SIM105  (the integrator wires the ledger here)
    from .ledger import Ledger  # noqa: F401  (the engine's C ledger, once built)
except ImportError:
    pass

__all__ = ["EFAULT", "EINVAL", "Allocator", "BufError", "Half", "ReceiveAllocator",
           "SendAllocator", "Span", "check_slice", "check_span", "half_bounds", "within"]

_U64: Final = 1 << 64


def _u64(value: int) -> bool:
    return 0 <= value < _U64


class Allocator(_ref.Allocator):
    """First-fit allocation of granule-aligned buffers inside one span (BUF-2), in C.

    The reference's API: :attr:`area`, :attr:`granule`, :attr:`capacity`,
    :meth:`free_bytes`, :meth:`largest_free`, :meth:`live`, :meth:`alloc`,
    :meth:`free`. Offsets are u64 (NQE-6): an area that ends past 2**64 is refused
    with EINVAL, where the reference would accept it. It subclasses the reference's
    so that :class:`SendAllocator` and :class:`ReceiveAllocator` are the reference's
    constructors over this one (their ``super().__init__`` lands here); it overrides
    every method and keeps none of the reference's state.
    """

    def __init__(self, area: Span, granule: int) -> None:  # not super(): no Python state
        if granule <= 0 or granule & (granule - 1):
            raise BufError(f"granule must be a power of two, got {granule}", errno=EINVAL)
        out = ffi.new("struct nk_bufpool **")
        fits = _u64(granule) and _u64(area.offset) and _u64(area.size)
        rc = lib.nk_bufpool_new(out, area.offset, area.size, granule) if fits else -EINVAL
        if rc:
            if rc == -EINVAL:
                raise BufError(f"area {area} is not a non-empty run of {granule}-byte granules",
                               errno=EINVAL)
            raise MemoryError("nk_bufpool_new")
        self.area = Span(*area)
        self.granule = granule
        self._p: Any = ffi.gc(out[0], lib.nk_bufpool_delete)
        self._off = ffi.new("uint64_t *")
        # cffi drops the GIL in every call: the lock keeps two threads out of one C pool
        self._lock = threading.Lock()

    # -- queries ---------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Bytes of the area."""
        return int(self.area.size)

    def free_bytes(self) -> int:
        """Bytes in free granules."""
        with self._lock:
            return int(lib.nk_bufpool_free_bytes(self._p))

    def largest_free(self) -> int:
        """Bytes of the longest free run: the largest ``alloc`` that succeeds now."""
        with self._lock:
            return int(lib.nk_bufpool_largest_free(self._p))

    def live(self) -> list[Span]:
        """The buffers handed out and not yet freed, by offset."""
        with self._lock:
            n = lib.nk_bufpool_live_count(self._p)
            out = ffi.new("struct nk_span[]", n)
            got = lib.nk_bufpool_live(self._p, out, n)
        return [Span(int(out[i].offset), int(out[i].size)) for i in range(got)]

    # -- alloc / free ------------------------------------------------------------
    def alloc(self, size: int) -> Span | None:
        """A buffer of ``size`` bytes, or ``None`` if no free run fits now (BUF-7).

        BufError (EINVAL) for a size that can never fit: 0, negative, or larger
        than the whole area (BUF-9).
        """
        if not 0 <= size < _U64:
            rc = -EINVAL
        else:
            with self._lock:
                rc = lib.nk_bufpool_alloc(self._p, size, self._off)
                got = int(self._off[0])
        if rc == 0:
            return Span(got, size)
        if rc == -errno.ENOSPC:
            return None
        if rc == -EINVAL:
            raise BufError(f"cannot allocate {size} bytes from an area of {self.capacity}",
                           errno=EINVAL)
        raise MemoryError("nk_bufpool_alloc")

    def free(self, offset: int) -> Span:
        """Give back the buffer that starts at ``offset``; returns it (BUF-6).

        EFAULT if ``offset`` is outside the area; EINVAL if no live buffer
        starts there (double free, or an offset this allocator never gave).
        """
        if not 0 <= offset < _U64:
            rc = -EFAULT
        else:
            with self._lock:
                rc = lib.nk_bufpool_free(self._p, offset, self._off)
                size = int(self._off[0])
        if rc == 0:
            return Span(offset, size)
        if rc == -EFAULT:
            raise BufError(f"offset {offset:#x} is outside {self.area}", errno=EFAULT)
        raise BufError(f"no live buffer starts at {offset:#x} (double free?)", errno=EINVAL)


class SendAllocator(_ref.SendAllocator, Allocator):
    """The tenant's allocator over its send half (BUF-1, BUF-3): the reference's, in C."""


class ReceiveAllocator(_ref.ReceiveAllocator, Allocator):
    """An NSM's allocator over its slice of a tenant's receive half (BUF-1, BUF-4, BUF-8).

    The reference's constructor (the grant is checked there), the C allocator.
    """
