"""The documentation site builds strictly, and what it says is the reference's.

The site is built once into a temporary directory with ``mkdocs build
--strict`` (as CI does); the tests then read the generated HTML and SVG back
and hold every table, worked example and diagram to the reference model:
field layouts from ``field_layout()``/``header_field_layout()``, op names from
``Op``, the examples' bytes decoded with ``reference.nqe.unpack``, the socket
diagrams' edges against ``sockstate.TABLE``, the device diagram's offsets
against ``Geometry``, the operator guide against the CLI parser, and the
requirement index against ``spec/`` and the tests' ``req`` marks. Checks that
guard the index are also shown to fail on a doctored spec.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest

from netkernel.conformance import requirements
from netkernel.reference import coreengine, device, sockstate
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
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")
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
    if shutil.which("dot") is None:  # .ci/run installs it; mkdocs build there fails without
        pytest.skip("the site's diagrams need Graphviz's dot: apt-get install graphviz")
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


# -- the hooks themselves ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    """docs/hooks.py, imported as mkdocs imports it (it is not a package module)."""
    spec = importlib.util.spec_from_file_location("nk_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the requirement index ----------------------------------------------------------------


def index_problems(known: dict[str, requirements.Requirement], tests: dict[str, list[str]],
                   rows: list[tuple[str, list[str]]]) -> list[str]:
    """What is wrong with an index given as ``(ID, tests named)`` rows: a requirement
    missing, one too many or out of order, or a row whose tests are not the ones that
    name the requirement."""
    problems = [f"{rid} is missing from the index" for rid in known
                if rid not in {r for r, _ in rows}]
    problems += [f"{rid} is in the index but not in spec/" for rid, _ in rows
                 if rid not in known]
    if not problems and [r for r, _ in rows] != list(known):
        problems.append("the index is not in spec order")
    for rid, named in rows:
        if rid in known and sorted(named) != sorted(tests.get(rid, [])):
            problems.append(f"{rid}: the index names {named}, the tests {tests.get(rid, [])}")
    return problems


def _html_index(site: Path) -> list[tuple[str, list[str]]]:
    rows = table_with(page(site, "requirements"), "ID", "requirement", "level", "roles",
                      "checked by")
    return [(r[0], [t for t in r[4].split() if "::" in t]) for r in rows]


def _markdown_index(text: str) -> list[tuple[str, list[str]]]:
    rows = []
    for line in text.splitlines()[2:]:
        cells = line.strip("|").split(" | ")
        rid = re.sub(r"^\[([A-Z]+-\d+)\]\(.*\)$", r"\1", cells[0].strip())
        rows.append((rid, re.findall(r"`([^`]+::[^`]+)`", cells[4])))
    return rows


def test_requirement_index_lists_every_requirement_with_its_tests(
        site: Path, hooks: ModuleType) -> None:
    known = requirements.load()
    tests = hooks.tests_by_requirement()
    assert len(known) > 100 and len(tests) > 100
    assert index_problems(known, tests, _html_index(site)) == []


def test_the_index_check_fails_when_the_generator_drops_a_spec_id(
        tmp_path: Path, hooks: ModuleType) -> None:
    """Generate the index from a copy of spec/ with NQE-4 deleted: the check must say so,
    while the index generated from the real spec passes the same check."""
    known = requirements.load()
    tests = hooks.tests_by_requirement()
    real = hooks.requirement_index(known, tests, str)
    assert index_problems(known, tests, _markdown_index(real)) == []

    doctored = tmp_path / "spec"
    shutil.copytree(requirements.SPEC_DIR, doctored)
    nqe_md = doctored / "nqe.md"
    text = nqe_md.read_text(encoding="utf-8")
    cut = re.compile(r"^### NQE-4:.*?(?=^#)", re.MULTILINE | re.DOTALL)
    assert cut.search(text)
    nqe_md.write_text(cut.sub("", text, count=1), encoding="utf-8")
    fewer = requirements.load(doctored)
    assert set(known) - set(fewer) == {"NQE-4"}

    broken = hooks.requirement_index(fewer, tests, str)
    assert index_problems(known, tests, _markdown_index(broken)) == [
        "NQE-4 is missing from the index"]


def test_the_index_check_fails_when_a_row_loses_a_test(site: Path, hooks: ModuleType) -> None:
    known = requirements.load()
    tests = hooks.tests_by_requirement()
    rows = _html_index(site)
    rid = next(r for r, n in rows if len(n) >= 2)
    rows = [(r, n[1:] if r == rid else n) for r, n in rows]
    assert [p for p in index_problems(known, tests, rows) if p.startswith(rid)]


_COLLECT = textwrap.dedent("""
    import json, sys, pytest
    found = {}
    class Marks:
        def pytest_collection_modifyitems(self, items):
            for item in items:
                ids = [r for m in item.iter_markers("req") for r in m.args]
                if ids:
                    found[item.nodeid] = ids
    status = pytest.main(["conformance", "tests", "--target", "reference", "--collect-only",
                          "-q", "-p", "no:cacheprovider"], plugins=[Marks()])
    print("NK-MARKS " + json.dumps(found))
    sys.exit(int(status))
