"""Futex bells across processes (reference/bell.py; RING-6, RING-7, DEV-9)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netkernel.reference import bell, shm
from netkernel.reference import device as dev
from netkernel.reference.nqe import NQE, Op, pack

GEO = dev.Geometry(ring_entries=16, data_size=64 << 10, send_size=32 << 10, buf_size=4 << 10)
DEADLINE = 10.0  # a generous bound on anything that must happen "eventually"


@pytest.fixture
def device(tmp_path: Path) -> Iterator[shm.DeviceMap]:
    m = shm.create_device(tmp_path / "vm-1.nk", GEO, dev_id=1)
    yield m
    m.close()


def _child(script: str, *args: str) -> subprocess.Popen[str]:
    """A fresh Python process running ``script`` (it prints one line once ready)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
    assert proc.returncode == 0
    return out


def test_wait_times_out_when_not_rung(device: shm.DeviceMap) -> None:
    b = device.bell(0, dev.Bell.ENGINE)
    t0 = time.monotonic()
    assert b.wait(b.value(), 0.03) is False
    assert 0.025 <= time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    assert bell.wait_any([(b, b.value())], 0.03) is None
    assert 0.025 <= time.monotonic() - t0 < 0.5


def test_wait_is_capped_at_max_sleep(device: shm.DeviceMap) -> None:
    """RING-7: nobody sleeps longer than MAX_SLEEP, whatever timeout it asks for."""
    b = device.bell(0, dev.Bell.DEVICE)
    t0 = time.monotonic()
    assert b.wait(b.value(), 10.0) is False
    assert time.monotonic() - t0 < bell.MAX_SLEEP + 0.2


def test_wait_returns_at_once_if_the_word_already_changed(device: shm.DeviceMap) -> None:
    b = device.bell(0, dev.Bell.ENGINE)
    before = b.value()
    b.ring()
    assert b.value() == before + 1
    t0 = time.monotonic()
    assert b.wait(before, 0.05) is True
    assert bell.wait_any([(b, before)], 0.05) == -1
    assert time.monotonic() - t0 < 0.02


_RINGER = """
    import sys, time
    from netkernel.reference import shm, device as dev
    m = shm.open_device(sys.argv[1])
    b = m.bell(int(sys.argv[2]), dev.Bell(int(sys.argv[3])))
    print("ready", flush=True)
    time.sleep(0.02)
    print(b.ring(), flush=True)
"""


def test_bell_wakes_a_sleeper_in_another_process(device: shm.DeviceMap) -> None:
    b = device.bell(0, dev.Bell.ENGINE)
    expected = b.value()
    proc = _child(_RINGER, str(device.path), "0", str(int(dev.Bell.ENGINE)))
    deadline = time.monotonic() + DEADLINE
    woken = False
    while not woken and time.monotonic() < deadline:
        woken = b.wait(expected, bell.MAX_SLEEP)  # False only on timeout
    assert woken
    assert b.value() == expected + 1
    _finish(proc)


def test_wait_any_tells_which_bell_rang(tmp_path: Path) -> None:
    geo = dev.Geometry(n_qsets=2, ring_entries=16, data_size=64 << 10, send_size=32 << 10,
                       buf_size=4 << 10)
    with shm.create_device(tmp_path / "vm-2.nk", geo) as m:
        b0, b1 = m.bell(0, dev.Bell.ENGINE), m.bell(1, dev.Bell.ENGINE)
        v0, v1 = b0.value(), b1.value()
        proc = _child(_RINGER, str(m.path), "1", str(int(dev.Bell.ENGINE)))
        deadline = time.monotonic() + DEADLINE
        got = None
        while got is None and time.monotonic() < deadline:
            got = bell.wait_any([(b0, v0), (b1, v1)])
        assert got in (1, -1)  # -1: it rang before we went to sleep
        assert (b0.value(), b1.value()) == (v0, v1 + 1)
        _finish(proc)


_CONSUMER = """
    import sys
    from netkernel.reference import shm, device as dev, bell
    m = shm.open_device(sys.argv[1])
    ring = m.ring(0, dev.RingId.JOB)
    b = m.bell(0, dev.Bell.ENGINE)
    want, got, slept, tags = int(sys.argv[2]), 0, 0, []
    print("ready", flush=True)
    while got < want:
        batch = ring.pop_many(64)
        if not batch:
            slept += bell.sleep_until_work(b, [ring])
            continue
        got += len(batch)
        tags += [int.from_bytes(raw[27:29], "little") for raw in batch]
    ok = tags == [i % 65536 for i in range(want)]
    print(got, slept, ok, flush=True)
"""


def test_producer_consumer_handshake_across_processes(device: shm.DeviceMap) -> None:
    """RING-6 end to end: the consumer sleeps on its bell, notify() wakes it, nothing is lost."""
    n = 600
    ring = device.ring(0, dev.RingId.JOB)
    b = device.bell(0, dev.Bell.ENGINE)
    proc = _child(_CONSUMER, str(device.path), str(n))
    rung = 0
    deadline = time.monotonic() + DEADLINE
    for i in range(n):
        while not ring.push(pack(NQE(op=Op.CLOSE, sock_id=1, tag=i))):
            assert time.monotonic() < deadline, "consumer stopped taking NQEs"
            time.sleep(0.0005)
        rung += bell.notify(ring, b)
        if i % 50 == 49:
            time.sleep(0.01)  # let the consumer run dry and go to sleep
    got, slept, ok = _finish(proc).split()
    assert (int(got), ok) == (n, "True")
    assert rung > 0 and int(slept) > 0  # the sleep/wake path was taken, not only polling


def test_sleep_until_work_does_not_sleep_when_work_is_there(device: shm.DeviceMap) -> None:
    ring = device.ring(0, dev.RingId.SEND)
    b = device.bell(0, dev.Bell.ENGINE)
    assert ring.push(pack(NQE(op=Op.BUF_RETURN)))
    t0 = time.monotonic()
    assert bell.sleep_until_work(b, [device.ring(0, dev.RingId.JOB), ring], 0.05) is False
    assert time.monotonic() - t0 < 0.02
    assert not ring.consumer_sleeping()  # the flag is cleared again (finish_sleep)


def test_bell_rejects_an_offset_outside_the_region(device: shm.DeviceMap) -> None:
    with pytest.raises(ValueError):
        bell.Bell(device.buf, len(device.buf), device.base)
    with pytest.raises(ValueError):
        bell.Bell(device.buf, 2, device.base)
