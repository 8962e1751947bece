"""The conformance suite's pytest plugin: ``--target``, role fixtures, ``--nk-report``.

Loaded by the repository's root ``conftest.py``. Every conformance test carries
``@pytest.mark.req("NQE-4", ...)`` naming the requirements it checks and asks
for the roles it exercises by fixture (``codec``, ``ring``, ...). A role the
target lacks skips the test as *not applicable*; an optional feature the target
does not claim skips it as *unsupported* (:func:`require_feature`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from netkernel.conformance import requirements, runtime, targets

NOT_APPLICABLE = "not applicable: "
UNSUPPORTED = "unsupported: "

# Certification runs are reproducible: same examples, same order, no database (DESIGN §9).
# Role fixtures are function-scoped but hand out stateless adapters (modules), so
# reusing one across the examples of a @given test is safe.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "certify", derandomize=True, max_examples=200, deadline=None, database=None,
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=_SUPPRESS,
)
settings.load_profile(os.environ.get("NK_HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("netkernel")
    group.addoption("--target", default="reference",
                    help="implementation under test: reference, fastpath (the fast path with"
                         " its default NSM, the shm NSM), fastpath-kernel (the fast path with the"
                         " kernel NSM), exec:CMD (an NSM program;"
                         " {instance} in CMD is the instance's name), or module[:function]")
    group.addoption("--nk-report", metavar="FILE", default=None,
                    help="write a JSON report: every spec requirement with its status")
    group.addoption("--nk-certify", action="store_true",
                    help="reproducible certification run (hypothesis profile 'certify')")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--nk-certify"):
        settings.load_profile("certify")


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


@pytest.fixture(scope="session")
def nk_runtime(target: targets.Target,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[runtime.Runtime]:
    """The session's running instances (CoreEngine, NSM), started when a test first asks:
    the target's processes, the reference's where the target has none (targets.py)."""
    rt = runtime.Runtime(target, tmp_path_factory.mktemp("nk-logs"))
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
        for rid in req_ids(item):
            if rid not in known:
                raise pytest.UsageError(f"{item.nodeid} names {rid}, which spec/ does not define")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    ids = getattr(report, "nk_req", None)
    if not ids:
        return
    if report.when == "call" or report.outcome != "passed":
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        outcome = "failed" if report.failed else ("skipped" if report.skipped else "passed")
        _REPORTS.append((ids, report.nodeid, outcome, reason))


_REPORTS: list[tuple[list[str], str, str, str]] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    report.nk_req = req_ids(item)
    return report


def requirement_status(
    known: dict[str, requirements.Requirement],
    results: list[tuple[list[str], str, str, str]],
) -> dict[str, dict[str, Any]]:
    """Fold test outcomes into one status per requirement.

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
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--nk-report")
    if not path:
        return
    known = requirements.load()
    status = requirement_status(known, _REPORTS)
    counts: dict[str, int] = defaultdict(int)
    for entry in status.values():
        counts[entry["status"]] += 1
    doc = {
        "target": session.config.getoption("--target"),
        "certify": bool(session.config.getoption("--nk-certify")),
        "summary": dict(sorted(counts.items())),
        "requirements": status,
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
