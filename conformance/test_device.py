"""The NK device (spec/device.md, DEV-*): header, geometry, queue sets, data area.

Header offsets and the layout formulas are taken from spec/device.md, not
from the implementation: a test corrupts a header through the spec's table
and expects the target's reader to refuse it.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import struct
import uuid
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from netkernel.conformance.requirements import SPEC_DIR

SPEC = (SPEC_DIR / "device.md").read_text(encoding="utf-8")
#: header field -> (offset, size), from the table of DEV-3
HEADER: dict[str, tuple[int, int]] = {
    m.group(3): (int(m.group(1)), int(m.group(2)))
    for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|", SPEC, re.MULTILINE)
}
HEADER_SIZE = 256
LINE = 64
PAGE = 4096


def test_spec_header_table_parses() -> None:
    assert HEADER["magic"] == (0, 8) and HEADER["dev_id"] == (80, 4)
    assert sum(size for _, size in HEADER.values()) == 84


# -- the spec's formulas (DEV-7, DEV-10, DEV-13), as the test's own oracle -----------------------

def ring_size(entries: int) -> int:
    return 192 + 32 * entries


def stride(entries: int) -> int:
    return 2 * LINE + 4 * ring_size(entries)


def data_offset(n_qsets: int, entries: int) -> int:
    end = HEADER_SIZE + n_qsets * stride(entries)
    return -(-end // PAGE) * PAGE


def get(buf: Any, name: str) -> int:
    off, size = HEADER[name]
    return int.from_bytes(bytes(buf[off:off + size]), "little")


def put(buf: Any, name: str, value: int) -> None:
    off, size = HEADER[name]
    buf[off:off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


geometries = st.builds(
    lambda n, e, b, halves, send: dict(n_qsets=n, ring_entries=1 << e, buf_size=1 << b,
                                       data_size=halves << b, send_size=min(send, halves - 1) << b),
    st.integers(1, 4), st.integers(1, 9), st.integers(6, 14), st.integers(2, 64),
    st.integers(1, 63),
)


def make(device: Any, g: dict[str, int], kind: int = 1, slack: int = 0) -> tuple[Any, bytearray]:
    geo = device.Geometry(kind=device.Kind(kind), **g)
    buf = bytearray(data_offset(g["n_qsets"], g["ring_entries"]) + g["data_size"] + slack)
    device.init_header(memoryview(buf), geo)
    return geo, buf


def refused(device: Any, buf: Any) -> bool:
    try:
        device.read_header(memoryview(buf))
    except device.DeviceError:
        return True
    return False


# -- DEV-2, DEV-3: identification and header layout ---------------------------------------------

@pytest.mark.req("DEV-3", "DEV-13", "DEV-4")
@given(g=geometries, kind=st.sampled_from([1, 2]))
def test_init_writes_every_header_field_where_the_spec_says(device: Any, g: dict[str, int],
                                                           kind: int) -> None:
    _, buf = make(device, g, kind)
    e, n = g["ring_entries"], g["n_qsets"]
    expect = {
        "version": 1, "header_size": 256, "kind": kind, "state": 0, "n_qsets": n,
        "ring_entries": e, "qset_offset": 256, "qset_stride": stride(e),
        "data_offset": data_offset(n, e), "data_size": g["data_size"],
        "send_size": g["send_size"], "buf_size": g["buf_size"],
        "total_size": data_offset(n, e) + g["data_size"],
    }
    assert bytes(buf[0:8]) == b"NKDEVICE"
    assert {name: get(buf, name) for name in expect} == expect
    assert bytes(buf[84:256]) == bytes(172)
    back = device.read_header(memoryview(buf))
    assert (back.n_qsets, back.ring_entries, back.data_size, back.send_size, back.buf_size) == (
        n, e, g["data_size"], g["send_size"], g["buf_size"])


@pytest.mark.req("DEV-3")
@given(g=geometries, junk=st.binary(min_size=172, max_size=172))
def test_reader_ignores_the_unused_header_bytes(device: Any, g: dict[str, int],
                                                junk: bytes) -> None:
    _, buf = make(device, g)
    buf[84:256] = junk
    assert device.read_header(memoryview(buf)).ring_entries == g["ring_entries"]


@pytest.mark.req("DEV-2")
@given(g=geometries, at=st.integers(0, 7), byte=st.integers(0, 255))
def test_bad_magic_is_refused(device: Any, g: dict[str, int], at: int, byte: int) -> None:
    _, buf = make(device, g)
    assume(buf[at] != byte)
    buf[at] = byte
    assert refused(device, buf)


@pytest.mark.req("DEV-2")
@given(g=geometries, version=st.integers(0, 0xFFFF).filter(lambda v: v != 1))
def test_other_version_is_refused(device: Any, g: dict[str, int], version: int) -> None:
    _, buf = make(device, g)
    put(buf, "version", version)
    assert refused(device, buf)


@pytest.mark.req("DEV-2")
@given(g=geometries, kind=st.integers(0, 255).filter(lambda k: k not in (1, 2)))
def test_unknown_kind_is_refused(device: Any, g: dict[str, int], kind: int) -> None:
    _, buf = make(device, g)
    put(buf, "kind", kind)
    assert refused(device, buf)


@pytest.mark.req("DEV-5")
@given(g=geometries, features=st.integers(0, 2**32 - 1))
def test_unknown_feature_bits_are_ignored(device: Any, g: dict[str, int], features: int) -> None:
    _, buf = make(device, g)
    put(buf, "features", features)
    assert device.read_header(memoryview(buf)).ring_entries == g["ring_entries"]


# -- DEV-12 .. DEV-14: validation ------------------------------------------------------------------

bad_limits = st.one_of(
    st.tuples(st.just("n_qsets"), st.sampled_from([0, 256])),
    st.tuples(st.just("ring_entries"),
              st.one_of(st.sampled_from([0, 1, 1 << 17]),
                        st.integers(3, 1 << 10).filter(lambda v: v & (v - 1)))),
    st.tuples(st.just("buf_size"),
              st.one_of(st.sampled_from([0, 1, 32]),
                        st.integers(65, 1 << 20).filter(lambda v: v & (v - 1)))),
    st.tuples(st.just("send_size"), st.sampled_from(["zero", "all", "more", "odd"])),
    st.tuples(st.just("data_size"), st.sampled_from(["odd", "less"])),
)


@pytest.mark.req("DEV-12")
@given(g=geometries, bad=bad_limits)
def test_geometry_outside_its_limits_is_refused(device: Any, g: dict[str, int],
                                                bad: tuple[str, Any]) -> None:
    _, header = make(device, g)
    name, value = bad
    b, d, s = g["buf_size"], g["data_size"], g["send_size"]
    if isinstance(value, str):
        value = {"zero": 0, "all": d, "more": d + b, "less": s,
                 "odd": (s if name == "send_size" else d) + 1}[value]
    put(header, name, value)
    # keep the derived fields consistent with the bad sizes and the region large enough,
    # so that only the limits of DEV-12 can refuse it
    e, n = get(header, "ring_entries"), get(header, "n_qsets")
    put(header, "qset_stride", stride(e))
    put(header, "data_offset", data_offset(n, e))
    put(header, "total_size", data_offset(n, e) + get(header, "data_size"))
    buf = bytearray(max(len(header), get(header, "total_size")))
    buf[:HEADER_SIZE] = header[:HEADER_SIZE]
    assert refused(device, buf)
    with pytest.raises(device.DeviceError):
        device.Geometry(**{**g, name: value})


@pytest.mark.req("DEV-13")
@given(g=geometries,
       name=st.sampled_from(["header_size", "qset_offset", "qset_stride", "data_offset",
                             "total_size"]),
       delta=st.one_of(st.integers(1, 1 << 20), st.integers(-(1 << 20), -1),
                       st.sampled_from([LINE, PAGE, -LINE, -PAGE, 1 << 63])))
def test_derived_offset_that_disagrees_is_refused(device: Any, g: dict[str, int], name: str,
                                                  delta: int) -> None:
    _, buf = make(device, g, slack=1 << 21)
    old = get(buf, name)
    put(buf, name, old + delta)
    assume(get(buf, name) != old)  # a delta that wraps to the same value corrupts nothing
    assert refused(device, buf)


@pytest.mark.req("DEV-14")
@given(g=geometries, short=st.integers(1, 1 << 16), slack=st.integers(0, 1 << 12))
def test_region_shorter_than_total_size_is_refused(device: Any, g: dict[str, int], short: int,
                                                   slack: int) -> None:
    geo, buf = make(device, g, slack=slack)
    total = get(buf, "total_size")
    assert not refused(device, buf)  # a longer region is fine
    cut = max(0, total - short)
    assert refused(device, buf[:cut])
    with pytest.raises(device.DeviceError):
        device.init_header(memoryview(bytearray(cut)), geo)


@pytest.mark.req("DEV-14", "DEV-2")
@given(size=st.integers(0, HEADER_SIZE - 1))
def test_region_shorter_than_a_header_is_refused(device: Any, size: int) -> None:
    assert refused(device, (b"NKDEVICE\x01\x00" + bytes(HEADER_SIZE))[:size])


# -- DEV-4: initialisation -------------------------------------------------------------------------

@pytest.mark.req("DEV-4")
@given(g=geometries, fill=st.integers(1, 255))
def test_init_zeroes_every_bell_index_and_slot(device: Any, g: dict[str, int], fill: int) -> None:
    geo = device.Geometry(**g)
    buf = bytearray([fill]) * (data_offset(g["n_qsets"], g["ring_entries"]) + g["data_size"])
    device.init_header(memoryview(buf), geo)
    assert get(buf, "state") == 0  # INIT
    assert bytes(buf[HEADER_SIZE:get(buf, "data_offset")]) == bytes(
        get(buf, "data_offset") - HEADER_SIZE)


# -- DEV-6, DEV-7, DEV-10, DEV-11: where everything is ---------------------------------------------

@pytest.mark.req("DEV-6", "DEV-7", "DEV-10")
@given(g=geometries)
def test_queue_sets_bells_rings_and_data_area_are_where_the_spec_says(device: Any,
                                                                      g: dict[str, int]) -> None:
    geo = device.Geometry(**g)
    e = g["ring_entries"]
    spans = []
    for q in range(g["n_qsets"]):
        base = HEADER_SIZE + q * stride(e)
        for i, bell in enumerate(device.Bell):
            off = geo.bell_offset(q, bell)
            assert off == base + i * LINE and off % LINE == 0
            spans.append((off, LINE))
        for i, rid in enumerate(["JOB", "COMPLETION", "SEND", "RECEIVE"]):
            off = geo.ring_offset(q, device.RingId[rid])
            assert off == base + 2 * LINE + i * ring_size(e) and off % LINE == 0
            spans.append((off, ring_size(e)))
    spans.sort()
    for (a, alen), (b, _) in itertools.pairwise(spans):
        assert a + alen <= b, "rings and bells must not overlap"
    d = data_offset(g["n_qsets"], e)
    assert geo.data_offset == d and d % PAGE == 0 and spans[-1][0] + spans[-1][1] <= d
    assert geo.total_size == d + g["data_size"]


@pytest.mark.req("DEV-11")
@given(g=geometries, offset=st.integers(-(1 << 20), 1 << 22), size=st.integers(0, 1 << 22))
def test_send_and_receive_halves(device: Any, g: dict[str, int], offset: int, size: int) -> None:
    geo = device.Geometry(**g)
    s, d = g["send_size"], g["data_size"]
    assert geo.in_send_half(offset, size) == (offset >= 0 and offset + size <= s)
    assert geo.in_receive_half(offset, size) == (s <= offset and offset + size <= d)


@pytest.mark.req("DEV-8")
def test_ring_directions_agree_with_the_op_table(device: Any, codec: Any) -> None:
    """Device-side ops go on JOB/SEND (to the engine); events and engine messages on the others."""
    to_engine = {r.name.lower() for r in device.RingId if r.to_engine}
    from_engine = {r.name.lower() for r in device.RingId if not r.to_engine}
    assert to_engine == {"job", "send"} and from_engine == {"completion", "receive"}
    for op, info in codec.OPS.items():
        sent_by_engine = info.direction.value == "event" or op.name.startswith("TENANT_")
        assert info.ring in (from_engine if sent_by_engine else to_engine), op.name


# -- DEV-1: the same bytes anywhere ----------------------------------------------------------------

NQE = struct.Struct("<BBBIQQIH3x")


def _memfd(size: int) -> int:
    fd = os.memfd_create("nk-conformance")
    os.ftruncate(fd, size)
    return fd


def _shm_file(size: int) -> int:
    path = f"/dev/shm/nk-conformance-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)  # the mappings keep it alive
    os.ftruncate(fd, size)
    return fd


@pytest.mark.req("DEV-1")
@pytest.mark.parametrize("backing", [_memfd, _shm_file], ids=["memfd", "dev-shm-file"])
def test_two_mappings_and_a_copy_see_one_device(device: Any, ring: Any, backing: Any) -> None:
    """Created through one mapping, used through another at a different address, and copied."""
    geo = device.Geometry(n_qsets=2, ring_entries=8, data_size=1 << 16, send_size=1 << 15,
                          buf_size=1 << 12)
    fd = backing(geo.total_size)
    a = mmap.mmap(fd, geo.total_size)
    b = mmap.mmap(fd, geo.total_size)
    os.close(fd)
    va, vb = memoryview(a), memoryview(b)
    try:
        device.init_header(va, geo)
        seen = device.read_header(vb)
        assert seen.total_size == geo.total_size
        off = seen.ring_offset(1, device.RingId.SEND)
        producer = ring.Ring(va, geo.ring_offset(1, device.RingId.SEND), geo.ring_entries)
        sent = [NQE.pack(0x06, 1, 0, 7, i, 4096 * i, 100, i) for i in range(5)]
        assert producer.push_many(sent) == 5
        copy = memoryview(bytearray(vb))  # another address again
        assert device.read_header(copy).data_offset == geo.data_offset
        assert ring.Ring(copy, off, seen.ring_entries).pop_many(8) == sent
        assert ring.Ring(vb, off, seen.ring_entries).pop_many(8) == sent
        del producer
    finally:
        va.release()
        vb.release()
        a.close()
        b.close()
