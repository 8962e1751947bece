"""Fixtures shared by the project's own tests.

``nk_instance``: a running NetKernel instance (CoreEngine + kernel NSM) under a
unique name, started with ``netkernel.instance.up`` and stopped with ``down``
at teardown; ``NETKERNEL_INSTANCE`` names it for the test's duration, so
GuestLib sockets created in the test attach to it.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest


def _runtime_available() -> str | None:
    """Why an instance cannot be started here, or None if it can."""
    for module in ("netkernel.instance", "netkernel.reference.coreengine",
                   "netkernel.reference.nsm_kernel"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} does not exist yet"
        except ImportError as exc:
            return f"{module}: {exc}"
    return None


@pytest.fixture(scope="module")
def nk_instance_name() -> Iterator[str]:
    """A running instance shared by the tests of one module; its name."""
    missing = _runtime_available()
    if missing:
        pytest.skip(f"no NetKernel runtime: {missing}")
    from netkernel import instance

    name = f"test-{uuid.uuid4().hex[:10]}"
    instance.up(name)
    try:
        yield name
    finally:
        instance.down(name)


@pytest.fixture
def nk_instance(nk_instance_name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module's running instance, named by ``NETKERNEL_INSTANCE`` for this test."""
    monkeypatch.setenv("NETKERNEL_INSTANCE", nk_instance_name)
    monkeypatch.delenv("NETKERNEL_ROOT", raising=False)
    assert os.environ["NETKERNEL_INSTANCE"] == nk_instance_name
    return nk_instance_name
