"""The C codec (fastpath/nqe.py over csrc/nqe.c) against the reference codec, byte for byte.

Every check is a differential one: the same input goes to ``netkernel.reference.nqe``
(the judge) and to ``netkernel.fastpath.nqe``, and the two *outcomes* must be
equal: the value, or the error's type, field, errno (and, for the NQE codec,
message). Inputs are arbitrary bytes of any length, mutated valid NQEs, NQEs
with fields out of range or of the wrong type, addresses in and out of the
grammar. The batch forms (Python and raw C) must agree with the per-NQE ones.

A differential check counts only if it can fail: the last tests run the same
check functions on deliberately broken codecs and require hypothesis to find
a counterexample.
"""

from __future__ import annotations

import decimal
import types
from typing import Any

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from netkernel.fastpath import nqe as fast
from netkernel.fastpath._lib import ffi, lib
from netkernel.reference import nqe as ref

ACCEPTED = sorted(op for op in range(256) if ref.is_known_op(op))
WIDTH = {name: (1 << (8 * size)) - 1 for name, _, size in ref.field_layout()
         if name != "reserved"}


def outcome(fn: Any, *args: Any, message: bool = True) -> tuple[Any, ...]:
    """What ``fn(*args)`` did: its value, or the error's type, field, errno (and message)."""
    try:
        return ("value", fn(*args))
    except ref.NQEError as exc:
        return ("NQEError", exc.field, exc.errno) + ((str(exc),) if message else ())
    except Exception as exc:  # the type is the outcome (TypeError, ValueError...)
        return (type(exc).__name__,)


# -- strategies ----------------------------------------------------------------------------------


def valid_fields() -> Any:
    return st.fixed_dictionaries({"op": st.sampled_from(ACCEPTED),
                                  **{n: st.integers(0, w) for n, w in WIDTH.items() if n != "op"}})


def as_wire(f: dict[str, int], reserved: bytes = b"\0\0\0") -> bytes:
    return ref.WIRE.pack(*(f[n] for n in ref.FIELDS[:-1]), reserved)


def nqe_bytes() -> Any:
    """Valid NQEs, valid NQEs with one byte changed, and plain random 32 bytes."""
    valid = valid_fields().map(as_wire)
    mutated = st.tuples(valid, st.integers(0, 31), st.integers(0, 255)).map(
        lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:])
    return st.one_of(valid, mutated, st.binary(min_size=32, max_size=32))


def any_length() -> Any:
    return st.one_of(nqe_bytes(), st.binary(max_size=100),
                     nqe_bytes().flatmap(lambda b: st.integers(0, 64).map(lambda k: (b * 3)[:k])))


#: a field value: in its width, just outside it, far outside, or not an int at all
def field_value(name: str) -> Any:
    top = WIDTH[name]
    return st.one_of(
        st.integers(0, top), st.sampled_from([0, top, top + 1, -1, 1 << 64, -(1 << 64)]),
        st.integers(-(1 << 70), 1 << 70), st.booleans(),
        st.sampled_from([1.0, "1", None, decimal.Decimal(1), b"\x01"]),
    )


def any_nqe() -> Any:
    """NQE dataclasses with every kind of field value, mostly valid."""
    reserved = st.one_of(st.just(b"\0\0\0"), st.binary(min_size=3, max_size=3),
                         st.binary(max_size=5), st.just(bytearray(3)))
    fields = {n: st.one_of(valid_fields().map(lambda f, n=n: f[n]), field_value(n))
              for n in WIDTH}
    return st.builds(ref.NQE, **fields, reserved=reserved)


# -- the differential checks (also run against broken codecs below) ----------------------------


def decode_agrees(codec: Any, buf: bytes) -> bool:
    """Same accept/reject, errno, field, message and fields; the same error reply."""
    if outcome(codec.unpack, buf) != outcome(ref.unpack, buf):
        return False
    return outcome(codec.error_reply, buf) == outcome(ref.error_reply, buf)


