"""The C ring (fastpath/ring.py over include/nk/ring.h) against the reference ring.

In one process: random programs of ring calls, including raw corruption of
the indices, are applied to a C ring and a reference ring on two buffers; every
call must give the same result (or the same exception) and leave the same
bytes (RING-1..RING-11). A ring that skips one slot write is shown to be
caught by that check.

Across two processes: a producer and a consumer on one MAP_SHARED mapping of a
/dev/shm file, in all four mixes of C and reference, with random batch sizes,
random pauses and the NEED_WAKEUP handshake on a futex bell (RING-5, RING-6,
RING-9, DEV-9): every NQE arrives once, in order, and both sides finish
within a bound.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import random
import struct
import time
import types
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkernel.fastpath import bell as fbell
from netkernel.fastpath import device as fdev
from netkernel.fastpath import ring as fring
from netkernel.reference import bell as rbell
from netkernel.reference import device as rdev
from netkernel.reference import ring as rring

U32 = 1 << 32
FIELD = {"tail": rring.TAIL, "head": rring.HEAD, "flags": rring.FLAGS}


def nqe(seq: int) -> bytes:
    """32 bytes that differ for every seq (the ring never looks inside)."""
    return hashlib.blake2b(seq.to_bytes(8, "little"), digest_size=32).digest()


ops = st.one_of(
    st.tuples(st.just("push_many"), st.integers(0, 20)),
    st.tuples(st.just("push"), st.just(1)),
    st.tuples(st.just("pop_many"), st.integers(0, 20)),
    st.tuples(st.just("pop"), st.just(0)),
    st.tuples(st.sampled_from(["prepare_sleep", "finish_sleep", "consumer_sleeping", "len",
                               "free", "tail", "head"]), st.just(0)),
    st.tuples(st.just("corrupt"), st.tuples(st.sampled_from(sorted(FIELD)),
                                            st.integers(0, U32 - 1))),
    st.tuples(st.just("bad_nqe"), st.integers(0, 40)),
)


def call(r: Any, op: str, arg: Any, seq: int) -> Any:
    """One step on one ring: its result, or the exception's type name and message."""
    try:
        if op == "push_many":
            return r.push_many([nqe(seq + i) for i in range(arg)])
        if op == "push":
            return r.push(nqe(seq))
        if op == "pop_many":
            return r.pop_many(arg)
        if op == "bad_nqe":
            return r.push_many([nqe(seq), b"x" * arg])
        if op == "len":
            return len(r)
        if op in ("tail", "head"):
            return getattr(r, op)
        return getattr(r, op)()
    except (rring.RingError, ValueError) as exc:
        return (type(exc).__name__, str(exc))


def run_program(impl: type, entries: int, start: int, offset: int,
                program: list[tuple[str, Any]]) -> None:
    """Apply ``program`` to ``impl`` and to the reference ring; assert they never differ."""
    size = offset + rring.SLOTS + 32 * entries + 64
    bufs = [bytearray(size), bytearray(size)]
    for b in bufs:
        for field in (rring.TAIL, rring.HEAD):
            b[offset + field:offset + field + 4] = start.to_bytes(4, "little")
    rings = [impl(memoryview(bufs[0]), offset, entries),
             rring.Ring(memoryview(bufs[1]), offset, entries)]
    for step, (op, arg) in enumerate(program):
        seq = step * 64
        if op == "corrupt":  # what a hostile peer does to the shared indices (RING-10)
            field, value = arg
            for b in bufs:
                at = offset + FIELD[field]
                b[at:at + 4] = value.to_bytes(4, "little")
            continue
        got, want = (call(r, op, arg, seq) for r in rings)
        assert got == want, f"step {step} {op}({arg}): {got!r} != reference {want!r}"
        assert bufs[0] == bufs[1], f"step {step} {op}({arg}): the bytes differ"


starts = st.one_of(st.just(0), st.integers(U32 - 40, U32 - 1), st.integers(0, U32 - 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.sampled_from([2, 4, 8, 16]), start=starts,
       offset=st.sampled_from([0, 64, 640]), program=st.lists(ops, max_size=60))
def test_c_ring_matches_the_reference_step_by_step(entries: int, start: int, offset: int,
                                                   program: list[tuple[str, Any]]) -> None:
    run_program(fring.Ring, entries, start, offset, program)


class SkipsIndex3(fring.Ring):
    """A broken ring: push_many leaves the slot of index 3 unwritten."""

    def push_many(self, nqes: list[bytes]) -> int:
        tail = self.tail
        slot = self._off + rring.SLOTS + (3 & self._mask) * 32
        before = bytes(self._buf[slot:slot + 32])
        n = super().push_many(nqes)
        if (3 - tail) % U32 < n:
            self._buf[slot:slot + 32] = before
        return n


def test_the_differential_check_catches_a_ring_that_skips_a_slot() -> None:
    @settings(max_examples=300, database=None, derandomize=True, deadline=None)
    @given(entries=st.sampled_from([2, 4, 8, 16]), start=starts,
           offset=st.sampled_from([0, 64, 640]), program=st.lists(ops, max_size=60))
    def differential(entries: int, start: int, offset: int,
                     program: list[tuple[str, Any]]) -> None:
        run_program(SkipsIndex3, entries, start, offset, program)

    with pytest.raises(AssertionError, match="the bytes differ"):
        differential()


def test_ring_keeps_its_region_mapped_while_it_lives() -> None:
    """A mapping cannot be closed under a live C ring; dropping the ring allows it."""
    mm = mmap.mmap(-1, 4096)
    buf = memoryview(mm)
    r = fring.Ring(buf, 0, 8)
    assert r.push(nqe(1))
    with pytest.raises(BufferError):
        buf.release()
    del r
    buf.release()
    mm.close()


def test_misaligned_ring_is_refused() -> None:
    with pytest.raises(ValueError, match="aligned"):
        fring.Ring(memoryview(bytearray(4096)), 2, 8)


# -- two processes -------------------------------------------------------------------------------

IMPLS: dict[str, tuple[Any, Any]] = {
    "c": (fring, fbell), "ref": (rring, rbell),
    "broken": (types.SimpleNamespace(Ring=SkipsIndex3), fbell),
}
GEOS = {seed: rdev.Geometry(n_qsets=1, ring_entries=entries, data_size=1 << 13,
                           send_size=1 << 12, buf_size=1 << 12)
        for seed, entries in ((1, 8), (2, 2))}
LIMIT = 60.0  # seconds: a side still running then has hung


def _open(path: str, impl: str) -> tuple[Any, Any]:
    """A ring and its bell over a new mapping (the views keep it mapped)."""
    ring_mod, bell_mod = IMPLS[impl]
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, 0)
    os.close(fd)
    buf = memoryview(mm)
    geo = (fdev if impl == "c" else rdev).read_header(buf)
    r = ring_mod.Ring.of(buf, geo, 0, rdev.RingId.JOB)
    bell = bell_mod.Bell(buf, geo.bell_offset(0, rdev.Bell.ENGINE), bell_mod.buffer_address(buf))
    return r, bell


