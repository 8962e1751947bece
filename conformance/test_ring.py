"""Rings (spec/device.md, RING-*): layout, ownership, FIFO, wrap-around, the wake-up handshake.

Every test asks for the ``ring`` role first, so a target without rings is
reported *not applicable* for every RING requirement. Indices are read and
written raw at the offsets of RING-1, never through the ring under test, so
a test can start a ring near 2**32 or corrupt it the way a hostile peer would.

The last test runs a producer and a consumer in two real processes over a
memfd, with futex bells (DEV-9), and checks FIFO order and a checksum of
100k NQEs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import multiprocessing
import os
import random
import struct
import time
from collections import deque
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

TAIL, HEAD, FLAGS, SLOTS = 0, 64, 128, 192
NEED_WAKEUP = 1
U32 = 1 << 32
NQE = struct.Struct("<BBBIQQIH3x")  # a SEND request; the ring never looks inside


def nqe(seq: int) -> bytes:
    return NQE.pack(0x06, seq % 7, 0, 1 + seq % 0xFFFF_FFFE, seq, (seq * 0x9E37_79B9) % 2**64,
                    seq % 4096, seq & 0xFFFF)


def ring_bytes(entries: int) -> int:
    return SLOTS + 32 * entries


def load(buf: Any, off: int, field: int) -> int:
    return int.from_bytes(bytes(buf[off + field:off + field + 4]), "little")


def store(buf: Any, off: int, field: int, value: int) -> None:
    buf[off + field:off + field + 4] = (value % U32).to_bytes(4, "little")


def make_ring(ring: Any, entries: int, start: int = 0, offset: int = 0,
              head: int | None = None) -> tuple[Any, bytearray]:
    buf = bytearray(offset + ring_bytes(entries) + 64)
    store(buf, offset, TAIL, start)
    store(buf, offset, HEAD, start if head is None else head)
    return ring.Ring(memoryview(buf), offset, entries), buf


def changed(before: bytes, after: bytes) -> set[int]:
    return {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}


def within(spans: list[tuple[int, int]]) -> set[int]:
    return {i for start, n in spans for i in range(start, start + n)}


# -- RING-1, RING-3, RING-4: layout, wrap, full and empty ----------------------------------------

@pytest.mark.req("RING-1", "RING-3")
@given(entries=st.sampled_from([2, 4, 8, 64]), start=st.integers(0, U32 - 1),
       offset=st.sampled_from([0, 64, 4096 + 128]), n=st.integers(1, 64))
def test_slot_of_index_i_is_i_mod_entries(ring: Any, entries: int, start: int, offset: int,
                                          n: int) -> None:
    r, buf = make_ring(ring, entries, start, offset)
    n = min(n, entries)
    sent = [nqe(start + i) for i in range(n)]
    assert r.push_many(sent) == n
    assert load(buf, offset, TAIL) == (start + n) % U32
    for i, item in enumerate(sent):
        slot = offset + SLOTS + 32 * ((start + i) % entries)
        assert bytes(buf[slot:slot + 32]) == item
    assert r.pop_many(n) == sent
    assert load(buf, offset, HEAD) == (start + n) % U32


@pytest.mark.req("RING-3", "RING-9")
@given(entries=st.sampled_from([2, 4, 16]), before=st.integers(1, 40), total=st.integers(1, 200))
def test_indices_wrap_at_2_to_the_32(ring: Any, entries: int, before: int, total: int) -> None:
    start = U32 - before
    r, buf = make_ring(ring, entries, start)
    sent: deque[bytes] = deque()
    got: list[bytes] = []
    for i in range(total):
        assert r.push(nqe(i))
        sent.append(nqe(i))
        if len(sent) == entries or i % 3 == 0:
            got.extend(r.pop_many(entries))
            sent.clear()
    got.extend(r.pop_many(entries))
    assert got == [nqe(i) for i in range(total)]
    assert load(buf, 0, TAIL) == load(buf, 0, HEAD) == (start + total) % U32


@pytest.mark.req("RING-4")
@given(entries=st.sampled_from([2, 4, 8, 32]), start=st.integers(0, U32 - 1))
def test_full_and_empty(ring: Any, entries: int, start: int) -> None:
    r, buf = make_ring(ring, entries, start)
    assert r.pop() is None and r.pop_many(5) == [] and len(r) == 0 and r.free() == entries
    for i in range(entries):
        assert r.push(nqe(i))
    assert len(r) == entries and r.free() == 0
    snapshot = bytes(buf)
    assert not r.push(nqe(99))
    assert r.push_many([nqe(98), nqe(97)]) == 0
    assert bytes(buf) == snapshot, "a full ring must not be written"
    assert r.pop() == nqe(0)
    assert r.free() == 1 and r.push(nqe(entries))
    assert r.pop_many(entries + 5) == [nqe(i) for i in range(1, entries + 1)]
    assert r.pop() is None


@pytest.mark.req("RING-7")
@pytest.mark.parametrize("entries", [2, 64])
def test_no_ring_operation_waits(ring: Any, entries: int) -> None:
    """Full and empty return at once: a ring call never sleeps for the other side."""
    r, _ = make_ring(ring, entries)
    started = time.monotonic()
    for _ in range(20):
        assert r.pop() is None and r.pop_many(8) == []
        assert r.prepare_sleep()
        r.finish_sleep()
    assert r.push_many([nqe(i) for i in range(entries)]) == entries
    for _ in range(20):
        assert not r.push(nqe(0)) and r.push_many([nqe(1)]) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 0.5, f"80 calls on a full or empty ring took {elapsed:.3f} s"


@pytest.mark.req("RING-8")
@given(entries=st.sampled_from([4, 16]), used=st.integers(0, 16), batch=st.integers(0, 40),
       limit=st.integers(0, 40))
def test_batches_take_what_fits_in_order(ring: Any, entries: int, used: int, batch: int,
                                         limit: int) -> None:
    r, _ = make_ring(ring, entries)
    used = min(used, entries)
    assert r.push_many([nqe(i) for i in range(used)]) == used
    items = [nqe(100 + i) for i in range(batch)]
    n = r.push_many(items)
    assert n == min(batch, entries - used)
    want = ([nqe(i) for i in range(used)] + items[:n])
    assert r.pop_many(limit) == want[:limit]
    assert r.pop_many(entries) == want[limit:]


# -- RING-10: impossible indices -------------------------------------------------------------------

@pytest.mark.req("RING-10")
@given(entries=st.sampled_from([2, 8, 64]), head=st.integers(0, U32 - 1), data=st.data())
def test_impossible_indices_raise_and_touch_nothing(ring: Any, entries: int, head: int,
                                                    data: st.DataObject) -> None:
    used = data.draw(st.integers(entries + 1, U32 - 1), label="tail - head")
    r, buf = make_ring(ring, entries, (head + used) % U32, head=head)
    snapshot = bytes(buf)
    for op in (lambda: r.push(nqe(1)), lambda: r.push_many([nqe(1), nqe(2)]), r.pop,
               lambda: r.pop_many(3), lambda: len(r), r.free):
        with pytest.raises(ring.RingError):
            op()
        assert bytes(buf) == snapshot
    with pytest.raises(ring.RingError):
        r.prepare_sleep()


# -- the stateful machine: RING-1..RING-4, RING-6, RING-8, RING-9, RING-11 -------------------------

class RingMachine(RuleBasedStateMachine):
    """One producer and one consumer, interleaved at random, against a deque.

    Every step also checks which bytes it changed (RING-2): the producer only
    its tail and the slots it filled, the consumer only its head or flags.
    """

    impl: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.model: deque[bytes] = deque()
        self.sleeping = False
        self.seq = 0

    @initialize(entries=st.sampled_from([2, 4, 8, 16]),
                start=st.one_of(st.just(0), st.integers(U32 - 40, U32 - 1),
                                st.integers(0, U32 - 1)),
                offset=st.sampled_from([0, 64, 640]))
    def setup(self, entries: int, start: int, offset: int) -> None:
        self.entries, self.off = entries, offset
        self.ring, self.buf = make_ring(self.impl, entries, start, offset)
        self.tail = self.head = start

    def _next(self) -> bytes:
        self.seq += 1
        return nqe(self.seq)

    def _slots(self, index: int, n: int) -> list[tuple[int, int]]:
        return [(self.off + SLOTS + 32 * ((index + i) % self.entries), 32) for i in range(n)]

    @rule(n=st.integers(0, 20))
    def produce(self, n: int) -> None:
        items = [self._next() for _ in range(n)]
        before = bytes(self.buf)
        # n == 1 goes through push(), the rest through push_many()
        pushed = int(bool(self.ring.push(items[0]))) if n == 1 else self.ring.push_many(items)
        assert pushed == min(n, self.entries - len(self.model))  # RING-4, RING-8
        assert changed(before, bytes(self.buf)) <= within(
            [(self.off + TAIL, 4), *self._slots(self.tail, pushed)])  # RING-2
        for i, item in enumerate(items[:pushed]):  # RING-1
            s = self._slots(self.tail, pushed)[i][0]
            assert bytes(self.buf[s:s + 32]) == item
        self.model.extend(items[:pushed])
        self.tail = (self.tail + pushed) % U32
        if pushed:
            # RING-6: a sleeping consumer is always seen; RING-11: an awake one never is
            assert self.ring.consumer_sleeping() == self.sleeping

    @precondition(lambda self: not self.sleeping)
    @rule(limit=st.integers(0, 20))
    def consume(self, limit: int) -> None:
        before = bytes(self.buf)
        if limit == 1:
            one = self.ring.pop()
            got = [] if one is None else [one]
        else:
            got = self.ring.pop_many(limit)
        want = [self.model.popleft() for _ in range(min(limit, len(self.model)))]
        assert got == want  # RING-9
        assert changed(before, bytes(self.buf)) <= within([(self.off + HEAD, 4)])  # RING-2
        self.head = (self.head + len(got)) % U32

    @precondition(lambda self: not self.sleeping)
    @rule()
    def try_to_sleep(self) -> None:
        before = bytes(self.buf)
        slept = self.ring.prepare_sleep()
        assert slept == (not self.model)  # RING-6: never sleeps on a non-empty ring
        assert changed(before, bytes(self.buf)) <= within([(self.off + FLAGS, 4)])
        assert load(self.buf, self.off, FLAGS) & NEED_WAKEUP == (NEED_WAKEUP if slept else 0)
        self.sleeping = slept

    @precondition(lambda self: self.sleeping)
    @rule()
    def wake(self) -> None:
        self.ring.finish_sleep()
        assert load(self.buf, self.off, FLAGS) & NEED_WAKEUP == 0  # RING-11
        assert not self.ring.consumer_sleeping()
        self.sleeping = False

    @invariant()
    def indices_agree(self) -> None:
        if not hasattr(self, "ring"):
            return
        assert load(self.buf, self.off, TAIL) == self.tail  # RING-3: free-running
        assert load(self.buf, self.off, HEAD) == self.head
        assert (self.tail - self.head) % U32 == len(self.model) == len(self.ring)  # RING-4
        assert self.ring.free() == self.entries - len(self.model)


@pytest.mark.req("RING-1", "RING-2", "RING-3", "RING-4", "RING-6", "RING-8", "RING-9",
                 "RING-11", "NQE-16")
def test_random_interleavings_against_a_deque(ring: Any) -> None:
    machine = type("TargetRingMachine", (RingMachine,), {"impl": ring})
    run_state_machine_as_test(machine)


@pytest.mark.req("RING-6", "RING-11")
@given(entries=st.sampled_from([2, 8]), start=st.integers(0, U32 - 1))
def test_wakeup_handshake_both_orders(ring: Any, entries: int, start: int) -> None:
    """Push before the consumer's re-check: no sleep. Push after: the producer sees the flag."""
    r, buf = make_ring(ring, entries, start)
    assert r.push(nqe(1))
    assert not r.prepare_sleep()  # work slipped in: no sleep, flag cleared
    assert load(buf, 0, FLAGS) & NEED_WAKEUP == 0 and not r.consumer_sleeping()
    assert r.pop() == nqe(1)
    assert r.prepare_sleep()  # empty: sleep
    assert r.push(nqe(2))
    assert r.consumer_sleeping()  # the producer must ring the bell
    r.finish_sleep()
    assert not r.consumer_sleeping()
    assert r.pop() == nqe(2)


