"""One single-producer / single-consumer NQE ring over shared memory (spec/device.md, RING-*).

Layout (RING-1), from the ring's offset; each index owns a cache line so the
two sides never write the same line:

    +0    tail  u32   written only by the producer (RING-2)
    +64   head  u32   written only by the consumer (RING-2)
    +128  flags u32   written only by the consumer: bit 0 NEED_WAKEUP (RING-6)
    +192  slots       ring_entries x 32-byte NQEs

Indices are free-running 32-bit counters; slot = index & (entries - 1)
(RING-3). The ring is empty when head == tail and full when
tail - head == entries (RING-4).

Memory ordering (RING-5). The spec asks for: producer writes the slot, then
store-release of tail; consumer load-acquire of tail, reads the slot, then
store-release of head. CPython cannot emit fences; this reference relies on
the program order of its stores and loads, which x86-64's TSO preserves for
exactly these store/store and load/load pairs. The C fast path uses C11
atomics. The one store->load pair (publish tail, then read NEED_WAKEUP; the
consumer's set NEED_WAKEUP, then re-read tail) needs a full fence, which the
Python reference approximates: a lost wake-up there costs at most one bounded
sleep, never a hang, because every sleeper in the reference runtime sleeps
with a timeout (RING-7).
"""

from __future__ import annotations

import struct
import sys
from typing import Final, Self

from .device import NQE_SLOT, RING_HEADER_SIZE, Geometry, RingId

TAIL: Final = 0
HEAD: Final = 64
FLAGS: Final = 128
SLOTS: Final = RING_HEADER_SIZE
NEED_WAKEUP: Final = 1
U32: Final = 1 << 32
#: Indices are loaded with the *native* format "I": one fixed-size 4-byte memcpy, a
#: single load ("<I" is assembled one byte at a time and could mix two values). Stores
#: go through a memoryview cast (see _store). The layout is little-endian (RING-1); a
#: big-endian host swaps the value in registers.
_u32 = struct.Struct("I")
_SWAP: Final = sys.byteorder != "little"
assert _u32.size == 4


class RingError(RuntimeError):
    """The ring's indices are inconsistent: the other side broke RING-4 (RING-10, SEC-6)."""


class Ring:
    """A view of one ring inside a device region. Either side may hold one.

    The producer calls :meth:`push`, the consumer :meth:`pop`; a process must
    act as only one of the two for a given ring (RING-2).
    """

    def __init__(self, buf: memoryview, offset: int, entries: int) -> None:
        if entries < 2 or entries & (entries - 1):
            raise ValueError(f"ring entries must be a power of two >= 2, got {entries}")
        if offset < 0 or offset + RING_HEADER_SIZE + entries * NQE_SLOT > len(buf):
            raise ValueError("ring does not fit in the region")
        self._buf = buf
        self._off = offset
        self.entries = entries
        self._mask = entries - 1

    @classmethod
    def of(cls, buf: memoryview, geo: Geometry, qset: int, ring: RingId) -> Self:
        """The ring ``ring`` of queue set ``qset`` in a device region."""
        return cls(buf, geo.ring_offset(qset, ring), geo.ring_entries)

    # -- raw index access ---------------------------------------------------
    def _load(self, field: int) -> int:
        value: int = _u32.unpack_from(self._buf, self._off + field)[0]  # one 4-byte load
        return int.from_bytes(value.to_bytes(4, "big"), "little") if _SWAP else value

    def _store(self, field: int, value: int) -> None:
        value %= U32
        if _SWAP:
            value = int.from_bytes(value.to_bytes(4, "little"), "big")
        # one 4-byte store: struct's pack_into zero-fills the field before it writes the
        # value, so the other process could read a transient 0; a memoryview item
        # assignment is a single memcpy of the 4 bytes
        at = self._off + field
        self._buf[at:at + 4].cast("I")[0] = value

    @property
    def tail(self) -> int:
        return self._load(TAIL)

    @property
    def head(self) -> int:
        return self._load(HEAD)

    def __len__(self) -> int:
        """NQEs published and not yet consumed (RING-4); RingError if impossible."""
        used = (self._load(TAIL) - self._load(HEAD)) % U32
        if used > self.entries:
            raise RingError(
                f"ring at {self._off:#x} has tail-head={used} > {self.entries} entries"
            )
        return used

    def free(self) -> int:
        """Slots the producer may fill now (RING-4)."""
        return self.entries - len(self)

    def _slot(self, index: int) -> int:
        return self._off + SLOTS + (index & self._mask) * NQE_SLOT

    # -- producer side --------------------------------------------------------
    def push(self, nqe: bytes) -> bool:
        """Publish one 32-byte NQE; False if the ring is full (RING-4). Producer only."""
        return self.push_many([nqe]) == 1

    def push_many(self, nqes: list[bytes]) -> int:
        """Publish as many NQEs as fit, in order, with one tail update (RING-8)."""
        for nqe in nqes:  # check them all before writing any slot
            if len(nqe) != NQE_SLOT:
                raise ValueError(f"an NQE is {NQE_SLOT} bytes, got {len(nqe)}")
        tail = self._load(TAIL)  # our own index: no ordering needed
        head = self._load(HEAD)  # load-acquire in C: the slots before head are free again
        used = (tail - head) % U32
        if used > self.entries:
            raise RingError(f"ring at {self._off:#x} has tail-head={used}")
        n = min(len(nqes), self.entries - used)
        for i in range(n):
            s = self._slot(tail + i)
            self._buf[s:s + NQE_SLOT] = nqes[i]
        if n:
            # store-release in C: the slot writes above become visible before the new tail
            self._store(TAIL, tail + n)
        return n

    def consumer_sleeping(self) -> bool:
        """After publishing: must the producer ring the consumer's bell? (RING-6)."""
        # C: atomic_thread_fence(seq_cst) between the tail store and this load
        return bool(self._load(FLAGS) & NEED_WAKEUP)

    # -- consumer side --------------------------------------------------------
    def pop(self) -> bytes | None:
        """Take the oldest NQE, or None if the ring is empty. Consumer only."""
        got = self.pop_many(1)
        return got[0] if got else None

    def pop_many(self, limit: int) -> list[bytes]:
        """Take up to ``limit`` NQEs in FIFO order with one head update (RING-8)."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")  # else head would move back
        head = self._load(HEAD)
        tail = self._load(TAIL)  # load-acquire in C: pairs with the producer's release
        used = (tail - head) % U32
        if used > self.entries:
            raise RingError(f"ring at {self._off:#x} has tail-head={used}")
        n = min(limit, used)
        out = []
        for i in range(n):
            s = self._slot(head + i)
            out.append(bytes(self._buf[s:s + NQE_SLOT]))
        if n:
            # store-release in C: our slot reads complete before the producer may reuse them
            self._store(HEAD, head + n)
        return out

    def prepare_sleep(self) -> bool:
        """Set NEED_WAKEUP, then re-check for work (RING-6).

        Returns True if the ring is still empty, so the caller may sleep on
        its bell; False if an NQE slipped in (NEED_WAKEUP is cleared again).
        """
        self._store(FLAGS, NEED_WAKEUP)
        # C: atomic_thread_fence(seq_cst): the flag store before the tail re-load
        if len(self):
            self._store(FLAGS, 0)
            return False
        return True

    def finish_sleep(self) -> None:
        """Clear NEED_WAKEUP after waking (RING-6, RING-11)."""
        self._store(FLAGS, 0)
