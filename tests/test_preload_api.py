"""libnkpreload.so under real programs, with Linux as the oracle (PRE-1..PRE-10).

The ladder's first rungs (issue 5):

1. preloading ``/bin/true`` and ``ls`` changes nothing, with an agent reachable and
   without one;
2. API-level scenarios (``tests/preload/scenarios.py`` in Python, ``tests/preload/
   nkcalls.c`` in C) run once on plain Linux and once under the library against a
   running instance: same output, same exit status. Each scenario prints facts
   (names, errnos, bytes), never ports or timings.

That the sockets really went through NetKernel is read from the CoreEngine's status:
the NSM's count of SOCKET replies grows by the sockets the program made (and not at
all for AF_UNIX sockets or a static binary, which the library cannot see).

The agent is ``nk-agent`` started here as ``netkernel run`` starts it (--ready-fd,
--hold-fd), and the programs get LD_PRELOAD and NETKERNEL_* as ``netkernel run`` sets
them. Every subprocess runs under a timeout.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netkernel.fastpath import preload
from tests.live import echo_server, own_instance, status, time_limit

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "fastpath" / "csrc"
# The installed library and agent (pip builds them), or NETKERNEL_PRELOAD's and
# NETKERNEL_AGENT_BIN's (a sanitizer build).
LIB, AGENT = preload.paths().lib, preload.paths().agent
SCENARIOS = ROOT / "tests" / "preload" / "scenarios.py"
NKCALLS = ROOT / "tests" / "preload" / "nkcalls.c"
RUN_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The library, the agent, and nkcalls built dynamic (with _FORTIFY_SOURCE, so
    the _chk variants are called) and, if libc.a is there, static."""
    out = tmp_path_factory.mktemp("preload")
    built = {"dynamic": out / "nkcalls", "static": out / "nkcalls-static"}
    subprocess.run(["cc", "-O2", "-D_FORTIFY_SOURCE=2", "-Wall", "-Wextra", "-Werror", "-o",
                    str(built["dynamic"]), str(NKCALLS)], check=True, timeout=120)
    static = subprocess.run(["cc", "-O2", "-static", "-o", str(built["static"]), str(NKCALLS)],
                            capture_output=True, timeout=120)
    if static.returncode != 0:
        del built["static"]
    return built


@pytest.fixture(scope="module")
def inst() -> Iterator[str]:
    with own_instance() as name:
        yield name


def plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NETKERNEL_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(ROOT)
    return env


@contextlib.contextmanager
def started_agent(inst: str, path: Path
                  ) -> Iterator[tuple[dict[str, str], subprocess.Popen[bytes]]]:
    """nk-agent attached to ``inst`` listening on ``path``, held alive by a pipe; the
    environment ``netkernel run`` gives a program (PRE-1), and the agent's process."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    err = open(Path(status(inst)["dir"]) / f"{path.name}.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(AGENT), "--socket", str(path), "--instance", inst,
                             "--ready-fd", str(ready_w), "--hold-fd", str(hold_r)],
                            pass_fds=(ready_w, hold_r), stderr=err, env=plain_env())
    os.close(ready_w)
    os.close(hold_r)
    try:
        ok, _, _ = select.select([ready_r], [], [], 20)
        assert ok and os.read(ready_r, 1), "nk-agent did not come up (no ready byte)"
        env = plain_env()
        env.update(LD_PRELOAD=str(LIB), NETKERNEL_AGENT=str(path), NETKERNEL_INSTANCE=inst,
                   NETKERNEL_PRELOAD=str(LIB), NETKERNEL_AGENT_BIN=str(AGENT))
        yield env, proc
    finally:
        os.close(ready_r)
        os.close(hold_w)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


@pytest.fixture(scope="module")
def agent(programs: dict[str, Path], inst: str) -> Iterator[dict[str, str]]:
    path = Path(status(inst)["dir"]) / f"agent-test-{os.getpid()}.sock"
    with started_agent(inst, path) as (env, _):
        yield env


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def nsm_sockets(name: str) -> int:
    """SOCKETs the instance's NSMs have answered so far."""
    return sum(n for nsm in status(name)["nsms"]
               for op, n in nsm["counters"].get("ops", {}).items() if op.startswith("SOCKET"))