# -- two real processes ----------------------------------------------------------------------------

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98}.get(os.uname().machine)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
FUTEX_WAIT, FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, seconds: float) -> bool:
    """FUTEX_WAIT (shared); False on timeout. The harness's bell, per DEV-9."""
    ts = _Timespec(0, int(seconds * 1e9))
    rc = _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), FUTEX_WAIT,
                       ctypes.c_uint32(expected), ctypes.byref(ts), None, 0)
    return rc == 0 or ctypes.get_errno() != errno.ETIMEDOUT


def futex_wake(addr: int) -> None:
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), FUTEX_WAKE, 0x7FFF_FFFF, None, None, 0)


def _consumer(ring: Any, device: Any, fd: int, total: int, conn: Any) -> None:
    """Child: map the device anew, consume ``total`` NQEs, report order, digest and sleeps."""
    try:
        mm = mmap.mmap(fd, 0)
        buf = memoryview(mm)
        geo = device.read_header(buf)
        r = ring.Ring(buf, geo.ring_offset(0, device.RingId.JOB), geo.ring_entries)
        bell = geo.bell_offset(0, device.Bell.ENGINE)
        probe = ctypes.c_char.from_buffer(mm, bell)
        addr = ctypes.addressof(probe)
        digest, seen, sleeps, lost, disorder = hashlib.sha256(), 0, 0, 0, 0
        idle = 0
        while seen < total:
            got = r.pop_many(64)
            for item in got:
                disorder += item != nqe(seen)
                digest.update(item)
                seen += 1
            if got:
                idle = 0
                continue
            idle += 1
            if idle < 50:  # poll a little before sleeping (RING-7)
                continue
            value = load(buf, bell, 0)  # read the bell before the re-check (DEV-9)
            if r.prepare_sleep():
                sleeps += 1
                woken = futex_wait(addr, value, 0.05)
                r.finish_sleep()
                lost += (not woken) and len(r) > 0
            idle = 0
        del probe
        conn.send((seen, digest.hexdigest(), sleeps, lost, disorder))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", repr(exc)))


