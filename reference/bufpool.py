"""Buffer ownership in the data area (spec/device.md, BUF-*; spec/nqe.md, NQE-6, NQE-14).

Everything about who may touch which bytes of a device's data area lives in
this file; it is sans-IO: it hands out and takes back *offsets*, it never
reads or writes the data area itself.

The data area of a tenant device has two halves (DEV-11)::

    [0, send_size)          send half: the tenant allocates, an NSM reads
    [send_size, data_size)  receive half: cut into slices, one per NSM
                            (TENANT_MAP); each NSM allocates in its slice,
                            the tenant reads

Three pieces, one per party:

* :class:`SendAllocator` - the tenant (GuestLib) allocates a send buffer,
  writes the payload, names it in a SEND request and frees it when the reply
  comes back (BUF-3);
* :class:`ReceiveAllocator` - an NSM allocates a receive buffer in its slice
  when data arrives, names it in EV_DATA and frees it when the tenant's
  BUF_RETURN comes back (BUF-4). A full slice makes :meth:`~Allocator.alloc`
  return ``None``: the NSM stops reading that socket, it never drops (BUF-7);
* :class:`Ledger` - the CoreEngine's record of which buffers are lent across
  the device boundary; it rejects a SEND of a buffer already lent, an EV_DATA
  outside the NSM's slice, and a BUF_RETURN of a buffer the tenant does not
  hold (BUF-5, BUF-8).

Every rejection is a :class:`BufError` carrying the errno a receiver puts in
its reply: ``EFAULT`` for a span outside the region it must lie in (checked
first, NQE-12), ``EINVAL`` for a span that is in bounds but not owned as
claimed.
"""

from __future__ import annotations

import bisect
import enum
import errno as _errno
from collections.abc import Iterable
from typing import Final, NamedTuple

from .device import Geometry

EFAULT: Final = _errno.EFAULT
EINVAL: Final = _errno.EINVAL


class BufError(ValueError):
    """A buffer operation that breaks the ownership rules; ``errno`` is the reply's."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class Span(NamedTuple):
    """A buffer: ``size`` bytes at ``offset`` in the data area (NQE-6)."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


class Half(enum.Enum):
    """The two halves of the data area (DEV-11)."""

    SEND = "send"
    RECEIVE = "receive"


def half_bounds(geo: Geometry, half: Half) -> Span:
    """The half as a span of the data area (DEV-11)."""
    if half is Half.SEND:
        return Span(0, geo.send_size)
    return Span(geo.send_size, geo.data_size - geo.send_size)


def within(outer: Span, offset: int, size: int) -> bool:
    """True if ``[offset, offset+size)`` lies in ``outer``, with no overflow (NQE-14).

    Written the way a C implementation must write it: never form
    ``offset + size`` (it may wrap a u64); compare ``size`` with the room left.
    """
    if offset < outer.offset or size < 0:
        return False
    room = outer.end - offset
    return room >= 0 and size <= room


def check_span(geo: Geometry, half: Half, offset: int, size: int) -> None:
    """Reject a buffer an NQE names outside ``half`` with EFAULT (NQE-6, NQE-14).

    A size of 0 names no buffer: nothing will be dereferenced, so any
    ``offset`` passes.
    """
    if size == 0:
        return
    if not within(half_bounds(geo, half), offset, size):
        raise BufError(
            f"buffer [{offset:#x}, +{size:#x}) is outside the {half.value} half"
            f" {half_bounds(geo, half)}",
            errno=EFAULT,
        )


