"""The C allocators (fastpath/bufpool.py over csrc/bufpool.c) against the reference.

Random alloc/free programs run on a C allocator and a reference allocator over
the same area: every call must give the same span, ``None`` or BufError (same
errno, same message), and the two must agree on live buffers, free bytes and
the largest free run after every step (BUF-1, BUF-2, BUF-6, BUF-7, BUF-9).
An allocator that rounds sizes down is shown to be caught by that check.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netkernel.fastpath import bufpool as fbuf
from netkernel.reference import bufpool as rbuf
from netkernel.reference import device as rdev
from tests.live import in_threads

U64 = 1 << 64

geometries = st.builds(
    lambda b, halves, send: rdev.Geometry(n_qsets=1, ring_entries=2, buf_size=1 << b,
                                          data_size=halves << b,
                                          send_size=min(send, halves - 1) << b),
    st.integers(6, 12), st.integers(2, 40), st.integers(1, 39),
)


@st.composite
def pools(draw: st.DrawFn) -> tuple[str, tuple[Any, ...]]:
    """Which allocator, and its constructor arguments (sometimes invalid ones)."""
    geo = draw(geometries)
    kind = draw(st.sampled_from(["send", "receive", "area"]))
    b = geo.buf_size
    if kind == "send":
        return kind, (geo,)
    if kind == "receive":
        first = draw(st.integers(-2, (geo.data_size - geo.send_size) // b + 2))
        count = draw(st.integers(0, 40))
        skew = draw(st.sampled_from([0, 0, 0, 1, 32]))
        return kind, (geo, rbuf.Span(geo.send_size + first * b + skew, count * b))
    granule = draw(st.sampled_from([0, 1, 3, 64, 4096, -64]))
    offset = draw(st.one_of(st.integers(-2, 20).map(lambda k: k * max(granule, 1)),
                            st.sampled_from([U64 - 4096, 1 << 63])))
    size = draw(st.one_of(st.integers(0, 20).map(lambda k: k * max(granule, 1)),
                          st.just(4096)))
    if offset + size > U64:  # the one known difference: offsets are u64 in C (see below)
        size = U64 - offset
    return kind, (rbuf.Span(offset, size), granule)


def make(mod: Any, kind: str, args: tuple[Any, ...]) -> Any:
    cls = {"send": mod.SendAllocator, "receive": mod.ReceiveAllocator, "area": mod.Allocator}
    return cls[kind](*args)


def result(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except rbuf.BufError as exc:
        return ("BufError", exc.errno, str(exc))


steps = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.one_of(st.integers(-2, 5000), st.integers(1, 1 << 18),
                                          st.sampled_from([U64 - 1, U64, 1 << 70]))),
    st.tuples(st.just("free_live"), st.integers(0, 1000)),
    st.tuples(st.just("free_any"), st.one_of(st.integers(-1, 1 << 18),
                                             st.sampled_from([U64 - 1, U64, -(1 << 64)]))),
    st.tuples(st.just("free_again"), st.integers(0, 1000)),
), max_size=80)


def run_program(impl: Any, kind: str, args: tuple[Any, ...],
                program: list[tuple[str, int]]) -> None:
    """Apply ``program`` to ``impl``'s allocator and the reference's; assert they agree."""
    made = [result(make, impl, kind, args), result(make, rbuf, kind, args)]
    if made[1][0] != "ok":
        assert made[0] == made[1]  # the same refusal: errno and message
        return
    assert made[0][0] == "ok", made[0]
    pools_ = [made[0][1], made[1][1]]
    freed: list[int] = []
    for step, (op, arg) in enumerate(program):
        live = pools_[1].live()
        if op == "alloc":
            calls = [(p.alloc, arg) for p in pools_]
        elif op == "free_live":
            if not live:
                continue
            offset = live[arg % len(live)].offset
            calls = [(p.free, offset) for p in pools_]
        elif op == "free_again":
            if not freed:
                continue
            calls = [(p.free, freed[arg % len(freed)]) for p in pools_]
        else:
            calls = [(p.free, arg) for p in pools_]
        got, want = (result(fn, a) for fn, a in calls)
        assert got == want, f"step {step} {op}({arg}): {got!r} != reference {want!r}"
        if op != "alloc" and want[0] == "ok":
            freed.append(want[1].offset)
        state = [(p.live(), p.free_bytes(), p.largest_free(), p.capacity, p.area, p.granule)
                 for p in pools_]
        assert state[0] == state[1], f"step {step} {op}({arg}): state {state[0]} != {state[1]}"


@settings(max_examples=300, deadline=None)
@given(pool=pools(), program=steps)
def test_c_allocators_match_the_reference(pool: tuple[str, tuple[Any, ...]],
                                          program: list[tuple[str, int]]) -> None:
    run_program(fbuf, *pool, program)


class _RoundsDown(fbuf.Allocator):
    """A broken allocator: a buffer over one granule gets one granule too few (breaks BUF-2)."""

    def alloc(self, size: int) -> Any:
        if size > self.granule and size <= self.capacity:
            span = super().alloc(size - self.granule)
            return None if span is None else rbuf.Span(span.offset, size)
        return super().alloc(size)


class _Broken:
    Allocator = _RoundsDown

    class SendAllocator(_RoundsDown):
        def __init__(self, geo: rdev.Geometry) -> None:
            super().__init__(rbuf.half_bounds(geo, rbuf.Half.SEND), geo.buf_size)

    class ReceiveAllocator(_RoundsDown):
        def __init__(self, geo: rdev.Geometry, grant: rbuf.Span) -> None:
            rbuf.check_slice(geo, grant)
            super().__init__(grant, geo.buf_size)


def test_the_differential_check_catches_an_allocator_that_rounds_down() -> None:
    @settings(max_examples=300, database=None, derandomize=True, deadline=None)
    @given(pool=pools(), program=steps)
    def differential(pool: tuple[str, tuple[Any, ...]], program: list[tuple[str, int]]) -> None:
        run_program(_Broken, *pool, program)

    with pytest.raises(AssertionError):
        differential()


def test_re_exports_are_the_reference_data_model() -> None:
    for name in ("Span", "Half", "BufError", "within", "check_span", "half_bounds",
                 "check_slice"):
        assert getattr(fbuf, name) is getattr(rbuf, name), name


@given(geo=geometries, receive=st.booleans(),
       offset=st.one_of(st.integers(0, 1 << 20), st.integers(U64 - 4096, U64 - 1)),
       size=st.one_of(st.integers(0, 1 << 20), st.sampled_from([U64 - 1, (1 << 32) - 1])))
def test_c_bounds_checks_match_the_reference(geo: rdev.Geometry, receive: bool, offset: int,
                                             size: int) -> None:
    """nk_buf_check_span / nk_buf_check_slice (used by the C engine) give the reference's errno."""
    from netkernel.fastpath._lib import ffi, lib

    g = ffi.new("struct nk_geometry *", dict(
        n_qsets=1, ring_entries=2, data_size=geo.data_size, send_size=geo.send_size,
        buf_size=geo.buf_size, kind=1))
    half = rbuf.Half.RECEIVE if receive else rbuf.Half.SEND
    want = result(rbuf.check_span, geo, half, offset, size)
    assert lib.nk_buf_check_span(g, receive, offset, size) == (
        0 if want[0] == "ok" else -want[1])
    want = result(rbuf.check_slice, geo, rbuf.Span(offset, size))
    assert lib.nk_buf_check_slice(g, offset, size) == (0 if want[0] == "ok" else -want[1])


