"""Fixtures shared by the project's own tests.

``nk_instance``: a running NetKernel instance (CoreEngine + kernel NSM) under a
unique name, started with ``netkernel.instance.up`` and stopped with ``down``
at teardown; ``NETKERNEL_INSTANCE`` names it for the test's duration, so
GuestLib sockets created in the test attach to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live import own_instance


@pytest.fixture(scope="module")
def nk_instance_name() -> Iterator[str]:
    """A running instance shared by the tests of one module; its name."""
    with own_instance() as name:
        yield name


@pytest.fixture
def nk_instance(nk_instance_name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module's running instance, named by ``NETKERNEL_INSTANCE`` for this test."""
    monkeypatch.setenv("NETKERNEL_INSTANCE", nk_instance_name)
    monkeypatch.delenv("NETKERNEL_ROOT", raising=False)
    return nk_instance_name
