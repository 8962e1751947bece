"""Wake-up bells over C futexes: drop-in for :mod:`netkernel.reference.bell` (DEV-9, RING-6/7).

The protocol and the API are the reference's (read its docstring); the bell
word is read and rung with C11 atomics and the futex calls are made by the
inline functions of csrc/include/nk/bell.h, through cffi, which releases the
GIL while a thread sleeps. :func:`notify` and :func:`sleep_until_work` are
the reference's, re-exported: they compose ring and bell calls and take
either implementation of each.

A bell holds a cffi view of its region (``ffi.from_buffer``), so the word
stays mapped while the bell lives: it can never touch unmapped memory.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from typing import Any, Final

from netkernel.reference.bell import (
    CLOCK_MONOTONIC,
    FUTEX_32,
    FUTEX_WAIT,
    FUTEX_WAKE,
    MAX_SLEEP,
    U32,
    WAITV_MAX,
    WAKE_ALL,
    buffer_address,
    notify,
    sleep_until_work,
)

from ._lib import ffi, lib

__all__ = ["CLOCK_MONOTONIC", "FUTEX_32", "FUTEX_WAIT", "FUTEX_WAKE", "MAX_SLEEP", "U32",
           "WAITV_MAX", "WAKE_ALL", "Bell", "buffer_address", "notify", "sleep_until_work",
           "wait_any"]

_NS: Final = 1_000_000_000


def _ns(seconds: float) -> int:
    return int(max(0.0, min(seconds, MAX_SLEEP)) * _NS)


class Bell:
    """One 32-bit bell word at ``offset`` of a mapped region whose base is at ``base``.

    ``base`` is :func:`buffer_address` of ``buf`` (kept as :attr:`address` for
    the reference's API); the futex calls use the word inside ``buf`` itself.
    """

    def __init__(self, buf: memoryview, offset: int, base: int) -> None:
        if offset % 4 or not 0 <= offset <= len(buf) - 4:
            raise ValueError(f"bell offset {offset} is not an aligned word inside the region")
        region = ffi.from_buffer(buf, require_writable=True)
        word = ffi.cast("uint32_t *", region + offset)
        if int(ffi.cast("uintptr_t", word)) % 4:
            raise ValueError(f"bell at {offset:#x} is not 4-byte aligned: it is a futex word")
        self._buf = buf
        self._region = region  # keeps the buffer exported (mapped) while the bell lives
        self._word: Any = word
        self.offset = offset
        self.address = base + offset

    def value(self) -> int:
        """The word now: read it before the re-check of the rings (RING-6)."""
        return int(lib.nk_bell_value(self._word))  # load-acquire

    def ring(self) -> int:
        """Change the word and wake every sleeper on it; returns how many woke."""
        woken = lib.nk_bell_ring(self._word)  # seq_cst +1, then FUTEX_WAKE
        if woken < 0:
            raise OSError(-woken, f"FUTEX_WAKE: {os.strerror(-woken)}")
        return int(woken)

    def wait(self, expected: int, timeout: float = MAX_SLEEP) -> bool:
        """Sleep while the word equals ``expected``, at most ``timeout`` seconds (RING-7).

        True if the word changed or a wake arrived (or EINTR), False on timeout.
        """
        rc = lib.nk_bell_wait(self._word, expected % U32, _ns(timeout))
        if rc == 0 or rc == -errno.EINTR:
            return True
        if rc == -errno.ETIMEDOUT:
            return False
        raise OSError(-rc, f"FUTEX_WAIT: {os.strerror(-rc)}")


def wait_any(bells: Sequence[tuple[Bell, int]], timeout: float = MAX_SLEEP) -> int | None:
    """Sleep until any bell's word differs from its expected value, or ``timeout`` passes.

    One futex_waitv(2) over up to 128 words. The index of a bell that woke, -1
    if a word had already changed (or a signal arrived), None on timeout; with
    no bells it sleeps for the timeout; without futex_waitv (Linux < 5.16) it
    waits on the first bell only (RING-7).
    """
    timeout = min(timeout, MAX_SLEEP)
    if not bells:
        time.sleep(max(0.0, timeout))
        return None
    if len(bells) > WAITV_MAX:
        raise ValueError(f"futex_waitv takes at most {WAITV_MAX} words, got {len(bells)}")
    # a reference Bell has no C word: its address (same process, same mapping) serves
    words = ffi.new("uint32_t *[]", [getattr(b, "_word", None) or ffi.cast("uint32_t *", b.address)
                                     for b, _ in bells])
    expected = ffi.new("uint32_t[]", [e % U32 for _, e in bells])
    rc = lib.nk_bell_waitv_ns(words, expected, len(bells), _ns(timeout))
    if rc >= 0:
        return int(rc)
    if rc in (-errno.EAGAIN, -errno.EINTR):
        return -1
    if rc == -errno.ETIMEDOUT:
        return None
    if rc == -errno.ENOSYS:
        bell, value = bells[0]
        return 0 if bell.wait(value, timeout) else None
    raise OSError(-rc, f"futex_waitv: {os.strerror(-rc)}")
