"""Buffer ownership in the data area (spec/device.md BUF-*; spec/nqe.md NQE-6, NQE-12, NQE-14).

The ``bufpool`` role provides ``Span``, ``Half``, ``BufError`` (with
``errno``), ``check_span``, ``SendAllocator``, ``ReceiveAllocator`` and
``Ledger`` (the CoreEngine's record of lent buffers). Each is driven here by
random sequences and compared with a model written from the spec.
"""

from __future__ import annotations

import errno
import random
from collections import deque
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

U64 = (1 << 64) - 1

geometries = st.builds(
    lambda b, halves, send: dict(n_qsets=1, ring_entries=2, buf_size=1 << b,
                                 data_size=halves << b, send_size=min(send, halves - 1) << b),
    st.integers(6, 12), st.integers(2, 32), st.integers(1, 31),
)


def geometry(device: Any, g: dict[str, int]) -> Any:
    return device.Geometry(**g)


def errno_of(fn: Any, *args: Any) -> int:
    """0 if the call succeeds, else the errno of the BufError it raises."""
    try:
        fn(*args)
    except Exception as exc:
        code = getattr(exc, "errno", None)
        assert isinstance(code, int), f"{exc!r} carries no errno"
        return code
    return 0


# -- NQE-6, NQE-14: bounds ----------------------------------------------------------------------

offsets = st.one_of(st.integers(0, 1 << 20), st.integers(U64 - (1 << 12), U64),
                    st.sampled_from([0, U64, 1 << 63, 1 << 32]))
sizes = st.one_of(st.integers(0, 1 << 20), st.sampled_from([0, 1, (1 << 32) - 1, U64]))


@pytest.mark.req("NQE-6", "NQE-14", "DEV-11")
@given(g=geometries, send=st.booleans(), offset=offsets, size=sizes)
def test_buffer_outside_its_half_is_efault(bufpool: Any, device: Any, g: dict[str, int],
                                           send: bool, offset: int, size: int) -> None:
    """Offsets count from the data area; u64-sized values must not wrap into range."""
    geo = geometry(device, g)
    lo, hi = (0, g["send_size"]) if send else (g["send_size"], g["data_size"])
    inside = size == 0 or (lo <= offset and size <= hi - offset)
    half = bufpool.Half.SEND if send else bufpool.Half.RECEIVE
    assert errno_of(bufpool.check_span, geo, half, offset, size) == (0 if inside else errno.EFAULT)


@pytest.mark.req("NQE-12", "NQE-14")
@given(g=geometries, reserved=st.binary(min_size=3, max_size=3),
       past=st.integers(1, 1 << 20), size=st.integers(1, 1 << 16))
def test_reserved_bytes_are_checked_before_bounds(bufpool: Any, codec: Any, device: Any,
                                                  g: dict[str, int], reserved: bytes, past: int,
                                                  size: int) -> None:
    """A SEND with a buffer past the send half: EINVAL if reserved bytes are bad, else EFAULT."""
    geo = geometry(device, g)
    req = codec.pack(codec.NQE(op=0x06, sock_id=1, data_ptr=g["send_size"] + past, size=size))
    wire = req[:29] + reserved

    def receive() -> None:
        nqe = codec.unpack(wire)
        bufpool.check_span(geo, bufpool.Half.SEND, nqe.data_ptr, nqe.size)

    assert errno_of(receive) == (errno.EINVAL if reserved != b"\0\0\0" else errno.EFAULT)


# -- allocators: BUF-1, BUF-2, BUF-6, BUF-7, BUF-9 -----------------------------------------------