""")


def test_the_index_reads_the_same_marks_pytest_collects(hooks: ModuleType) -> None:
    """The index reads marks statically; pytest's own collection must agree with it."""
    proc = subprocess.run([sys.executable, "-c", _COLLECT], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("NK-MARKS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected: dict[str, set[str]] = {}
    for nodeid, ids in json.loads(line.removeprefix("NK-MARKS ")).items():
        if "::test_script[" not in nodeid:  # parametrized ids fold into the test's name
            nodeid = nodeid.split("[", 1)[0]
        for rid in ids:
            collected.setdefault(rid, set()).add(nodeid)
    static = {rid: set(names) for rid, names in hooks.tests_by_requirement().items()}
    assert static == collected


# -- diagrams -----------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def svg_edges(path: Path) -> set[tuple[str, str, str]]:
    """``(from, to, call|event)`` of every edge of a socket diagram, from the ids
    docs/hooks.py gives them (``nk-edgeN|from|to|kind``)."""
    edges = set()
    for g in ET.parse(path).getroot().iter(f"{SVG}g"):
        if g.get("class") == "edge" and (g.get("id") or "").startswith("nk-edge"):
            _, src, dst, kind = (g.get("id") or "").split("|")
            edges.add((src, dst, kind))
    return edges


@pytest.mark.parametrize("kind", list(sockstate.Kind), ids=lambda k: k.value)
def test_socket_diagram_draws_every_state_change_of_the_table(
        site: Path, kind: sockstate.Kind, hooks: ModuleType) -> None:
    valid = sockstate.TCP_STATES if kind is sockstate.Kind.TCP else sockstate.UDP_STATES
    open_states = [s.value for s in valid if s is not sockstate.State.CLOSED]
    idle = sockstate.To.IDLE.value
    want = set()
    for row in sockstate.TABLE:
        if kind not in row.kinds or row.next is sockstate.To.SAME:
            continue
        for s in (s for s in valid if s in row.states and s is not row.next):
            if row.next is sockstate.To.IDLE and s is sockstate.State.UNBOUND:
                continue  # stays UNBOUND: it holds no port
            for inp in row.inputs:
                want.add((s.value, row.next.value,
                          "event" if isinstance(inp, sockstate.Event) else "call"))
    drawn = set()
    for src, dst, how in svg_edges(site / "diagrams" / f"sockstate-{kind.value}.svg"):
        if src == hooks.ANY_OPEN:
            drawn |= {(s, dst, how) for s in open_states
                      if s != dst and not (dst == idle and s == "UNBOUND")}
        else:
            drawn.add((src, dst, how))
    assert want and drawn == want
    nodes = {t.text for g in ET.parse(site / "diagrams" / f"sockstate-{kind.value}.svg")
             .getroot().iter(f"{SVG}g") if g.get("class") == "node"
             for t in g.iter(f"{SVG}title")}
    assert {s.value for s in valid} <= nodes


def test_socket_tables_on_the_page_are_the_reference_table(site: Path) -> None:
    p = page(site, "sockets")
    tables = [t for t in p.tables if t and t[0] == ["state", "input", "when", "next", "result",
                                                     "effect"]]
    assert len(tables) == 2
    for table, kind in zip(tables, [sockstate.Kind.TCP, sockstate.Kind.UDP], strict=True):
        want = [[c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
                for line in sockstate.render_rows(kind)]
        assert table[1:] == want


def test_device_diagram_has_the_offsets_of_the_default_geometry(site: Path) -> None:
    geo = coreengine.GEOMETRY[device.Kind.TENANT]
    texts = {t.text for t in ET.parse(site / "diagrams" / "device-tenant.svg").getroot()
             .iter(f"{SVG}text")}
    want = {f"{geo.ring_offset(0, r):#x}" for r in device.RingId}
    want |= {f"{geo.bell_offset(0, b):#x}" for b in device.Bell}
    want |= {f"{geo.data_offset:#x}", f"{geo.data_offset + geo.send_size:#x}", "0x0"}
    assert want <= texts
    rows = table_with(page(site, "device"), "offset", "size", "part")
    assert [int(r[0].split()[0], 16) for r in rows] == sorted(int(r[0].split()[0], 16)
                                                              for r in rows)
    assert f"{geo.data_offset:#x} ({geo.data_offset})" in [r[0] for r in rows]


def test_architecture_diagram_is_on_the_site(site: Path) -> None:
    svg = site / "diagrams" / "architecture.svg"
    texts = " ".join(t.text or "" for t in ET.parse(svg).getroot().iter(f"{SVG}text"))
    for word in ("GuestLib", "CoreEngine", "engine.sock", "vm-1.nk", "nsm-1.nk", "ServiceLib"):
        assert word in texts
    assert "diagrams/architecture.svg" in (site / "architecture" / "index.html").read_text()


def test_the_build_names_the_package_when_dot_is_missing(
        hooks: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from mkdocs.exceptions import PluginError

    monkeypatch.setattr(hooks.shutil, "which", lambda name: None)
    with pytest.raises(PluginError, match="graphviz"):
        hooks.dot_svg("digraph { a -> b }")


# -- the CoreEngine page --------------------------------------------------------------------


def test_coreengine_walkthrough_is_the_reference_engine_at_work(site: Path) -> None:
    rows = table_with(page(site, "coreengine"), "step", "what happens", "read from")
    assert len(rows) >= 8
    first = rows[0]
    assert first[2].startswith("VM 1 JOB: SOCKET vm_id=42 sock_id=5")
    assert first[3].startswith("NSM 1 RECEIVE: TENANT_MAP vm_id=1")
    forwarded = rows[1][3]
    assert forwarded.startswith("NSM 1 COMPLETION: SOCKET vm_id=1 sock_id=1 ")
    refused = next(r for r in rows if "sock_id=9" in r[2])
    assert refused[3] == "VM 1 COMPLETION: CLOSE|REPLY vm_id=1 sock_id=9 op_data=-EBADF tag=3"


def test_the_walkthrough_fails_the_build_when_the_engine_misbehaves(
        hooks: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from mkdocs.exceptions import PluginError

    real = hooks.eng.switch

    def drops_events(e, src, qset, ring, raw):  # type: ignore[no-untyped-def]
        e, outs = real(e, src, qset, ring, raw)
        return e, [o for o in outs if o.nqe.op != ref.Op.EV_DATA]

    monkeypatch.setattr(hooks.eng, "switch", drops_events)
    with pytest.raises(PluginError, match="walkthrough"):
        hooks.engine_walkthrough()


# -- the operator guide ----------------------------------------------------------------------


def test_operator_guide_documents_every_command_and_option(
        site: Path, hooks: ModuleType) -> None:
    text = " ".join("".join(page(site, "operator").text).split())
    for path in hooks.subcommands():
        parser = hooks.subcommand_parser(path)
        assert f"netkernel {' '.join(path)} [-h]" in text, path
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, (path, option)
    for name in ("up", "status", "demo", "down", "run", "bench", "nqe"):
        assert [p for p in hooks.subcommands() if p[0] == name], name
