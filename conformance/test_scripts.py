"""Every socket script (conformance/scripts/*.nkt), replayed on Linux and on the target.

A script is data: its ``# req:`` line names the requirements it checks, which
become the test's ``req`` marks. Each script runs first on real Linux sockets —
the oracle, so a failure there means the script is wrong — then on the
target's ``sockets`` role. docs/scripts.md describes the format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from netkernel.conformance import script
from netkernel.conformance.script import (
    Expect,
    LinuxHost,
    Script,
    ScriptError,
    ScriptFailure,
    parse,
    replay,
)

SCRIPTS = script.scripts()


def _params() -> list[Any]:
    return [
        pytest.param(s, id=s.name.removesuffix(".nkt"), marks=pytest.mark.req(*s.reqs))
        for s in SCRIPTS
    ]


@pytest.mark.parametrize("nkt", _params())
def test_script(sockets: Any, nkt: Script) -> None:
    with LinuxHost() as linux:
        try:
            replay(nkt, linux)
        except ScriptFailure as exc:
            pytest.fail(f"the script disagrees with Linux, so the script is wrong:\n{exc}")
    replay(nkt, sockets.Host())


def test_every_script_names_requirements() -> None:
    assert len(SCRIPTS) >= 10
    for s in SCRIPTS:
        assert s.reqs, f"{s.name} has no '# req:' line"


# -- the replayer fails when it should -------------------------------------------------

HAPPY = """\
# req: SOCK-3
l = socket(AF_INET, SOCK_STREAM)
listen(l, 1) = 0
c = socket(AF_INET, SOCK_STREAM)
connect(c, @l) = 0
a = accept(l) = @c
send(c, 4) = 4
recv(a, 10) = 4
connect(c, @l) = -1 EISCONN
"""


def _mutations(s: Script) -> list[tuple[int, Script]]:
    """Copies of ``s`` with one expectation made wrong, and the line it is on."""
    wrong: dict[str, Callable[[Expect], Expect]] = {
        "value": lambda e: dataclasses.replace(e, value=e.value + 1),
        "errno": lambda e: dataclasses.replace(e, value=script.ERRNO_NAMES["EAGAIN"]),
        "addr": lambda e: Expect("errno", script.ERRNO_NAMES["ENOTCONN"]),
    }
    out = []
    for i, line in enumerate(s.lines):
        if line.expect is None:
            continue
        bad = dataclasses.replace(line, expect=wrong[line.expect.kind](line.expect))
        out.append((line.lineno, dataclasses.replace(s, lines=(*s.lines[:i], bad,
                                                                 *s.lines[i + 1:]))))
    return out


@pytest.mark.req("SOCK-3")
def test_a_wrong_expectation_fails_on_every_line(sockets: Any) -> None:
    """The replayer is not a rubber stamp: one wrong expectation, on any line, fails the
    replay on Linux and on the target, naming that line."""
    good = parse(HAPPY, "happy.nkt")
    with LinuxHost() as linux:
        replay(good, linux)
    replay(good, sockets.Host())
    mutations = _mutations(good)
    assert len(mutations) == 6
    for lineno, bad in mutations:
        for host in (LinuxHost(), sockets.Host()):
            with pytest.raises(ScriptFailure, match=rf"happy\.nkt:{lineno}: "):
                replay(bad, host)
            if isinstance(host, LinuxHost):
                host.close_all()


@pytest.mark.parametrize(("text", "lineno", "message"), [
    ("s = socket(AF_INET, SOCK_STREAM)\nbind(s, 127.0.0.1:0)", 2, "needs an expected result"),
    ("s = socket(AF_INET, SOCK_STREAM)\n\n# c\nbind(t, 127.0.0.1:0) = 0", 4, "names no socket"),
    ("s = socket(AF_INET, SOCK_STREAM)\nbind(s, 10.0.0.1:0) = 0", 2, "neither loopback"),
    ("s = socket(AF_INET, SOCK_STREAM)\nfrob(s) = 0", 2, "unknown call"),
    ("s = socket(AF_INET, SOCK_STREAM)\nrecv(s, 1) = -1 EWHAT", 2, "unknown errno"),
    ("s = socket(AF_INET, SOCK_STREAM)\nlisten(s) = 0", 2, "takes 2 operand"),
    ("s = socket(AF_UNIX, SOCK_STREAM)", 1, "AF_INET or AF_INET6"),
    ("s = socket(AF_INET, SOCK_STREAM)\nsetsockopt(s, SO_FOO, 1) = 0", 2, "unknown option"),
    ("socket(AF_INET, SOCK_STREAM)", 1, "name the socket"),
])
def test_bad_syntax_names_the_line(text: str, lineno: int, message: str) -> None:
    """A self-test of the format (no target involved): errors carry file and line."""
    with pytest.raises(ScriptError, match=rf"bad\.nkt:{lineno}: .*{message}"):
        parse(text, "bad.nkt")