class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free on a send or receive allocator, against a granule model."""

    pool: Any = None
    dev: Any = None

    @initialize(g=geometries, receive=st.booleans(), data=st.data())
    def setup(self, g: dict[str, int], receive: bool, data: st.DataObject) -> None:
        self.geo = geometry(self.dev, g)
        self.b = g["buf_size"]
        if receive:
            granules = (g["data_size"] - g["send_size"]) // self.b
            first = data.draw(st.integers(0, granules - 1), label="slice start")
            count = data.draw(st.integers(1, granules - first), label="slice granules")
            area = self.pool.Span(g["send_size"] + first * self.b, count * self.b)
            self.alloc = self.pool.ReceiveAllocator(self.geo, area)
        else:
            area = self.pool.Span(0, g["send_size"])
            self.alloc = self.pool.SendAllocator(self.geo)
        self.area = area
        self.used: dict[int, int] = {}  # offset -> size

    def _free_granules(self) -> list[bool]:
        n = self.area.size // self.b
        free = [True] * n
        for off, size in self.used.items():
            first = (off - self.area.offset) // self.b
            for i in range(first, first + -(-size // self.b)):
                free[i] = False
        return free

    def _longest_run(self) -> int:
        best = run = 0
        for f in self._free_granules():
            run = run + 1 if f else 0
            best = max(best, run)
        return best

    @rule(size=st.integers(1, 1 << 16))
    def allocate(self, size: int) -> None:
        if size > self.area.size:
            assert errno_of(self.alloc.alloc, size) == errno.EINVAL  # BUF-9
            return
        fits = -(-size // self.b) <= self._longest_run()
        span = self.alloc.alloc(size)
        if not fits:
            assert span is None  # BUF-7: nothing fits
            return
        assert span is not None, "BUF-7: allocation failed although a free run fits"
        off, got = span
        assert got == size
        assert off % self.b == 0  # BUF-2: on a granule
        assert self.area.offset <= off and off + size <= self.area.offset + self.area.size  # BUF-1
        first = (off - self.area.offset) // self.b
        free = self._free_granules()
        assert all(free[first:first + -(-size // self.b)]), "BUF-2: overlaps a live buffer"
        self.used[off] = size

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.used:
            return
        off = data.draw(st.sampled_from(sorted(self.used)))
        assert tuple(self.alloc.free(off)) == (off, self.used.pop(off))

    @rule(delta=st.integers(1, 1 << 20), outside=st.booleans())
    def bad_free(self, delta: int, outside: bool) -> None:
        """BUF-6: a free that names no live buffer changes nothing."""
        if outside:
            off = self.area.offset - delta if delta <= self.area.offset else \
                self.area.offset + self.area.size + delta
            expect = errno.EFAULT
        else:
            off = self.area.offset + delta % self.area.size
            if off in self.used:
                return
            expect = errno.EINVAL
        before = [tuple(s) for s in self.alloc.live()]
        assert errno_of(self.alloc.free, off) == expect
        assert [tuple(s) for s in self.alloc.live()] == before

    @invariant()
    def accounting(self) -> None:
        if hasattr(self, "alloc"):
            assert sorted((o, s) for o, s in self.used.items()) == \
                [tuple(s) for s in self.alloc.live()]
            assert self.alloc.free_bytes() == sum(self._free_granules()) * self.b
            assert self.alloc.largest_free() == self._longest_run() * self.b


@pytest.mark.req("BUF-1", "BUF-2", "BUF-6", "BUF-7", "BUF-9")
def test_allocators_under_random_alloc_and_free(bufpool: Any, device: Any) -> None:
    machine = type("TargetAllocatorMachine", (AllocatorMachine,), {"pool": bufpool, "dev": device})
    run_state_machine_as_test(machine)


@pytest.mark.req("BUF-9")
@given(g=geometries, size=st.one_of(st.integers(-(1 << 20), 0), st.integers(1, 1 << 20)))
def test_sizes_that_can_never_fit_fail_at_once(bufpool: Any, device: Any, g: dict[str, int],
                                               size: int) -> None:
    alloc = bufpool.SendAllocator(geometry(device, g))
    if size <= 0 or size > g["send_size"]:
        assert errno_of(alloc.alloc, size) == errno.EINVAL
    else:
        assert alloc.alloc(size) is not None


@pytest.mark.req("BUF-8")
@given(g=geometries, first=st.integers(-4, 40), count=st.integers(0, 40),
       skew=st.sampled_from([0, 0, 1, 32]))
def test_receive_slice_must_be_whole_granules_of_the_receive_half(
        bufpool: Any, device: Any, g: dict[str, int], first: int, count: int, skew: int) -> None:
    geo, b = geometry(device, g), g["buf_size"]
    off, size = g["send_size"] + first * b + skew, count * b
    if size == 0 or off < g["send_size"] or off + size > g["data_size"]:
        expect = errno.EFAULT
    elif skew:
        expect = errno.EINVAL
    else:
        expect = 0
    assert errno_of(bufpool.ReceiveAllocator, geo, bufpool.Span(off, size)) == expect
    assert errno_of(bufpool.Ledger(geo).grant, 1, off, size) == expect


# -- the ledger: BUF-3, BUF-4, BUF-5, BUF-8 --------------------------------------------------------

class LedgerMachine(RuleBasedStateMachine):
    """TENANT_MAP, SEND and its reply, EV_DATA and BUF_RETURN in random order, against a model.

    The model applies the spec's rules in the spec's order (EFAULT before
    EINVAL) and the ledger must give the same outcome for every call; a
    rejected call must leave the ledger unchanged.
    """

    pool: Any = None
    dev: Any = None

    @initialize(halves=st.integers(4, 24), send=st.integers(1, 8), data=st.data())
    def setup(self, halves: int, send: int, data: st.DataObject) -> None:
        self.b = 64
        self.s, self.d = min(send, halves - 1) * self.b, halves * self.b
        geo = self.dev.Geometry(n_qsets=1, ring_entries=2, buf_size=self.b, data_size=self.d,
                                send_size=self.s)
        self.ledger = self.pool.Ledger(geo)
        self.slices: dict[int, tuple[int, int]] = {}
        self.sent: set[tuple[int, int]] = set()
        self.held: dict[tuple[int, int], int] = {}

    spans = st.tuples(st.integers(-64, 26 * 64), st.integers(0, 4 * 64))

    def _check(self, fn: Any, args: tuple[int, ...], expect: int) -> int:
        before = (self.ledger.slices(), self.ledger.lent_send(), self.ledger.held_by_tenant())
        try:
            got = fn(*args)
            code = 0
        except Exception as exc:
            got, code = None, getattr(exc, "errno", -1)
        assert code == expect, f"{fn.__name__}{args}: errno {code}, spec says {expect}"
        if code:
            after = (self.ledger.slices(), self.ledger.lent_send(), self.ledger.held_by_tenant())
            assert after == before, "a rejected call must change nothing"
        return got  # type: ignore[no-any-return]

    @staticmethod
    def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]

    @rule(nsm=st.integers(1, 3), first=st.integers(0, 24), count=st.integers(1, 8))
    def tenant_map(self, nsm: int, first: int, count: int) -> None:
        off, size = self.s + first * self.b, count * self.b
        if off + size > self.d:
            expect = errno.EFAULT
        elif nsm in self.slices or any(self._overlap((off, size), s)
                                       for s in self.slices.values()):
            expect = errno.EINVAL
        else:
            expect = 0
        self._check(self.ledger.grant, (nsm, off, size), expect)
        if not expect:
            self.slices[nsm] = (off, size)

    @rule(span=spans)
    def send(self, span: tuple[int, int]) -> None:  # BUF-3
        off, size = span
        if size and not (off >= 0 and off + size <= self.s):
            expect = errno.EFAULT
        elif size and any(self._overlap(span, s) for s in self.sent):
            expect = errno.EINVAL
        else:
            expect = 0
        self._check(self.ledger.lend_send, span, expect)
        if not expect and size:
            self.sent.add(span)

    @rule(data=st.data(), span=spans)
    def send_reply(self, data: st.DataObject, span: tuple[int, int]) -> None:  # BUF-3
        if self.sent and data.draw(st.booleans()):
            span = data.draw(st.sampled_from(sorted(self.sent)))
        expect = 0 if span in self.sent or span[1] == 0 else errno.EINVAL
        self._check(self.ledger.settle_send, span, expect)
        self.sent.discard(span)

    @rule(nsm=st.integers(1, 3), data=st.data(), span=spans)
    def ev_data(self, nsm: int, data: st.DataObject, span: tuple[int, int]) -> None:  # BUF-4, -8
        if nsm in self.slices and data.draw(st.booleans()):
            so, ss = self.slices[nsm]
            g = data.draw(st.integers(0, ss // self.b - 1))
            span = (so + g * self.b, data.draw(st.integers(1, ss - g * self.b)))
        off, size = span
        grant = self.slices.get(nsm)
        if grant is None or not (grant[0] <= off and off + size <= grant[0] + grant[1]):
            expect = errno.EFAULT
        elif size == 0 or any(self._overlap(span, h) for h in self.held):
            expect = errno.EINVAL
        else:
            expect = 0
        self._check(self.ledger.lend_receive, (nsm, off, size), expect)
        if not expect:
            self.held[span] = nsm

    @rule(data=st.data(), span=spans)
    def buf_return(self, data: st.DataObject, span: tuple[int, int]) -> None:  # BUF-5
        if self.held and data.draw(st.booleans()):
            span = data.draw(st.sampled_from(sorted(self.held)))
        off, size = span
        if size and not (self.s <= off and off + size <= self.d):
            expect = errno.EFAULT
        elif span not in self.held:
            expect = errno.EINVAL
        else:
            expect = 0
        got = self._check(self.ledger.return_receive, span, expect)
        if not expect:
            assert got == self.held.pop(span), "BUF_RETURN goes back to the NSM that lent it"

    @invariant()
    def same_ownership(self) -> None:
        if hasattr(self, "ledger"):
            assert sorted(tuple(s) for s in self.ledger.lent_send()) == sorted(self.sent)
            assert sorted(tuple(s) for s in self.ledger.held_by_tenant()) == sorted(self.held)


@pytest.mark.req("BUF-3", "BUF-4", "BUF-5", "BUF-8")
def test_ledger_under_random_ownership_moves(bufpool: Any, device: Any) -> None:
    machine = type("TargetLedgerMachine", (LedgerMachine,), {"pool": bufpool, "dev": device})
    run_state_machine_as_test(machine)


@pytest.mark.req("BUF-5")
def test_returning_a_send_buffer_as_a_receive_buffer_is_efault(bufpool: Any,
                                                               device: Any) -> None:
    geo = device.Geometry(n_qsets=1, ring_entries=2, buf_size=4096, data_size=1 << 16,
                          send_size=1 << 15)
    ledger = bufpool.Ledger(geo)
    span = bufpool.SendAllocator(geo).alloc(100)
    ledger.lend_send(*span)
    assert errno_of(ledger.return_receive, *span) == errno.EFAULT
    ledger.grant(7, 1 << 15, 1 << 15)
    ledger.lend_receive(7, 1 << 15, 10)
    assert ledger.return_receive(1 << 15, 10) == 7
    assert errno_of(ledger.return_receive, 1 << 15, 10) == errno.EINVAL  # double return


# -- BUF-7: flow control end to end --------------------------------------------------------------

@pytest.mark.req("BUF-7", "BUF-4")
@given(seed=st.integers(0, 2**32 - 1), granules=st.integers(1, 6), chunks=st.integers(5, 60))
def test_full_slice_stops_reading_and_loses_nothing(bufpool: Any, device: Any, seed: int,
                                                    granules: int, chunks: int) -> None:
    """An NSM pushes a byte stream into a small slice; a slow tenant reads and returns buffers.

    The NSM reads from its stack only when a buffer is free, so every byte
    arrives once, in order, and the stall path (alloc -> None) is taken.
    """
    rng = random.Random(seed)
    b = 64
    geo = device.Geometry(n_qsets=1, ring_entries=2, buf_size=b, data_size=16 * b,
                          send_size=8 * b)
    area = bytearray(geo.data_size)
    grant = bufpool.Span(8 * b, granules * b)
    nsm = bufpool.ReceiveAllocator(geo, grant)
    ledger = bufpool.Ledger(geo)
    ledger.grant(1, *grant)
    sent = b"".join(rng.randbytes(rng.randint(1, 300)) for _ in range(chunks))
    pending = bytearray(sent)  # still in the NSM's stack (e.g. the kernel socket buffer)
    receive_ring: deque[tuple[int, int]] = deque()  # EV_DATA in flight to the tenant
    app = bytearray()
    stalls = steps = 0
    while pending or receive_ring:
        steps += 1
        assert steps < 100_000, "no progress: a buffer was lost"
        if pending and rng.random() < 0.6:  # NSM: read only into a free buffer
            span = nsm.alloc(min(len(pending), rng.randint(1, 3 * b), grant.size))
            if span is None:
                stalls += 1  # BUF-7: stop reading; the data stays in the stack
            else:
                off, size = span
                area[off:off + size] = pending[:size]
                del pending[:size]
                ledger.lend_receive(1, off, size)
                receive_ring.append((off, size))
        # tenant: read, then BUF_RETURN -- only once the NSM has hit a full slice (or has
        # nothing left to read), so the stall path is taken in every example that can fill it
        if receive_ring and (stalls or not pending) and rng.random() < 0.4:
            off, size = receive_ring.popleft()
            app += area[off:off + size]
            assert ledger.return_receive(off, size) == 1
            nsm.free(off)
    assert bytes(app) == sent
    assert nsm.free_bytes() == grant.size and not ledger.held_by_tenant()
    if len(sent) > grant.size:
        assert stalls > 0, "the slice never filled up: the test did not exercise BUF-7"