def encode_agrees(codec: Any, nqe: ref.NQE) -> bool:
    return outcome(codec.pack, nqe) == outcome(ref.pack, nqe)


# -- NQEs ----------------------------------------------------------------------------------------


@given(buf=any_length())
def test_decoder_and_error_reply_agree_on_any_bytes(buf: bytes) -> None:
    assert decode_agrees(fast, buf)


@given(buf=nqe_bytes())
def test_decoder_agrees_on_every_input_type(buf: bytes) -> None:
    for arg in (bytearray(buf), memoryview(buf)):
        assert outcome(fast.unpack, arg) == outcome(ref.unpack, arg)
        assert outcome(fast.error_reply, arg) == outcome(ref.error_reply, arg)


@given(nqe=any_nqe())
def test_encoder_agrees_on_any_nqe(nqe: ref.NQE) -> None:
    """The same bytes, or the same NQEError (first failing field, errno, message)."""
    assert encode_agrees(fast, nqe)


@given(f=valid_fields())
def test_round_trip_through_c_is_the_reference_round_trip(f: dict[str, int]) -> None:
    nqe = ref.NQE(**f)
    assert fast.pack(nqe) == ref.pack(nqe)
    got = fast.unpack(fast.pack(nqe))
    # the same object in every respect the dataclass offers, not just ==
    assert type(got) is ref.NQE and vars(got) == vars(nqe) and hash(got) == hash(nqe)
    assert repr(got) == repr(nqe) and fast.unpack_many(ref.pack(nqe)) == [nqe]


@given(buf=nqe_bytes())
def test_error_reply_is_a_valid_nqe_with_the_reference_bytes(buf: bytes) -> None:
    got, want = outcome(fast.error_reply, buf), outcome(ref.error_reply, buf)
    assert got == want
    if got[0] == "value" and got[1] is not None:
        assert fast.pack(got[1]) == ref.pack(want[1])


def test_op_table_in_c_is_the_reference_table() -> None:
    """All 256 op bytes and a few non-bytes: nk_op_is_known against the reference's sets."""
    for op in [*range(-3, 260), True, 1.0, "x"]:
        assert fast.is_known_op(op) == ref.is_known_op(op), op
    for op in range(256):
        answerable = op in {int(o) for o, i in ref.OPS.items()
                            if i.replied or o is ref.Op.BUF_RETURN}
        assert bool(lib.nk_op_is_answerable(op)) == answerable, hex(op)


def test_module_is_a_drop_in_for_the_reference() -> None:
    """Every public name of the reference exists here, and the data model is the same object."""
    public = [n for n, obj in vars(ref).items() if not n.startswith("_")
              and not isinstance(obj, types.ModuleType)
              and getattr(obj, "__module__", ref.__name__) not in ("typing", "__future__")]
    missing = [n for n in public if not hasattr(fast, n)]
    assert not missing
    for name in ("NQE", "NQEError", "Op", "OPS", "Sockaddr", "Dir", "OpInfo", "NQE_STRUCT"):
        assert getattr(fast, name) is getattr(ref, name)


# -- batches -------------------------------------------------------------------------------------


@given(chunks=st.lists(nqe_bytes(), max_size=12), tail=st.binary(max_size=40))
def test_unpack_many_is_unpack_in_a_loop(chunks: list[bytes], tail: bytes) -> None:
    buf = b"".join(chunks) + tail
    loop = [buf[i:i + 32] for i in range(0, len(buf), 32)]
    assert outcome(fast.unpack_many, buf) == outcome(lambda: [ref.unpack(c) for c in loop])


@given(nqes=st.lists(st.one_of(valid_fields().map(lambda f: ref.NQE(**f)), any_nqe()),
                     max_size=10))
def test_pack_many_is_pack_in_a_loop(nqes: list[ref.NQE]) -> None:
    assert outcome(fast.pack_many, nqes) == outcome(lambda: b"".join(ref.pack(n) for n in nqes))


