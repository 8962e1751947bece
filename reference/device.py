"""The NK device layout (spec/device.md): header, queue sets, rings, data area.

One shared region per device. Everything is addressed by offset from the
start of the region, so the same bytes work as a ``/dev/shm`` file, a memfd
or an ivshmem PCI BAR (DEV-1). This module declares the header once as a
construct ``Struct`` and computes the geometry of everything that follows;
:mod:`netkernel.reference.ring` operates one ring inside it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

import construct as cs

MAGIC: Final = b"NKDEVICE"  # DEV-2
VERSION: Final = 1  # DEV-2
CACHE_LINE: Final = 64  # DEV-6: indices and bells each own a cache line
HEADER_SIZE: Final = 256  # DEV-3
RING_HEADER_SIZE: Final = 3 * CACHE_LINE  # tail line, head line, flags line (RING-1)
BELL_SIZE: Final = CACHE_LINE  # one futex word per cache line (DEV-9)
PAGE: Final = 4096
MAX_QSETS: Final = 255  # queue set IDs fit the NQE's one byte
MIN_RING_ENTRIES: Final = 2
MAX_RING_ENTRIES: Final = 1 << 16
NQE_SLOT: Final = 32


class Kind(enum.IntEnum):
    """Which side of the CoreEngine a device sits on (DEV-2)."""

    TENANT = 1
    NSM = 2


class State(enum.IntEnum):
    """Device life cycle, written only by the CoreEngine after creation (DEV-4)."""

    INIT = 0
    READY = 1
    DETACHED = 2


class Feature(enum.IntFlag):
    """Feature bits (DEV-5). A device MUST NOT set a bit it does not implement."""

    NONE = 0
    FUTEX_BELLS = 1 << 0  # sleepers wait on the queue set's bell words with futex
    HUGE_PAGES = 1 << 1  # the region is backed by huge pages (informative)
    POLLED = 1 << 2  # bells wake nobody across this device (a guest BAR): bounded sleeps, VM-2


class RingId(enum.IntEnum):
    """The four rings of a queue set, in layout order (DEV-7)."""

    JOB = 0  # device -> CoreEngine: control calls (tenant) / replies (NSM)
    COMPLETION = 1  # CoreEngine -> device: replies (tenant) / control calls (NSM)
    SEND = 2  # device -> CoreEngine: data calls, BUF_RETURN (tenant) / data replies, events (NSM)
    RECEIVE = 3  # CoreEngine -> device: events (tenant) / data calls, TENANT_MAP (NSM)

    @property
    def to_engine(self) -> bool:
        """True if the device side produces and the CoreEngine consumes (DEV-8)."""
        return self in (RingId.JOB, RingId.SEND)


class Bell(enum.IntEnum):
    """The two futex words of a queue set (DEV-9): who sleeps on it."""

    DEVICE = 0  # the device side (GuestLib / ServiceLib) sleeps here
    ENGINE = 1  # the CoreEngine sleeps here


HEADER_STRUCT: Final = cs.Struct(
    "magic" / cs.Const(MAGIC),
    "version" / cs.Int16ul,
    "header_size" / cs.Int16ul,
    "features" / cs.Int32ul,
    "total_size" / cs.Int64ul,
    "kind" / cs.Int8ul,
    "state" / cs.Int8ul,
    "n_qsets" / cs.Int16ul,
    "ring_entries" / cs.Int32ul,
    "qset_offset" / cs.Int64ul,
    "qset_stride" / cs.Int64ul,
    "data_offset" / cs.Int64ul,
    "data_size" / cs.Int64ul,
    "send_size" / cs.Int64ul,
    "buf_size" / cs.Int32ul,
    "owner_pid" / cs.Int32ul,
    "dev_id" / cs.Int32ul,
    cs.Padding(HEADER_SIZE - 84),
)

HEADER_DOC: Final[dict[str, str]] = {
    "magic": "the 8 ASCII bytes NKDEVICE",
    "version": "layout version, 1",
    "header_size": "bytes from the start of the region to the end of the header (256)",
    "features": "feature bits (FUTEX_BELLS=1, HUGE_PAGES=2, POLLED=4)",
    "total_size": "size of the whole region in bytes",
    "kind": "1 tenant device, 2 NSM device",
    "state": "0 INIT, 1 READY, 2 DETACHED; written by the CoreEngine only",
    "n_qsets": "number of queue sets (1..255)",
    "ring_entries": "NQE slots per ring, a power of two (2..65536)",
    "qset_offset": "offset of queue set 0, a multiple of 64",
    "qset_stride": "bytes between consecutive queue sets, a multiple of 64",
    "data_offset": "offset of the data area, a multiple of 4096",
    "data_size": "size of the data area in bytes",
    "send_size": "size of the send half [0, send_size); the receive half is [send_size, data_size)",
    "buf_size": "buffer granule in bytes: every data-area buffer starts on a multiple of it",
    "owner_pid": "process ID of the device side (informative only)",
    "dev_id": "VM ID or NSM ID the CoreEngine assigned (informative; the engine keeps its own)",
}


class DeviceError(ValueError):
    """A region whose header is not a valid NK device (DEV-2, DEV-12..DEV-14, SEC-1)."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Sizes chosen by whoever creates a device; everything else follows (DEV-12, DEV-13)."""

    n_qsets: int = 1
    ring_entries: int = 256
    data_size: int = 4 << 20
    send_size: int = 2 << 20
    buf_size: int = 16 << 10
    kind: Kind = Kind.TENANT

    def __post_init__(self) -> None:
        e = self.ring_entries
        if not 1 <= self.n_qsets <= MAX_QSETS:
            raise DeviceError(f"n_qsets must be 1..{MAX_QSETS}, got {self.n_qsets}")
        if not MIN_RING_ENTRIES <= e <= MAX_RING_ENTRIES or e & (e - 1):
            raise DeviceError(f"ring_entries must be a power of two in 2..65536, got {e}")
        b = self.buf_size
        if b < 64 or b & (b - 1):
            raise DeviceError(f"buf_size must be a power of two >= 64, got {b}")
        if self.data_size % b or self.send_size % b or not 0 < self.send_size < self.data_size:
            raise DeviceError("data_size and send_size must be multiples of buf_size,"
                              " with 0 < send_size < data_size")

    @property
    def ring_size(self) -> int:
        """Bytes of one ring: its three header lines and its slots."""
        return RING_HEADER_SIZE + self.ring_entries * NQE_SLOT

    @property
    def qset_stride(self) -> int:
        """Bytes of one queue set: two bells, then four rings (DEV-7)."""
        return 2 * BELL_SIZE + 4 * self.ring_size

    @property
    def qset_offset(self) -> int:
        return HEADER_SIZE

    @property
    def data_offset(self) -> int:
        end = self.qset_offset + self.n_qsets * self.qset_stride
        return (end + PAGE - 1) // PAGE * PAGE

    @property
    def total_size(self) -> int:
        return self.data_offset + self.data_size

    def bell_offset(self, qset: int, bell: Bell) -> int:
        """Offset of a queue set's bell word (DEV-9)."""
        self._check_qset(qset)
        return self.qset_offset + qset * self.qset_stride + bell * BELL_SIZE

    def ring_offset(self, qset: int, ring: RingId) -> int:
        """Offset of a ring's header; its slots follow the header (DEV-7, RING-1)."""
        self._check_qset(qset)
        return self.qset_offset + qset * self.qset_stride + 2 * BELL_SIZE + ring * self.ring_size

    def _check_qset(self, qset: int) -> None:
        if not 0 <= qset < self.n_qsets:
            raise DeviceError(f"queue set {qset} does not exist (n_qsets={self.n_qsets})")

    def in_send_half(self, offset: int, size: int) -> bool:
        """True if ``[offset, offset+size)`` lies in the send half (DEV-11, SEC-3)."""
        return offset >= 0 and size >= 0 and offset + size <= self.send_size

    def in_receive_half(self, offset: int, size: int) -> bool:
        """True if ``[offset, offset+size)`` lies in the receive half (DEV-11, SEC-3)."""
        return offset >= self.send_size and size >= 0 and offset + size <= self.data_size


