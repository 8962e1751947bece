"""The C device header (fastpath/device.py over csrc/device.c) against the reference.

Differential: arbitrary header bytes and region lengths go to both readers;
they must accept and refuse the same regions, with the same message, and
return the same geometry (DEV-2, DEV-3, DEV-5, DEV-12..DEV-14). Both writers
must write the same bytes (DEV-3, DEV-4). A reader that skips one check is
shown to be caught by the same differential check.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netkernel.fastpath import device as fdev
from netkernel.fastpath._lib import ffi, lib
from netkernel.reference import device as rdev

U64 = 1 << 64
FIELDS = {name: (off, size) for name, off, size in rdev.header_field_layout()}

geometries = st.builds(
    lambda n, e, b, halves, send, kind: rdev.Geometry(
        n_qsets=n, ring_entries=1 << e, buf_size=1 << b, data_size=halves << b,
        send_size=min(send, halves - 1) << b, kind=rdev.Kind(kind)),
    st.integers(1, 3), st.integers(1, 8), st.integers(6, 13), st.integers(2, 16),
    st.integers(1, 15), st.sampled_from([1, 2]),
)


def _edge(size: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    edges = [v for v in (0, 1, 2, 64, 256, 4096, top) if v <= top]
    return st.one_of(st.integers(0, top), st.sampled_from(edges))


@st.composite
def regions(draw: st.DrawFn) -> tuple[bytes, int]:
    """A header (valid, mutated or random) and the length of the region it heads."""
    geo = draw(geometries)
    buf = bytearray(geo.total_size)
    rdev.init_header(memoryview(buf), geo)
    header = bytearray(buf[:rdev.HEADER_SIZE])
    how = draw(st.sampled_from(["valid", "fields", "random", "wrap"]))
    if how == "fields":  # a few fields set to arbitrary or edge values
        for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3)):
            off, size = FIELDS[name]
            header[off:off + size] = draw(_edge(size)).to_bytes(size, "little")
    elif how == "random":  # arbitrary bytes, sometimes with the right magic and version
        header = bytearray(draw(st.binary(min_size=256, max_size=256)))
        if draw(st.booleans()):
            header[:10] = b"NKDEVICE\x01\x00"
    elif how == "wrap":  # data_offset + data_size wraps a u64 onto a small total_size
        b = geo.buf_size
        data = -(-(U64 - geo.data_offset) // b) * b + draw(st.integers(0, 4)) * b
        total = (geo.data_offset + data) % U64
        for name, value in (("data_size", data), ("total_size", total)):
            off, size = FIELDS[name]
            header[off:off + size] = (value % U64).to_bytes(size, "little")
    total = int.from_bytes(header[16:24], "little")
    length = draw(st.one_of(
        st.integers(0, rdev.HEADER_SIZE + 8),
        st.just(min(total, 1 << 22)),
        st.integers(max(0, min(total, 1 << 22) - 64), min(total, 1 << 22) + 64),
    ))
    return bytes(header), length


def outcome(read: Callable[[memoryview], Any], header: bytes, length: int) -> tuple[Any, ...]:
    """("ok", geometry) or ("refused", message): what a reader makes of a region."""
    region = bytearray(max(length, rdev.HEADER_SIZE))
    region[:rdev.HEADER_SIZE] = header
    try:
        return ("ok", read(memoryview(region)[:length]))
    except rdev.DeviceError as exc:
        return ("refused", str(exc))


def check_same(read: Callable[[memoryview], Any], header: bytes, length: int) -> None:
    assert outcome(read, header, length) == outcome(rdev.read_header, header, length)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(region=regions())
@example(region=(b"", 0))
def test_reader_accepts_and_refuses_what_the_reference_does(region: tuple[bytes, int]) -> None:
    header, length = region
    check_same(fdev.read_header, header.ljust(rdev.HEADER_SIZE, b"\0"), length)


def _lax_read_header(buf: memoryview) -> Any:
    """A broken reader: it lets a wrong qset_stride through (breaks DEV-13)."""
    out = ffi.new("struct nk_geometry *")
    fault = lib.nk_dev_check_header(ffi.from_buffer(buf), len(buf), out)
    if fault == lib.NK_DEV_BAD_QSET_STRIDE:
        return "accepted a bad stride"
    if fault:
        raise rdev.DeviceError(f"fault {fault}")
    return rdev.Geometry(n_qsets=out.n_qsets, ring_entries=out.ring_entries,
                         data_size=out.data_size, send_size=out.send_size,
                         buf_size=out.buf_size, kind=rdev.Kind(out.kind))


def test_the_differential_check_catches_a_reader_that_skips_a_check() -> None:
    @settings(max_examples=400, database=None, derandomize=True, deadline=None)
    @given(region=regions())
    def differential(region: tuple[bytes, int]) -> None:
        check_same(_lax_read_header, *region)

    with pytest.raises(AssertionError):
        differential()


@given(geo=geometries, fill=st.integers(0, 255), slack=st.integers(0, 100),
       owner=st.integers(0, (1 << 32) - 1), dev_id=st.integers(0, (1 << 32) - 1),
       features=st.integers(0, (1 << 32) - 1))
def test_writer_writes_the_reference_bytes(geo: rdev.Geometry, fill: int, slack: int, owner: int,
                                           dev_id: int, features: int) -> None:
    a = bytearray([fill]) * (geo.total_size + slack)
    b = bytearray(a)
    fdev.init_header(memoryview(a), geo, owner_pid=owner, dev_id=dev_id,
                     features=rdev.Feature(features))
    rdev.init_header(memoryview(b), geo, owner_pid=owner, dev_id=dev_id,
                     features=rdev.Feature(features))
    assert a == b
    assert fdev.read_header(memoryview(a)) == geo


@given(geo=geometries, short=st.integers(1, 5000))
def test_writer_refuses_a_short_region_like_the_reference(geo: rdev.Geometry,
                                                          short: int) -> None:
    cut = max(0, geo.total_size - short)
    errors = []
    for init in (fdev.init_header, rdev.init_header):
        with pytest.raises(rdev.DeviceError) as exc:
            init(memoryview(bytearray([7]) * cut), geo)
        errors.append(str(exc.value))
    assert errors[0] == errors[1]


def test_c_reader_errno_categories() -> None:
    """nk_dev_read_header: 0 or -errno, one errno per category of refusal."""
    geo = rdev.Geometry(n_qsets=1, ring_entries=2, data_size=1 << 13, send_size=1 << 12,
                        buf_size=1 << 12)
    buf = bytearray(geo.total_size)
    fdev.init_header(memoryview(buf), geo)
    out = ffi.new("struct nk_geometry *")

    def rc(b: bytes | bytearray, n: int | None = None) -> int:
        return int(lib.nk_dev_read_header(ffi.from_buffer(b), len(b) if n is None else n, out))

    assert rc(buf) == 0 and out.data_size == geo.data_size
    assert rc(buf, 255) == rc(buf, geo.total_size - 1) == -errno.EMSGSIZE
    assert rc(b"NKDEVICX" + bytes(buf[8:])) == -errno.EBADMSG
    assert rc(bytes(buf[:8]) + b"\x02" + bytes(buf[9:])) == -errno.EPROTONOSUPPORT
    assert rc(bytes(buf[:24]) + b"\x03" + bytes(buf[25:])) == -errno.EINVAL
