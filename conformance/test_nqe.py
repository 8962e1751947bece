"""NQE v1 (spec/nqe.md): layout, op table, results, matching, malformed NQEs, addresses.

The expected layout and op codes are read from spec/nqe.md itself, so the
codec under test is held to the spec, not to the reference. The reference
codec is used only as the oracle of the differential test (NQE-12): whatever
32 bytes arrive, a target must accept and reject exactly what it does.
"""

from __future__ import annotations

import ctypes
import errno
import re
import socket
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netkernel.conformance.requirements import SPEC_DIR
from netkernel.reference import nqe as ref_nqe  # the oracle of the differential tests

SPEC = (SPEC_DIR / "nqe.md").read_text(encoding="utf-8")

# -- what the spec says -------------------------------------------------------------------

#: (field, offset, size) from the layout table of spec/nqe.md §1
LAYOUT: list[tuple[str, int, int]] = [
    (m.group(3), int(m.group(1)), int(m.group(2)))
    for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|", SPEC, re.MULTILINE)
]
INT_FIELDS = [(name, off, size) for name, off, size in LAYOUT if name != "reserved"]
#: code -> (name, kind) from the op table of spec/nqe.md §2
OP_ROWS: dict[int, tuple[str, str]] = {
    int(m.group(1), 16): (m.group(2), m.group(3))
    for m in re.finditer(r"^\|\s*0x([0-9A-Fa-f]{2})\s*\|\s*([^|]+?)\s*\|\s*(\w+)\s*\|",
                         SPEC, re.MULTILINE)
}
UNKNOWN_REPLY = 0xFF
REQUEST_CODES = {c for c, (_, kind) in OP_ROWS.items() if kind in ("request", "control")}
EVENT_CODES = {c for c, (_, kind) in OP_ROWS.items() if kind == "event"}
#: every op byte a v1 receiver accepts (NQE-7, NQE-8, NQE-11)
ACCEPTED = REQUEST_CODES | EVENT_CODES | {c | 0x80 for c in REQUEST_CODES} | {UNKNOWN_REPLY}
UNKNOWN = sorted(set(range(256)) - ACCEPTED)
WIDTH = {name: (1 << (8 * size)) - 1 for name, _, size in INT_FIELDS}


def test_spec_tables_parse() -> None:
    """The tables this file reads are where it expects them (guards the parsers below)."""
    assert [n for n, _, _ in LAYOUT] == ["op", "qset", "vm_id", "sock_id", "op_data",
                                         "data_ptr", "size", "tag", "reserved"]
    assert sum(size for _, _, size in LAYOUT) == 32
    assert len(REQUEST_CODES) >= 15 and len(EVENT_CODES) >= 4 and UNKNOWN_REPLY in OP_ROWS


# -- strategies ------------------------------------------------------------------------------

ANY_ACCEPTED_OP = st.sampled_from(sorted(ACCEPTED))


def fields(ops: st.SearchStrategy[int] = ANY_ACCEPTED_OP) -> Any:
    return st.fixed_dictionaries(
        {"op": ops, **{n: st.integers(0, WIDTH[n]) for n, _, _ in INT_FIELDS if n != "op"}})


def raw_nqe(f: dict[str, int], reserved: bytes = b"\0\0\0") -> bytes:
    """An NQE built straight from the spec's layout table: the test's own encoder."""
    out = bytearray(32)
    for name, off, size in INT_FIELDS:
        out[off:off + size] = f[name].to_bytes(size, "little")
    out[29:32] = reserved
    return bytes(out)


def as_dict(codec: Any, nqe: Any) -> dict[str, Any]:
    return {name: getattr(nqe, name) for name, _, _ in LAYOUT}


nonzero_reserved = st.binary(min_size=3, max_size=3).filter(lambda b: b != b"\0\0\0")


# -- NQE-1 .. NQE-5: the bytes ------------------------------------------------------------------

