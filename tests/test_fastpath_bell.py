"""fastpath/bell.py and fastpath/shm.py are drop-ins for the reference's (DEV-9, RING-6, RING-7).

The reference's own bell tests (tests/test_bell.py) are run again with this
process on the C modules (fastpath bell, shm, rings), against a child process
that is either the reference or the fast path: C<->reference and C<->C. A bell
module whose ring() does not change the word is shown to fail them.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.test_bell as ref_tests
from netkernel.fastpath import bell as fbell
from netkernel.fastpath import ring as fring
from netkernel.fastpath import shm as fshm
from netkernel.reference import bell as rbell
from netkernel.reference import device as rdev
from netkernel.reference import shm as rshm

TESTS = sorted(name for name in dir(ref_tests) if name.startswith("test_"))
CHILD_SCRIPTS = ("_RINGER", "_CONSUMER")


def _run(name: str, tmp_path: Path) -> None:
    """Run one reference bell test; its ``device`` fixture made by the module it now uses."""
    fn = getattr(ref_tests, name)
    params = inspect.signature(fn).parameters
    if "device" in params:
        m = ref_tests.shm.create_device(tmp_path / "vm-1.nk", ref_tests.GEO, dev_id=1)
        try:
            fn(m)
        finally:
            m.close()
    else:
        fn(tmp_path)


@pytest.fixture(params=["child-reference", "child-fastpath"])
def on_fastpath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(ref_tests, "bell", fbell)
    monkeypatch.setattr(ref_tests, "shm", fshm)
    if request.param == "child-fastpath":
        for script in CHILD_SCRIPTS:
            text = getattr(ref_tests, script).replace("netkernel.reference", "netkernel.fastpath")
            monkeypatch.setattr(ref_tests, script, text)
    yield request.param


@pytest.mark.parametrize("name", TESTS)
def test_reference_bell_tests_pass_on_the_fast_path(name: str, on_fastpath: str,
                                                    tmp_path: Path) -> None:
    _run(name, tmp_path)


def test_fastpath_shm_hands_out_c_rings_and_bells(tmp_path: Path) -> None:
    with fshm.create_device(tmp_path / "vm-3.nk", ref_tests.GEO) as m:
        assert isinstance(m.ring(0, rdev.RingId.JOB), fring.Ring)
        assert isinstance(m.bell(0, rdev.Bell.ENGINE), fbell.Bell)
        with rshm.open_device(m.path) as other:  # the reference reads the C-made device
            assert other.geo == m.geo
            assert other.ring(0, rdev.RingId.JOB).push(bytes(32))
        assert m.ring(0, rdev.RingId.JOB).pop() == bytes(32)


class _SilentBell(fbell.Bell):
    """A broken bell: ring() wakes the sleepers but leaves the word unchanged (breaks DEV-9)."""

    def ring(self) -> int:
        before = self.value()
        woken = super().ring()
        self._word[0] = before
        return woken


def test_a_bell_that_does_not_change_its_word_fails_the_reference_tests(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = types.SimpleNamespace(**{k: getattr(fbell, k) for k in fbell.__all__})
    broken.Bell = _SilentBell

    class _Map(fshm.DeviceMap):
        def bell(self, qset: int, which: Any) -> Any:
            return _SilentBell(self.buf, self.geo.bell_offset(qset, which), self.base)

    def create(path: Path, geo: Any, **kw: Any) -> Any:
        m = fshm.create_device(path, geo, **kw)
        m.__class__ = _Map
        return m

    monkeypatch.setattr(ref_tests, "bell", broken)
    monkeypatch.setattr(ref_tests, "shm", types.SimpleNamespace(create_device=create))
    with pytest.raises(AssertionError):
        _run("test_wait_returns_at_once_if_the_word_already_changed", tmp_path)


def test_the_api_is_the_references() -> None:
    for name in ("MAX_SLEEP", "WAITV_MAX", "buffer_address", "Bell", "wait_any", "notify",
                 "sleep_until_work"):
        assert hasattr(fbell, name), name
    assert fbell.MAX_SLEEP == rbell.MAX_SLEEP
    for name in ("DeviceMap", "create_device", "open_device", "instance_dir", "device_path",
                 "engine_socket", "remove_instance", "root", "instance_name"):
        assert hasattr(fshm, name), name
