"""The documentation site builds strictly, and what it says about bytes is the reference's.

The site is built once into a temporary directory with ``mkdocs build
--strict`` (as CI does); the tests then read the generated HTML back and hold
every table and every worked example to the reference model: field layouts
from ``field_layout()``/``header_field_layout()``, op names from ``Op``, and
the examples' bytes decoded with ``reference.nqe.unpack``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from netkernel.conformance import requirements
from netkernel.reference import device
from netkernel.reference import nqe as ref

ROOT = Path(__file__).resolve().parent.parent

Table = list[list[str]]


class _Page(HTMLParser):
    """Collects the tables of a page, and the bytes and table of each worked example."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[Table] = []
        self.examples: list[tuple[str, Table]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self._example_depth: int | None = None
        self._depth = 0
        self._example_bytes = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"] or "")
        if tag == "div":
            self._depth += 1
            if "nk-example" in (a.get("class") or "").split():
                self._example_depth = self._depth
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre" and self._example_depth is not None:
            self._pre = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            if self._example_depth == self._depth:
                self.examples.append((self._example_bytes, self.tables[-1]))
                self._example_depth = None
            self._depth -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "pre" and self._pre is not None:
            self._example_bytes = "".join(self._pre)
            self._pre = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def page(site: Path, uri: str) -> _Page:
    parser = _Page()
    parser.feed((site / uri / "index.html").read_text(encoding="utf-8"))
    return parser


def table_with(p: _Page, *head: str) -> Table:
    """The first table whose header row starts with ``head``; its body rows."""
    for table in p.tables:
        if table and table[0][:len(head)] == list(head):
            return table[1:]
    raise AssertionError(f"no table headed {head}")


def test_wire_format_field_table_is_the_codec_layout(site: Path) -> None:
    rows = table_with(page(site, "wire-format"), "offset", "size", "field")
    assert [(int(r[0]), int(r[1]), r[2]) for r in rows] == [
        (off, size, name) for name, off, size in ref.field_layout()
    ]
    for row in rows:
        assert row[4] == ref.FIELD_DOC[row[2]]


def test_wire_format_page_names_every_op(site: Path) -> None:
    p = page(site, "wire-format")
    rows = table_with(p, "op", "name", "kind")
    assert [(int(r[0], 16), r[1]) for r in rows] == [
        *((int(op), op.name) for op in ref.OPS), (ref.OP_UNKNOWN_REPLY, "UNKNOWN_REPLY"),
    ]
    for op, info in ref.OPS.items():
        row = next(r for r in rows if r[1] == op.name)
        assert row[2] == info.direction.value


def test_op_table_page_is_the_reference_op_table(site: Path) -> None:
    rows = table_with(page(site, "ops"), "op", "name", "reply op")
    by_name = {r[1]: r for r in rows}
    for op, info in ref.OPS.items():
        code, _, reply, kind, ring, replied, op_data, data, answer = by_name[op.name]
        assert int(code, 16) == op
        assert (kind, ring, replied) == (info.direction.value, info.ring,
                                         "yes" if info.replied else "no")
        assert (op_data, data, answer) == (info.op_data, info.data, info.reply)
        reply_op = int(op) | ref.REPLY_BIT
        assert reply == (f"{reply_op:#04x}" if ref.is_known_op(reply_op) else "—")


def _check_example(hex_text: str, rows: Table) -> ref.NQE:
    """Decode an example's bytes with the reference and hold every row of its table to them."""
    n = ref.unpack(bytes.fromhex(hex_text))
    head, *body = rows
    assert head[:6] == ["field", "offset", "size", "value", "hex", "reads as"]
    assert [(r[0], int(r[1]), int(r[2])) for r in body] == ref.field_layout()
    for name, _, _, value, hex_value, reads_as, _ in body:
        wire = getattr(n, name)
        if isinstance(wire, bytes):
            assert value == wire.hex()
        else:
            assert int(value) == wire and int(hex_value, 16) == wire
        if name == "op":
            assert reads_as == ref.op_name(n.op)
        elif name == "op_data" and n.is_reply:
            expected = str(n.result) + (f" ({errno.errorcode[-n.result]})" if n.result < 0 else "")
            assert reads_as == expected
    return n


def test_worked_examples_decode_to_what_the_page_says(site: Path) -> None:
    examples = page(site, "wire-format").examples
    decoded = [_check_example(hex_text, rows) for hex_text, rows in examples]
    ops = [n.op for n in decoded]
    assert ref.Op.SEND in ops and ref.Op.SEND | ref.REPLY_BIT in ops
    refused = [n for n in decoded if n.op == ref.Op.CONNECT | ref.REPLY_BIT]
    assert refused and refused[0].result == -errno.ECONNREFUSED
    send = decoded[ops.index(ref.Op.SEND)]
    reply = decoded[ops.index(ref.Op.SEND | ref.REPLY_BIT)]
    assert (reply.sock_id, reply.tag, reply.qset) == (send.sock_id, send.tag, send.qset)


def test_device_header_table_is_the_header_struct(site: Path) -> None:
    rows = table_with(page(site, "device"), "offset", "size", "field")
    layout = device.header_field_layout()
    assert [(int(r[0]), int(r[1]), r[2]) for r in rows[:len(layout)]] == [
        (off, size, name) for name, off, size in layout
    ]
    assert [r[4] for r in rows[:len(layout)]] == [device.HEADER_DOC[n] for n, _, _ in layout]
    last = rows[-1]  # the padding up to the header's size
    assert int(last[0]) + int(last[1]) == device.HEADER_SIZE


def test_every_requirement_has_an_anchor_and_an_index_entry(site: Path) -> None:
    known = requirements.load()
    assert known
    pages: dict[str, _Page] = {}
    for req in known.values():
        uri = "spec" if req.file == "README.md" else f"spec/{req.file.removesuffix('.md')}"
        if uri not in pages:
            pages[uri] = page(site, uri)
        assert req.id in pages[uri].ids, f"{req.id} has no anchor in {uri}"
    index = table_with(page(site, "requirements"), "ID", "requirement")
    assert [r[0] for r in index] == list(known)


def test_cli_page_shows_real_encodings(site: Path) -> None:
    text = "".join(page(site, "cli").text)
    send = ref.NQE(op=ref.Op.SEND, sock_id=7, data_ptr=0x1000, size=100, tag=9)
    assert ref.pack(send).hex() in text
    assert "-111 (ECONNREFUSED)" in text
