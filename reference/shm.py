"""Where a NetKernel instance lives on this host, and its device files (DEV-1).

Everything of one instance sits in one runtime directory,
``/dev/shm/netkernel/<instance>/``:

    engine.sock         the CoreEngine's control endpoint (line-delimited JSON)
    engine.pid          CoreEngine process ID, written by ``netkernel up``
    engine.log          its stdout/stderr
    nsm-<id>.pid/.log   one pair per NSM started by ``netkernel up``
    vm-<id>.nk          a tenant device, created by the CoreEngine on attach
    nsm-<id>.nk         an NSM device, created by the CoreEngine on attach

The root can be moved with ``NETKERNEL_ROOT`` (tests only; the default is
the one operators and tenants agree on). The instance name comes from the
command line, else ``NETKERNEL_INSTANCE``, else ``default``.

A device file is an NK device region (reference/device.py) mapped
``MAP_SHARED`` by the CoreEngine and by its one device-side process.
:class:`DeviceMap` is the mapping plus the views every user needs: the
geometry, rings and bells by queue set, the data area.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Final, Self

from . import device as dev
from .bell import Bell, buffer_address
from .ring import Ring

DEFAULT_ROOT: Final = "/dev/shm/netkernel"
DEFAULT_INSTANCE: Final = "default"
ENGINE_SOCK: Final = "engine.sock"
DEVICE_SUFFIX: Final = ".nk"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Device file name prefix per kind (the ID follows, then ``.nk``).
PREFIX: Final[dict[dev.Kind, str]] = {dev.Kind.TENANT: "vm", dev.Kind.NSM: "nsm"}
_FIELD: Final = {name: (offset, size) for name, offset, size in dev.header_field_layout()}
_INT: Final = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
               8: struct.Struct("<Q")}


def root() -> Path:
    """The directory holding every instance's runtime directory."""
    return Path(os.environ.get("NETKERNEL_ROOT", DEFAULT_ROOT))


def instance_name(name: str | None = None) -> str:
    """``name``, else ``$NETKERNEL_INSTANCE``, else ``default``; ValueError if unusable."""
    chosen = name or os.environ.get("NETKERNEL_INSTANCE") or DEFAULT_INSTANCE
    if not _NAME.fullmatch(chosen):
        raise ValueError(f"bad instance name {chosen!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return chosen


def instance_dir(name: str | None = None) -> Path:
    """``/dev/shm/netkernel/<instance>``."""
    return root() / instance_name(name)


def engine_socket(name: str | None = None) -> Path:
    """The CoreEngine's control socket of an instance."""
    return instance_dir(name) / ENGINE_SOCK


def device_path(name: str | None, kind: dev.Kind, dev_id: int) -> Path:
    """``vm-<id>.nk`` or ``nsm-<id>.nk`` in the instance directory."""
    return instance_dir(name) / f"{PREFIX[kind]}-{dev_id}{DEVICE_SUFFIX}"


def remove_instance(name: str | None = None) -> list[Path]:
    """Remove the runtime directory and everything in it; returns what was there."""
    d = instance_dir(name)
    found = sorted(d.iterdir()) if d.is_dir() else []
    shutil.rmtree(d, ignore_errors=True)
    return found


class DeviceMap:
    """One NK device file mapped into this process.

    ``buf`` is a writable memoryview of the whole region; ``geo`` its
    validated geometry. Rings and bells are views into ``buf``; they become
    unusable (ValueError) once :meth:`close` has released the mapping.
    :meth:`create` and :meth:`open` make one of the class they are called on
    (the fast path's subclass swaps in its header codec, rings and bells).
    """

    #: the header's reader and writer (DEV-2..DEV-4, SEC-1)
    read_header = staticmethod(dev.read_header)
    init_header = staticmethod(dev.init_header)

    def __init__(self, path: Path, fd: int, size: int, geo: dev.Geometry | None) -> None:
        self.path = path
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._mm)
        self.base = buffer_address(self.buf)
        self.geo = geo if geo is not None else self.read_header(self.buf)

    @classmethod
    def create(cls, path: Path, geo: dev.Geometry, *, owner_pid: int = 0,
               dev_id: int = 0, features: dev.Feature = dev.Feature.FUTEX_BELLS,
               file_size: int | None = None) -> Self:
        """Create a new device file, size it and write a fresh header in state INIT (DEV-4).

        ``file_size`` (at least ``geo.total_size``) makes the file longer than the device:
        a guest's PCI BAR is a power of two (VM-1); the tail is not part of the device and
        is not mapped here (DEV-14). Fails with FileExistsError rather than reuse a file
        someone else may map.
        """
        size = geo.total_size if file_size is None else file_size
        if size < geo.total_size:
            raise dev.DeviceError(f"a file of {size} bytes cannot hold {geo.total_size}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            m = cls(path, fd, geo.total_size, geo)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the file's pages
        m.init_header(m.buf, geo, owner_pid=owner_pid, dev_id=dev_id, features=features)
        return m

    @classmethod
    def open(cls, path: Path | str) -> Self:
        """Map an existing device file and validate its header (DEV-2, DEV-3, SEC-1)."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < dev.HEADER_SIZE:
                raise dev.DeviceError(f"{path} has {size} bytes, less than a device header")
            m = cls(path, fd, size, None)
        finally:
            os.close(fd)
        return m

    def ring(self, qset: int, ring: dev.RingId) -> Ring:
        """A view of one ring of queue set ``qset``."""
        return Ring.of(self.buf, self.geo, qset, ring)

    def bell(self, qset: int, which: dev.Bell) -> Bell:
        """A queue set's DEVICE or ENGINE bell (DEV-9)."""
        return Bell(self.buf, self.geo.bell_offset(qset, which), self.base)

    def data(self) -> memoryview:
        """The data area (DEV-10); offsets in NQEs are relative to its start."""
        return self.buf[self.geo.data_offset:self.geo.total_size]

    def header(self, field: str) -> int:
        """Read one integer header field by its name in HEADER_STRUCT."""
        offset, size = _FIELD[field]
        value: int = _INT[size].unpack_from(self.buf, offset)[0]
        return value

    def set_header(self, field: str, value: int) -> None:
        """Write one integer header field (the CoreEngine's ``state``, DEV-4)."""
        offset, size = _FIELD[field]
        _INT[size].pack_into(self.buf, offset, value)

    @property
    def state(self) -> dev.State:
        return dev.State(self.header("state"))

    def close(self) -> None:
        """Unmap. If views of the data area are still held elsewhere, the mapping
        stays until they are dropped (the pages are freed by the kernel then)."""
        try:
            self.buf.release()
            self._mm.close()
        except BufferError:
            pass

    def __enter__(self) -> DeviceMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_device(path: Path, geo: dev.Geometry, *, owner_pid: int = 0,
                  dev_id: int = 0, features: dev.Feature = dev.Feature.FUTEX_BELLS,
                  file_size: int | None = None) -> DeviceMap:
    """:meth:`DeviceMap.create`: a new device file in state INIT (DEV-4)."""
    return DeviceMap.create(path, geo, owner_pid=owner_pid, dev_id=dev_id, features=features,
                            file_size=file_size)


def bar_size(total_size: int) -> int:
    """The smallest power of two that holds ``total_size`` bytes: a PCI BAR's size (VM-1)."""
    return 1 << max(total_size - 1, 1).bit_length()


def open_device(path: Path | str) -> DeviceMap:
    """:meth:`DeviceMap.open`: map an existing device file, header validated (DEV-2, SEC-1)."""
    return DeviceMap.open(path)
