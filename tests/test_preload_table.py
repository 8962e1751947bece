"""docs/preload-calls.md says what libnkpreload.so does with every call (PRE-3, PRE-10).

The table is held to the built library: the rows marked *intercepted* are exactly
the dynamic symbols the library defines (``nm -D --defined-only``), both ways, and
every call issue 5 lists has a row. A row marked *kernel* names a call the library
must not define (the fd is a real socket: the kernel's call is the right one).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from netkernel.fastpath import preload

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "fastpath" / "csrc"
LIB = preload.paths().lib  # the installed library, or NETKERNEL_PRELOAD's
DOC = ROOT / "docs" / "preload-calls.md"

# Issue 5's list of what real programs use, as written there.
_ISSUE_TEXT = """
socket bind listen accept accept4 connect read write readv writev send recv sendto
recvfrom sendmsg recvmsg shutdown close dup dup2 dup3 fcntl ioctl setsockopt getsockopt
getsockname getpeername poll ppoll select pselect epoll_create1 epoll_ctl epoll_wait
epoll_pwait fork execve sendfile splice recvmmsg sendmmsg epoll_pwait2 __read_chk
__recv_chk __recvfrom_chk syscall vfork posix_spawn execv execvp execvpe execl execlp
execle
"""
ISSUE_CALLS = _ISSUE_TEXT.split()

STATUSES = {"intercepted", "kernel", "limitation"}
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([a-z]+)\s*\|(.*)\|\s*$")


def rows() -> dict[str, tuple[str, str]]:
    """call -> (status, description), from every table row whose first cell is a `name`."""
    found: dict[str, tuple[str, str]] = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            name, status, text = m.groups()
            assert status in STATUSES, f"{name}: unknown status {status!r}"
            assert text.strip(), f"{name}: no description"
            assert name not in found, f"{name}: two rows"
            found[name] = (status, text.strip())
    return found


def table() -> dict[str, str]:
    """call -> status."""
    return {name: status for name, (status, _) in rows().items()}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    if shutil.which("nm") is None:
        pytest.skip("needs nm (binutils)")
    out = subprocess.run(["nm", "-D", "--defined-only", str(LIB)], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines()
            if len(line.split()) >= 3 and line.split()[1] in "TtWi"}


def test_every_call_of_the_issue_has_a_row() -> None:
    missing = [c for c in ISSUE_CALLS if c not in table()]
    assert not missing, f"docs/preload-calls.md lacks rows for {missing}"


def test_intercepted_rows_are_the_symbols_the_library_defines(exported: set[str]) -> None:
    """PRE-3: what the docs call intercepted is what the loader will interpose."""
    intercepted = {name for name, status in table().items() if status == "intercepted"}
    assert intercepted - exported == set(), "documented as intercepted, not defined"
    assert exported - intercepted == set(), "defined by the library, not documented"


def test_kernel_rows_are_not_interposed(exported: set[str]) -> None:
    """PRE-2: poll, epoll, select, fork, sendfile stay the kernel's own."""
    kernel = {name for name, status in table().items() if status == "kernel"}
    assert kernel, "no kernel rows"
    assert kernel & exported == set()
    for name in ("poll", "ppoll", "select", "pselect", "epoll_create1", "epoll_ctl",
                 "epoll_wait", "epoll_pwait", "epoll_pwait2"):
        status, text = rows()[name]
        assert status == "kernel", f"{name} must be documented as the kernel's"
        assert "Not intercepted: the fd is a real socket" in text, name


def test_limitations_are_documented() -> None:
    """PRE-10: static binaries and calls inside glibc are named as limitations."""
    text = DOC.read_text()
    rows = re.findall(r"^\|\s*([^|`]+?)\s*\|\s*limitation\s*\|", text, re.M)
    assert "static binaries" in rows
    assert "calls inside glibc" in rows