@given(chunks=st.lists(nqe_bytes(), max_size=16))
def test_c_batch_decode_and_encode_agree_with_the_reference(chunks: list[bytes]) -> None:
    """nk_nqe_decode_batch / nk_nqe_encode_batch (the CoreEngine's entry points), NQE by NQE."""
    n, buf = len(chunks), b"".join(chunks)
    out = ffi.new("struct nk_nqe[]", max(n, 1))
    status = ffi.new("int32_t[]", max(n, 1))
    accepted = lib.nk_nqe_decode_batch(buf, n, out, status)
    raw = ffi.new("uint8_t[]", max(n, 1) * 32)
    estatus = ffi.new("int32_t[]", max(n, 1))
    encoded = lib.nk_nqe_encode_batch(out, n, raw, estatus)
    want = [outcome(ref.unpack, c, message=False) for c in chunks]
    assert accepted == encoded == sum(w[0] == "value" for w in want)
    for i, (chunk, w) in enumerate(zip(chunks, want, strict=True)):
        assert bytes(ffi.buffer(out + i, 32)) == chunk
        assert status[i] == estatus[i] == (0 if w[0] == "value" else -w[2])
        assert bytes(ffi.buffer(raw + 32 * i, 32)) == (chunk if w[0] == "value" else bytes(32))
        single = ffi.new("struct nk_nqe *")
        assert lib.nk_nqe_decode(chunk, 32, single, ffi.NULL) == status[i]
    check_only = ffi.new("int32_t[]", max(n, 1))
    assert lib.nk_nqe_decode_batch(buf, n, ffi.NULL, check_only) == accepted
    assert list(check_only)[:n] == list(status)[:n]


# -- addresses (NQE-15) --------------------------------------------------------------------------

HOST_ALPHABET = "0123456789abcdefABCDEF:.%/ gx\x00\u0661"


def hosts() -> Any:
    """Real addresses, real addresses with one edit, and strings from the grammar's alphabet."""
    real = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                     st.ip_addresses(v=6).map(lambda a: a.exploded),
                     st.sampled_from(["::", "::1", "1::", "::ffff:1.2.3.4", "1:2:3:4:5:6:7::",
                                      "::1:2:3:4:5:6:7", "1:2:3:4:5:6:1.2.3.4", "0.0.0.0",
                                      "255.255.255.255", "01.2.3.4", "::1.2.3.4", ""]))
    edited = st.tuples(real, st.integers(0, 40), st.sampled_from([*HOST_ALPHABET, ""]),
                       st.booleans()).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + (1 if t[3] else 0):])
    return st.one_of(real, edited, st.text(alphabet=HOST_ALPHABET, max_size=45))


def sockaddrs() -> Any:
    num = st.one_of(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
                    st.sampled_from([0, -1, 2**32, 2**64, 2**70]))
    family = st.one_of(st.sampled_from([2, 10]), st.integers(-1, 12), st.just(2**70))
    typed = st.builds(ref.Sockaddr, family, hosts(), st.integers(0, 0xFFFF), st.just(0),
                      st.just(0))
    wild = st.builds(ref.Sockaddr, family, hosts(), num, num, num)
    odd = st.builds(ref.Sockaddr, st.sampled_from([2, 10, 2.0, True]),
                    st.sampled_from(["1.2.3.4", "::1", b"1.2.3.4", 16909060, None]),
                    st.sampled_from([80, 1.5, "80", True]))
    return st.one_of(typed, wild, odd)


@given(addr=sockaddrs())
def test_pack_sockaddr_agrees(addr: ref.Sockaddr) -> None:
    assert outcome(fast.pack_sockaddr, addr, message=False) == \
        outcome(ref.pack_sockaddr, addr, message=False)


