"""The codec's ``struct`` twin (``nqe.WIRE``) against its construct declaration (NQE-1, NQE-2).

``nqe.WIRE`` is derived from ``nqe.NQE_STRUCT`` by ``nqe.wire_struct``; these
tests hold the two to the same bytes on random input, and the fast
``pack``/``unpack`` built on the twin to the results and errors of the
construct-based codec they replaced (kept below as the oracle).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import construct as cs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netkernel.reference import nqe as nq
from netkernel.reference.nqe import NQE

_WIDTHS = {name: size for name, _offset, size in nq.field_layout()}
_INTS = [name for name in nq.FIELDS if name != "reserved"]


def _field_values() -> st.SearchStrategy[dict[str, Any]]:
    """Every field within its width: exactly what the declaration can build."""
    return st.fixed_dictionaries({
        **{name: st.integers(0, (1 << (8 * _WIDTHS[name])) - 1) for name in _INTS},
        "reserved": st.binary(min_size=3, max_size=3),
    })


def _oracle_pack(n: NQE) -> bytes:
    """``pack`` as it was: the checks, then construct builds the bytes."""
    nq._check(n)
    built: bytes = nq.NQE_STRUCT.build(dataclasses.asdict(n))
    return built


def _oracle_unpack(buf: bytes) -> NQE:
    """``unpack`` as it was: construct parses, then every check runs."""
    raw = bytes(buf)
    if len(raw) != nq.NQE_SIZE:
        raise nq.NQEError(f"an NQE is {nq.NQE_SIZE} bytes, got {len(raw)}", field="length",
                          errno=22)
    c = nq.NQE_STRUCT.parse(raw)
    n = NQE(**{name: c[name] for name in nq.FIELDS})
    nq._check(n)
    return n


def _outcome(fn: Any, arg: Any) -> tuple[str, Any]:
    """What ``fn(arg)`` did: its value, or the error's type, field, errno and message."""
    try:
        return ("value", fn(arg))
    except nq.NQEError as exc:
        return ("NQEError", (exc.field, exc.errno, str(exc)))


def test_twin_has_the_declared_size_and_fields() -> None:
    assert nq.WIRE.size == nq.NQE_STRUCT.sizeof() == nq.NQE_SIZE
    assert tuple(f.name for f in dataclasses.fields(NQE)) == nq.FIELDS
    for name, offset, size in nq.field_layout():  # each field lands where it is declared
        values: dict[str, Any] = {n: 0 for n in _INTS} | {"reserved": bytes(3)}
        values[name] = b"\xff" * size if name == "reserved" else (1 << (8 * size)) - 1
        raw = nq.WIRE.pack(*(values[n] for n in nq.FIELDS))
        assert raw == bytes(offset) + b"\xff" * size + bytes(nq.NQE_SIZE - offset - size)


@given(_field_values())
def test_twin_builds_what_the_declaration_builds(fields: dict[str, Any]) -> None:
    raw = nq.NQE_STRUCT.build(fields)
    assert nq.WIRE.pack(*(fields[name] for name in nq.FIELDS)) == raw
    assert nq.WIRE.unpack(raw) == tuple(fields[name] for name in nq.FIELDS)


@given(st.binary(min_size=nq.NQE_SIZE, max_size=nq.NQE_SIZE))
def test_twin_parses_what_the_declaration_parses(raw: bytes) -> None:
    parsed = nq.NQE_STRUCT.parse(raw)
    assert nq.WIRE.unpack(raw) == tuple(parsed[name] for name in nq.FIELDS)
    assert nq.unpack_unchecked(raw) == NQE(**{name: parsed[name] for name in nq.FIELDS})


_OPS = st.one_of(st.sampled_from(sorted({int(o) for o in nq.Op} | {0xFF})),
                 st.sampled_from([int(o) | nq.REPLY_BIT for o in nq.Op]),
                 st.integers(0, 0xFF), st.integers(-2, 0x1FF))


@given(st.builds(
    NQE, op=_OPS, qset=st.integers(-1, 0x100), vm_id=st.integers(0, 0xFF),
    sock_id=st.integers(0, nq.U32_MAX + 1), op_data=st.integers(-1, nq.U64_MAX),
    data_ptr=st.integers(0, nq.U64_MAX + 1), size=st.integers(0, nq.U32_MAX),
    tag=st.integers(-1, nq.U16_MAX + 1),
    reserved=st.sampled_from([b"\0\0\0", b"\0\0\1", b"\x80\0\0"])))
def test_pack_matches_the_construct_codec(n: NQE) -> None:
    assert _outcome(nq.pack, n) == _outcome(_oracle_pack, n)


@given(st.one_of(
    st.binary(min_size=nq.NQE_SIZE, max_size=nq.NQE_SIZE),
    st.binary(max_size=40),
    st.sampled_from(sorted({int(o) for o in nq.Op})).map(
        lambda op: bytes([op]) + bytes(nq.NQE_SIZE - 1)),
))
def test_unpack_matches_the_construct_codec(raw: bytes) -> None:
    assert _outcome(nq.unpack, raw) == _outcome(_oracle_unpack, raw)
    assert _outcome(nq.unpack, bytearray(raw)) == _outcome(_oracle_unpack, raw)
    assert _outcome(nq.unpack, memoryview(raw)) == _outcome(_oracle_unpack, raw)


def test_wire_struct_translates_other_declarations() -> None:
    big = cs.Struct("a" / cs.Int16ub, "b" / cs.Bytes(5), "c" / cs.Int64ub)
    twin = nq.wire_struct(big)
    assert twin.format == ">H5sQ"
    assert twin.pack(7, b"hello", 9) == big.build({"a": 7, "b": b"hello", "c": 9})


@pytest.mark.parametrize("declared", [
    cs.Struct("a" / cs.Int16ul, "b" / cs.Int16ub),  # two byte orders
    cs.Struct("a" / cs.VarInt),  # no fixed width
    cs.Struct("n" / cs.Int8ul, "b" / cs.Bytes(cs.this.n)),  # length from the context
])
def test_wire_struct_refuses_what_struct_cannot_say(declared: cs.Struct) -> None:
    with pytest.raises(TypeError):
        nq.wire_struct(declared)
