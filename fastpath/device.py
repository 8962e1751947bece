"""The ``device`` role over C: NK device header creation and validation (spec/device.md DEV-*).

The data model is the reference's (one data model): :class:`Geometry`, the
enums, the header's construct declaration and every constant are
re-exported from :mod:`netkernel.reference.device`. Only the two operations
that touch a region run in C (csrc/device.c): :func:`init_header` and
:func:`read_header`. The C returns a fault category; this module turns it into
the reference's :class:`DeviceError` with the reference's message.
"""

from __future__ import annotations

from typing import Any

import construct as cs

from netkernel.reference.device import (
    BELL_SIZE,
    CACHE_LINE,
    HEADER_DOC,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    MAX_QSETS,
    MAX_RING_ENTRIES,
    MIN_RING_ENTRIES,
    NQE_SLOT,
    PAGE,
    RING_HEADER_SIZE,
    VERSION,
    Bell,
    DeviceError,
    Feature,
    Geometry,
    Kind,
    RingId,
    State,
    header_field_layout,
)

from ._lib import ffi, lib

__all__ = [
    "BELL_SIZE", "CACHE_LINE", "HEADER_DOC", "HEADER_SIZE", "HEADER_STRUCT", "MAGIC",
    "MAX_QSETS", "MAX_RING_ENTRIES", "MIN_RING_ENTRIES", "NQE_SLOT", "PAGE",
    "RING_HEADER_SIZE", "VERSION", "Bell", "DeviceError", "Feature", "Geometry", "Kind",
    "RingId", "State", "header_field_layout", "init_header", "read_header",
]

U32 = 1 << 32
#: derived header fields in the order the reader compares them (DEV-13)
_DERIVED = {
    lib.NK_DEV_BAD_HEADER_SIZE: "header_size",
    lib.NK_DEV_BAD_QSET_OFFSET: "qset_offset",
    lib.NK_DEV_BAD_QSET_STRIDE: "qset_stride",
    lib.NK_DEV_BAD_DATA_OFFSET: "data_offset",
    lib.NK_DEV_BAD_TOTAL_SIZE: "total_size",
}
_GEOMETRY = {lib.NK_DEV_BAD_KIND, lib.NK_DEV_BAD_N_QSETS, lib.NK_DEV_BAD_RING_ENTRIES,
             lib.NK_DEV_BAD_BUF_SIZE, lib.NK_DEV_BAD_SIZES}


def _c_geometry(geo: Geometry) -> Any:
    return ffi.new("struct nk_geometry *", dict(
        n_qsets=geo.n_qsets, ring_entries=geo.ring_entries, data_size=geo.data_size,
        send_size=geo.send_size, buf_size=geo.buf_size, kind=int(geo.kind)))


def init_header(buf: memoryview, geo: Geometry, *, owner_pid: int = 0, dev_id: int = 0,
                features: Feature = Feature.FUTEX_BELLS) -> None:
    """Write a fresh header and zero every ring and bell (DEV-4). Done by the creator."""
    for name, value in (("features", int(features)), ("owner_pid", owner_pid),
                        ("dev_id", dev_id)):
        if not 0 <= value < U32:  # refused as the reference's construct build refuses it
            if len(buf) < geo.total_size:
                break  # the reference checks the size first
            raise cs.FormatFieldError(
                f"struct '<L' error during building, given value {value}", path=name)
    region = ffi.from_buffer(buf, require_writable=True)
    rc = lib.nk_dev_init_header(region, len(buf), _c_geometry(geo), owner_pid, dev_id,
                                int(features))
    if rc:
        raise DeviceError(f"region of {len(buf)} bytes is smaller than {geo.total_size}")


def read_header(buf: memoryview) -> Geometry:
    """Validate a region's header and return its geometry (DEV-2, DEV-12..DEV-14, SEC-1).

    The checks run in C, in the reference's order; a refusal raises the
    reference's DeviceError with the reference's message.
    """
    out = ffi.new("struct nk_geometry *")
    fault = lib.nk_dev_check_header(ffi.from_buffer(buf), len(buf), out)
    if fault != lib.NK_DEV_OK:
        raise DeviceError(_message(fault, buf))
    return Geometry(n_qsets=out.n_qsets, ring_entries=out.ring_entries,
                    data_size=out.data_size, send_size=out.send_size,
                    buf_size=out.buf_size, kind=Kind(out.kind))


def _message(fault: int, buf: memoryview) -> str:
    """The reference's words for a fault the C found (only on the refusal path)."""
    if fault == lib.NK_DEV_SHORT_HEADER:
        return f"region of {len(buf)} bytes cannot hold the {HEADER_SIZE}-byte header"
    if fault == lib.NK_DEV_BAD_MAGIC:
        return f"bad magic: expected {MAGIC!r}"
    h = HEADER_STRUCT.parse(bytes(buf[:HEADER_SIZE]))
    if fault == lib.NK_DEV_BAD_VERSION:
        return f"unsupported device version {h.version} (this reader speaks {VERSION})"
    if fault in _GEOMETRY:
        try:  # the reference's own wording of the limit the C found broken
            Geometry(n_qsets=h.n_qsets, ring_entries=h.ring_entries, data_size=h.data_size,
                     send_size=h.send_size, buf_size=h.buf_size, kind=Kind(h.kind))
        except ValueError as exc:
            return f"bad geometry: {exc}"
        return f"bad geometry (fault {fault})"
    geo = Geometry(n_qsets=h.n_qsets, ring_entries=h.ring_entries, data_size=h.data_size,
                   send_size=h.send_size, buf_size=h.buf_size, kind=Kind(h.kind))
    if fault in _DERIVED:
        name = _DERIVED[fault]
        value = getattr(geo, name) if name != "header_size" else HEADER_SIZE
        return f"header field {name}={h[name]} disagrees with the geometry ({value})"
    return f"header says {geo.total_size} bytes, region has {len(buf)}"