def raw_sockaddrs() -> Any:
    v4 = st.tuples(st.binary(min_size=14, max_size=14)).map(lambda t: b"\x02\x00" + t[0])
    v6 = st.tuples(st.binary(min_size=26, max_size=26)).map(lambda t: b"\x0a\x00" + t[0])
    # addresses with long zero runs, where "::" placement is decided
    zeros = st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xABC]), min_size=8, max_size=8).map(
        lambda hs: b"\x0a\x00\x00\x50" + bytes(4) + b"".join(h.to_bytes(2, "big") for h in hs)
        + bytes(4))
    return st.one_of(v4, v6, zeros, st.binary(max_size=40))


@given(raw=raw_sockaddrs())
def test_unpack_sockaddr_agrees(raw: bytes) -> None:
    got = outcome(fast.unpack_sockaddr, raw, message=False)
    assert got == outcome(ref.unpack_sockaddr, raw, message=False)
    if got[0] == "value":  # and the text it writes reads back to the same bytes
        assert fast.pack_sockaddr(got[1])[:8] == raw[:8]


@pytest.mark.parametrize("host", ["::ffff:1.2.3.4", "::ffff:0.0.0.0", "1:0:0:2::3", "1::2:0:0:3",
                                  "0:0:1:0:0:1:0:0", "::", "::1", "1::", "fe80::1:0:0:0"])
def test_ipv6_text_is_pythons(host: str) -> None:
    """Spots where compressors differ (first longest run, runs of one, IPv4-mapped)."""
    addr = ref.Sockaddr(10, host, 1)
    assert fast.unpack_sockaddr(fast.pack_sockaddr(addr)) == \
        ref.unpack_sockaddr(ref.pack_sockaddr(addr))


# -- the checks can fail ------------------------------------------------------------------------


def broken_codec(**overrides: Any) -> Any:
    public = {k: getattr(fast, k) for k in dir(fast) if not k.startswith("__")}
    return types.SimpleNamespace(**{**public, **overrides})


def _unpack_ignoring_reserved(buf: Any) -> ref.NQE:
    raw = bytes(buf)
    return fast.unpack(raw[:29] + b"\0\0\0" if len(raw) == 32 else raw)


def _pack_truncating(nqe: ref.NQE) -> bytes:
    """Truncates an oversized sock_id instead of refusing it (NQE-5)."""
    if isinstance(nqe.sock_id, int) and nqe.sock_id > WIDTH["sock_id"]:
        nqe = ref.NQE(**{**nqe.__dict__, "sock_id": nqe.sock_id & WIDTH["sock_id"]})
    return fast.pack(nqe)


SEARCH = settings(max_examples=2000, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))


def test_differential_decode_check_catches_a_decoder_that_ignores_reserved_bytes() -> None:
    lax = broken_codec(unpack=_unpack_ignoring_reserved)
    bad = find(nqe_bytes(), lambda b: not decode_agrees(lax, b), settings=SEARCH)
    assert bad[29:32] != b"\0\0\0" and ref.is_known_op(bad[0])


def test_differential_encode_check_catches_an_encoder_that_truncates() -> None:
    lax = broken_codec(pack=_pack_truncating)
    bad = find(any_nqe(), lambda n: not encode_agrees(lax, n), settings=SEARCH)
    assert isinstance(bad.sock_id, int) and bad.sock_id > WIDTH["sock_id"]


# -- the benchmark runs (no speed is asserted: it is never a CI gate) ----------------------------


def test_bench_codec_runs_and_prints_its_ratios() -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "bench.codec", "--count", "5000", "--per-call",
                          "500", "--rounds", "1"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for row in ("decode + check", "check + encode"):
        line = next(line for line in run.stdout.splitlines() if line.startswith(row))
        ref_rate, per_call, many, batch = (float(x.replace(",", "")) for x in
                                           re.findall(r"[\d,]+\.\d+", line)[:4])
        assert min(ref_rate, per_call, many, batch) > 0, line
        printed = float(re.findall(r"([\d.]+)x", line)[-1])  # C-batch/ref as printed
        assert abs(printed - batch / ref_rate) <= 0.05 + 0.01 * printed, line
