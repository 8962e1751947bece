"""mkdocs hooks: the spec joins the site, and every wire-format fact is generated.

Nothing in the docs about bytes is typed by hand. A page asks for a table or an
example with a placeholder comment, and :func:`on_page_markdown` replaces it
with text built from the reference at build time:

``<!-- nk:nqe-fields -->``        NQE field table (``NQE_STRUCT``, ``field_layout``, ``FIELD_DOC``)
``<!-- nk:nqe-diagram -->``       the 32 bytes drawn as a byte map
``<!-- nk:nqe-ops -->``           the op table (``Op``, ``OPS``, ``is_known_op``)
``<!-- nk:nqe-op-codes -->``      the op codes in brief
``<!-- nk:nqe-example KEY -->``   a worked example: bytes from ``pack``, rows from ``explain``
``<!-- nk:device-header -->``     device header table (``HEADER_STRUCT``, ``HEADER_DOC``)
``<!-- nk:device-map -->``        the offsets of a device region, from ``Geometry``
``<!-- nk:ring-header -->``       a ring's index lines (``ring.TAIL`` ...)
``<!-- nk:requirements -->``      every requirement in ``spec/``, linked, with the tests naming it
``<!-- nk:requirement-counts -->`` how many requirements are tested, untestable, neither
``<!-- nk:device-geometry -->``   the sizes of the devices the runtime creates
``<!-- nk:sockstate-table KIND -->`` a socket type's transitions (``sockstate.render_table``)
``<!-- nk:engine-walkthrough -->`` the reference engine switching one socket's life, NQE by NQE
``<!-- nk:engine-rings -->``      which NSM ring the engine forwards each op to
``<!-- nk:engine-buffers -->``    which half each op's buffer must lie in (``engine.HALF``)
``<!-- nk:diagram NAME CAPTION -->`` a diagram of :data:`DIAGRAMS`, drawn by Graphviz
``<!-- nk:cli-options CMD… -->``  a command's usage and options, from ``cli.build_parser()``
``<!-- nk:target-roles -->``      the roles a conformance target provides
``<!-- nk:report-example -->``    one requirement's entry in a ``--nk-report`` file
``<!-- nk:cli ARGS -->``          ``netkernel ARGS`` and its real output
``<!-- nk:cli-fails ARGS -->``    the same for a command that must exit 2

``[[NQE-4]]`` in a page becomes a link to that requirement; an ID the spec does
not define is a build warning, which ``mkdocs build --strict`` turns into an
error. The spec files (``spec/*.md``) are added to the site under ``spec/``
(:func:`on_files`), every requirement heading gets its ID as anchor
(``spec/nqe/#NQE-4``), and the "Specification" nav entry is expanded to the
spec files that exist (:func:`on_config`).

Diagrams are Graphviz source built here from the reference and drawn with
``dot -Tsvg`` into ``diagrams/NAME.svg`` (:func:`on_files`); without ``dot``
(Debian package ``graphviz``) the build stops and says so, and a warning from
``dot`` fails a strict build. Nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import html
import io
import json
import logging
import posixpath
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import construct as cs
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from netkernel import cli, explain
from netkernel.conformance import plugin, requirements, targets
from netkernel.reference import bufpool, coreengine, device, ring, sockstate
from netkernel.reference import engine as eng
from netkernel.reference import nqe as ref

log = logging.getLogger("mkdocs.hooks.netkernel")

ROOT: Final = Path(__file__).resolve().parent.parent
SPEC_DIR: Final = ROOT / "spec"
SPEC_URI: Final = "spec"
SPEC_NAV_TITLE: Final = "Specification"

# -- worked examples: NQEs built here, bytes made by the reference codec ----------

_SEND = ref.NQE(op=ref.Op.SEND, qset=0, vm_id=3, sock_id=7, op_data=0, data_ptr=4096, size=100,
                tag=9)
_CONNECT = ref.NQE(op=ref.Op.CONNECT, vm_id=3, sock_id=5, data_ptr=8192, size=16, tag=2)
_ENOSYS, _ECONNREFUSED = (explain.errno_number(n) for n in ("ENOSYS", "ECONNREFUSED"))
_RECEIVE_HALF = device.Geometry().send_size  # first offset of the default receive half

EXAMPLES: Final[dict[str, tuple[str, ref.NQE]]] = {
    "send": ("A SEND request: 100 bytes at offset 4096 of the send half, on socket 7, tag 9",
             _SEND),
    "send-reply": ("Its reply: the stack accepted all 100 bytes", _SEND.reply(100)),
    "connect": ("A CONNECT request: a 16-byte sockaddr_in at offset 8192", _CONNECT),
    "connect-refused": ("Its reply: the peer refused the connection",
                        _CONNECT.reply(-_ECONNREFUSED)),
    "ev-data": ("An EV_DATA event: 1448 bytes arrived in the receive half",
                ref.NQE(op=ref.Op.EV_DATA, vm_id=3, sock_id=7, data_ptr=_RECEIVE_HALF + 16384,
                        size=1448)),
    "tenant-map": ("A TENANT_MAP from the CoreEngine: serve VM 3, whose receive half"
                   " (the default geometry's) is all this NSM's slice",
                   ref.NQE(op=ref.Op.TENANT_MAP, vm_id=3, op_data=3, data_ptr=_RECEIVE_HALF,
                           size=device.Geometry().data_size - _RECEIVE_HALF, tag=3)),
    "unknown-op": ("The reply to a request with an op no one knows (0x30)",
                   ref.NQE(op=0x30, sock_id=7, tag=4).reply(-_ENOSYS)),
}


def example_hex(key: str) -> str:
    return ref.pack(EXAMPLES[key][1]).hex()


# -- small renderers --------------------------------------------------------------


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_FMT_TYPES: Final = {"B": "u8", "H": "u16", "L": "u32", "I": "u32", "Q": "u64",
                     "b": "i8", "h": "i16", "l": "i32", "i": "i32", "q": "i64"}


def _wire_type(subcon: Any) -> str:
    """``u32 LE``, ``3 bytes``, ``8 bytes = "NKDEVICE"`` for a construct field."""
    inner = getattr(subcon, "subcon", subcon)
    if isinstance(inner, cs.Const):
        return f"{inner.sizeof()} bytes = `{inner.value.decode('ascii')}`"
    fmt = getattr(inner, "fmtstr", None)
    if fmt:
        kind = _FMT_TYPES[fmt[-1]]
        return kind if kind.endswith("8") else f"{kind} LE"
    return f"{inner.sizeof()} bytes"


def _subcons(struct: Any) -> dict[str, Any]:
    return {sub.name: sub for sub in struct.subcons if sub.name is not None}


def _req_link(rid: str, page: Page, known: dict[str, requirements.Requirement]) -> str:
    req = known.get(rid)
    if req is None:
        log.warning("%s cites %s, which spec/ does not define", page.file.src_uri, rid)
        return rid
    target = posixpath.join(SPEC_URI, req.file)
    here = posixpath.dirname(page.file.src_uri) or "."
    return f"[{rid}]({posixpath.relpath(target, here)}#{rid})"


# -- generators: one per placeholder -------------------------------------------------


def gen_nqe_fields(_: list[str], page: Page) -> str:
    subs = _subcons(ref.NQE_STRUCT)
    rows = [(off, size, f"`{name}`", _wire_type(subs[name]), ref.FIELD_DOC[name])
            for name, off, size in ref.field_layout()]
    return _table(["offset", "size", "field", "type", "meaning"], rows)


def gen_nqe_diagram(_: list[str], page: Page) -> str:
    """The 32 bytes, 8 per line, each field's name centred over its bytes."""
    per_line, cell = 8, 9
    owner = [name for name, off, size in ref.field_layout() for _ in range(size)]
    out: list[str] = []
    for start in range(0, ref.NQE_SIZE, per_line):
        ruler = "".join(f"{i:<{cell}}" for i in range(start, start + per_line))
        row, i = "|", start
        while i < start + per_line:
            j = i
            while j < start + per_line and owner[j] == owner[i]:
                j += 1
            width = (j - i) * cell - 1
            row += owner[i][:width].center(width) + "|"
            i = j
        out += [" " + ruler.rstrip(), row]
    return "```text\n" + "\n".join(out) + "\n```"