@pytest.mark.req("NQE-1", "NQE-2", "NQE-3", "NQE-7")
@given(f=fields())
def test_round_trip_every_op(codec: Any, f: dict[str, int]) -> None:
    """Any accepted op, any field values: 32 bytes at the spec's offsets; unpack inverts pack."""
    wire = codec.pack(codec.NQE(**f))
    assert len(wire) == 32
    assert wire == raw_nqe(f)
    got = codec.unpack(wire)
    assert as_dict(codec, got) == {**f, "reserved": b"\0\0\0"}


@pytest.mark.req("NQE-2", "NQE-3")
def test_field_bytes_are_little_endian_at_their_offsets(codec: Any) -> None:
    """Distinct byte patterns per field land on the spec's bytes, least significant first."""
    f = {"op": 0x06, "qset": 0x11, "vm_id": 0x22, "sock_id": 0x33343536,
         "op_data": 0x4142434445464748, "data_ptr": 0x5152535455565758,
         "size": 0x61626364, "tag": 0x7172}
    wire = codec.pack(codec.NQE(**f))
    assert wire.hex() == ("06" "11" "22" "36353433" "4847464544434241" "5857565554535251"
                          "64636261" "7271" "000000")
    assert as_dict(codec, codec.unpack(wire))["sock_id"] == 0x33343536


@pytest.mark.req("NQE-1")
@given(buf=st.binary(max_size=96).filter(lambda b: len(b) != 32))
def test_wrong_length_is_rejected_whole(codec: Any, buf: bytes) -> None:
    with pytest.raises(codec.NQEError) as exc:
        codec.unpack(buf)
    assert exc.value.errno == errno.EINVAL
    assert codec.error_reply(buf) is None  # no field of it can be trusted: no reply


@pytest.mark.req("NQE-1")
@given(f=fields(), extra=st.binary(min_size=1, max_size=32))
def test_valid_nqe_with_trailing_bytes_is_rejected(codec: Any, f: dict[str, int],
                                                   extra: bytes) -> None:
    """A decoder must not decode the valid prefix of a longer buffer, nor pad a short one."""
    wire = raw_nqe(f)
    for buf in (wire + extra, wire[:-len(extra)]):
        with pytest.raises(codec.NQEError) as exc:
            codec.unpack(buf)
        assert exc.value.errno == errno.EINVAL


@pytest.mark.req("NQE-4")
@given(f=fields(), reserved=nonzero_reserved)
def test_encoder_refuses_nonzero_reserved(codec: Any, f: dict[str, int], reserved: bytes) -> None:
    with pytest.raises(codec.NQEError) as exc:
        codec.pack(codec.NQE(**f, reserved=reserved))
    assert exc.value.errno == errno.EINVAL
    assert exc.value.field == "reserved"


@pytest.mark.req("NQE-4", "NQE-10")
@given(f=fields(), reserved=nonzero_reserved)
def test_decoder_rejects_nonzero_reserved(codec: Any, f: dict[str, int], reserved: bytes) -> None:
    with pytest.raises(codec.NQEError) as exc:
        codec.unpack(raw_nqe(f, reserved))
    assert exc.value.errno == errno.EINVAL
    assert exc.value.field == "reserved"


@pytest.mark.req("NQE-5")
@given(f=fields(), name=st.sampled_from([n for n, _, _ in INT_FIELDS]),
       over=st.one_of(st.integers(1, 1 << 70), st.integers(-(1 << 70), -1)))
def test_encoder_refuses_values_out_of_width(codec: Any, f: dict[str, int], name: str,
                                            over: int) -> None:
    bad = WIDTH[name] + over if over > 0 else over
    with pytest.raises(codec.NQEError) as exc:
        codec.pack(codec.NQE(**{**f, name: bad}))
    assert exc.value.errno == errno.EINVAL
    assert exc.value.field == name


# -- NQE-7, NQE-8: the op table -------------------------------------------------------------------

