"""Runtime paths and device files (DEV-1): :mod:`netkernel.reference.shm` over the C fast path.

Paths, names and the file life cycle are the reference's, re-exported. The
:class:`DeviceMap` here is the reference's with the fast path's pieces: its
header is validated by the C reader, and :meth:`DeviceMap.ring` and
:meth:`DeviceMap.bell` hand out C rings and C bells over the same mapping.
"""

from __future__ import annotations

import mmap
import os
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
from .bell import Bell, buffer_address
from .ring import Ring

__all__ = ["DEFAULT_INSTANCE", "DEFAULT_ROOT", "DEVICE_SUFFIX", "ENGINE_SOCK", "PREFIX",
           "DeviceMap", "create_device", "device_path", "engine_socket", "instance_dir",
           "instance_name", "open_device", "remove_instance", "root"]


class DeviceMap(_ref.DeviceMap):
    """One NK device file mapped into this process; rings and bells are the C ones.

    Rings and bells keep the mapping exported while they live, so :meth:`close`
    unmaps only once they are dropped (the reference's close tolerates that).
    """

    def __init__(self, path: Path, fd: int, size: int, geo: dev.Geometry | None) -> None:
        # the reference's constructor, with the C header reader (DEV-2, DEV-12..14, SEC-1)
        self.path = path
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._mm)
        self.base = buffer_address(self.buf)
        self.geo = geo if geo is not None else dev.read_header(self.buf)

    def ring(self, qset: int, ring: dev.RingId) -> Ring:  # type: ignore[override]
        """A view of one ring of queue set ``qset``."""
        return Ring.of(self.buf, self.geo, qset, ring)

    def bell(self, qset: int, which: dev.Bell) -> Bell:  # type: ignore[override]
        """A queue set's DEVICE or ENGINE bell (DEV-9)."""
        return Bell(self.buf, self.geo.bell_offset(qset, which), self.base)


def create_device(path: Path, geo: dev.Geometry, *, owner_pid: int = 0,
                  dev_id: int = 0) -> DeviceMap:
    """Create a new device file, size it and write a fresh header in state INIT (DEV-4)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, geo.total_size)
        m = DeviceMap(path, fd, geo.total_size, geo)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)  # the mapping keeps the file's pages
    dev.init_header(m.buf, geo, owner_pid=owner_pid, dev_id=dev_id)
    return m


def open_device(path: Path | str) -> DeviceMap:
    """Map an existing device file and validate its header (DEV-2, DEV-3, SEC-1)."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < dev.HEADER_SIZE:
            raise dev.DeviceError(f"{path} has {size} bytes, less than a device header")
        m = DeviceMap(path, fd, size, None)
    finally:
        os.close(fd)
    return m
