"""Wake-up bells: futex words in a device region (spec/device.md, DEV-9, RING-6, RING-7).

A queue set holds two bell words, each on its own cache line: DEVICE (the
device side sleeps on it) and ENGINE (the CoreEngine sleeps on it). The
protocol, producer and consumer, in the order that keeps wake-ups from being
lost (RING-6):

    producer                            consumer
    ring.push(nqe)   (publish tail)     v = bell.value()
    if ring.consumer_sleeping():        if ring.prepare_sleep():   (set NEED_WAKEUP, re-check tail)
        bell.ring()  (+1, FUTEX_WAKE)       bell.wait(v, timeout)   (FUTEX_WAIT while word == v)
                                        ring.finish_sleep()

The consumer reads the word *before* it re-checks the ring, so a producer
that publishes after the re-check also changes the word, and FUTEX_WAIT
returns at once instead of sleeping. Every wait has a timeout (RING-7): the
Python reference cannot emit the store->load fence the protocol needs, so a
lost wake-up must cost at most one bounded sleep, never a hang.

The words are shared between processes (the device is a file mapped
MAP_SHARED), so the futexes are the non-private kind. This module is the only
place that makes futex system calls; it goes through libc's ``syscall`` with
ctypes, which releases the GIL while the thread sleeps.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

#: Longest single sleep anywhere in the reference runtime (RING-7).
MAX_SLEEP: Final = 0.05

_SYS_FUTEX: Final[dict[str, int]] = {"x86_64": 202, "aarch64": 98, "riscv64": 98}
_SYS_FUTEX_WAITV: Final = 449  # the same number on every architecture (Linux >= 5.16)
FUTEX_WAIT: Final = 0
FUTEX_WAKE: Final = 1
FUTEX_32: Final = 2  # futex_waitv: the word is 32 bits; no FUTEX_PRIVATE_FLAG (shared)
CLOCK_MONOTONIC: Final = 1
WAITV_MAX: Final = 128  # FUTEX_WAITV_MAX in the kernel
WAKE_ALL: Final = 0x7FFF_FFFF
U32: Final = 1 << 32


class SleepingRing(Protocol):
    """What the wake-up protocol uses of a ring (:class:`~netkernel.reference.ring.Ring`)."""

    def consumer_sleeping(self) -> bool: ...
    def prepare_sleep(self) -> bool: ...
    def finish_sleep(self) -> None: ...


class Wakeable(Protocol):
    """What the wake-up protocol uses of a bell: :class:`Bell`, or the fast path's."""

    def value(self) -> int: ...
    def ring(self) -> int: ...
    def wait(self, expected: int, timeout: float = MAX_SLEEP) -> bool: ...


