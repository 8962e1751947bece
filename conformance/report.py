"""The certification report: what a run proved, in JSON, Markdown and HTML.

The plugin (plugin.py) collects one :class:`Outcome` per test phase and hands
them here at the end of the session. :func:`build` folds them into the report
document (the JSON report; the other formats are renderings of it):

- ``suite``, ``spec``: what judged — the suite's version and a digest of its
  files, the spec's version line (spec/README.md) and a digest of spec/*.md;
- ``target``, ``implementation``: what was judged — the ``--target`` string,
  the target's name and version, and the command line and executable digest
  of every program the suite started for it;
- ``run``: how — certification or not, the Hypothesis settings and seed,
  Python, pytest and the platform, the command line;
- ``summary``, ``verdict``: a count per status, the failing mandatory (MUST,
  MUST NOT) and optional (SHOULD, SHOULD NOT, MAY) requirements;
- ``requirements``: every requirement of spec/ with its status;
- ``failures``: every failing test with its requirements, its error, and how
  to reproduce it (command line, Hypothesis falsifying example and
  ``@reproduce_failure`` blob).

Exit status of a certification run (:func:`certification_exit`): non-zero
exactly when a mandatory requirement failed, or a test naming no requirement
failed (the suite's self-checks: the report cannot be trusted then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from netkernel.conformance import requirements, targets

MANDATORY = frozenset({"MUST", "MUST NOT"})
NOT_APPLICABLE = "not applicable: "
UNSUPPORTED = "unsupported: "
STATUSES = ("failed", "passed", "unsupported", "not-applicable", "untestable", "not-tested")
SUITE_DIR = Path(__file__).resolve().parent
#: Files written by ``--nk-report-dir``.
FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html",
         "junit": "junit.xml"}
_SPEC_VERSION = re.compile(r"^#\s.*\bspecification\s+(v\S+)", re.MULTILINE)
_LIMIT = 8000  # characters kept of a failure's details or falsifying example
#: The reproduction data a failure may carry besides its command, as the pages label it.
_REPRODUCE_EXTRAS = (("falsifying_example", "Falsifying example"),
                     ("reproduce_failure", "Reproduce with"), ("seed", "Seed"))


@dataclasses.dataclass
class Outcome:
    """One phase (setup, call, teardown) of one test, as the report needs it."""

    req: list[str]
    nodeid: str
    outcome: str  # passed, failed, skipped
    reason: str = ""  # why it was skipped
    when: str = "call"
    error: str = ""  # the short error of a failure
    details: str = ""  # the failure's traceback, shortened
    reproduce: dict[str, Any] = dataclasses.field(default_factory=dict)


def is_mandatory(level: str) -> bool:
    return level in MANDATORY


def _digest(paths: Iterable[Path], base: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.relative_to(base).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def spec_info(spec_dir: Path = requirements.SPEC_DIR) -> dict[str, Any]:
    """The spec's version (the ``# NetKernel specification vN`` line of README.md) and a
    digest of every spec/*.md: two runs judged by the same text have the same digest."""
    readme = spec_dir / "README.md"
    m = _SPEC_VERSION.search(readme.read_text(encoding="utf-8")) if readme.exists() else None
    return {"version": m.group(1) if m else "unknown",
            "digest": _digest(spec_dir.glob("*.md"), spec_dir), "path": str(spec_dir)}


def suite_info() -> dict[str, Any]:
    """The suite's distribution version and a digest of its tests and scripts."""
    try:
        version = importlib.metadata.version("netkernel")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    files = [*SUITE_DIR.glob("*.py"), *SUITE_DIR.glob("scripts/*.nkt")]
    return {"name": "netkernel.conformance", "version": version,
            "digest": _digest(files, SUITE_DIR), "path": str(SUITE_DIR)}


def _launchers(target: targets.Target) -> dict[str, targets.Launcher]:
    found: dict[str, targets.Launcher] = {}
    for role, obj in target.roles.items():
        if isinstance(obj, targets.Launcher):
            found[role] = obj
        elif isinstance(getattr(obj, "process", None), targets.Launcher):
            found[role] = obj.process
    return found


def implementation_info(target: targets.Target) -> dict[str, Any]:
    """The target's name and version, its roles and features, and for every program the
    suite starts for it the command line and the digest of the executable."""
    programs: dict[str, Any] = {}
    for role, launcher in _launchers(target).items():
        argv0 = launcher.argv[0].replace("{python}", sys.executable)
        exe = shutil.which(argv0)
        entry: dict[str, Any] = {"command": shlex.join(launcher.argv), "executable": exe}
        if exe:
            entry["sha256"] = hashlib.sha256(Path(exe).read_bytes()).hexdigest()
        programs[role] = entry
    return {"name": target.name, "version": target.version, "roles": sorted(target.roles),
            "features": sorted(target.features), "programs": programs}


def requirement_status(
    known: dict[str, requirements.Requirement],
    results: Iterable[tuple[list[str], str, str, str]],
) -> dict[str, dict[str, Any]]:
    """Fold test outcomes ``(ids, nodeid, outcome, skip reason)`` into one status per
    requirement.

    failed > passed > unsupported > not-applicable > untestable > not-tested: any failing
    test fails the requirement; it passes if a test behind it passed and none failed.
    """
    by_req: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for ids, nodeid, outcome, reason in results:
        for rid in ids:
            by_req[rid].append((nodeid, outcome, reason))
    out: dict[str, dict[str, Any]] = {}
    for rid, req in known.items():
        runs = by_req.get(rid, [])
        outcomes = {o for _, o, _ in runs}
        reasons = sorted({r for _, o, r in runs if o == "skipped"})
        if "failed" in outcomes:
            status = "failed"
        elif "passed" in outcomes:
            status = "passed"
        elif any(r.startswith(UNSUPPORTED) for r in reasons):
            status = "unsupported"
        elif reasons:
            status = "not-applicable"
        elif req.untestable:
            status = "untestable"
        else:
            status = "not-tested"
        out[rid] = {
            "status": status, "level": req.level, "roles": list(req.roles), "file": req.file,
            "title": req.title, "tests": sorted({n for n, _, _ in runs}),
            "reasons": reasons or ([req.untestable] if status == "untestable" else []),
        }
        failed = sorted({n for n, o, _ in runs if o == "failed"})
        if failed:
            out[rid]["failed_tests"] = failed
    return out


#: pytest's exit statuses that end a run before it can judge anything.
NO_VERDICT = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


def build(outcomes: list[Outcome], *, target_spec: str, target: targets.Target | None,
          certify: bool, run: dict[str, Any], pytest_status: int = 0) -> dict[str, Any]:
    """The report document (the JSON report). ``pytest_status`` is pytest's exit status
    before the certification rule: 2 to 5 leave the run without a verdict."""
    known = requirements.load()
    status = requirement_status(known, [(o.req, o.nodeid, o.outcome, o.reason)
                                        for o in outcomes if o.req])
    counts = {s: 0 for s in STATUSES}
    for entry in status.values():
        counts[entry["status"]] += 1
    failing = [rid for rid, e in status.items() if e["status"] == "failed"]
    failures = [{"nodeid": o.nodeid, "when": o.when, "requirements": o.req,
                 "levels": sorted({known[r].level for r in o.req if r in known}),
                 "error": o.error, "reproduce": o.reproduce, "details": o.details}
                for o in outcomes if o.outcome == "failed"]
    mandatory = [rid for rid in failing if is_mandatory(known[rid].level)]
    unattributed = sorted({o.nodeid for o in outcomes if o.outcome == "failed" and not o.req})
    passed = not mandatory and not unattributed and pytest_status not in NO_VERDICT
    return {
        "target": target_spec,
        "certify": certify,
        "summary": {s: n for s, n in counts.items() if n},
        "verdict": {
            "passed": passed,
            "failed_mandatory": mandatory,
            "failed_optional": [rid for rid in failing if rid not in mandatory],
            "failed_unattributed_tests": unattributed,
            "no_verdict": NO_VERDICT.get(pytest_status),
            "rule": "a run fails exactly when a MUST or MUST NOT requirement fails (or a test"
                    " naming no requirement fails: the suite's own checks)",
        },
        "suite": suite_info(),
        "spec": spec_info(),
        "implementation": implementation_info(target) if target else None,
        "run": run,
        "requirements": status,
        "failures": failures,
    }


def certification_exit(doc: dict[str, Any]) -> int:
    """A certification run's exit status: 1 when the verdict fails, else 0."""
    return 0 if doc["verdict"]["passed"] else 1


# -- renderings ------------------------------------------------------------------------------------

def _reqs_by_status(doc: dict[str, Any]) -> dict[str, list[str]]:
    by: dict[str, list[str]] = defaultdict(list)
    for rid, e in doc["requirements"].items():
        by[e["status"]].append(rid)
    return by


def _headline(doc: dict[str, Any]) -> str:
    v = doc["verdict"]
    if v.get("no_verdict"):
        return f"NO VERDICT: the run ended early ({v['no_verdict']})"
    if v["passed"]:
        extra = (f" ({len(v['failed_optional'])} optional requirement(s) failed)"
                 if v["failed_optional"] else "")
        return "PASS: no mandatory requirement failed" + extra
    parts = []
    if v["failed_mandatory"]:
        parts.append(f"{len(v['failed_mandatory'])} mandatory requirement(s) failed")
    if v["failed_unattributed_tests"]:
        parts.append(f"{len(v['failed_unattributed_tests'])} suite check(s) failed")
    return "FAIL: " + ", ".join(parts)


def _facts(doc: dict[str, Any]) -> list[tuple[str, str]]:
    impl = doc["implementation"] or {}
    run = doc["run"]
    hyp = run.get("hypothesis", {})
    facts = [
        ("Target", doc["target"]),
        ("Implementation", f"{impl.get('name')} (version {impl.get('version') or 'not given'})"),
    ]
    for role, prog in sorted(impl.get("programs", {}).items()):
        exe = prog.get("executable") or "not found"
        facts.append((f"Program ({role})", f"{prog['command']}  [{exe}"
                      + (f", sha256 {prog['sha256'][:16]}…]" if prog.get("sha256") else "]")))
    facts += [
        ("Suite", f"{doc['suite']['name']} {doc['suite']['version']} ({doc['suite']['digest']})"),
        ("Spec", f"{doc['spec']['version']} ({doc['spec']['digest']})"),
        ("Certification run", "yes" if doc["certify"] else "no (development run)"),
        ("Hypothesis", f"{hyp.get('version')}, profile {hyp.get('profile')}, seed "
                       f"{hyp.get('seed')}, max_examples {hyp.get('max_examples')}"),
        ("Python", f"{run.get('python')} on {run.get('platform')}"),
        ("Command", run.get("command", "")),
    ]
    return facts


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict[str, Any]) -> str:
    """The human-readable report as Markdown."""
    out = [f"# NetKernel certification report: `{doc['target']}`", "",
           f"**{_headline(doc)}**", ""]
    out += ["| | |", "|---|---|"]
    out += [f"| {k} | {_md_cell(v)} |" for k, v in _facts(doc)]
    out += ["", "## Summary", "", "| status | requirements |", "|---|---|"]
    out += [f"| {s} | {n} |" for s, n in doc["summary"].items()]
    v = doc["verdict"]
    for key, label in (("failed_mandatory", "Failing mandatory requirements"),
                       ("failed_optional", "Failing optional requirements (exit status 0)"),
                       ("failed_unattributed_tests", "Failing suite checks")):
        if v[key]:
            out += ["", f"**{label}:** " + ", ".join(f"`{x}`" for x in v[key])]
    if doc["failures"]:
        out += ["", "## Failures", ""]
        for f in doc["failures"]:
            out += [f"### `{f['nodeid']}` ({f['when']})", "",
                    f"- **Requirements:** {', '.join(f['requirements']) or 'none'}"
                    f" ({', '.join(f['levels']) or '-'})",
                    f"- **Error:** {_md_cell(f['error'])}",
                    f"- **Reproduce:** `{f['reproduce'].get('command', '')}`"]
            for key, label in _REPRODUCE_EXTRAS:
                if f["reproduce"].get(key):
                    out += ["", f"{label}:", "", "```", str(f["reproduce"][key]), "```"]
            out.append("")
    out += ["", "## Requirements", "", "| ID | level | status | title | tests / reasons |",
            "|---|---|---|---|---|"]
    for rid, e in doc["requirements"].items():
        why = ", ".join(e.get("failed_tests") or e["reasons"])
        out.append(f"| {rid} | {e['level']} | **{e['status']}** | {_md_cell(e['title'])} "
                   f"| {_md_cell(why)} |")
    return "\n".join(out) + "\n"


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:75em;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .5em;
vertical-align:top;text-align:left}th{background:#f3f3f3}code,pre{font:12px ui-monospace,monospace}
pre{background:#f6f6f6;padding:.5em;overflow-x:auto;white-space:pre-wrap}
.verdict{font-size:1.3em;font-weight:bold;padding:.5em;border-radius:4px}
.PASS{background:#dfd}.FAIL,.NO{background:#fdd}.failed{background:#fdd}.passed{background:#efe}
.unsupported,.not-applicable,.untestable,.not-tested{color:#666}
"""


def html_page(doc: dict[str, Any]) -> str:
    """The human-readable report as one self-contained HTML page (no external resources)."""
    e = html.escape
    head = _headline(doc)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>NetKernel certification: {e(doc['target'])}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>NetKernel certification report: <code>{e(doc['target'])}</code></h1>",
           f'<p class="verdict {head.split()[0].rstrip(":")}">{e(head)}</p>', "<table>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _facts(doc)]
    out += ["</table>", "<h2>Summary</h2>", "<table><tr><th>status</th><th>requirements</th></tr>"]
    out += [f'<tr class="{e(s)}"><td>{e(s)}</td><td>{n}</td></tr>'
            for s, n in doc["summary"].items()]
    out.append("</table>")
    v = doc["verdict"]
    for key, label in (("failed_mandatory", "Failing mandatory requirements"),
                       ("failed_optional", "Failing optional requirements (exit status 0)"),
                       ("failed_unattributed_tests", "Failing suite checks")):
        if v[key]:
            links = [f'<a href="#{e(x)}">{e(x)}</a>' if key != "failed_unattributed_tests"
                     else f"<code>{e(x)}</code>" for x in v[key]]
            out.append(f"<p><b>{label}:</b> " + ", ".join(links) + "</p>")
    if doc["failures"]:
        out.append("<h2>Failures</h2>")
        for i, f in enumerate(doc["failures"]):
            rep = f["reproduce"]
            out += [f'<h3 id="failure-{i}"><code>{e(f["nodeid"])}</code> ({e(f["when"])})</h3>',
                    "<table>",
                    f"<tr><th>Requirements</th><td>{e(', '.join(f['requirements']) or 'none')}"
                    f" ({e(', '.join(f['levels']) or '-')})</td></tr>",
                    f"<tr><th>Error</th><td><pre>{e(f['error'])}</pre></td></tr>",
                    f"<tr><th>Reproduce</th><td><pre>{e(rep.get('command', ''))}</pre></td></tr>"]
            for key, label in _REPRODUCE_EXTRAS:
                if rep.get(key):
                    out.append(f"<tr><th>{label}</th><td><pre>{e(str(rep[key]))}</pre></td></tr>")
            out += ["</table>", f"<details><summary>details</summary><pre>{e(f['details'])}"
                    "</pre></details>"]
    out += ["<h2>Requirements</h2>",
            "<table><tr><th>ID</th><th>level</th><th>status</th><th>title</th>"
            "<th>tests / reasons</th></tr>"]
    fail_index: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(doc["failures"]):
        for rid in f["requirements"]:
            fail_index[rid].append(i)
    for rid, r in doc["requirements"].items():
        if r["status"] == "failed":
            why = ", ".join(f'<a href="#failure-{i}">{e(doc["failures"][i]["nodeid"])}</a>'
                            for i in fail_index[rid])
        else:
            why = e(", ".join(r["reasons"]))
        out.append(f'<tr id="{e(rid)}" class="{e(r["status"])}"><td>{e(rid)}</td>'
                   f"<td>{e(r['level'])}</td><td><b>{e(r['status'])}</b></td>"
                   f"<td>{e(r['title'])} <small>({e(r['file'])})</small></td><td>{why}</td></tr>")
    out += ["</table>", "</body></html>"]
    return "\n".join(out) + "\n"


def write(doc: dict[str, Any], *, json_path: Path | None = None, directory: Path | None = None,
          ) -> list[Path]:
    """Write the JSON report to ``json_path``, and every format into ``directory``."""
    written: list[Path] = []
    text = json.dumps(doc, indent=2) + "\n"
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text, encoding="utf-8")
        written.append(json_path)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        for kind, body in (("json", text), ("markdown", markdown(doc)), ("html", html_page(doc))):
            path = directory / FILES[kind]
            path.write_text(body, encoding="utf-8")
            written.append(path)
    return written


def summary_lines(doc: dict[str, Any], written: list[Path], exit_status: int) -> list[str]:
    """The run's last words on the terminal (plugin.py prints them after pytest's own)."""
    v = doc["verdict"]
    counts = ", ".join(f"{n} {s}" for s, n in doc["summary"].items())
    lines = [f"NetKernel {'certification' if doc['certify'] else 'conformance'} of "
             f"{doc['target']}: {_headline(doc)}",
             f"  requirements: {counts}"]
    if v["failed_mandatory"]:
        lines.append("  failing mandatory (MUST/MUST NOT): " + " ".join(v["failed_mandatory"]))
    if v["failed_optional"]:
        lines.append("  failing optional (SHOULD/MAY): " + " ".join(v["failed_optional"]))
    if v["failed_unattributed_tests"]:
        lines.append("  failing suite checks: " + " ".join(v["failed_unattributed_tests"]))
    if doc["summary"].get("not-tested"):
        lines.append(f"  partial run: {doc['summary']['not-tested']} requirement(s) not tested"
                     " (a certification runs the whole suite)")
    for path in written:
        lines.append(f"  report: {path}")
    lines.append(f"  exit status: {exit_status}")
    return lines


def environment() -> dict[str, str]:
    """The NetKernel variables a rerun needs (``NETKERNEL_*``, ``NK_*``)."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("NETKERNEL_", "NK_")) and k != "NETKERNEL_INSTANCE"}


def shorten(text: str, limit: int = _LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more)"
