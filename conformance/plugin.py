"""The conformance suite's pytest plugin: ``--target``, role fixtures, the certification report.

Registered by the ``pytest11`` entry point ``netkernel.conformance.plugin`` of the
installed distribution (so ``pytest --pyargs netkernel.conformance`` works
anywhere), and by the repository's root ``conftest.py`` under the same name
(pytest loads it once). Every conformance test carries
``@pytest.mark.req("NQE-4", ...)`` naming the requirements it checks and asks
for the roles it exercises by fixture (``codec``, ``ring``, ...). A role the
target lacks skips the test as *not applicable*; an optional feature the target
does not claim skips it as *unsupported* (:func:`require_feature`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, settings

from netkernel.conformance import report as nkreport
from netkernel.conformance import requirements, runtime, targets
from netkernel.conformance.report import NOT_APPLICABLE, UNSUPPORTED, requirement_status

__all__ = ["NOT_APPLICABLE", "UNSUPPORTED", "require_feature", "requirement_status"]

# Certification runs are reproducible: same examples, same order, no database (DESIGN §9).
# Role fixtures are function-scoped but hand out stateless adapters (modules), so
# reusing one across the examples of a @given test is safe.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
# print_blob: a failure's report carries its @reproduce_failure blob (report.py).
settings.register_profile(
    "certify", derandomize=True, max_examples=200, deadline=None, database=None,
    print_blob=True, suppress_health_check=_SUPPRESS,
)
# derandomize=False is explicit: Hypothesis loads its "ci" profile (derandomized) when
# it sees a CI variable, and a profile inherits from whatever was loaded; a development
# run's examples are random and a report fixes and records the seed (pytest_configure).
settings.register_profile(
    "dev", max_examples=60, deadline=None, derandomize=False,
    suppress_health_check=_SUPPRESS,
)


def _runs_the_suite(config: pytest.Config) -> bool:
    """Whether this is a NetKernel run: from the repository, or naming the suite.

    The ``pytest11`` entry point loads this plugin into every pytest run of an
    environment where netkernel is installed; other projects' runs keep their own
    hypothesis settings.
    """
    return (_reporting(config) or (config.rootpath / "conformance" / "plugin.py").is_file()
            or any("conformance" in str(arg) for arg in config.args))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("netkernel")
    group.addoption("--target", default="reference",
                    help="implementation under test: reference, fastpath (the fast path with"
                         " its default NSM, the shm NSM), fastpath-kernel (the fast path with the"
                         " kernel NSM), exec:CMD (an NSM program;"
                         " {instance} in CMD is the instance's name), or module[:function]")
    group.addoption("--nk-report", metavar="FILE", default=None,
                    help="write the JSON report: every spec requirement with its status")
    group.addoption("--nk-report-dir", metavar="DIR", default=None,
                    help="write every report into DIR: report.json, report.md, report.html"
                         " and junit.xml (unless --junitxml names another file)")
    group.addoption("--nk-target-version", metavar="VERSION", default=None,
                    help="the version of the implementation under test, for the report"
                         " (overrides the target's own; e.g. for an exec: target)")
    group.addoption("--nk-certify", action="store_true",
                    help="certification run: reproducible (hypothesis profile 'certify'); the"
                         " exit status is non-zero exactly when a MUST/MUST NOT requirement"
                         " fails; the verdict is printed last")


_RUN = pytest.StashKey[dict[str, Any]]()


def _reporting(config: pytest.Config) -> bool:
    return bool(config.getoption("--nk-report") or config.getoption("--nk-report-dir")
                or config.getoption("--nk-certify"))


@pytest.hookimpl(tryfirst=True)  # before junitxml and hypothesis read their options
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "req(*ids): the spec requirement IDs this test checks")
    _OUTCOMES.clear()
    if config.getoption("--nk-certify"):
        settings.load_profile("certify")
    elif _runs_the_suite(config):
        settings.load_profile(os.environ.get("NK_HYPOTHESIS_PROFILE", "dev"))
    directory = config.getoption("--nk-report-dir")
    if directory and not getattr(config.option, "xmlpath", None):
        config.option.xmlpath = str(Path(directory) / nkreport.FILES["junit"])
    if (_reporting(config) and not settings().derandomize
            and config.getoption("hypothesis_seed", None) is None):
        # a report's failures must be reproducible: fix the seed and write it down
        config.option.hypothesis_seed = str(random.getrandbits(32))


_TARGET = pytest.StashKey[targets.Target]()


def _target(config: pytest.Config) -> targets.Target:
    if _TARGET not in config.stash:
        config.stash[_TARGET] = targets.load(config.getoption("--target"))
    return config.stash[_TARGET]


@pytest.fixture(scope="session")
def target(pytestconfig: pytest.Config) -> targets.Target:
    """The implementation under test."""
    return _target(pytestconfig)


def _role(target: targets.Target, name: str) -> Any:
    try:
        return target.role(name)
    except targets.RoleMissing as exc:
        pytest.skip(NOT_APPLICABLE + str(exc))


def require_feature(target: targets.Target, feature: str) -> None:
    """Skip as *unsupported* when the target does not claim an optional feature."""
    if feature not in target.features:
        pytest.skip(f"{UNSUPPORTED}target {target.name!r} does not claim {feature}")


def _role_fixture(name: str) -> Any:
    """A fixture named after a role: the target's adapter for it, or a not-applicable skip."""

    @pytest.fixture(name=name)
    def fixture(target: targets.Target) -> Any:
        return _role(target, name)

    fixture.__doc__ = f"The target's {name!r} role (skips the test as not applicable without it)."
    return fixture