def init_header(buf: memoryview, geo: Geometry, *, owner_pid: int = 0, dev_id: int = 0,
                features: Feature = Feature.FUTEX_BELLS) -> None:
    """Write a fresh header and zero every ring and bell (DEV-4). Done by the creator."""
    if len(buf) < geo.total_size:
        raise DeviceError(f"region of {len(buf)} bytes is smaller than {geo.total_size}")
    buf[HEADER_SIZE:geo.data_offset] = bytes(geo.data_offset - HEADER_SIZE)
    buf[:HEADER_SIZE] = HEADER_STRUCT.build(dict(
        version=VERSION, header_size=HEADER_SIZE, features=int(features),
        total_size=geo.total_size, kind=int(geo.kind), state=int(State.INIT),
        n_qsets=geo.n_qsets, ring_entries=geo.ring_entries, qset_offset=geo.qset_offset,
        qset_stride=geo.qset_stride, data_offset=geo.data_offset, data_size=geo.data_size,
        send_size=geo.send_size, buf_size=geo.buf_size, owner_pid=owner_pid, dev_id=dev_id,
    ))


def read_header(buf: memoryview) -> Geometry:
    """Validate a region's header and return its geometry (DEV-2, DEV-12..DEV-14, SEC-1).

    Every offset is recomputed from the sizes and compared, so a header that
    places a ring or the data area outside the region is rejected before
    anyone follows it.
    """
    if len(buf) < HEADER_SIZE:
        raise DeviceError(f"region of {len(buf)} bytes cannot hold the {HEADER_SIZE}-byte header")
    try:
        h = HEADER_STRUCT.parse(bytes(buf[:HEADER_SIZE]))
    except cs.ConstructError as exc:
        raise DeviceError(f"bad magic: expected {MAGIC!r}") from exc
    if h.version != VERSION:
        raise DeviceError(f"unsupported device version {h.version} (this reader speaks {VERSION})")
    try:
        geo = Geometry(n_qsets=h.n_qsets, ring_entries=h.ring_entries, data_size=h.data_size,
                       send_size=h.send_size, buf_size=h.buf_size, kind=Kind(h.kind))
    except ValueError as exc:
        raise DeviceError(f"bad geometry: {exc}") from exc
    expect = {"header_size": HEADER_SIZE, "qset_offset": geo.qset_offset,
              "qset_stride": geo.qset_stride, "data_offset": geo.data_offset,
              "total_size": geo.total_size}
    for name, value in expect.items():
        if h[name] != value:
            raise DeviceError(
                f"header field {name}={h[name]} disagrees with the geometry ({value})")
    if geo.total_size > len(buf):
        raise DeviceError(f"header says {geo.total_size} bytes, region has {len(buf)}")
    return geo


def header_field_layout() -> list[tuple[str, int, int]]:
    """``(name, offset, size)`` of every header field, read off :data:`HEADER_STRUCT`."""
    out: list[tuple[str, int, int]] = []
    offset = 0
    for sub in HEADER_STRUCT.subcons:
        size = sub.sizeof()
        if sub.name is not None:
            out.append((sub.name, offset, size))
        offset += size
    return out
