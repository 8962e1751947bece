"""The ``ring`` role over C: one SPSC NQE ring in shared memory (spec/device.md RING-*).

The same class, constructor and methods as :mod:`netkernel.reference.ring`,
operating on the same bytes of the same region; every operation is one call
into the inline C ops of csrc/include/nk/ring.h, which carry the C11
release/acquire stores and loads and the seq_cst fences of RING-5 and RING-6
that the Python reference can only approximate.

The ring holds a cffi view of the region (``ffi.from_buffer``), which keeps the
buffer exported, and so mapped, for as long as the ring lives: a mapping whose
rings are still alive cannot be unmapped under them (``mmap.close`` raises
BufferError instead, which :class:`~netkernel.reference.shm.DeviceMap` tolerates).
"""

from __future__ import annotations

from typing import Any, Final

from netkernel.reference import ring as _ref
from netkernel.reference.device import NQE_SLOT
from netkernel.reference.ring import FLAGS, HEAD, NEED_WAKEUP, SLOTS, TAIL, U32, RingError

from ._lib import ffi, lib

__all__ = ["FLAGS", "HEAD", "NEED_WAKEUP", "SLOTS", "TAIL", "U32", "Ring", "RingError"]

#: pop_many batches up to this size copy into a buffer the ring keeps
_BATCH: Final = 64


class Ring(_ref.Ring):
    """A view of one ring inside a device region. Either side may hold one.

    The reference's :class:`~netkernel.reference.ring.Ring` (its checks of the
    size and place, :meth:`of`) with every operation in C. The producer calls
    :meth:`push`, the consumer :meth:`pop`; a process must act as only one of
    the two for a given ring (RING-2).
    """

    def __init__(self, buf: memoryview, offset: int, entries: int) -> None:
        super().__init__(buf, offset, entries)
        region = ffi.from_buffer(buf, require_writable=True)
        base = region + offset
        if int(ffi.cast("uintptr_t", base)) % 4:
            raise ValueError(f"ring at {offset:#x} is not 4-byte aligned: its indices are atomics")
        self._region = region  # keeps the buffer exported (mapped) while the ring lives
        self._r: Any = ffi.new("struct nk_ring *")
        # where pop_many copies NQEs out; one consumer per ring (RING-2), so one buffer
        self._dst: Any = ffi.new("char[]", min(entries, _BATCH) * NQE_SLOT)
        lib.nk_ring_init(self._r, base, entries)

    def _corrupt(self, extra: str = "") -> RingError:
        used = (self.tail - self.head) % U32
        return RingError(f"ring at {self._off:#x} has tail-head={used}{extra}")

    @property
    def tail(self) -> int:
        return int(self._r.tail[0])

    @property
    def head(self) -> int:
        return int(self._r.head[0])

    def __len__(self) -> int:
        """NQEs published and not yet consumed (RING-4); RingError if impossible."""
        used = lib.nk_ring_count(self._r)
        if used < 0:
            raise self._corrupt(f" > {self.entries} entries")
        return int(used)

    def free(self) -> int:
        """Slots the producer may fill now (RING-4)."""
        return self.entries - len(self)

    # -- producer side --------------------------------------------------------
    def push(self, nqe: bytes) -> bool:
        """Publish one 32-byte NQE; False if the ring is full (RING-4). Producer only."""
        if len(nqe) != NQE_SLOT:
            raise ValueError(f"an NQE is {NQE_SLOT} bytes, got {len(nqe)}")
        pushed = lib.nk_ring_push_bytes(self._r, nqe if type(nqe) is bytes else bytes(nqe), 1)
        if pushed < 0:
            raise self._corrupt()
        return bool(pushed == 1)

    def push_many(self, nqes: list[bytes]) -> int:
        """Publish as many NQEs as fit, in order, with one tail update (RING-8)."""
        for nqe in nqes:  # check them all before writing any slot
            if len(nqe) != NQE_SLOT:
                raise ValueError(f"an NQE is {NQE_SLOT} bytes, got {len(nqe)}")
        n = min(len(nqes), self.entries)  # more can never fit
        # one bytes object goes to C as its own buffer, with no copy
        src = nqes[0] if n == 1 and type(nqes[0]) is bytes else b"".join(nqes[:n])
        pushed = lib.nk_ring_push_bytes(self._r, src, n)
        if pushed < 0:
            raise self._corrupt()
        return int(pushed)

    def consumer_sleeping(self) -> bool:
        """After publishing: must the producer ring the consumer's bell? (RING-6)."""
        return bool(lib.nk_ring_consumer_sleeping(self._r))  # seq_cst fence, then flags

    # -- consumer side --------------------------------------------------------
    def pop(self) -> bytes | None:
        """Take the oldest NQE, or None if the ring is empty. Consumer only."""
        got = lib.nk_ring_pop_bytes(self._r, self._dst, 1)
        if got < 0:
            raise self._corrupt()
        return ffi.unpack(self._dst, NQE_SLOT) if got else None

    def pop_many(self, limit: int) -> list[bytes]:
        """Take up to ``limit`` NQEs in FIFO order with one head update (RING-8)."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")  # else head would move back
        n = min(limit, self.entries)
        dst = self._dst if n <= _BATCH else ffi.new("char[]", n * NQE_SLOT)
        got = lib.nk_ring_pop_bytes(self._r, dst, n)
        if got < 0:
            raise self._corrupt()
        if got == 1:
            return [ffi.unpack(dst, NQE_SLOT)]
        raw = ffi.unpack(dst, got * NQE_SLOT)
        return [raw[i:i + NQE_SLOT] for i in range(0, got * NQE_SLOT, NQE_SLOT)]

    def prepare_sleep(self) -> bool:
        """Set NEED_WAKEUP, then re-check for work (RING-6).

        Returns True if the ring is still empty, so the caller may sleep on
        its bell; False if an NQE slipped in (NEED_WAKEUP is cleared again).
        """
        rc = lib.nk_ring_prepare_sleep(self._r)  # flag, seq_cst fence, tail re-load
        if rc < 0:
            raise self._corrupt(f" > {self.entries} entries")
        return bool(rc == 1)

    def finish_sleep(self) -> None:
        """Clear NEED_WAKEUP after waking (RING-6, RING-11)."""
        lib.nk_ring_finish_sleep(self._r)
