"""The initramfs archive format: cpio "newc" (the kernel's ``usr/gen_init_cpio`` format).

Written here rather than with ``cpio -o -H newc`` so that an image is the same bytes for
the same inputs (owner root, every time stamp 0) and needs no tool on the host; the kernel
unpacks any number of such archives laid end to end, which is how a run's own files
(:func:`netkernel.adapters.kvm.image.run_archive`) join the cached image.
"""

from __future__ import annotations

import stat
from typing import BinaryIO, Final

_MAGIC: Final = b"070701"
_TRAILER: Final = "TRAILER!!!"


class Writer:
    """Entries in the order given; a directory must come before what it holds."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        path = name.lstrip("/").encode()
        self._ino += 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(path) + 1, 0)
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + path + b"\0")
        self._out.write(b"\0" * (-(len(header) + len(path) + 1) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def fifo(self, name: str, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFIFO | mode)

    def close(self) -> None:
        """The trailer, once; the stream stays open (the caller's)."""
        if not self._closed:
            self._ino = -1  # the trailer's inode is 0
            self._entry(_TRAILER, 0)
            self._closed = True


def unpack(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of every entry of one or more concatenated archives (for tests
    and for reading an image back); a later entry of the same name wins, as in the kernel."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos:pos + 6] != _MAGIC:
            if data[pos] == 0:  # padding between archives
                pos += 4
                continue
            raise ValueError(f"not a newc archive at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110: name_end - 1].decode()
        start = name_end + (-name_end % 4)
        body = data[start:start + size]
        pos = start + size + (-(start + size) % 4)
        if name != _TRAILER:
            out[name] = (mode, body)
    return out