@pytest.mark.req("NQE-7")
def test_spec_op_table_lists_exactly_the_codec_ops(codec: Any) -> None:
    """The hand-written table of spec/nqe.md and the codec's Op enum name the same codes."""
    in_spec = {c: name for c, (name, kind) in OP_ROWS.items() if kind != "reply"}
    in_codec = {int(op): op.name for op in codec.Op}
    assert in_spec == in_codec
    assert OP_ROWS[UNKNOWN_REPLY][1] == "reply"
    assert codec.OP_UNKNOWN_REPLY == UNKNOWN_REPLY


@pytest.mark.req("NQE-7", "NQE-8", "NQE-11")
def test_every_op_byte_is_accepted_or_unknown_as_the_table_says(codec: Any) -> None:
    """All 256 op bytes: the table's codes and the reply codes of answered ops, nothing else."""
    for op in range(256):
        wire = raw_nqe({"op": op, "qset": 0, "vm_id": 0, "sock_id": 1, "op_data": 0,
                        "data_ptr": 0, "size": 0, "tag": 0})
        if op in ACCEPTED:
            assert codec.unpack(wire).op == op
        else:
            with pytest.raises(codec.NQEError) as exc:
                codec.unpack(wire)
            assert (exc.value.errno, exc.value.field) == (errno.ENOSYS, "op"), hex(op)


@pytest.mark.req("NQE-8", "NQE-9", "NQE-4")
@given(f=fields(st.sampled_from(sorted(REQUEST_CODES))),
       result=st.integers(-4095, (1 << 63) - 1))
def test_reply_sets_bit_7_and_echoes_the_matching_fields(codec: Any, f: dict[str, int],
                                                         result: int) -> None:
    reply = codec.NQE(**f).reply(result)
    got = codec.unpack(codec.pack(reply))
    assert got.op == f["op"] | 0x80
    assert (got.qset, got.sock_id, got.tag) == (f["qset"], f["sock_id"], f["tag"])
    assert got.result == result
    assert got.reserved == b"\0\0\0"


# -- NQE-13: results ---------------------------------------------------------------------------

@pytest.mark.req("NQE-13")
@given(f=fields(st.sampled_from(sorted(REQUEST_CODES))),
       result=st.integers(-(1 << 63), (1 << 63) - 1))
def test_result_is_signed_64_bit_twos_complement(codec: Any, f: dict[str, int],
                                                 result: int) -> None:
    wire = codec.pack(codec.NQE(**f).reply(result))
    assert wire[7:15] == struct.pack("<q", result)
    assert codec.unpack(wire).result == result


@pytest.mark.req("NQE-13")
@pytest.mark.parametrize("name", ["EINVAL", "ENOSYS", "EFAULT", "ECONNREFUSED", "ECONNRESET",
                                  "EAGAIN", "EAFNOSUPPORT", "EPIPE"])
def test_errors_travel_as_negative_linux_errno(codec: Any, name: str) -> None:
    linux = {"EINVAL": 22, "ENOSYS": 38, "EFAULT": 14, "ECONNREFUSED": 111, "ECONNRESET": 104,
             "EAGAIN": 11, "EAFNOSUPPORT": 97, "EPIPE": 32}[name]
    req = codec.NQE(op=0x04, sock_id=7, tag=3)
    wire = codec.pack(req.reply(-linux))
    assert wire[7:15] == (-linux).to_bytes(8, "little", signed=True)
    assert codec.unpack(wire).result == -linux


@pytest.mark.req("NQE-13", "NQE-10", "NQE-11")
def test_codec_rejections_carry_linux_errno_numbers(codec: Any) -> None:
    good = raw_nqe({"op": 0x01, "qset": 0, "vm_id": 0, "sock_id": 1, "op_data": 0,
                    "data_ptr": 0, "size": 0, "tag": 0})
    cases = {good[:31]: 22, bytes([UNKNOWN[0]]) + good[1:]: 38, good[:29] + b"\0\0\1": 22}
    for buf, linux in cases.items():
        with pytest.raises(codec.NQEError) as exc:
            codec.unpack(buf)
        assert exc.value.errno == linux


# -- NQE-9: matching -------------------------------------------------------------------------------

@pytest.mark.req("NQE-9")
@given(data=st.data(),
       keys=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 0xFFFF)), min_size=1,
                     max_size=24, unique=True))