def _producer(path: str, impl: str, total: int, seed: int, conn: Any) -> None:
    try:
        r, bell = _open(path, impl)
        _, bell_mod = IMPLS[impl]
        rng = random.Random(seed)
        seq = rings = 0
        while seq < total:
            batch = [struct.pack("<Q24x", seq + i)
                     for i in range(min(rng.randint(1, 12), total - seq))]
            n = r.push_many(batch)
            seq += n
            if n:
                rings += bell_mod.notify(r, bell)  # RING-6 producer side, then DEV-9
            else:
                time.sleep(0)  # full: no wake-up for space, retry
            if rng.random() < 0.002:
                time.sleep(rng.choice([0.0005, 0.003, 0.06]))  # the consumer runs dry
        conn.send(("done", seq, rings))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", repr(exc)))


def _consumer(path: str, impl: str, total: int, seed: int, conn: Any) -> None:
    try:
        r, bell = _open(path, impl)
        _, bell_mod = IMPLS[impl]
        rng = random.Random(seed + 1)
        expect = disorder = sleeps = idle = 0
        while expect < total:
            got = r.pop_many(rng.randint(1, 12))
            for item in got:
                disorder += struct.unpack("<Q24x", item)[0] != expect
                expect += 1
            if got:
                idle = 0
                if rng.random() < 0.001:
                    time.sleep(0.002)  # the producer finds the ring full
                continue
            idle += 1
            if idle > 20:  # poll a little, then sleep on the bell (RING-7)
                sleeps += 1
                bell_mod.sleep_until_work(bell, [r])
                idle = 0
        conn.send(("done", expect, disorder, sleeps, len(r)))
    except BaseException as exc:
        conn.send(("error", repr(exc)))


def run_pair(producer: str, consumer: str, seed: int, total: int) -> tuple[Any, Any]:
    """A producer and a consumer process on one /dev/shm device; what each reported."""
    path = f"/dev/shm/nk-test-ring-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    geo = GEOS[seed]
    os.ftruncate(fd, geo.total_size)
    with mmap.mmap(fd, geo.total_size) as mm:
        fdev.init_header(memoryview(mm), geo)
    os.close(fd)
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    procs = [ctx.Process(target=_consumer, args=(path, consumer, total, seed, pipes[0][1])),
             ctx.Process(target=_producer, args=(path, producer, total, seed, pipes[1][1]))]
    try:
        for p in procs:
            p.start()
        results = []
        deadline = time.monotonic() + LIMIT
        for recv, _ in pipes:
            assert recv.poll(max(0.0, deadline - time.monotonic())), "a side hung"
            results.append(recv.recv())
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        os.unlink(path)
    return results[0], results[1]


@pytest.mark.parametrize("seed", sorted(GEOS))
@pytest.mark.parametrize(("producer", "consumer"),
                         [("c", "c"), ("c", "ref"), ("ref", "c"), ("ref", "ref")])
def test_two_processes_every_nqe_once_in_order(producer: str, consumer: str,
                                              seed: int) -> None:
    total = 30_000 if "ref" not in (producer, consumer) else 8_000
    (cstate, *cres), (pstate, *pres) = run_pair(producer, consumer, seed, total)
    assert cstate == "done", cres
    assert pstate == "done", pres
    seen, disorder, sleeps, left = cres
    assert (seen, disorder, left) == (total, 0, 0)
    assert pres[0] == total
    assert sleeps > 0, "the consumer never went to sleep: the handshake was not exercised"


def test_two_processes_check_catches_a_ring_that_skips_a_slot() -> None:
    """The same check, with a producer that leaves the slot of index 3 unwritten."""
    (cstate, *cres), (pstate, *_) = run_pair("broken", "c", 1, 2000)
    assert (cstate, pstate) == ("done", "done")
    seen, disorder, _, _ = cres
    assert seen == 2000 and disorder == 1  # exactly NQE 3 arrived wrong
