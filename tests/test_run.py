"""`netkernel run` (netkernel/run.py, spec/preload.md PRE-1, PRE-10)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netkernel import run
from netkernel.fastpath import preload

TIMEOUT = 60


def _static() -> Path | None:
    for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if os.path.exists(p) and run.static_binary(Path(p)):
            return Path(p)
    return None


def test_a_dynamic_program_is_not_static() -> None:
    assert not run.static_binary(Path(shutil.which("ls") or "/bin/ls"))
    assert not run.static_binary(Path(sys.executable))


def test_a_static_program_and_a_script_run_by_one_are_static(tmp_path: Path) -> None:
    static = _static()
    if static is None:
        pytest.skip("no statically linked program on this machine")
    assert run.static_binary(static)
    script = tmp_path / "s"
    script.write_text(f"#!{static} -p\n")
    assert run.static_binary(script)
    script.write_text("#!/bin/sh\ntrue\n")
    assert not run.static_binary(script)


def test_what_is_not_an_elf_executable_is_not_static(tmp_path: Path) -> None:
    for content in (b"", b"plain text", b"\x7fELF\x02\x01" + b"\0" * 10):  # truncated ELF
        f = tmp_path / "f"
        f.write_bytes(content)
        assert not run.static_binary(f)
    assert not run.static_binary(tmp_path / "missing")


def test_the_environment_preloads_the_library_once_after_others_and_names_the_agent(
        tmp_path: Path) -> None:
    paths = preload.Paths(lib=tmp_path / "libnkpreload.so", agent=tmp_path / "nk-agent")

    class FakeAgent:  # only the socket path is read
        socket = tmp_path / "agent.sock"

    env = run.environment({"LD_PRELOAD": f"/x/a.so:{paths.lib} /y/b.so", "HOME": "/h"},
                          "inst", FakeAgent(), paths)  # type: ignore[arg-type]
    assert env["LD_PRELOAD"].split() == ["/x/a.so", "/y/b.so", str(paths.lib)]
    assert env[preload.SOCKET_ENV] == str(FakeAgent.socket)
    assert env["NETKERNEL_INSTANCE"] == "inst" and env["HOME"] == "/h"
    assert env[preload.LIB_ENV] == str(paths.lib) and env[preload.AGENT_ENV] == str(paths.agent)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netkernel", "run", *args], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_no_command_and_an_unknown_command_are_clear_errors() -> None:
    none = _cli("--")
    assert none.returncode == run.EXIT_CANNOT_RUN and "no command given" in none.stderr
    missing = _cli("--", "no-such-program-anywhere")
    assert missing.returncode == run.EXIT_NOT_FOUND and "command not found" in missing.stderr


def test_without_an_instance_run_starts_an_embedded_one_and_leaves_nothing(
        tmp_path: Path) -> None:
    """PRE-1: the embedded instance serves the command, which reaches a kernel server on
    loopback; afterwards its runtime directory is gone."""
    root = tmp_path / "root"
    env = dict(os.environ, NETKERNEL_ROOT=str(root))
    env.pop("NETKERNEL_INSTANCE", None)
    env.pop(preload.SOCKET_ENV, None)
    code = """
import socket, threading
srv = socket.create_server(("127.0.0.1", 0))
def serve():
    c, _ = srv.accept(); c.sendall(c.recv(5).upper()); c.close()
threading.Thread(target=serve).start()
s = socket.create_connection(srv.getsockname())
s.sendall(b"hello"); print(s.recv(5).decode())
"""
    proc = _cli("--", sys.executable, "-c", code, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "HELLO"
    assert not root.exists() or not any(root.iterdir()), list(root.rglob("*"))


def test_sigterm_reaches_the_command_and_the_embedded_instance_is_stopped(
        tmp_path: Path) -> None:
    """`run` passes SIGTERM on to the command, returns 128 + 15 as a shell would, and
    stops its embedded instance: nothing of it stays behind (PRE-1)."""
    root = tmp_path / "root"
    env = dict(os.environ, NETKERNEL_ROOT=str(root))
    env.pop("NETKERNEL_INSTANCE", None)
    env.pop(preload.SOCKET_ENV, None)
    code = "import socket, sys, time; s = socket.socket(); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-m", "netkernel", "run", "--", sys.executable,
                             "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 128 + signal.SIGTERM
    assert not root.exists() or not any(root.iterdir()), list(root.rglob("*"))