def gen_nqe_ops(_: list[str], page: Page) -> str:
    rows = []
    for op, info in ref.OPS.items():
        reply = int(op) | ref.REPLY_BIT
        rows.append((
            f"`{int(op):#04x}`", f"**{op.name}**",
            f"`{reply:#04x}`" if ref.is_known_op(reply) else "—",
            info.direction.value, info.ring, "yes" if info.replied else "no",
            info.op_data, info.data, info.reply,
        ))
    rows.append((f"`{ref.OP_UNKNOWN_REPLY:#04x}`", "**UNKNOWN_REPLY**", "—", "reply", "—", "—",
                 f"-ENOSYS (-{_ENOSYS})", "as in the request",
                 "the reply to a request whose op the receiver does not know"))
    return _table(["op", "name", "reply op", "kind", "ring", "replied", "op_data",
                   "data_ptr / size", "reply's op_data"], rows)


def gen_nqe_op_codes(_: list[str], page: Page) -> str:
    """The op codes in brief: code, name, kind and reply code (the op table has the rest)."""
    rows = []
    for op, info in ref.OPS.items():
        reply = int(op) | ref.REPLY_BIT
        rows.append((f"`{int(op):#04x}`", op.name, info.direction.value,
                     f"`{reply:#04x}` {ref.op_name(reply)}" if ref.is_known_op(reply) else "—"))
    rows.append((f"`{ref.OP_UNKNOWN_REPLY:#04x}`", ref.op_name(ref.OP_UNKNOWN_REPLY), "reply",
                 "—"))
    return _table(["op", "name", "kind", "reply op"], rows)


def gen_nqe_example(args: list[str], page: Page) -> str:
    """A worked example as HTML: the bytes, then every field as ``explain`` reads it.

    ``tests/test_docs.py`` decodes the bytes with the reference codec and checks
    each row against them.
    """
    if len(args) != 1 or args[0] not in EXAMPLES:
        raise PluginError(f"nk:nqe-example takes one of {sorted(EXAMPLES)}, got {args}")
    title, n = EXAMPLES[args[0]]
    raw = ref.pack(n)
    dump = "  ".join(raw[i:i + 8].hex(" ") for i in range(0, len(raw), 8))
    e = html.escape
    rows = "".join(
        f"<tr><td><code>{e(r.name)}</code></td><td>{r.offset}</td><td>{r.size}</td>"
        f"<td>{e(r.value.hex() if isinstance(r.value, bytes) else str(r.value))}</td>"
        f"<td><code>{e(r.hex)}</code></td><td>{e(r.reads_as)}</td><td>{e(r.op_says)}</td></tr>"
        for r in explain.explain(n)
    )
    return (
        f'<div class="nk-example" id="example-{e(args[0])}" markdown="0">\n'
        f"<p><strong>{e(title)}</strong> — {e(explain.op_summary(n.op))}</p>\n"
        f'<pre class="nk-bytes"><code>{dump}</code></pre>\n'
        "<table><thead><tr><th>field</th><th>offset</th><th>size</th><th>value</th>"
        "<th>hex</th><th>reads as</th><th>what the op puts there</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>\n</div>"
    )


def gen_device_header(_: list[str], page: Page) -> str:
    subs = _subcons(device.HEADER_STRUCT)
    layout = device.header_field_layout()
    rows: list[tuple[object, ...]] = [
        (off, size, f"`{name}`", _wire_type(subs[name]), device.HEADER_DOC[name])
        for name, off, size in layout
    ]
    end = layout[-1][1] + layout[-1][2]
    if end < device.HEADER_SIZE:
        rows.append((end, device.HEADER_SIZE - end, "*(padding)*", "zero bytes",
                     "reserved for later versions; written as zero"))
    return _table(["offset", "size", "field", "type", "meaning"], rows)


#: The device the map shows: a tenant device as the runtime creates it.
EXAMPLE_GEOMETRY: Final = coreengine.GEOMETRY[device.Kind.TENANT]


def gen_device_map(_: list[str], page: Page) -> str:
    geo = EXAMPLE_GEOMETRY
    rows: list[tuple[object, ...]] = [(0, device.HEADER_SIZE, "header", "")]
    for q in range(geo.n_qsets):
        for bell in device.Bell:
            rows.append((geo.bell_offset(q, bell), device.BELL_SIZE, f"queue set {q}",
                         f"bell `{bell.name}` (futex word; who sleeps on it)"))
        for r in device.RingId:
            way = "device → CoreEngine" if r.to_engine else "CoreEngine → device"
            rows.append((geo.ring_offset(q, r), geo.ring_size, f"queue set {q}",
                         f"ring `{r.name}` ({way})"))
    gap = geo.qset_offset + geo.n_qsets * geo.qset_stride
    if gap < geo.data_offset:
        rows.append((gap, geo.data_offset - gap, "padding", "up to the next 4096-byte page"))
    rows.append((geo.data_offset, geo.send_size, "data area", "send half (tenant allocates)"))
    rows.append((geo.data_offset + geo.send_size, geo.data_size - geo.send_size, "data area",
                 "receive half (NSMs allocate)"))
    intro = (f"For `Geometry(n_qsets={geo.n_qsets}, ring_entries={geo.ring_entries},"
             f" data_size={geo.data_size}, send_size={geo.send_size})`: ring size"
             f" {geo.ring_size} bytes, queue set stride {geo.qset_stride} bytes, total"
             f" {geo.total_size} bytes.\n\n")
    return intro + _table(["offset", "size", "part", "what"],
                          [(f"{o:#x} ({o})", s, p, w) for o, s, p, w in rows])