def test_replies_in_any_order_find_their_requests(codec: Any, data: st.DataObject,
                                                  keys: list[tuple[int, int]]) -> None:
    """Requests in flight with distinct (sock_id, tag); their replies come back shuffled."""
    requests = {
        key: codec.NQE(op=data.draw(st.sampled_from(sorted(REQUEST_CODES))), sock_id=key[0],
                       tag=key[1], qset=data.draw(st.integers(0, 3)))
        for key in keys
    }
    results = {key: data.draw(st.integers(-4095, 1 << 40)) for key in keys}
    wires = [codec.pack(req.reply(results[key])) for key, req in requests.items()]
    for wire in data.draw(st.permutations(wires)):
        got = codec.unpack(wire)
        key = (got.sock_id, got.tag)
        assert key in requests, "a reply must carry its request's (sock_id, tag)"
        req = requests.pop(key)
        assert got.op == req.op | 0x80 and got.qset == req.qset
        assert got.result == results[key]
    assert not requests


# -- NQE-10 .. NQE-12: malformed NQEs --------------------------------------------------------------

@pytest.mark.req("NQE-10")
@given(f=fields(), reserved=nonzero_reserved)
def test_nonzero_reserved_is_answered_einval_only_for_answered_ops(
        codec: Any, f: dict[str, int], reserved: bytes) -> None:
    reply = codec.error_reply(raw_nqe(f, reserved))
    if f["op"] in REQUEST_CODES:
        assert reply is not None
        assert reply.op == f["op"] | 0x80
        assert reply.result == -errno.EINVAL
        assert (reply.qset, reply.sock_id, reply.tag) == (f["qset"], f["sock_id"], f["tag"])
        assert reply.reserved == b"\0\0\0"
        codec.pack(reply)  # the answer itself is a valid NQE
    else:  # an event or a reply is never answered
        assert reply is None


@pytest.mark.req("NQE-11")
@given(f=fields(st.sampled_from(UNKNOWN)), reserved=st.binary(min_size=3, max_size=3))
def test_unknown_op_is_answered_0xff_enosys_unless_it_is_a_reply(
        codec: Any, f: dict[str, int], reserved: bytes) -> None:
    wire = raw_nqe(f, reserved)
    with pytest.raises(codec.NQEError) as exc:
        codec.unpack(wire)
    assert (exc.value.errno, exc.value.field) == (errno.ENOSYS, "op")
    reply = codec.error_reply(wire)
    if f["op"] & 0x80:
        assert reply is None
        return
    assert reply is not None
    back = codec.unpack(codec.pack(reply))
    assert back.op == UNKNOWN_REPLY and back.result == -errno.ENOSYS
    assert (back.qset, back.sock_id, back.tag, back.data_ptr, back.size) == (
        f["qset"], f["sock_id"], f["tag"], f["data_ptr"], f["size"])


@pytest.mark.req("NQE-12")
@given(buf=st.binary(min_size=32, max_size=32))
def test_first_failing_check_decides_the_errno(codec: Any, buf: bytes) -> None:
    """Unknown op (ENOSYS) before reserved bytes (EINVAL), whatever else is wrong."""
    if buf[0] not in ACCEPTED:
        expect: tuple[int, str] | None = (errno.ENOSYS, "op")
    elif buf[29:32] != b"\0\0\0":
        expect = (errno.EINVAL, "reserved")
    else:
        expect = None
    try:
        codec.unpack(buf)
    except codec.NQEError as exc:
        assert (exc.errno, exc.field) == expect
    else:
        assert expect is None


# -- differential: the target's codec against the reference, on any 32 bytes -------------------

def mutated_nqes() -> Any:
    """Mostly-valid NQEs with a mutated op or reserved bytes, plus plain random bytes."""
    valid = fields().map(raw_nqe)
    mutated = st.tuples(valid, st.integers(0, 31), st.integers(0, 255)).map(
        lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:])
    return st.one_of(valid, mutated, st.binary(min_size=32, max_size=32))