class Allocator:
    """First-fit allocation of granule-aligned buffers inside one span (BUF-2).

    Every buffer starts on a multiple of ``granule`` (counted from the start
    of the data area) and takes ``ceil(size / granule)`` whole granules; no
    two live buffers share a granule. :meth:`alloc` returns ``None`` only
    when no run of free granules is long enough (BUF-7).
    """

    def __init__(self, area: Span, granule: int) -> None:
        if granule <= 0 or granule & (granule - 1):
            raise BufError(f"granule must be a power of two, got {granule}", errno=EINVAL)
        if area.offset % granule or area.size % granule or area.size <= 0 or area.offset < 0:
            raise BufError(f"area {area} is not a non-empty run of {granule}-byte granules",
                           errno=EINVAL)
        self.area = area
        self.granule = granule
        self._total = area.size // granule
        # free runs as (first granule, count), sorted and never adjacent
        self._starts: list[int] = [0]
        self._counts: list[int] = [self._total]
        self._live: dict[int, Span] = {}  # offset -> buffer

    # -- queries ---------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Bytes of the area."""
        return self.area.size

    def free_bytes(self) -> int:
        """Bytes in free granules."""
        return sum(self._counts) * self.granule

    def largest_free(self) -> int:
        """Bytes of the longest free run: the largest ``alloc`` that succeeds now."""
        return max(self._counts, default=0) * self.granule

    def live(self) -> list[Span]:
        """The buffers handed out and not yet freed, by offset."""
        return [self._live[o] for o in sorted(self._live)]

    # -- alloc / free ------------------------------------------------------------
    def alloc(self, size: int) -> Span | None:
        """A buffer of ``size`` bytes, or ``None`` if no free run fits now (BUF-7).

        Raises :class:`BufError` (EINVAL) for a size that can never fit:
        0, negative, or larger than the whole area (BUF-9).
        """
        if size <= 0 or size > self.capacity:
            raise BufError(f"cannot allocate {size} bytes from an area of {self.capacity}",
                           errno=EINVAL)
        need = -(-size // self.granule)
        for i, count in enumerate(self._counts):
            if count >= need:
                first = self._starts[i]
                if count == need:
                    del self._starts[i], self._counts[i]
                else:
                    self._starts[i] += need
                    self._counts[i] -= need
                span = Span(self.area.offset + first * self.granule, size)
                self._live[span.offset] = span
                return span
        return None

    def free(self, offset: int) -> Span:
        """Give back the buffer that starts at ``offset``; returns it (BUF-6).

        EFAULT if ``offset`` is outside the area; EINVAL if no live buffer
        starts there (double free, or an offset this allocator never gave).
        """
        if not within(self.area, offset, 1):
            raise BufError(f"offset {offset:#x} is outside {self.area}", errno=EFAULT)
        span = self._live.pop(offset, None)
        if span is None:
            raise BufError(f"no live buffer starts at {offset:#x} (double free?)", errno=EINVAL)
        first = (offset - self.area.offset) // self.granule
        count = -(-span.size // self.granule)
        i = bisect.bisect_left(self._starts, first)
        self._starts.insert(i, first)
        self._counts.insert(i, count)
        # coalesce with the next run, then with the previous one
        if i + 1 < len(self._starts) and first + count == self._starts[i + 1]:
            self._counts[i] += self._counts.pop(i + 1)
            del self._starts[i + 1]
        if i > 0 and self._starts[i - 1] + self._counts[i - 1] == first:
            self._counts[i - 1] += self._counts.pop(i)
            del self._starts[i]
        return span


class SendAllocator(Allocator):
    """The tenant's allocator over its send half (BUF-1, BUF-3)."""

    def __init__(self, geo: Geometry) -> None:
        super().__init__(half_bounds(geo, Half.SEND), geo.buf_size)


class ReceiveAllocator(Allocator):
    """An NSM's allocator over the slice of a tenant's receive half it was granted (BUF-1, BUF-4).

    ``grant`` is the (data_ptr, size) of the TENANT_MAP that granted it; it
    must be a granule-aligned span of the receive half (BUF-8).
    """

    def __init__(self, geo: Geometry, grant: Span) -> None:
        check_slice(geo, grant)
        super().__init__(grant, geo.buf_size)

    def room(self, held: int, cap: int, empty: int) -> int:
        """NSM-16, NSM-18: the most bytes a socket holding ``held`` may be lent now.

        ``cap`` is the per-socket share (NSM-16); ``empty`` is how many sockets of
        the tenant hold none of the slice. They keep a reserve of a granule each (at
        most half the slice): a socket holding some of the slice takes nothing of
        the reserve, one holding none may take a granule of it. A datagram is never
        split: a socket holding none takes it whole if it fits; one holding some
        takes it only if it is at most this much.
        """
        reserve = min(empty, self._total // 2) * self.granule
        open_ = max(0, self.free_bytes() - reserve)
        if held == 0 and open_ < self.granule:
            open_ = min(self.free_bytes(), self.granule)
        return max(0, min(cap - held, open_))


def check_slice(geo: Geometry, grant: Span) -> None:
    """A receive slice must lie in the receive half (EFAULT) on whole granules (EINVAL) (BUF-8)."""
    if grant.size <= 0 or not within(half_bounds(geo, Half.RECEIVE), grant.offset, grant.size):
        raise BufError(f"slice {grant} is not inside the receive half", errno=EFAULT)
    if grant.offset % geo.buf_size or grant.size % geo.buf_size:
        raise BufError(f"slice {grant} is not on {geo.buf_size}-byte granules", errno=EINVAL)


class Ledger:
    """The CoreEngine's record of buffers lent across one tenant device (BUF-3..BUF-5, BUF-8).

    It sees the NQEs that move ownership and nothing else:

    =================  ==========================  ===========================
    NQE                 call                        ownership after
    =================  ==========================  ===========================
    TENANT_MAP          :meth:`grant`               slice belongs to that NSM
    SEND (request)      :meth:`lend_send`           send buffer lent to the NSM
    SEND (reply)        :meth:`settle_send`         send buffer back to tenant
    EV_DATA             :meth:`lend_receive`        receive buffer lent to tenant
    BUF_RETURN          :meth:`return_receive`      receive buffer back to NSM
    =================  ==========================  ===========================

    Every check runs before anything changes: a rejected call leaves the
    ledger as it was.
    """

    def __init__(self, geo: Geometry) -> None:
        self.geo = geo
        self._slices: dict[int, Span] = {}  # NSM ID -> granted slice
        self._sent: dict[int, Span] = {}  # send buffers lent to an NSM, by offset
        self._held: dict[int, tuple[Span, int]] = {}  # receive buffers the tenant holds -> NSM

    # -- queries -----------------------------------------------------------------
    def slices(self) -> dict[int, Span]:
        return dict(self._slices)

    def lent_send(self) -> list[Span]:
        """Send buffers lent to an NSM (the tenant must not touch them)."""
        return [self._sent[o] for o in sorted(self._sent)]

    def held_by_tenant(self) -> list[Span]:
        """Receive buffers the tenant holds (the NSM must not reuse them)."""
        return [self._held[o][0] for o in sorted(self._held)]

    # -- TENANT_MAP ----------------------------------------------------------------
    def grant(self, nsm: int, offset: int, size: int) -> Span:
        """Record that ``nsm`` allocates in ``[offset, offset+size)`` (BUF-8).

        EFAULT outside the receive half; EINVAL off granules, overlapping
        another NSM's slice, or for an NSM that already has one.
        """
        span = Span(offset, size)
        check_slice(self.geo, span)
        if nsm in self._slices:
            raise BufError(f"NSM {nsm} already has slice {self._slices[nsm]}", errno=EINVAL)
        for other, s in self._slices.items():
            if _overlap(s, span):
                raise BufError(f"slice {span} overlaps NSM {other}'s {s}", errno=EINVAL)
        self._slices[nsm] = span
        return span

    # -- SEND ----------------------------------------------------------------------
    def lend_send(self, offset: int, size: int) -> None:
        """A SEND request lends its buffer to the NSM (BUF-3). Size 0: no buffer.

        EFAULT outside the send half; EINVAL if it overlaps a buffer still lent.
        """
        check_span(self.geo, Half.SEND, offset, size)
        if size == 0:
            return
        span = Span(offset, size)
        clash = _find_overlap(self._sent.values(), span)
        if clash is not None:
            raise BufError(f"send buffer {span} overlaps {clash}, still lent", errno=EINVAL)
        self._sent[offset] = span

    def settle_send(self, offset: int, size: int) -> None:
        """The SEND's reply gives the buffer back to the tenant (BUF-3).

        EINVAL unless exactly that buffer is lent.
        """
        if size == 0:
            return
        if self._sent.get(offset) != Span(offset, size):
            raise BufError(f"send buffer ({offset:#x}, {size}) is not lent", errno=EINVAL)
        del self._sent[offset]

    # -- EV_DATA / BUF_RETURN --------------------------------------------------------
    def lend_receive(self, nsm: int, offset: int, size: int) -> None:
        """An EV_DATA from ``nsm`` lends a receive buffer to the tenant (BUF-4, BUF-8).

        EFAULT if the buffer is not inside the NSM's slice (or it has none);
        EINVAL if it is empty or overlaps a buffer the tenant still holds.
        """
        grant = self._slices.get(nsm)
        if grant is None or not within(grant, offset, size):
            raise BufError(f"buffer ({offset:#x}, {size}) is outside NSM {nsm}'s slice {grant}",
                           errno=EFAULT)
        span = Span(offset, size)
        if size == 0:
            raise BufError("EV_DATA names an empty buffer", errno=EINVAL)
        clash = _find_overlap((s for s, _ in self._held.values()), span)
        if clash is not None:
            raise BufError(f"receive buffer {span} overlaps {clash}, still held by the tenant",
                           errno=EINVAL)
        self._held[offset] = (span, nsm)

    def return_receive(self, offset: int, size: int) -> int:
        """A BUF_RETURN gives a receive buffer back; returns the NSM to forward it to (BUF-5).

        EFAULT if the span is not inside the receive half (a send-half buffer
        included); EINVAL unless the tenant holds exactly that buffer (never
        lent, already returned, or only part of it).
        """
        check_span(self.geo, Half.RECEIVE, offset, size)
        held = self._held.get(offset)
        if held is None or held[0] != Span(offset, size) or size == 0:
            raise BufError(f"the tenant holds no receive buffer ({offset:#x}, {size})",
                           errno=EINVAL)
        del self._held[offset]
        return held[1]


def _overlap(a: Span, b: Span) -> bool:
    return a.offset < b.end and b.offset < a.end


def _find_overlap(spans: Iterable[Span], span: Span) -> Span | None:
    return next((s for s in spans if _overlap(s, span)), None)