@pytest.mark.req("RING-5", "RING-6", "RING-9", "DEV-1", "DEV-9", "NQE-16")
@pytest.mark.parametrize(("entries", "total"), [(256, 100_000), (4, 20_000)])
def test_two_processes_over_shared_memory(ring: Any, device: Any, entries: int,
                                          total: int) -> None:
    if _SYS_FUTEX is None:
        pytest.skip(f"not applicable: no futex syscall number for {os.uname().machine}")
    geo = device.Geometry(n_qsets=1, ring_entries=entries, data_size=1 << 16,
                          send_size=1 << 15, buf_size=1 << 12)
    fd = os.memfd_create("nk-ring-conformance")
    os.ftruncate(fd, geo.total_size)
    mm = mmap.mmap(fd, geo.total_size)
    buf = memoryview(mm)
    device.init_header(buf, geo)
    r = ring.Ring(buf, geo.ring_offset(0, device.RingId.JOB), geo.ring_entries)
    bell = geo.bell_offset(0, device.Bell.ENGINE)
    probe = ctypes.c_char.from_buffer(mm, bell)
    addr = ctypes.addressof(probe)

    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_consumer, args=(ring, device, fd, total, there), daemon=True)
    child.start()
    rng = random.Random(total)
    digest, rings = hashlib.sha256(), 0
    deadline = time.monotonic() + 20
    try:
        seq, next_pause = 0, total // 10
        while seq < total:
            if time.monotonic() > deadline or (here.poll() and seq < total):
                pytest.fail(f"producer stuck at {seq}/{total}; consumer said"
                            f" {here.recv() if here.poll() else 'nothing'}")
            batch = [nqe(seq + i) for i in range(min(rng.randint(1, 48), total - seq))]
            n = r.push_many(batch)
            for item in batch[:n]:
                digest.update(item)
            seq += n
            if n and r.consumer_sleeping():  # RING-6 producer side, then the bell (DEV-9)
                store(buf, bell, 0, load(buf, bell, 0) + 1)
                futex_wake(addr)
                rings += 1
            if n < len(batch):
                os.sched_yield()  # full: retry later, there is no wake-up for space
            if seq >= next_pause:
                next_pause += total // 10
                time.sleep(0.005)  # let the consumer run dry and go to sleep
        assert here.poll(max(1.0, deadline - time.monotonic())), "consumer did not finish"
        result = here.recv()
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
        del probe, r
        buf.release()
        with contextlib.suppress(BufferError):  # a view still referenced: the GC unmaps it
            mm.close()
        os.close(fd)
    assert result[0] != "error", result[1]
    seen, hexdigest, sleeps, lost, disorder = result
    assert (seen, disorder) == (total, 0)
    assert hexdigest == digest.hexdigest()
    assert sleeps > 0 and rings > 0, "the consumer should have slept and been woken"
    assert lost <= max(1, sleeps // 10), \
        f"{lost} of {sleeps} sleeps ended by timeout with work waiting: lost wake-ups"