# One fixture per role: codec, device, ring, bufpool, sockets, conntable, coreengine, nsm, guestlib.
for _name in targets.ROLES:
    globals()[f"_fixture_{_name}"] = _role_fixture(_name)


@pytest.fixture
def engine(coreengine: Any) -> Any:
    """The running CoreEngine, part of the coreengine role: its :class:`targets.Launcher`,
    or a not-applicable skip when the target's role has no process."""
    process = getattr(coreengine, "process", None)
    if process is None:
        pytest.skip(NOT_APPLICABLE + "the target's coreengine role has no running process")
    return process


@pytest.fixture(scope="session")
def nk_runtime(target: targets.Target, pytestconfig: pytest.Config,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[runtime.Runtime]:
    """The session's running instances (CoreEngine, NSM), started when a test first asks:
    the target's processes, the reference's where the target has none (targets.py).
    Their output goes to ``logs/`` in the ``--nk-report-dir``, else to a temporary dir."""
    directory = pytestconfig.getoption("--nk-report-dir")
    if directory:
        logs = Path(directory) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
    else:
        logs = tmp_path_factory.mktemp("nk-logs")
    rt = runtime.Runtime(target, logs)
    try:
        yield rt
    finally:
        rt.close()


def req_ids(item: pytest.Item) -> list[str]:
    """The requirement IDs a test names with ``@pytest.mark.req``."""
    return [rid for mark in item.iter_markers("req") for rid in mark.args]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    known = requirements.load()
    for item in items:
        ids = req_ids(item)
        for rid in ids:
            if rid not in known:
                raise pytest.UsageError(f"{item.nodeid} names {rid}, which spec/ does not define")
        if ids:  # in the JUnit XML: each testcase's requirements and their levels
            item.user_properties.append(("requirements", " ".join(ids)))
            item.user_properties.append(
                ("levels", " ".join(sorted({known[rid].level for rid in ids}))))


_OUTCOMES: list[nkreport.Outcome] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    report.nk_req = req_ids(item)
    report.nk_nodeid = _report_nodeid(item)
    if report.failed:
        report.nk_failure = _failure(item, call, report)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and report.outcome == "passed":
        return
    reason = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    outcome = "failed" if report.failed else ("skipped" if report.skipped else "passed")
    failure = getattr(report, "nk_failure", {})
    _OUTCOMES.append(nkreport.Outcome(
        list(getattr(report, "nk_req", [])), getattr(report, "nk_nodeid", report.nodeid),
        outcome, reason, report.when,
        failure.get("error", ""), failure.get("details", ""), failure.get("reproduce", {})))


_BLOB = re.compile(r"@reproduce_failure\([^)]*\)")
#: How Hypothesis opens the note naming the failing input: "Falsifying example" in older
#: releases (6.155 here), "Failing test case" in newer ones (6.170, what pip installs).
_EXAMPLE = ("Falsifying example", "Failing test case")


def _notes(exc: BaseException | None) -> list[str]:
    """The notes Hypothesis adds to a failure (falsifying example, blob, seed)."""
    if exc is None:
        return []
    notes = [str(n) for n in getattr(exc, "__notes__", [])]
    for sub in getattr(exc, "exceptions", ()):
        notes += _notes(sub)
    return notes


def _failure(item: pytest.Item, call: pytest.CallInfo[None],
             report: pytest.TestReport) -> dict[str, Any]:
    """A failure's short error, its traceback (shortened) and how to reproduce it."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(getattr(crash, "message", "") or report.longrepr or "")
    for opening in _EXAMPLE:
        text = text.split("\n" + opening, 1)[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    error = nkreport.shorten("\n".join(lines[:6]), 1000)
    notes = _notes(call.excinfo.value if call.excinfo else None)
    repro: dict[str, Any] = {"command": _rerun_command(item)}
    example = [n for n in notes if n.startswith(_EXAMPLE)]
    if example:
        repro["falsifying_example"] = nkreport.shorten("\n".join(example))
    blobs = [m.group(0) for n in notes for m in _BLOB.finditer(n)]
    if blobs:
        repro["reproduce_failure"] = "\n".join(blobs)
    seed_hints = [n for n in notes if "@seed(" in n]
    hyp = item.config.stash[_RUN]["hypothesis"] if _RUN in item.config.stash else {}
    if seed_hints:
        repro["seed"] = "\n".join(seed_hints)
    elif example and hyp:
        repro["seed"] = hyp["seed"]
    details = str(report.longrepr or "")
    if len(details) > 8000:
        details = "… " + details[-8000:]
    return {"error": error, "details": details, "reproduce": repro}


def _suite_module(item: pytest.Item) -> str | None:
    """``netkernel.conformance.test_x`` for a test of the suite, else None."""
    try:
        rel = item.path.resolve().relative_to(nkreport.SUITE_DIR)
    except ValueError:
        return None
    return ".".join(("netkernel", "conformance", *rel.with_suffix("").parts))


def _report_nodeid(item: pytest.Item) -> str:
    """The test's ID in the report: pytest's node ID, or, for a suite test run from outside
    the rootdir (``--pyargs`` from an installed copy, whose node IDs lose their file part),
    the ``module::test`` form that ``pytest --pyargs`` takes."""
    if not item.nodeid.startswith("::"):
        return item.nodeid
    module = _suite_module(item)
    return f"{module}{item.nodeid}" if module else item.nodeid


def _rerun_command(item: pytest.Item) -> str:
    """The command line that reruns one test the way this run ran it: a suite test by its
    module name (works from a checkout and from an installed copy), any other by node ID
    from the rootdir."""
    config = item.config
    nodeid = item.nodeid
    tail = nodeid.split("::", 1)[1] if "::" in nodeid else ""
    module = _suite_module(item)
    if module:
        argv = ["pytest", "--pyargs", f"{module}::{tail}" if tail else module]
    else:
        argv = ["pytest", nodeid, "--rootdir", str(config.rootpath)]
    argv += ["--target", config.getoption("--target")]
    if config.getoption("--nk-certify"):
        argv.append("--nk-certify")
    seed = config.getoption("hypothesis_seed", None)
    if seed is not None:
        argv.append(f"--hypothesis-seed={seed}")
    env = [f"{k}={shlex.quote(v)}" for k, v in nkreport.environment().items()]
    return " ".join([*env, shlex.join(argv)])


def _run_info(config: pytest.Config) -> dict[str, Any]:
    s = settings()  # the current defaults (the profile loaded)
    seed = config.getoption("hypothesis_seed", None)
    return {
        "certify": bool(config.getoption("--nk-certify")),
        "command": shlex.join(["pytest", *config.invocation_params.args]),
        "cwd": str(config.invocation_params.dir),
        "environment": nkreport.environment(),
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "executable": sys.executable, "platform": platform.platform(),
        "pytest": pytest.__version__,
        "hypothesis": {
            "version": hypothesis.__version__,
            "profile": "certify" if config.getoption("--nk-certify")
            else os.environ.get("NK_HYPOTHESIS_PROFILE", "dev"),
            "seed": ("derandomized: each test's examples follow from its source"
                     if s.derandomize else seed),
            "derandomize": s.derandomize, "max_examples": s.max_examples,
            "deadline": None if s.deadline is None else str(s.deadline),
            "database": None if s.database is None else repr(s.database),
            "print_blob": s.print_blob,
        },
    }


@pytest.hookimpl(tryfirst=True)  # before junitxml writes its file
def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_RUN] = _run_info(session.config)


@pytest.hookimpl(tryfirst=True)  # before junitxml writes its file
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not _reporting(config):
        return
    certify = bool(config.getoption("--nk-certify"))
    target = config.stash.get(_TARGET, None)
    if target is None:
        try:
            target = _target(config)
        except (SystemExit, Exception):  # a broken --target was reported already
            target = None
    version = config.getoption("--nk-target-version")
    if target is not None and version:
        target = dataclasses.replace(target, version=version)
    doc = nkreport.build(_OUTCOMES, target_spec=config.getoption("--target"), target=target,
                         certify=certify, run=config.stash.get(_RUN, None) or _run_info(config),
                         pytest_status=int(session.exitstatus))
    _junit_properties(config, doc)
    json_path = config.getoption("--nk-report")
    directory = config.getoption("--nk-report-dir")
    written = nkreport.write(doc, json_path=Path(json_path) if json_path else None,
                             directory=Path(directory) if directory else None)
    xmlpath = getattr(config.option, "xmlpath", None)
    if xmlpath:
        written.append(Path(xmlpath))
    if certify and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        # the certification rule: non-zero exactly when a mandatory requirement failed
        session.exitstatus = nkreport.certification_exit(doc)
    config.stash[_SUMMARY] = (doc, written, session)


_SUMMARY = pytest.StashKey[tuple[dict[str, Any], list[Path], pytest.Session]]()


def _junit_properties(config: pytest.Config, doc: dict[str, Any]) -> None:
    """The suite, spec and target versions as properties of the JUnit testsuite."""
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pytest moved it: the JUnit file just lacks the properties
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    impl = doc["implementation"] or {}
    for name, value in (("netkernel.target", doc["target"]),
                        ("netkernel.target.version", impl.get("version") or ""),
                        ("netkernel.suite.version", doc["suite"]["version"]),
                        ("netkernel.suite.digest", doc["suite"]["digest"]),
                        ("netkernel.spec.version", doc["spec"]["version"]),
                        ("netkernel.spec.digest", doc["spec"]["digest"]),
                        ("netkernel.certify", str(doc["certify"]).lower()),
                        ("netkernel.failed_mandatory",
                         " ".join(doc["verdict"]["failed_mandatory"]))):
        xml.add_global_property(name, value)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """The verdict, printed last: after pytest's own summary line (which the terminal
    reporter writes at the end of the session, before this hook)."""
    if _SUMMARY not in config.stash:
        return
    doc, written, session = config.stash[_SUMMARY]
    lines = nkreport.summary_lines(doc, written, int(session.exitstatus))
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        for line in lines:
            tr.write_line(line, bold=True, red=not doc["verdict"]["passed"],
                          green=doc["verdict"]["passed"])
        tr._tw.flush()
    else:
        print("\n" + "\n".join(lines), flush=True)