def test_threads_share_one_allocator_without_corrupting_it() -> None:
    """cffi drops the GIL in C calls; the wrapper's lock keeps the C pool consistent."""
    geo = rdev.Geometry(data_size=1 << 22, send_size=1 << 21, buf_size=64)
    pool = fbuf.SendAllocator(geo)

    def churn(seed: int) -> None:
        mine = []
        for i in range(3000):
            span = pool.alloc(1 + (seed * 7919 + i * 104729) % 1000)
            if span is not None:
                mine.append(span)
            if len(mine) > 20:
                pool.free(mine.pop(i % len(mine)).offset)
        for span in mine:
            pool.free(span.offset)

    assert in_threads(churn, 4) == []
    assert pool.live() == [] and pool.free_bytes() == pool.capacity == pool.largest_free()


def test_full_area_returns_none_not_an_error() -> None:
    geo = rdev.Geometry(data_size=1 << 13, send_size=1 << 12, buf_size=1 << 10)
    pool = fbuf.SendAllocator(geo)
    spans = [pool.alloc(1024) for _ in range(4)]
    assert [s.offset for s in spans if s] == [0, 1024, 2048, 3072]
    assert pool.alloc(1) is None  # BUF-7
    with pytest.raises(rbuf.BufError) as exc:
        pool.alloc(4097)  # BUF-9
    assert exc.value.errno == errno.EINVAL


def test_area_past_2_to_the_64_is_refused() -> None:
    """The one documented difference: the reference accepts an area whose offsets leave
    the u64 range an NQE's data_ptr can carry; the C allocator refuses it with EINVAL."""
    area = rbuf.Span(U64 - 4096, 8192)
    assert rbuf.Allocator(area, 4096).alloc(8192) == rbuf.Span(U64 - 4096, 8192)
    with pytest.raises(rbuf.BufError) as exc:
        fbuf.Allocator(area, 4096)
    assert exc.value.errno == errno.EINVAL
    top = fbuf.Allocator(rbuf.Span(U64 - 4096, 4096), 4096)  # ending at 2**64 is fine
    assert top.alloc(4096) == rbuf.Span(U64 - 4096, 4096)
