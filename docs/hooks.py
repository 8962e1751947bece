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
``<!-- nk:requirements -->``      every requirement in ``spec/``, linked
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
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import posixpath
import re
import shlex
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
from netkernel.reference import device, ring
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


#: An example device: what the offsets of a region look like for one geometry.
EXAMPLE_GEOMETRY: Final = device.Geometry(n_qsets=2, ring_entries=256)


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


def gen_requirements(_: list[str], page: Page) -> str:
    known = requirements.load()
    if not known:
        return "*No requirement is defined yet.*"
    rows = [(_req_link(r.id, page, known), r.title, r.level, ", ".join(r.roles),
             "untestable" if r.untestable else "")
            for r in known.values()]
    return _table(["ID", "requirement", "level", "roles", "note"], rows)


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
    "target-roles": gen_target_roles,
    "report-example": gen_report_example,
    "cli": gen_cli,
    "cli-fails": gen_cli_fails,
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
    """Add ``spec/*.md`` to the site as ``spec/…`` pages, read from the spec folder."""
    for path in spec_files():
        files.append(File.generated(config, f"{SPEC_URI}/{path.name}", abs_src_path=str(path)))
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