_u32 = struct.Struct("<I")
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _FutexWaitv(ctypes.Structure):
    _fields_ = [("val", ctypes.c_uint64), ("uaddr", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


def _sys_futex() -> int:
    machine = platform.machine()
    try:
        return _SYS_FUTEX[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"no futex syscall number known for {machine}") from None


_SYS_FUTEX_NR: Final = _sys_futex()


def _timespec(seconds: float) -> _Timespec:
    seconds = max(0.0, seconds)
    whole = int(seconds)
    return _Timespec(whole, int((seconds - whole) * 1e9))


def buffer_address(buf: memoryview) -> int:
    """The virtual address of ``buf[0]`` in this process (a writable, mapped buffer)."""
    probe = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe  # drop the export at once so the mapping can be closed later


class Bell:
    """One 32-bit bell word at ``offset`` of a mapped region whose base is at ``base``.

    ``base`` is :func:`buffer_address` of ``buf``; the kernel checks every
    address it is handed, so a bell used after its region was unmapped gets
    EFAULT (raised as OSError), never a crash.
    """

    def __init__(self, buf: memoryview, offset: int, base: int) -> None:
        if offset % 4 or not 0 <= offset <= len(buf) - 4:
            raise ValueError(f"bell offset {offset} is not an aligned word inside the region")
        self._buf = buf
        self.offset = offset
        self.address = base + offset

    def value(self) -> int:
        """The word now: read it before the re-check of the rings (RING-6)."""
        value: int = _u32.unpack_from(self._buf, self.offset)[0]
        return value

    def ring(self) -> int:
        """Change the word and wake every sleeper on it; returns how many woke."""
        _u32.pack_into(self._buf, self.offset, (self.value() + 1) % U32)
        woken: int = _syscall(_SYS_FUTEX_NR, ctypes.c_void_p(self.address), FUTEX_WAKE,
                              WAKE_ALL, None, None, 0)
        if woken < 0:
            _raise_errno("FUTEX_WAKE")
        return woken

    def wait(self, expected: int, timeout: float = MAX_SLEEP) -> bool:
        """Sleep while the word equals ``expected``, at most ``timeout`` seconds (RING-7).

        Returns True if the word changed or a wake arrived (including the
        word having changed before the call), False on timeout. An interrupted
        sleep (EINTR) counts as a wake: callers re-check their rings anyway.
        """
        ts = _timespec(min(timeout, MAX_SLEEP))
        rc = _syscall(_SYS_FUTEX_NR, ctypes.c_void_p(self.address), FUTEX_WAIT,
                      ctypes.c_uint32(expected % U32), ctypes.byref(ts), None, 0)
        if rc == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            return True
        if err == errno.ETIMEDOUT:
            return False
        raise OSError(err, f"FUTEX_WAIT: {os.strerror(err)}")


def wait_any(bells: Sequence[tuple[Bell, int]], timeout: float = MAX_SLEEP) -> int | None:
    """Sleep until any bell's word differs from its expected value, or ``timeout`` passes.

    One futex_waitv(2) call over up to 128 words (the CoreEngine's sleep on
    every ENGINE bell at once). Returns the index of a bell that woke, -1 if
    some word had already changed (or a signal arrived), None on timeout.
    With no bells it just sleeps for the timeout; on a kernel without
    futex_waitv it waits on the first bell only (the others wait out the
    timeout, RING-7).
    """
    timeout = min(timeout, MAX_SLEEP)
    if not bells:
        time.sleep(timeout)
        return None
    if len(bells) > WAITV_MAX:
        raise ValueError(f"futex_waitv takes at most {WAITV_MAX} words, got {len(bells)}")
    waiters = (_FutexWaitv * len(bells))()
    for slot, (bell, expected) in zip(waiters, bells, strict=True):
        slot.val = expected % U32
        slot.uaddr = bell.address
        slot.flags = FUTEX_32
    deadline = _timespec(time.clock_gettime(time.CLOCK_MONOTONIC) + timeout)  # absolute
    rc = _syscall(_SYS_FUTEX_WAITV, waiters, len(bells), 0, ctypes.byref(deadline),
                  CLOCK_MONOTONIC)
    if rc >= 0:
        return int(rc)
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EINTR):
        return -1
    if err == errno.ETIMEDOUT:
        return None
    if err == errno.ENOSYS:  # Linux < 5.16: sleep on the first word only, still bounded
        bell, expected = bells[0]
        return 0 if bell.wait(expected, timeout) else None
    raise OSError(err, f"futex_waitv: {os.strerror(err)}")


def notify(ring: SleepingRing, bell: Wakeable) -> bool:
    """Producer side, after a push: ring ``bell`` if the ring's consumer sleeps (RING-6)."""
    if ring.consumer_sleeping():
        bell.ring()
        return True
    return False


def sleep_until_work(bell: Wakeable, rings: Iterable[SleepingRing],
                     timeout: float = MAX_SLEEP) -> bool:
    """Consumer side: sleep on ``bell`` unless one of ``rings`` has work (RING-6, RING-7).

    Returns True if it slept and was woken, False if it did not sleep (work was
    found) or the sleep timed out. The caller polls its rings afterwards either way.
    """
    rings = list(rings)
    expected = bell.value()  # before the re-check: a later push changes the word
    try:
        # all(): stop at the first ring with work; finish_sleep below clears every flag
        if not all(r.prepare_sleep() for r in rings):
            return False
        return bell.wait(expected, timeout)
    finally:
        for r in rings:
            r.finish_sleep()


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")
