"""The ``netkernel nqe`` debugging tool, run as users run it: as a subprocess.

Both entry points are exercised (``python -m netkernel`` and the ``netkernel``
console script). Expected values come from the reference codec, never from
strings typed here: the tool must say what ``netkernel.reference.nqe`` says.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import sysconfig
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netkernel import cli
from netkernel.reference import nqe as ref

SEND = ref.NQE(op=ref.Op.SEND, qset=1, vm_id=2, sock_id=7, op_data=0, data_ptr=4096, size=100,
               tag=9)
REFUSED = ref.NQE(op=ref.Op.CONNECT, sock_id=3, tag=5).reply(-errno.ECONNREFUSED)


def _console_script() -> str:
    found = shutil.which("netkernel", path=sysconfig.get_path("scripts")) or shutil.which(
        "netkernel")
    if found is None:
        pytest.fail("the netkernel console script is not installed (pip install -e .)")
    return found


ENTRY_POINTS = {
    "module": [sys.executable, "-m", "netkernel"],
    "script": [_console_script()],
}


def run(*args: str, entry: str = "module") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ENTRY_POINTS[entry], *args], capture_output=True, text=True,
                          timeout=60, check=False)


def ok(*args: str, entry: str = "module") -> str:
    proc = run(*args, entry=entry)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def fails(*args: str) -> str:
    """Run a command that must be rejected: exit 2, one line on stderr, no traceback."""
    proc = run(*args)
    assert proc.returncode == cli.EXIT_USAGE, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def codec_error(raw: bytes) -> str:
    with pytest.raises(ref.NQEError) as info:
        ref.unpack(raw)
    return str(info.value)


# -- decode -------------------------------------------------------------------


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_decode_prints_every_field_with_offset_size_value_and_meaning(entry: str) -> None:
    out = ok("nqe", "decode", ref.pack(SEND).hex(), entry=entry)
    lines = out.splitlines()
    for name, offset, size in ref.field_layout():
        row = next(line for line in lines if line.split()[:1] == [name])
        value = getattr(SEND, name)
        expected = value.hex() if isinstance(value, bytes) else str(value)
        assert row.split()[1:4] == [str(offset), str(size), expected], row
        assert ref.FIELD_DOC[name] in out
    info = ref.OPS[ref.Op.SEND]
    assert f"SEND: {info.op_data}" in out
    assert f"SEND: {info.data}" in out
    assert "0x0000000000001000" in out  # data_ptr in hex, zero-padded to its 8 bytes


def test_decode_reply_reads_the_result_as_errno() -> None:
    out = ok("nqe", "decode", ref.pack(REFUSED).hex())
    assert "CONNECT|REPLY" in out
    assert f"-{errno.ECONNREFUSED} (ECONNREFUSED)" in out
    assert ref.OPS[ref.Op.CONNECT].reply in out
    assert "echoed from the request" in out


def test_decode_unknown_op_reply() -> None:
    reply = ref.NQE(op=0x30, sock_id=4, tag=2).reply(-errno.ENOSYS)
    assert reply.op == ref.OP_UNKNOWN_REPLY
    out = ok("nqe", "decode", ref.pack(reply).hex())
    assert "UNKNOWN_REPLY" in out
    assert f"-{errno.ENOSYS} (ENOSYS)" in out


def test_decode_accepts_spaces_colons_and_split_words() -> None:
    raw = ref.pack(SEND)
    plain = ok("nqe", "decode", raw.hex())
    assert ok("nqe", "decode", raw.hex(":")) == plain
    assert ok("nqe", "decode", raw.hex(" ")) == plain
    assert ok("nqe", "decode", *raw.hex(" ").split()) == plain
    assert ok("nqe", "decode", "0x" + raw.hex().upper()) == plain


def test_decode_json_matches_the_codec() -> None:
    doc = json.loads(ok("nqe", "decode", "--json", ref.pack(REFUSED).hex()))
    assert doc["hex"] == ref.pack(REFUSED).hex()
    assert doc["op_name"] == ref.op_name(REFUSED.op) and doc["is_reply"] is True
    assert doc["result"] == -errno.ECONNREFUSED and doc["errno"] == "ECONNREFUSED"
    assert [(f["name"], f["offset"], f["size"]) for f in doc["fields"]] == ref.field_layout()
    for field in doc["fields"]:
        value = getattr(REFUSED, field["name"])
        assert field["value"] == (value.hex() if isinstance(value, bytes) else value)
        assert field["meaning"] == ref.FIELD_DOC[field["name"]]


def test_decode_json_of_a_request_has_no_result() -> None:
    doc = json.loads(ok("nqe", "decode", "--json", ref.pack(SEND).hex()))
    assert doc["result"] is None and doc["errno"] is None and doc["is_reply"] is False


# -- decode errors: the codec's message, exit 2, no traceback ---------------------


def test_decode_wrong_length_gives_the_codec_message() -> None:
    raw = ref.pack(SEND)[:31]
    assert fails("nqe", "decode", raw.hex()).endswith(codec_error(raw))


def test_decode_unknown_op_gives_the_codec_message() -> None:
    raw = bytes([0x30]) + bytes(31)
    line = fails("nqe", "decode", raw.hex())
    assert line.endswith(codec_error(raw)) and "0x30" in line


def test_decode_nonzero_reserved_gives_the_codec_message() -> None:
    raw = ref.pack(SEND)[:29] + b"\x00\x01\x00"
    line = fails("nqe", "decode", raw.hex())
    assert line.endswith(codec_error(raw)) and "reserved" in line


@pytest.mark.parametrize("text", ["060", "06zz", "", "::"])
def test_decode_malformed_hex(text: str) -> None:
    assert fails("nqe", "decode", text).startswith("netkernel nqe decode: error: ")


# -- encode -------------------------------------------------------------------


def test_encode_prints_the_codec_bytes() -> None:
    out = ok("nqe", "encode", "op=SEND", "qset=1", "vm_id=2", "sock_id=7", "op_data=0",
             "data_ptr=0x1000", "size=100", "tag=9", entry="script")
    assert out.strip() == ref.pack(SEND).hex()


def test_encode_reply_by_errno_name_or_result() -> None:
    by_name = ok("nqe", "encode", "op=CONNECT|REPLY", "sock_id=3", "tag=5", "errno=ECONNREFUSED")
    by_result = ok("nqe", "encode", f"op={ref.Op.CONNECT | ref.REPLY_BIT:#x}", "sock_id=3",
                   "tag=5", f"result=-{errno.ECONNREFUSED}")
    assert by_name.strip() == by_result.strip() == ref.pack(REFUSED).hex()


@pytest.mark.parametrize("nqe", [
    SEND, REFUSED, SEND.reply(100),
    ref.NQE(op=ref.Op.EV_ERROR, sock_id=9, op_data=ref.encode_result(-errno.ECONNRESET)),
    ref.NQE(op=ref.OP_UNKNOWN_REPLY, sock_id=1, tag=0xFFFF,
            op_data=ref.encode_result(-errno.ENOSYS)),
])
def test_encode_decode_round_trip(nqe: ref.NQE) -> None:
    args = [f"{name}={getattr(nqe, name)}" for name, _, _ in ref.field_layout()
            if name != "reserved"]
    hex_text = ok("nqe", "encode", *args).strip()
    assert ref.unpack(bytes.fromhex(hex_text)) == nqe
    doc = json.loads(ok("nqe", "decode", "--json", hex_text))
    assert {f["name"]: f["value"] for f in doc["fields"]} == {
        name: (v.hex() if isinstance(v := getattr(nqe, name), bytes) else v)
        for name, _, _ in ref.field_layout()
    }


@pytest.mark.parametrize(("args", "says"), [
    (["op=FROB"], "unknown op 'FROB'"),
    (["op=SEND|LATER"], "REPLY"),
    (["op=SEND", "colour=7"], "unknown field 'colour'"),
    (["op=SEND", "reserved=1"], "reserved"),
    (["sock_id=1"], "op=... is required"),
    (["op=SEND", "size=1", "size=2"], "given twice"),
    (["op=SEND", "size=ten"], "not an integer"),
    (["op=SEND", "sock_id"], "expected FIELD=VALUE"),
    (["op=SEND|REPLY", "op_data=1", "errno=EPIPE"], "give only one"),
    (["op=SEND|REPLY", "errno=EWHATEVER"], "unknown errno"),
    (["op=SEND|REPLY", f"result={1 << 63}"], "signed 64-bit"),
])
def test_encode_rejects_bad_fields(args: list[str], says: str) -> None:
    line = fails("nqe", "encode", *args)
    assert line.startswith("netkernel nqe encode: error: ") and says in line


@pytest.mark.parametrize(("field", "value"), [("qset", 256), ("sock_id", -1), ("tag", 1 << 16),
                                              ("op", 0x30)])
def test_encode_out_of_range_gives_the_codec_message(field: str, value: int) -> None:
    with pytest.raises(ref.NQEError) as info:
        fields: dict[str, Any] = {"op": int(ref.Op.SEND), field: value}
        ref.pack(ref.NQE(**fields))
    args = ["op=SEND", f"{field}={value}"] if field != "op" else [f"op={value}"]
    assert fails("nqe", "encode", *args).endswith(str(info.value))


# -- ops ----------------------------------------------------------------------


def test_ops_lists_the_op_table() -> None:
    out = ok("nqe", "ops")
    for op, info in ref.OPS.items():
        row = next(line for line in out.splitlines() if line.startswith(f"{op:#04x} "))
        assert op.name in row.split() and info.ring in row.split()
        assert info.op_data in out and info.reply in out
    assert f"{ref.OP_UNKNOWN_REPLY:#04x}" in out


def test_ops_json() -> None:
    doc = json.loads(ok("nqe", "ops", "--json"))
    assert [(e["code"], e["name"]) for e in doc] == [(int(op), op.name) for op in ref.OPS]
    for entry in doc:
        info = ref.OPS[ref.Op(entry["code"])]
        assert (entry["direction"], entry["replied"]) == (info.direction.value, info.replied)
        if entry["reply_code"] is not None:
            assert ref.op_name(entry["reply_code"]) == f"{entry['name']}|REPLY"


def test_no_command_is_a_usage_error() -> None:
    proc = run()
    assert proc.returncode == 2 and "usage: netkernel" in proc.stderr


# -- in-process: many NQEs through encode -> decode ------------------------------

nqes = st.builds(
    ref.NQE,
    op=st.sampled_from(sorted({int(op) for op in ref.Op} | {ref.OP_UNKNOWN_REPLY}
                              | {int(op) | ref.REPLY_BIT for op, i in ref.OPS.items()
                                 if i.replied})),
    qset=st.integers(0, ref.U8_MAX), vm_id=st.integers(0, ref.U8_MAX),
    sock_id=st.integers(0, ref.U32_MAX), op_data=st.integers(0, ref.U64_MAX),
    data_ptr=st.integers(0, ref.U64_MAX), size=st.integers(0, ref.U32_MAX),
    tag=st.integers(0, ref.U16_MAX),
)


@given(nqes)
def test_encode_then_decode_in_process(nqe: ref.NQE) -> None:
    args = [f"{name}={getattr(nqe, name):#x}" for name, _, _ in ref.field_layout()
            if name != "reserved"]
    raw = cli.encode(cli.parse_assignments(args))
    assert raw == ref.pack(nqe)
    doc = cli.decoded_json(cli.decode(cli.parse_hex([raw.hex(":")])))
    assert doc["hex"] == raw.hex() and doc["op_name"] == ref.op_name(nqe.op)
    if nqe.is_reply:
        assert doc["result"] == nqe.result
    text = cli.format_decoded(nqe)
    for name, offset, size in ref.field_layout():
        assert f"{name:<9} {offset:>6} {size:>4}" in text