def same_as_linux(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs cmd on Linux and under the library; asserts the same status and output."""
    linux = run(cmd, plain_env())
    assert linux.returncode == 0 or linux.returncode < 0, linux.stderr
    nk = run(cmd, env)
    assert (nk.returncode, nk.stdout) == (linux.returncode, linux.stdout), (
        f"under NetKernel:\n{nk.stdout}\n{nk.stderr}\non Linux:\n{linux.stdout}")
    return nk


def ls_output(text: str) -> str:
    # What moves between two runs whatever the library does: /proc's link count (one per
    # process), the mtimes of /tmp and /run (other programs create files there).
    return "\n".join(line for line in text.splitlines()
                     if not line.endswith((" proc", " tmp", " run")))


# --- rung 1: nothing changes for programs without sockets ---------------------------


@pytest.mark.parametrize("reachable", [True, False], ids=["agent", "no-agent"])
def test_true_and_ls_unchanged(programs: dict[str, Path], agent: dict[str, str],
                               reachable: bool) -> None:
    """PRE-3: a program that makes no INET socket sees no difference, and never
    needs an agent (the control connection is opened lazily)."""
    env = dict(agent)
    if not reachable:
        env.update(NETKERNEL_AGENT="/nonexistent/agent.sock", NETKERNEL_INSTANCE="no-such")
    for cmd in (["/bin/true"], ["/bin/false"], ["ls", "-la", "/"], ["ls", "/nonexistent"]):
        linux = run(cmd, plain_env())
        nk = run(cmd, env)
        assert nk.returncode == linux.returncode, cmd
        assert ls_output(nk.stdout) == ls_output(linux.stdout), cmd
        assert nk.stderr == linux.stderr, cmd


# --- rung 2: the API, scenario by scenario -------------------------------------------

INET_SCENARIOS = ["tcp_pair", "nonblocking_connect", "unconnected", "epoll_sets", "dup_fcntl",
                  "fork_inherit", "exec_inherit", "udp", "eintr", "threads", "fork_threads",
                  "asyncio_echo"]


@pytest.mark.parametrize("name", INET_SCENARIOS)
def test_scenario_matches_linux(agent: dict[str, str], inst: str, name: str) -> None:
    """PRE-2, PRE-4..PRE-8: the scenario prints the same facts under NetKernel as on
    Linux, and its sockets were NetKernel's (the NSM answered their SOCKETs)."""
    with time_limit(3 * RUN_TIMEOUT):
        before = nsm_sockets(inst)
        same_as_linux([sys.executable, str(SCENARIOS), name], agent)
        assert nsm_sockets(inst) > before, "no socket went through NetKernel"


def test_tcp_inet6_matches_linux(agent: dict[str, str], inst: str) -> None:
    """PRE-3: AF_INET6 stream sockets are NetKernel's too."""
    with time_limit(3 * RUN_TIMEOUT):
        before = nsm_sockets(inst)
        same_as_linux([sys.executable, str(SCENARIOS), "tcp_pair", "inet6"], agent)
        assert nsm_sockets(inst) > before


def test_unix_sockets_untouched(agent: dict[str, str], inst: str) -> None:
    """PRE-3: AF_UNIX stream and datagram sockets, socketpair: the kernel's, and not
    one SOCKET reaches NetKernel."""
    with time_limit(3 * RUN_TIMEOUT):
        before = nsm_sockets(inst)
        same_as_linux([sys.executable, str(SCENARIOS), "unix_untouched"], agent)
        assert nsm_sockets(inst) == before


@pytest.mark.parametrize("name", ["eintr", "nosignal", "syscall", "accept", "chk", "mmsg",
                                  "reuse", "closeall"])
def test_c_calls_match_linux(programs: dict[str, Path], agent: dict[str, str], inst: str,
                             name: str) -> None:
    """PRE-2, PRE-3, PRE-5, PRE-7: EINTR under sigaction without SA_RESTART, EPIPE with
    MSG_NOSIGNAL, raw syscall(SYS_socket, ...) and friends, accept4 flags, the _chk
    variants, fds closed inside glibc (fclose, closefrom) and reused, a program closing
    or dup2-ing over every fd (the library's control connection too): as on Linux,
    through NetKernel."""
    with time_limit(3 * RUN_TIMEOUT):
        before = nsm_sockets(inst)
        same_as_linux([str(programs["dynamic"]), name], agent)
        assert nsm_sockets(inst) > before, "no socket went through NetKernel"


def test_sigpipe_kills_as_on_linux(programs: dict[str, Path], agent: dict[str, str]) -> None:
    """PRE-2: writing to a connection the peer closed raises SIGPIPE (no MSG_NOSIGNAL)."""
    with time_limit(3 * RUN_TIMEOUT):
        nk = same_as_linux([str(programs["dynamic"]), "sigpipe"], agent)
        assert nk.returncode == -signal.SIGPIPE


def test_syscall_socket_goes_through_netkernel(programs: dict[str, Path],
                                               agent: dict[str, str], inst: str) -> None:
    """PRE-3: syscall(SYS_socket, ...) makes a NetKernel socket: two SOCKETs at the NSM."""
    before = nsm_sockets(inst)
    out = run([str(programs["dynamic"]), "syscall"], agent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert nsm_sockets(inst) - before == 2


def test_socket_is_an_app_end(programs: dict[str, Path], agent: dict[str, str]) -> None:
    """PRE-2: under the library an INET socket's fd is an AF_UNIX socket (the app end,
    listed in /proc/net/unix); on Linux it is not."""
    assert run([str(programs["dynamic"]), "which"], plain_env()).stdout == "kernel socket\n"
    assert run([str(programs["dynamic"]), "which"], agent).stdout == "netkernel app end\n"


def test_static_binary_is_not_intercepted(programs: dict[str, Path],
                                          agent: dict[str, str], inst: str) -> None:
    """PRE-10 (documented limitation): the loader never runs for a static binary, so
    LD_PRELOAD is ignored and its sockets are the kernel's. `netkernel run` detects it."""
    if "static" not in programs:
        pytest.skip("no static libc to link against")
    before = nsm_sockets(inst)
    out = run([str(programs["static"]), "which"], agent)
    assert out.stdout == "kernel socket\n"
    assert nsm_sockets(inst) == before


def test_exec_puts_the_environment_back(programs: dict[str, Path],
                                        agent: dict[str, str]) -> None:
    """PRE-3: vfork+execle with a bare environment, posix_spawn with an empty one,
    execlp after unsetenv("LD_PRELOAD"), posix_spawnp, execv after clearenv(), fexecve
    and execveat all start children with the library."""
    linux = run([str(programs["dynamic"]), "spawns"], plain_env())
    assert linux.stdout.count("LD_PRELOAD=set") == 0
    assert len(linux.stdout.splitlines()) == 7, linux.stdout + linux.stderr
    nk = run([str(programs["dynamic"]), "spawns"], agent)
    assert nk.stdout.count("LD_PRELOAD=set") == 7, nk.stdout + nk.stderr


@pytest.mark.parametrize("how", ["execve(env)", "unsetenv+execv"])
def test_exec_child_finds_the_agent(agent: dict[str, str], how: str) -> None:
    """PRE-3: a child exec'd with a scrubbed environment (a new one passed, or the
    program's own emptied) gets LD_PRELOAD and the same NETKERNEL_AGENT back."""
    argv = f"[sys.executable, {str(SCENARIOS)!r}, 'show_env']"
    if how == "execve(env)":
        code = f"import os, sys; os.execve(sys.executable, {argv}, {{'PATH': '/bin'}})"
    else:
        code = f"import os, sys; os.environ.clear(); os.execv(sys.executable, {argv})"
    out = run([sys.executable, "-c", code], agent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"LD_PRELOAD {LIB}",
                                       f"NETKERNEL_AGENT {agent['NETKERNEL_AGENT']}"]


def test_netkernel_client_to_kernel_server(agent: dict[str, str], inst: str) -> None:
    """PRE-4: a NetKernel socket talks to a plain kernel socket on the same host."""
    with time_limit(3 * RUN_TIMEOUT), socket.create_server(("127.0.0.1", 0)) as lst:
        port = str(lst.getsockname()[1])
        echo_server(lst, count=6)
        before = nsm_sockets(inst)
        out = same_as_linux([sys.executable, str(SCENARIOS), "tcp_to", "127.0.0.1", port,
                             "3"], agent)
        assert out.stdout.count("True") == 3
        assert nsm_sockets(inst) - before == 3


def test_kernel_client_to_netkernel_server(agent: dict[str, str]) -> None:
    """PRE-4, PRE-7: a plain kernel client of a NetKernel listening socket."""
    with time_limit(3 * RUN_TIMEOUT):
        proc = subprocess.Popen([sys.executable, str(SCENARIOS), "tcp_serve", "2"], env=agent,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            for k in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                    payload = bytes([k]) * 100000
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := s.recv(65536):
                        got += chunk
                    assert got == payload
            assert proc.stdout.readline() == "served\n"
            assert proc.wait(RUN_TIMEOUT) == 0
        finally:
            proc.kill()
            proc.wait()


def test_no_instance_is_enetdown(programs: dict[str, Path]) -> None:
    """PRE-9: no agent and no instance to attach one to: socket() fails with ENETDOWN,
    never silently a kernel socket."""
    env = plain_env()
    env.update(LD_PRELOAD=str(LIB), NETKERNEL_INSTANCE="no-such-instance",
               NETKERNEL_AGENT_BIN=str(AGENT))
    out = run([str(programs["dynamic"]), "which"], env)
    assert out.stdout == "socket failed ENETDOWN\n", out.stdout + out.stderr


def test_library_spawns_an_agent(programs: dict[str, Path], inst: str) -> None:
    """PRE-1: without NETKERNEL_AGENT the library starts nk-agent (next to itself) for
    the instance, and the socket is NetKernel's."""
    env = plain_env()
    env.update(LD_PRELOAD=str(LIB), NETKERNEL_INSTANCE=inst)
    before = nsm_sockets(inst)
    out = run([str(programs["dynamic"]), "which"], env)
    assert out.stdout == "netkernel app end\n", out.stdout + out.stderr
    assert nsm_sockets(inst) == before + 1


def test_agent_socket_path_longer_than_sun_path(programs: dict[str, Path], inst: str,
                                               tmp_path: Path) -> None:
    """PRE-1: an agent socket deeper than sockaddr_un's 108 bytes is still reached (the
    library connects through its directory's /proc/self/fd entry)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with started_agent(inst, deep / "agent.sock") as (env, _):
        env["NETKERNEL_AGENT_BIN"] = "/nonexistent/nk-agent"  # no spawning a fresh one
        out = run([str(programs["dynamic"]), "which"], env)
        assert out.stdout == "netkernel app end\n", out.stdout + out.stderr


def test_agent_death_ends_sockets_and_a_new_agent_takes_over(programs: dict[str, Path],
                                                             inst: str) -> None:
    """PRE-9, PRE-1: the agent is killed under a connected socket: the program reads the
    end of the stream and its writes fail (never a hang); its next socket() starts a
    fresh agent and works."""
    path = Path(status(inst)["dir"]) / f"agent-dies-{os.getpid()}.sock"
    with time_limit(3 * RUN_TIMEOUT), socket.create_server(("127.0.0.1", 0)) as lst, \
            started_agent(inst, path) as (env, agent_proc):
        echo_server(lst, count=2)
        proc = subprocess.Popen([sys.executable, str(SCENARIOS), "agent_dies", "127.0.0.1",
                                 str(lst.getsockname()[1])], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stdout.readline() == "echo b'before'\n"
            assert proc.stdout.readline() == "ready\n"
            agent_proc.kill()
            agent_proc.wait()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            proc.kill()
            proc.wait()
        assert out.splitlines() == ["read after b''", "send after EPIPE",
                                    "name after ECONNRESET", "new socket b'again'",
                                    "agent True"]


def test_blocking_connect_is_interrupted(programs: dict[str, Path], agent: dict[str, str],
                                         inst: str) -> None:
    """PRE-5: a blocking connect that cannot complete (the kernel listener's queue is
    full, its SYNs are dropped) returns EINTR when a handler without SA_RESTART runs."""
    with time_limit(3 * RUN_TIMEOUT), socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        fillers = []
        for _ in range(3):  # the accept queue full, and SYNs beyond it waiting
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(lst.getsockname())
            fillers.append(c)
        try:
            before = nsm_sockets(inst)
            cmd = [str(programs["dynamic"]), "connect_eintr", str(lst.getsockname()[1])]
            out = same_as_linux(cmd, agent)
            assert out.stdout == "connect -1 EINTR\n"
            assert nsm_sockets(inst) == before + 1
        finally:
            for c in fillers:
                c.close()