@pytest.mark.req("NQE-1", "NQE-2", "NQE-10", "NQE-11", "NQE-12")
@given(buf=mutated_nqes())
def test_differential_against_reference_codec(codec: Any, buf: bytes) -> None:
    """Same accept/reject, same errno and field, same decoded fields, same error reply."""
    try:
        want: Any = as_dict(codec, ref_nqe.unpack(buf))
    except ref_nqe.NQEError as exc:
        want = (exc.errno, exc.field)
    try:
        got: Any = as_dict(codec, codec.unpack(buf))
    except codec.NQEError as exc:
        got = (exc.errno, exc.field)
    assert got == want
    if isinstance(want, tuple):
        ref_reply, reply = ref_nqe.error_reply(buf), codec.error_reply(buf)
        assert (reply is None) == (ref_reply is None)
        if reply is not None:
            assert codec.pack(reply) == ref_nqe.pack(ref_reply)


# -- NQE-15: addresses in data buffers ----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def linux_sockname(family: int, host: str) -> tuple[bytes, int]:
    """The bytes Linux itself writes for a bound UDP socket's address: the oracle."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        buf = ctypes.create_string_buffer(128)
        length = ctypes.c_uint32(128)
        assert _libc.getsockname(s.fileno(), buf, ctypes.byref(length)) == 0
        return buf.raw[:length.value], s.getsockname()[1]


@pytest.mark.req("NQE-15")
@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_sockaddr_is_what_linux_writes(codec: Any, family: int, host: str) -> None:
    try:
        raw, port = linux_sockname(family, host)
    except OSError as exc:  # e.g. no IPv6 loopback in this namespace
        pytest.skip(f"not applicable: Linux cannot bind {host}: {exc}")
    assert len(raw) == {socket.AF_INET: 16, socket.AF_INET6: 28}[family]
    assert codec.pack_sockaddr(codec.Sockaddr(family, host, port)) == raw
    got = codec.unpack_sockaddr(raw)
    assert (got.family, got.host, got.port) == (family, host, port)


sockaddrs = st.one_of(
    st.builds(lambda ip, port: (socket.AF_INET, str(ip), port, 0, 0),
              st.ip_addresses(v=4), st.integers(0, 0xFFFF)),
    st.builds(lambda ip, port, flow, scope: (socket.AF_INET6, str(ip), port, flow, scope),
              st.ip_addresses(v=6), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)),
)


@pytest.mark.req("NQE-15")
@given(a=sockaddrs, junk=st.binary(min_size=8, max_size=8))
def test_sockaddr_layout_and_round_trip(codec: Any, a: tuple[int, str, int, int, int],
                                        junk: bytes) -> None:
    family, host, port, flow, scope = a
    raw = codec.pack_sockaddr(codec.Sockaddr(family, host, port, flow, scope))
    packed = socket.inet_pton(family, host)
    if family == socket.AF_INET:
        assert raw == struct.pack("<H", 2) + struct.pack(">H", port) + packed + bytes(8)
        assert codec.unpack_sockaddr(raw[:8] + junk) == codec.unpack_sockaddr(raw)  # sin_zero
    else:
        assert raw == (struct.pack("<H", 10) + struct.pack(">HI", port, flow) + packed
                       + struct.pack("<I", scope))
    got = codec.unpack_sockaddr(raw)
    assert tuple(got) == (family, host, port, flow, scope)


@pytest.mark.req("NQE-15")
@given(raw=st.binary(max_size=40))
def test_sockaddr_decoder_rejects_bad_family_and_length(codec: Any, raw: bytes) -> None:
    family = int.from_bytes(raw[:2], "little") if len(raw) >= 2 else None
    sizes = {2: 16, 10: 28}
    if family is None:
        expect: int | None = errno.EINVAL
    elif family not in sizes:
        expect = errno.EAFNOSUPPORT
    elif len(raw) != sizes[family]:
        expect = errno.EINVAL
    else:
        expect = None
    try:
        codec.unpack_sockaddr(raw)
    except codec.NQEError as exc:
        assert exc.errno == expect
    else:
        assert expect is None