def gen_ring_header(_: list[str], page: Page) -> str:
    rows = [
        (ring.TAIL, 4, "`tail`", "producer", "free-running u32: next slot the producer fills"),
        (ring.HEAD, 4, "`head`", "consumer", "free-running u32: next slot the consumer reads"),
        (ring.FLAGS, 4, "`flags`", "consumer",
         f"bit 0 NEED_WAKEUP (= {ring.NEED_WAKEUP}): the consumer is about to sleep"),
        (ring.SLOTS, f"entries × {device.NQE_SLOT}", "slots", "producer",
         "the NQEs; slot = index & (entries - 1)"),
    ]
    return _table(["offset in ring", "size", "field", "written by", "meaning"], rows)


# -- the requirement index: which tests check which requirement, read statically ----------

#: Where the tests that name requirements live, relative to the repository.
TEST_GLOBS: Final = ("conformance/*.py", "tests/*.py")
SCRIPT_GLOB: Final = "conformance/scripts/*.nkt"
SCRIPT_TEST: Final = "conformance/test_scripts.py::test_script"
SCRIPT_REQ: Final = re.compile(r"^#\s*req:\s*(.+)$", re.MULTILINE)


def _req_marks(node: ast.AST) -> list[str]:
    """The IDs of every ``….mark.req("ID", …)`` call inside ``node`` (constant strings only)."""
    ids: list[str] = []
    for sub in ast.walk(node):
        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                and sub.func.attr == "req" and isinstance(sub.func.value, ast.Attribute)
                and sub.func.value.attr == "mark"):
            ids += [a.value for a in sub.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return ids


def _tests_in(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """``(test name, requirement IDs)`` for every test of a module that names any.

    A mark counts on the function it decorates (including marks inside its
    decorators' arguments, such as ``pytest.param(…, marks=…)``), on every test
    method of a class it decorates, and on every test of a module whose
    ``pytestmark`` holds it.
    """
    module_ids: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets):
            module_ids += _req_marks(stmt.value)
    found: list[tuple[str, list[str]]] = []

    def visit(body: list[ast.stmt], prefix: str, inherited: list[str]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                ids = inherited + [i for d in stmt.decorator_list for i in _req_marks(d)]
                if stmt.name.startswith("test") and ids:
                    found.append((prefix + stmt.name, ids))
            elif isinstance(stmt, ast.ClassDef):
                ids = inherited + [i for d in stmt.decorator_list for i in _req_marks(d)]
                visit(stmt.body, f"{prefix}{stmt.name}::", ids)

    visit(tree.body, "", module_ids)
    return found


def tests_by_requirement(root: Path = ROOT) -> dict[str, list[str]]:
    """Requirement ID -> the tests that name it, as ``file::test``, read without running pytest.

    Python tests are read with :mod:`ast`; a conformance script
    (``conformance/scripts/NAME.nkt``) names its requirements on its ``# req:``
    line and runs as ``conformance/test_scripts.py::test_script[NAME]``.
    """
    by_req: dict[str, list[str]] = {}
    for pattern in TEST_GLOBS:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            for name, ids in _tests_in(ast.parse(path.read_text(encoding="utf-8"))):
                for rid in dict.fromkeys(ids):
                    by_req.setdefault(rid, []).append(f"{rel}::{name}")
    for path in sorted(root.glob(SCRIPT_GLOB)):
        for line in SCRIPT_REQ.findall(path.read_text(encoding="utf-8")):
            for rid in (r.strip() for r in line.split(",")):
                if rid:
                    by_req.setdefault(rid, []).append(f"{SCRIPT_TEST}[{path.stem}]")
    return by_req


def requirement_index(known: dict[str, requirements.Requirement],
                      tests: dict[str, list[str]], link: Callable[[str], str]) -> str:
    """The index: one row per requirement of ``known``, in spec order, with its tests."""
    if not known:
        return "*No requirement is defined yet.*"
    rows = []
    for r in known.values():
        named = tests.get(r.id, [])
        if named:
            checked = "<br>".join(f"`{t}`" for t in named)
        elif r.untestable:
            checked = f"*untestable:* {r.untestable}"
        else:
            checked = "**no test names it**"
        rows.append((link(r.id), r.title, r.level, ", ".join(r.roles), checked))
    return _table(["ID", "requirement", "level", "roles", "checked by"], rows)


def gen_requirements(_: list[str], page: Page) -> str:
    known = requirements.load()
    tests = tests_by_requirement()
    for rid in sorted(set(tests) - set(known)):
        log.warning("%s is named by %s but spec/ does not define it", rid, tests[rid][0])
    return requirement_index(known, tests, lambda rid: _req_link(rid, page, known))


def gen_requirement_counts(_: list[str], page: Page) -> str:
    known = requirements.load()
    tests = tests_by_requirement()
    tested = sum(1 for rid in known if rid in tests)
    untestable = sum(1 for r in known.values() if r.untestable and r.id not in tests)
    names = {t for ts in tests.values() for t in ts}
    return (f"{len(known)} requirements: {tested} named by at least one of {len(names)} tests,"
            f" {untestable} marked untestable, {len(known) - tested - untestable} with neither.")


def _run_cli(args: list[str], page: Page, expect: int) -> tuple[list[str], str, str]:
    """``netkernel ARGS`` run in-process; ``{KEY}`` in ARGS is an example's hex."""
    argv = [re.sub(r"\{([a-z-]+)\}", lambda m: example_hex(m.group(1)), a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse's --help and usage errors exit; the build must not
            status = exc.code if isinstance(exc.code, int) else cli.EXIT_USAGE
    if status != expect:
        raise PluginError(f"{page.file.src_uri}: `netkernel {shlex.join(argv)}` exited"
                          f" {status}, expected {expect}: {err.getvalue().strip()}")
    return argv, out.getvalue().rstrip(), err.getvalue().rstrip()


def gen_cli(args: list[str], page: Page) -> str:
    """A command and its real output."""
    argv, out, _ = _run_cli(args, page, cli.EXIT_OK)
    return f"```console\n$ netkernel {shlex.join(argv)}\n{out}\n```"


def gen_cli_fails(args: list[str], page: Page) -> str:
    """A command that is rejected, its real error line and exit status."""
    argv, _, err = _run_cli(args, page, cli.EXIT_USAGE)
    return (f"```console\n$ netkernel {shlex.join(argv)}\n{err}\n$ echo $?\n"
            f"{cli.EXIT_USAGE}\n```")


def subcommand_parser(path: list[str]) -> argparse.ArgumentParser:
    """The parser of ``netkernel PATH…`` (``["up"]``, ``["nqe", "decode"]``), from
    ``cli.build_parser()``: the one the command really uses."""
    parser = cli.build_parser()
    for name in path:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            raise PluginError(f"netkernel {' '.join(path)}: no such command")
        parser = subs[0].choices[name]
    return parser


def subcommands(path: list[str] | None = None) -> list[list[str]]:
    """Every leaf command of the ``netkernel`` parser, as a path (``["nqe", "decode"]``)."""
    path = path or []
    parser = subcommand_parser(path)
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    return [leaf for name in subs[0].choices for leaf in subcommands([*path, name])]


def option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """``(option, default, meaning)`` for every argument of ``parser`` but ``--help``."""
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        names = ", ".join(a.option_strings) or (a.metavar if isinstance(a.metavar, str)
                                                 else a.dest)
        if a.choices and a.metavar is None:
            names += (" " if a.option_strings else "") + "{" + ",".join(map(str, a.choices)) + "}"
        elif a.option_strings and a.nargs != 0:
            names += f" {a.metavar or a.dest.upper()}"
        if a.default in (None, False, argparse.SUPPRESS) or not a.option_strings:
            default = ""
        elif isinstance(a.default, list):
            default = ",".join(map(str, a.default))
        else:
            default = str(a.default)
        rows.append((f"`{names}`", f"`{default}`" if default else "", a.help or ""))
    return rows


def gen_cli_options(args: list[str], page: Page) -> str:
    """``<!-- nk:cli-options up -->``: the usage line and the options of one command,
    read from the parser ``netkernel`` really runs, so the page cannot drift."""
    parser = subcommand_parser(args)
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=88)
    prefix = "usage: "
    usage = "\n".join(line.removeprefix(" " * len(prefix))
                      for line in parser.format_usage().strip().removeprefix(prefix).splitlines())
    rows = option_rows(parser)
    table = _table(["argument", "default", "meaning"], rows) if rows else "*No options.*"
    return f"{_cell(parser.description or '')}\n\n```text\n{usage}\n```\n\n{table}"


def gen_sockstate_table(args: list[str], page: Page) -> str:
    """The transition table of one socket type, rendered by ``sockstate.render_table``."""
    kinds = {k.value: k for k in sockstate.Kind}
    if len(args) != 1 or args[0] not in kinds:
        raise PluginError(f"nk:sockstate-table takes one of {sorted(kinds)}, got {args}")
    return sockstate.render_table(kinds[args[0]])


def gen_device_geometry(_: list[str], page: Page) -> str:
    """The sizes of the devices the runtime creates (``coreengine.GEOMETRY``)."""
    geos = coreengine.GEOMETRY
    kinds = list(geos)
    fields = ["n_qsets", "ring_entries", "ring_size", "qset_stride", "data_offset", "data_size",
              "send_size", "buf_size", "total_size"]
    def value(n: int) -> str:
        return str(n) if _size(n) == f"{n} B" else f"{n} ({_size(n)})"

    rows = [(f"`{f}`", *(value(getattr(geos[k], f)) for k in kinds)) for f in fields]
    return _table(["", *(f"{k.name.lower()} device" for k in kinds)], rows)


def gen_target_roles(_: list[str], page: Page) -> str:
    """The roles a target can provide, the reference module that models each, and how
    many requirements bind it."""
    known = requirements.load()
    # The module names only: importing every reference module is not needed here.
    modules = targets._REFERENCE_MODULES
    rows = []
    for role in targets.ROLES:
        binding = [r.id for r in known.values() if role in r.roles]
        model = f"`{modules[role]}`" if role in modules else (
            "none: " + targets.REFERENCE_NOT_APPLICABLE.get(role, "not modelled"))
        rows.append((f"`{role}`", model, len(binding),
                     ", ".join(binding[:6]) + (" …" if len(binding) > 6 else "")))
    return _table(["role", "modelled by", "requirements", "e.g."], rows)


def gen_report_example(_: list[str], page: Page) -> str:
    """One entry of a ``--nk-report`` file, made by the plugin's own folding function."""
    known = requirements.load()
    if not known:
        return "*No requirement is defined yet.*"
    rid = next(iter(known))
    node = f"conformance/test_{known[rid].file.removesuffix('.md')}.py::test_example"
    status = plugin.requirement_status({rid: known[rid]}, [([rid], node, "passed", "")])
    doc = {"target": "mypkg.nsm:target", "certify": True, "summary": {"passed": 1},
           "requirements": status}
    return "```json\n" + json.dumps(doc, indent=2) + "\n```"


# -- the CoreEngine at work: the reference engine run on a short script ------------------


def _nqe_text(n: ref.NQE) -> str:
    """An NQE in one line: its op, then every non-zero field."""
    fields = []
    for name in ("qset", "vm_id", "sock_id", "op_data", "data_ptr", "size", "tag"):
        value = getattr(n, name)
        if name == "op_data" and n.is_reply:
            value = n.result
            if value < 0:
                value = f"-{explain.errno_name(-value)}"
        if name == "op_data" and not n.is_reply and isinstance(value, int) and value > 9:
            value = f"{value:#x}"
        if value or (name == "data_ptr" and n.size):
            fields.append(f"{name}={value}")
    return " ".join([ref.op_name(n.op), *fields])


def _where(dev: eng.Dev | eng.Dest, ring_id: device.RingId | None = None) -> str:
    who = f"VM {dev.ident}" if dev.kind is device.Kind.TENANT else f"NSM {dev.ident}"
    if ring_id is None:
        assert isinstance(dev, eng.Dest)
        ring_id = dev.ring
    ring_name = ring_id.name
    return f"{who} {ring_name}"


def engine_walkthrough() -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """Run the reference switching core (``netkernel.reference.engine``) on one socket's
    life: ``(what, read from, NQE read, [(written to, NQE written)])`` per step.

    The devices have the runtime's default geometry. Each step states what the
    engine must do; if it does something else the build fails.
    """
    E, Op, R = ref, ref.Op, device.RingId
    e = eng.Engine()
    e, vm = eng.attach(e, coreengine.GEOMETRY[device.Kind.TENANT])
    e, nsm = eng.attach(e, coreengine.GEOMETRY[device.Kind.NSM])
    steps: list[tuple[str, str, str, list[tuple[str, str]]]] = []

    def run(what: str, src: eng.Dev, ring_id: device.RingId, n: ref.NQE,
            expect: list[tuple[eng.Dev, device.RingId, int]]) -> list[ref.NQE]:
        nonlocal e
        e, outs = eng.switch(e, src, 0, ring_id, ref.pack(n))
        got = [(o.dest.dev, o.dest.ring, o.nqe.op) for o in outs]
        if got != [(d, r, int(op)) for d, r, op in expect]:
            raise PluginError(f"CoreEngine walkthrough, {what!r}: expected {expect}, got {got}")
        steps.append((what, _where(src, ring_id), _nqe_text(n),
                      [(_where(o.dest), _nqe_text(o.nqe)) for o in outs]))
        return [o.nqe for o in outs]

    inet_stream = 2 | 1 << 16  # AF_INET | SOCK_STREAM << 16
    tmap, = run("the tenant opens socket 5 (its vm_id byte says 42: ignored, CE-8); the"
                " policy picks NSM 1, which does not serve VM 1 yet: the engine maps it first"
                " and holds the SOCKET (CE-16)",
                vm, R.JOB, E.NQE(op=Op.SOCKET, vm_id=42, sock_id=5, op_data=inet_stream, tag=1),
                [(nsm, R.RECEIVE, Op.TENANT_MAP)])
    fwd, = run("the NSM has mapped the tenant's data area: the held SOCKET goes on, with a"
               " socket ID the engine picked for the NSM (CE-10)",
               nsm, R.SEND, tmap.reply(0), [(nsm, R.COMPLETION, Op.SOCKET)])
    run("the NSM opened it: the reply goes back with the tenant's socket ID, and the"
        " connection table has the entry (CE-7, CE-11)",
        nsm, R.JOB, fwd.reply(0), [(vm, R.COMPLETION, Op.SOCKET | E.REPLY_BIT)])
    send, = run("a SEND of 100 bytes from the tenant's send half: checked (CE-14), lent to"
                " the NSM until the reply (BUF-3)",
                vm, R.SEND, E.NQE(op=Op.SEND, sock_id=5, data_ptr=0, size=100, tag=2),
                [(nsm, R.RECEIVE, Op.SEND)])
    run("the stack took the 100 bytes", nsm, R.SEND, send.reply(100),
        [(vm, R.COMPLETION, Op.SEND | E.REPLY_BIT)])
    grant = e.grants[(vm.ident, nsm.ident)].slice
    run("1448 bytes arrived: the NSM wrote them into its slice of the receive half (CE-12)",
        nsm, R.SEND, E.NQE(op=Op.EV_DATA, sock_id=fwd.sock_id, data_ptr=grant.offset,
                           size=1448),
        [(vm, R.RECEIVE, Op.EV_DATA)])
    run("the application read them: the tenant hands the buffer back (BUF-4)",
        vm, R.SEND, E.NQE(op=Op.BUF_RETURN, data_ptr=grant.offset, size=1448),
        [(nsm, R.RECEIVE, Op.BUF_RETURN)])
    run("a call naming a socket the tenant does not have is answered by the engine and"
        " never reaches an NSM (CE-9)",
        vm, R.JOB, E.NQE(op=Op.CLOSE, sock_id=9, tag=3),
        [(vm, R.COMPLETION, Op.CLOSE | E.REPLY_BIT)])
    close, = run("the tenant closes socket 5", vm, R.JOB, E.NQE(op=Op.CLOSE, sock_id=5, tag=4),
                 [(nsm, R.COMPLETION, Op.CLOSE)])
    run("the reply removes the entry (CE-7)", nsm, R.JOB, close.reply(0),
        [(vm, R.COMPLETION, Op.CLOSE | E.REPLY_BIT)])
    if eng.status(e)["sockets"] != 0:
        raise PluginError("CoreEngine walkthrough: the table is not empty after CLOSE")
    return steps


def gen_engine_walkthrough(_: list[str], page: Page) -> str:
    def code(text: str) -> str:  # `…` would show a table's escaped pipe as \|
        return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>"

    rows = []
    for i, (what, src, n, outs) in enumerate(engine_walkthrough(), start=1):
        written = "<br>".join(f"{dst}: {code(out)}" for dst, out in outs) or "—"
        rows.append((i, what, f"{src}: {code(n)}", written))
    return _table(["step", "what happens", "read from", "written to"], rows)


def gen_engine_buffers(_: list[str], page: Page) -> str:
    """Where each op's buffer must lie (CE-14), from the engine's own ``HALF`` table."""
    halves = [*bufpool.Half, None]
    rows = []
    for half in halves:
        ops = [f"`{op.name}`" for op, h in eng.HALF.items() if h is half]
        where = "none: size must be 0" if half is None else f"inside the {half.value} half"
        rows.append((where, ", ".join(ops)))
    return _table(["buffer (data_ptr, size)", "ops"], rows)


def gen_engine_rings(_: list[str], page: Page) -> str:
    """Which NSM ring the engine forwards a tenant's op to (DEV-8, CE-13), from the op
    table's ring and the engine's ``TO_NSM_RING``."""
    rows = []
    for op, info in ref.OPS.items():
        if info.ring not in eng.TO_NSM_RING or info.direction is ref.Dir.EVENT:
            continue
        if op in (ref.Op.ATTACH, ref.Op.DETACH):
            rows.append((f"`{op.name}`", info.ring.upper(), "— (the engine answers it)"))
            continue
        if op in (ref.Op.TENANT_MAP, ref.Op.TENANT_UNMAP):
            rows.append((f"`{op.name}`", "— (the engine sends it)",
                         eng.to_nsm_ring(op).name))
            continue
        rows.append((f"`{op.name}`", info.ring.upper(), eng.to_nsm_ring(op).name))
    return _table(["op", "the tenant writes it on", "the engine writes it to the NSM's"], rows)


# -- diagrams: Graphviz source built from the reference, drawn by `dot` at build time ----

DIAGRAM_URI: Final = "diagrams"
DOT_MISSING: Final = (
    "Graphviz's `dot` is not on PATH: the site's diagrams are drawn from the reference at"
    " build time. Install the Debian/Ubuntu package `graphviz` (apt-get install graphviz).")
_GRAPH_STYLE: Final = (
    'bgcolor="transparent"; fontname="Helvetica"; fontsize=11;'
    ' node [fontname="Helvetica", fontsize=11]; edge [fontname="Helvetica", fontsize=10];')


def _q(text: object) -> str:
    """A DOT string literal; a newline in ``text`` is a line break."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def _h(text: object) -> str:
    """Text inside a DOT HTML-like label."""
    return html.escape(str(text), quote=True)


def dot_svg(source: str) -> str:
    """Run ``dot -Tsvg`` on ``source``. The build fails, naming the package, without it."""
    exe = shutil.which("dot")
    if exe is None:
        raise PluginError(DOT_MISSING)
    proc = subprocess.run([exe, "-Tsvg"], input=source, capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0 or "<svg" not in proc.stdout:
        raise PluginError(f"dot -Tsvg failed ({proc.returncode}): {proc.stderr.strip()}")
    if proc.stderr.strip():  # a warning from dot is a diagram drawn wrong: --strict fails
        log.warning("dot: %s", proc.stderr.strip())
    return proc.stdout


# The socket state machine, from sockstate.TABLE.

def _row_targets(row: sockstate.Row, state: sockstate.State) -> list[sockstate.State]:
    """Where ``row`` takes a socket in ``state``: one state, or both idle states for
    ``UNBOUND/BOUND`` (BOUND when the socket still holds a port)."""
    if row.next is sockstate.To.SAME:
        return [state]
    if row.next is sockstate.To.IDLE:
        return [sockstate.State.UNBOUND, sockstate.State.BOUND]
    assert isinstance(row.next, sockstate.State)
    return [row.next]


_IDLE_STATES: Final = (sockstate.State.UNBOUND, sockstate.State.BOUND)


#: A guard longer than this is drawn as ``[…]``; the table beside the diagram has it.
GUARD_WIDTH: Final = 12


def _edge_label(inp: sockstate.Input, row: sockstate.Row) -> str:
    if row.when is sockstate.When.ALWAYS:
        return inp.value
    guard = row.when.value
    return f"{inp.value} [{guard if len(guard) <= GUARD_WIDTH else '…'}]"


#: The diagrams' pseudo-state for "every open state" (the tables' ``any open``).
ANY_OPEN: Final = "any open state"


def sockstate_edges(kind: sockstate.Kind) -> dict[tuple[str, str, bool], list[str]]:
    """``(from, to, by an event) -> labels``: every state change :data:`sockstate.TABLE`
    allows for ``kind``. Rows that keep the state are no change.

    ``to`` is a state, or ``UNBOUND/BOUND`` (BOUND while the socket holds a port).
    A label is an input, with its row's guard (``connect [AF_UNSPEC]``, ``[…]`` for
    a long guard) unless the input makes the same change without one. A label
    that takes every open state (but the target) to one target is one edge from
    :data:`ANY_OPEN`, as the tables' ``any open`` cell.
    """
    valid = sockstate.TCP_STATES if kind is sockstate.Kind.TCP else sockstate.UDP_STATES
    open_states = {s.value for s in valid if s is not sockstate.State.CLOSED}
    events = {e.value for e in sockstate.Event}
    order = [*sockstate.Call, *sockstate.Event]
    # (from, to, input) -> labels, in table order
    moves: dict[tuple[str, str, str], list[str]] = {}
    for row in sockstate.TABLE:
        if kind not in row.kinds or row.next is sockstate.To.SAME:
            continue
        for state in (s for s in valid if s in row.states and s is not row.next):
            for inp in sorted(row.inputs, key=order.index):
                labels = moves.setdefault((state.value, row.next.value, inp.value), [])
                if _edge_label(inp, row) not in labels:
                    labels.append(_edge_label(inp, row))
    sources: dict[tuple[str, str], set[str]] = {}  # (to, label) -> from
    for (src, dst, inp), labels in moves.items():
        for label in [inp] if inp in labels else labels:
            sources.setdefault((dst, label), set()).add(src)
    edges: dict[tuple[str, str, bool], list[str]] = {}
    for (dst, label), srcs in sources.items():
        bare = label.split(" ", 1)[0]  # a state that makes the change unguarded has it too
        if open_states - {dst} <= srcs | sources.get((dst, bare), set()):
            srcs = {ANY_OPEN}
        event = label.split(" ", 1)[0] in events
        for src in sorted(srcs, key=lambda x: [s.value for s in valid].index(x)
                          if x != ANY_OPEN else -1):
            edges.setdefault((src, dst, event), []).append(label)
    return edges


def event_or_call(event: bool) -> str:
    return "event" if event else "call"


def sockstate_dot(kind: sockstate.Kind) -> str:
    valid = sockstate.TCP_STATES if kind is sockstate.Kind.TCP else sockstate.UDP_STATES
    idle = sockstate.To.IDLE.value
    edges = sockstate_edges(kind)
    lines = [f"digraph sockstate_{kind.value} {{", _GRAPH_STYLE,
             "rankdir=TB; nodesep=0.4; ranksep=0.45; compound=true;",
             'node [shape=box, style="rounded,filled", fillcolor="#eef3fb", color="#3f51b5"];']
    if any(dst == idle for _, dst, _ in edges):
        lines += [f'subgraph cluster_idle {{ label={_q(idle)}; style="rounded,dashed";'
                  ' color="#888888"; fontcolor="#666666";',
                  *(f"{_q(s.value)};" for s in _IDLE_STATES), "}"]
    if any(src == ANY_OPEN for src, _, _ in edges):
        lines.append(f'{_q(ANY_OPEN)} [shape=box, style="rounded,dashed", color="#888888",'
                     ' fontcolor="#666666"];')
    for s in valid:
        extra = ', fillcolor="#f3f3f3", color="#888888"' if s is sockstate.State.CLOSED else ""
        lines.append(f"{_q(s.value)} [label={_q(s.value)}{extra}];")
    for i, ((src, dst, event), labels) in enumerate(edges.items()):
        # The id says what the edge stands for; tests/test_docs.py reads it back.
        attrs = [f"label={_q(chr(10).join(labels))}",
                 f"id={_q(f'nk-edge{i}|{src}|{dst}|{event_or_call(event)}')}"]
        if event:
            attrs.append('style=dashed, color="#c2185b", fontcolor="#c2185b"')
        if dst == idle:  # into the box: the socket lands in one of the two states
            if src == sockstate.State.UNBOUND.value:
                continue  # holds no port: stays UNBOUND
            dst = sockstate.State.BOUND.value if src != sockstate.State.BOUND.value else (
                sockstate.State.UNBOUND.value)
            if src not in (s.value for s in _IDLE_STATES):
                attrs.append("lhead=cluster_idle, constraint=false")  # a way back up
        lines.append(f"{_q(src)} -> {_q(dst)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines)


# The NK device, from device.Geometry and the runtime's default geometry.

def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def device_parts(geo: device.Geometry) -> list[tuple[int, int, str]]:
    """``(offset, size, what)`` for every part of a region of ``geo``, in order."""
    parts = [(0, device.HEADER_SIZE, "header")]
    for q in range(geo.n_qsets):
        for bell in device.Bell:
            parts.append((geo.bell_offset(q, bell), device.BELL_SIZE,
                          f"queue set {q}: {bell.name} bell"))
        for r in device.RingId:
            parts.append((geo.ring_offset(q, r), geo.ring_size, f"queue set {q}: {r.name} ring"))
    end = geo.qset_offset + geo.n_qsets * geo.qset_stride
    if end < geo.data_offset:
        parts.append((end, geo.data_offset - end, "padding to a 4096-byte page"))
    parts.append((geo.data_offset, geo.send_size, "data area: send half"))
    parts.append((geo.data_offset + geo.send_size, geo.data_size - geo.send_size,
                  "data area: receive half"))
    return parts


def device_dot(geo: device.Geometry) -> str:
    """The region as a column of parts, queue set 0 and one ring drawn out beside it."""
    def cell(off: int, size: int, what: str, port: str = "", colour: str = "#eef3fb") -> str:
        p = f' PORT="{port}"' if port else ""
        return (f'<TR><TD ALIGN="RIGHT"><FONT FACE="monospace">{off:#x}</FONT></TD>'
                f'<TD BGCOLOR="{colour}" ALIGN="LEFT">{_h(what)}</TD>'
                f'<TD{p} ALIGN="RIGHT">{_h(_size(size))}</TD></TR>')

    def table(title: str, rows: list[str]) -> str:
        return ('<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4">'
                f'<TR><TD COLSPAN="3"><B>{_h(title)}</B></TD></TR>{"".join(rows)}</TABLE>>')

    q0 = geo.qset_offset
    region = [cell(0, device.HEADER_SIZE, "header", colour="#fff3e0")]
    for q in range(geo.n_qsets):
        off = geo.qset_offset + q * geo.qset_stride
        region.append(cell(off, geo.qset_stride, f"queue set {q}", port=f"q{q}"))
    end = geo.qset_offset + geo.n_qsets * geo.qset_stride
    if end < geo.data_offset:
        region.append(cell(end, geo.data_offset - end, "padding", colour="#f3f3f3"))
    region.append(cell(geo.data_offset, geo.send_size, "data area: send half (tenant's)",
                       colour="#e8f5e9"))
    region.append(cell(geo.data_offset + geo.send_size, geo.data_size - geo.send_size,
                       "data area: receive half (NSMs' slices)", colour="#e8f5e9"))
    qset = [cell(geo.bell_offset(0, b), device.BELL_SIZE, f"{b.name} bell (futex word)",
                 colour="#fff3e0") for b in device.Bell]
    for r in device.RingId:
        way = "device → CoreEngine" if r.to_engine else "CoreEngine → device"
        qset.append(cell(geo.ring_offset(0, r), geo.ring_size, f"{r.name} ring ({way})",
                         port="job" if r is device.RingId.JOB else ""))
    job = geo.ring_offset(0, device.RingId.JOB)
    ring_rows = [
        cell(job + ring.TAIL, device.CACHE_LINE, "tail (producer), own cache line"),
        cell(job + ring.HEAD, device.CACHE_LINE, "head (consumer), own cache line"),
        cell(job + ring.FLAGS, device.CACHE_LINE, "flags: NEED_WAKEUP"),
        cell(job + ring.SLOTS, geo.ring_entries * device.NQE_SLOT,
             f"{geo.ring_entries} slots × {device.NQE_SLOT}-byte NQE"),
    ]
    assert q0 == geo.bell_offset(0, device.Bell.DEVICE)
    return "\n".join([
        "digraph device {", _GRAPH_STYLE, "rankdir=LR; node [shape=plaintext];",
        f"region [label={table(f'region, {_size(geo.total_size)}', region)}];",
        f"qset [label={table('queue set 0', qset)}];",
        f"ring [label={table('JOB ring (every ring alike)', ring_rows)}];",
        'region:q0:e -> qset:w [style=dashed, arrowhead=none];',
        'qset:job:e -> ring:w [style=dashed, arrowhead=none];',
        "}",
    ])


# The architecture: who talks to whom, with the reference's names for rings and roles.

def architecture_dot() -> str:
    """Tenants on top, the CoreEngine in the middle, NSMs and their stacks below."""
    to_engine = " + ".join(r.name for r in device.RingId if r.to_engine)
    from_engine = " + ".join(r.name for r in device.RingId if not r.to_engine)
    grey = 'style=dashed, color="#888888", fontcolor="#666666", arrowsize=0.6'
    lines = [
        "digraph architecture {", _GRAPH_STYLE, "rankdir=TB; nodesep=0.5; ranksep=0.5;",
        'node [shape=box, style="rounded,filled", fillcolor="#eef3fb", color="#3f51b5"];',
    ]
    tenants = [(1, "application", "GuestLib: Python API"),
               (2, "unmodified program", "GuestLib: LD_PRELOAD\nlibrary + nk-agent")]
    for v, app, gl in tenants:
        lines += [
            f"subgraph cluster_vm{v} {{ label={_q(f'tenant, VM ID {v}')}; style=rounded;"
            ' color="#999999";',
            f"app{v} [label={_q(app)}]; gl{v} [label={_q(gl)}];",
            f"app{v} -> gl{v} [label=\"socket calls\"];", "}",
            f'vm{v} [shape=cylinder, style=filled, fillcolor="#fff3e0",'
            f" label={_q(f'NK device vm-{v}.nk')}];",
            f"gl{v} -> vm{v} [dir=both, label=\"NQEs, payload\"];",
        ]
    lines += [
        'subgraph cluster_ce { label="CoreEngine (host process)"; style=rounded;'
        ' color="#3f51b5";',
        'switch [label="switching: stamps the VM ID,\\nchecks every buffer, translates IDs"];',
        'table [label="connection table\\n(VM, qset, socket) ↔ (NSM, qset, socket)"];',
        'policy [label="policy (which NSM)\\ncounters"];',
        'control [label="engine.sock: attach,\\nstatus, shutdown (JSON)", fillcolor="#f3f3f3"];',
        "{ rank=same; control -> switch -> table -> policy [style=invis]; }", "}",
    ]
    for v, _, _ in tenants:
        lines.append(f"vm{v} -> switch [label={_q(f'{to_engine} ↓{chr(10)}{from_engine} ↑')},"
                     " dir=both];")
    lines += [
        'pairs [shape=box, style=filled, fillcolor="#e8f5e9",'
        ' label="shared memory\\n(a connection between two tenants)"];',
        'linux [shape=box, style=filled, fillcolor="#e8f5e9", label="Linux TCP/UDP"];',
    ]
    nsms = [(1, "shm NSM", ("pairs", "linux")), (2, "kernel NSM\nor a vendor's NSM", ("linux",))]
    for n, name, stacks in nsms:
        lines += [
            f'nsmdev{n} [shape=cylinder, style=filled, fillcolor="#fff3e0",'
            f" label={_q(f'NK device nsm-{n}.nk')}];",
            f"switch -> nsmdev{n} [dir=both];",
            f"subgraph cluster_nsm{n} {{ label={_q(f'NSM, NSM ID {n}')}; style=rounded;"
            ' color="#999999";',
            f"nsm{n} [label={_q(name + chr(10) + 'ServiceLib')}]; }}",
            f"nsmdev{n} -> nsm{n} [dir=both];",
            *(f"nsm{n} -> {stack};" for stack in stacks),
        ]
    lines += [f"gl1 -> control [{grey}, label=\"attach (RT-3)\", constraint=false];",
              f"nsm1 -> control [{grey}, constraint=false];", "}"]
    return "\n".join(lines)


#: Every diagram of the site: ``diagrams/NAME.svg`` is drawn from ``DIAGRAMS[NAME]()``.
DIAGRAMS: Final[dict[str, Callable[[], str]]] = {
    "architecture": architecture_dot,
    "device-tenant": lambda: device_dot(coreengine.GEOMETRY[device.Kind.TENANT]),
    "sockstate-tcp": lambda: sockstate_dot(sockstate.Kind.TCP),
    "sockstate-udp": lambda: sockstate_dot(sockstate.Kind.UDP),
}


def gen_diagram(args: list[str], page: Page) -> str:
    """``<!-- nk:diagram NAME caption… -->``: the image, linked to itself for zooming."""
    if not args or args[0] not in DIAGRAMS:
        raise PluginError(f"{page.file.src_uri}: nk:diagram takes one of {sorted(DIAGRAMS)},"
                          f" got {args}")
    here = posixpath.dirname(page.file.src_uri) or "."
    src = posixpath.relpath(f"{DIAGRAM_URI}/{args[0]}.svg", here)
    caption = " ".join(args[1:]) or args[0]
    return f'[![{caption}]({src}){{ .nk-diagram }}]({src})'


Generator = Callable[[list[str], Page], str]
GENERATORS: Final[dict[str, Generator]] = {
    "nqe-fields": gen_nqe_fields,
    "nqe-diagram": gen_nqe_diagram,
    "nqe-ops": gen_nqe_ops,
    "nqe-op-codes": gen_nqe_op_codes,
    "nqe-example": gen_nqe_example,
    "device-header": gen_device_header,
    "device-map": gen_device_map,
    "ring-header": gen_ring_header,
    "requirements": gen_requirements,
    "requirement-counts": gen_requirement_counts,
    "target-roles": gen_target_roles,
    "report-example": gen_report_example,
    "cli": gen_cli,
    "cli-fails": gen_cli_fails,
    "diagram": gen_diagram,
    "cli-options": gen_cli_options,
    "sockstate-table": gen_sockstate_table,
    "device-geometry": gen_device_geometry,
    "engine-walkthrough": gen_engine_walkthrough,
    "engine-buffers": gen_engine_buffers,
    "engine-rings": gen_engine_rings,
}

PLACEHOLDER: Final = re.compile(r"^<!--\s*nk:([a-z-]+)(.*?)-->[ \t]*$", re.MULTILINE)
REQ_REF: Final = re.compile(r"\[\[([A-Z]+-\d+)\]\]")
REQ_HEADING: Final = re.compile(r"^(###\s+([A-Z]+-\d+)\s*[:—-]\s*.+?)\s*$", re.MULTILINE)
MD_LINK: Final = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def _expand(match: re.Match[str], page: Page) -> str:
    name, rest = match.group(1), match.group(2)
    gen = GENERATORS.get(name)
    if gen is None:
        raise PluginError(f"{page.file.src_uri}: unknown placeholder nk:{name}")
    return "\n" + gen(shlex.split(rest), page) + "\n"


# -- the spec as part of the site -----------------------------------------------------


def spec_files() -> list[Path]:
    """``spec/*.md``: README first, then in the order the README's table lists them."""
    found = {p.name: p for p in sorted(SPEC_DIR.glob("*.md"))}
    readme = found.pop("README.md", None)
    order: list[str] = []
    if readme is not None:
        order = re.findall(r"\]\(([\w.-]+\.md)\)", readme.read_text(encoding="utf-8"))
    listed = [found[n] for n in dict.fromkeys(order) if n in found]
    rest = [p for n, p in found.items() if n not in order]
    return ([readme] if readme else []) + listed + rest


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Expand ``- Specification: spec/README.md`` in the nav to every spec file present."""
    nav = config.nav or []
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and SPEC_NAV_TITLE in entry:
            pages: list[Any] = []
            for path in spec_files():
                uri = f"{SPEC_URI}/{path.name}"
                pages.append({"Overview": uri} if path.name == "README.md" else uri)
            nav[i] = {SPEC_NAV_TITLE: pages}
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add ``spec/*.md`` to the site as ``spec/…`` pages, read from the spec folder, and
    every diagram of :data:`DIAGRAMS` as ``diagrams/NAME.svg``, drawn by ``dot``."""
    for path in spec_files():
        files.append(File.generated(config, f"{SPEC_URI}/{path.name}", abs_src_path=str(path)))
    for name, source in DIAGRAMS.items():
        files.append(File.generated(config, f"{DIAGRAM_URI}/{name}.svg",
                                    content=dot_svg(source())))
    return files


def _spec_markdown(markdown: str, page: Page) -> str:
    """Anchor every requirement heading with its ID; fix links that leave the spec folder.

    A link to a spec file not written yet becomes plain text (logged), a link to
    a page of ``docs/`` is pointed at that page, and a link to another file of
    the repository becomes its text followed by the path.
    """
    markdown = REQ_HEADING.sub(lambda m: f"{m.group(1)} {{ #{m.group(2)} }}", markdown)

    def link(m: re.Match[str]) -> str:
        text, href, anchor = m.group(1), m.group(2), m.group(3) or ""
        if re.match(r"^[a-z]+:", href) or href.startswith("/"):
            return m.group(0)
        target = posixpath.normpath(posixpath.join(SPEC_URI, href))
        if target.startswith(SPEC_URI + "/"):
            if (ROOT / target).is_file():
                return m.group(0)
            log.info("%s links to %s, which does not exist yet", page.file.src_uri, target)
            return text
        if target.startswith("docs/") and target.endswith(".md"):
            rel = posixpath.relpath(target.removeprefix("docs/"), SPEC_URI)
            return f"[{text}]({rel}{anchor})"
        return text if text.strip("`") == target else f"{text} (`{target}`)"

    return MD_LINK.sub(link, markdown)


def _docs_markdown(markdown: str, page: Page) -> str:
    """Point links to ``../spec/X.md`` (right in the repository) at the site's copy."""
    here = posixpath.dirname(page.file.src_uri)

    def link(m: re.Match[str]) -> str:
        text, href, anchor = m.group(1), m.group(2), m.group(3) or ""
        target = posixpath.normpath(posixpath.join(here, href))
        if not target.startswith(f"../{SPEC_URI}/"):
            return m.group(0)
        rel = posixpath.relpath(target.removeprefix("../"), here or ".")
        return f"[{text}]({rel}{anchor})"

    return MD_LINK.sub(link, markdown)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri.startswith(SPEC_URI + "/"):
        markdown = _spec_markdown(markdown, page)
    else:
        markdown = _docs_markdown(markdown, page)
    markdown = PLACEHOLDER.sub(lambda m: _expand(m, page), markdown)
    if REQ_REF.search(markdown):
        known = requirements.load()
        markdown = REQ_REF.sub(lambda m: _req_link(m.group(1), page, known), markdown)
    return markdown
