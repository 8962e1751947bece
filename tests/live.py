"""Helpers for the system tests on a live instance (test_system, test_isolation, test_faults).

* :func:`time_limit`: fails a test that runs past its budget instead of hanging CI;
* :class:`Program`: a tenant (or any helper) in a separate Python process, driven
  line by line over its stdin/stdout, killed at the end whatever happened;
* :func:`own_instance`: a running instance under a unique name, stopped (and its
  files removed) afterwards, for tests that break their instance;
* :func:`pids_of`, :func:`until`: what runs for an instance, polling with a deadline;
* :func:`echo_server`, :func:`in_threads`: an echo server in a thread, work spread over
  threads with what they raised collected.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from netkernel import instance


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds`` (main thread only)."""
    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"test exceeded its {seconds:g} s budget")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def until(what: str, check: Callable[[], Any], timeout: float = 5.0,
          interval: float = 0.005) -> Any:
    """``check()``'s first truthy result, polled until ``timeout``; AssertionError after."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


class Program:
    """``python -c code`` (optionally under a wrapper such as ``unshare -n``).

    The program reads commands from stdin and answers with one JSON line per
    answer; :meth:`read` waits for that line with a deadline. Whatever it
    writes to stderr is kept in a file and shown when a test fails.
    """

    def __init__(self, code: str, *args: str, instance: str | None = None,
                 wrapper: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("NETKERNEL_ROOT", None)
        if instance is not None:
            full_env["NETKERNEL_INSTANCE"] = instance
        self.stderr_path = Path(f"/tmp/nk-program-{uuid.uuid4().hex[:8]}.err")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([*wrapper, sys.executable, "-c", code, *args],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=full_env, text=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 10.0) -> Any:
        """The next JSON line the program writes."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer from pid {self.pid} in {timeout} s; stderr:\n{self.stderr()}"
        line = self.proc.stdout.readline()
        assert line, f"pid {self.pid} exited ({self.proc.poll()}); stderr:\n{self.stderr()}"
        return json.loads(line)

    def ask(self, line: str, timeout: float = 10.0) -> Any:
        self.send(line)
        return self.read(timeout)

    def finish(self, timeout: float = 10.0) -> int:
        """Close its stdin and wait for it to exit; its exit status."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pid {self.pid} did not exit in {timeout} s;"
                                 f" stderr:\n{self.stderr()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        text = self.stderr()
        if text.strip():
            sys.stderr.write(f"--- stderr of pid {self.pid}:\n{text}")  # shown on failure
        self.stderr_path.unlink(missing_ok=True)

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def own_instance(monkeypatch: pytest.MonkeyPatch | None = None, **up: Any) -> Iterator[str]:
    """A fresh instance named uniquely, named by NETKERNEL_INSTANCE if ``monkeypatch`` is
    given; stopped and removed afterwards whatever state the test left it in."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    if monkeypatch is not None:
        monkeypatch.delenv("NETKERNEL_ROOT", raising=False)
        monkeypatch.setenv("NETKERNEL_INSTANCE", name)
    instance.up(name, **up)
    try:
        yield name
    finally:
        instance.down(name)


def pids_of(name: str, *, environ: bool = False) -> list[int]:
    """Every live process whose command line names ``name`` as an argument (pid reuse
    cannot match), or with ``environ`` whose environment sets NETKERNEL_INSTANCE to it."""
    found = []
    env_entry = f"NETKERNEL_INSTANCE={name}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            args = proc.joinpath("cmdline").read_bytes().split(b"\0")
            env = proc.joinpath("environ").read_bytes().split(b"\0") if environ else []
            state = proc.joinpath("stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if (name.encode() in args or env_entry in env) and state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def status(name: str) -> dict[str, Any]:
    from netkernel import instance

    return instance.status(name)


def tenant_entry(name: str, pid: int) -> dict[str, Any] | None:
    """The status entry of the tenant device held by process ``pid``, if attached."""
    for t in status(name)["tenants"]:
        if t["pid"] == pid:
            entry: dict[str, Any] = t
            return entry
    return None


def echo_server(lst: Any, count: int = 1) -> threading.Thread:
    """Echo every byte back on ``count`` connections accepted from ``lst`` (a kernel or a
    GuestLib listening socket), in a daemon thread, started."""
    def run() -> None:
        for _ in range(count):
            conn, _ = lst.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def in_threads(work: Callable[[int], None], count: int,
               timeout: float | None = None) -> list[BaseException]:
    """Run ``work(k)`` for ``k`` in ``range(count)``, each in a thread of its own, and join
    them (each for at most ``timeout``); returns what they raised."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors
