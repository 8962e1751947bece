"""Runtime paths and device files (DEV-1): :mod:`netkernel.reference.shm` over the C fast path.

Paths, names and the file life cycle are the reference's, re-exported. The
:class:`DeviceMap` here is the reference's with the fast path's pieces: its
header is validated by the C reader, and :meth:`DeviceMap.ring` and
:meth:`DeviceMap.bell` hand out C rings and C bells over the same mapping.
"""

from __future__ import annotations

from pathlib import Path

from netkernel.reference import shm as _ref
from netkernel.reference.shm import (
    DEFAULT_INSTANCE,
    DEFAULT_ROOT,
    DEVICE_SUFFIX,
    ENGINE_SOCK,
    PREFIX,
    device_path,
    engine_socket,
    instance_dir,
    instance_name,
    remove_instance,
    root,
)

from . import device as dev
from .bell import Bell
from .ring import Ring

__all__ = ["DEFAULT_INSTANCE", "DEFAULT_ROOT", "DEVICE_SUFFIX", "ENGINE_SOCK", "PREFIX",
           "DeviceMap", "create_device", "device_path", "engine_socket", "instance_dir",
           "instance_name", "open_device", "remove_instance", "root"]


class DeviceMap(_ref.DeviceMap):
    """One NK device file mapped into this process; the header codec, rings and bells are C.

    Rings and bells keep the mapping exported while they live, so :meth:`close`
    unmaps only once they are dropped (the reference's close tolerates that).
    """

    # the C header reader and writer (DEV-2, DEV-4, DEV-12..14, SEC-1)
    read_header = staticmethod(dev.read_header)
    init_header = staticmethod(dev.init_header)

    def ring(self, qset: int, ring: dev.RingId) -> Ring:
        """A view of one ring of queue set ``qset``."""
        return Ring.of(self.buf, self.geo, qset, ring)

    def bell(self, qset: int, which: dev.Bell) -> Bell:  # type: ignore[override]
        """A queue set's DEVICE or ENGINE bell (DEV-9)."""
        return Bell(self.buf, self.geo.bell_offset(qset, which), self.base)


def create_device(path: Path, geo: dev.Geometry, *, owner_pid: int = 0,
                  dev_id: int = 0) -> DeviceMap:
    """:meth:`DeviceMap.create` of the fast path's map: a new device file in state INIT (DEV-4)."""
    return DeviceMap.create(path, geo, owner_pid=owner_pid, dev_id=dev_id)


def open_device(path: Path | str) -> DeviceMap:
    """:meth:`DeviceMap.open` of the fast path's map: header validated in C (DEV-2, SEC-1)."""
    return DeviceMap.open(path)
