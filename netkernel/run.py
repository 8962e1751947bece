"""``netkernel run -- CMD``: an unmodified program over NetKernel (spec/preload.md).

:func:`run` makes sure an instance serves the program (the one named, else an
embedded CoreEngine + NSM started for the duration of the command, PRE-1),
starts the tenant's ``nk-agent`` attached to it, and runs CMD with
``libnkpreload.so`` preloaded and the agent's socket in ``NETKERNEL_AGENT``, so
that every AF_INET/AF_INET6 TCP and UDP socket of CMD and of its children is a
NetKernel socket. The exit status is CMD's (128 + N when a signal N ended it).

A statically linked program cannot be preloaded: :func:`static_binary` finds it
before anything starts, and ``run`` refuses it (PRE-10).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from netkernel import instance as inst
from netkernel.fastpath import preload
from netkernel.reference import shm

AGENT_START_TIMEOUT: Final = 10.0
EXIT_USAGE: Final = 2
EXIT_CANNOT_RUN: Final = 126
EXIT_NOT_FOUND: Final = 127
_PT_INTERP: Final = 3


class RunError(RuntimeError):
    """The command cannot be run over NetKernel; the message says why."""


def _resolve(program: str, env: dict[str, str]) -> Path | None:
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    return Path(found) if found else None


def static_binary(path: Path, _depth: int = 0) -> bool:
    """True if ``path`` is an ELF executable without an interpreter (PT_INTERP): the
    dynamic loader never runs for it, so LD_PRELOAD cannot reach it (PRE-10). A script's
    ``#!`` interpreter is checked instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head.startswith(b"#!") and _depth == 0:
                interp = head[2:].split(b"\n")[0].split()
                return bool(interp) and static_binary(Path(interp[0].decode()), 1)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # not ELF, or not 64-bit
                return False
            endian = "<" if head[5] == 1 else ">"
            phoff, = struct.unpack_from(endian + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error, IndexError, UnicodeDecodeError):
        return False
    types = [struct.unpack_from(endian + "I", table, i * phentsize)[0] for i in range(phnum)
             if (i + 1) * phentsize <= len(table)]
    return _PT_INTERP not in types


@contextlib.contextmanager
def _instance(name: str | None, nsm: str, impl: str) -> Iterator[tuple[str, bool]]:
    """The instance to use and whether it is embedded (started here, stopped after)."""
    if name is not None or inst.running(None):
        chosen = shm.instance_name(name)
        if not inst.running(chosen):
            raise RunError(f"instance {chosen!r} is not running (start it with"
                           f" `netkernel up --instance {chosen}`, or omit --instance)")
        yield chosen, False
        return
    embedded = f"run-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        inst.up(embedded, nsm=nsm, impl=impl)
    except inst.InstanceError as exc:
        raise RunError(f"cannot start an embedded instance: {exc}") from None
    try:
        yield embedded, True
    finally:
        inst.down(embedded)


#: sun_path holds 108 bytes, the terminating NUL included.
_SUN_PATH_MAX: Final = 107


def agent_socket_path(name: str) -> Path:
    """Where the agent listens: in the instance's directory, or in the temporary directory
    when that path would not fit a sockaddr_un (a deep NETKERNEL_ROOT)."""
    leaf = f"agent-{os.getpid()}-{uuid.uuid4().hex[:6]}.sock"
    path = shm.instance_dir(name) / leaf
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        path = Path(tempfile.gettempdir()) / f"netkernel-{leaf}"
    return path


class Agent:
    """The tenant's nk-agent, started for one ``run`` (PRE-1): it exits once the command
    and every process it left behind have closed their NetKernel sockets."""

    def __init__(self, binary: Path, name: str, label: str) -> None:
        self.socket = agent_socket_path(name)
        ready_r, ready_w = os.pipe()
        self._hold_r, self._hold_w = os.pipe()
        os.set_inheritable(self._hold_w, False)
        argv = [str(binary), "--socket", str(self.socket), "--instance", name,
                "--ready-fd", str(ready_w), "--hold-fd", str(self._hold_r), "--name", label]
        # Its own session: Ctrl-C at the terminal is the command's, and the agent stays
        # to deliver what the command sent before it died (GL-10).
        # Its messages go to a log beside its socket, never to a pipe: the agent outlives
        # `run` with an instance that was already running, and a full pipe would stall it.
        self.log = self.socket.with_suffix(".log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         pass_fds=(ready_w, self._hold_r),
                                         start_new_session=True)
        os.close(ready_w)
        os.close(self._hold_r)
        try:
            self._wait_ready(ready_r)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(ready_r)

    def _wait_ready(self, fd: int) -> None:
        import select

        ready, _, _ = select.select([fd], [], [], AGENT_START_TIMEOUT)
        if ready and os.read(fd, 1):
            return
        try:
            self.proc.wait(timeout=AGENT_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        why = self.log.read_text(errors="replace").strip() or (
            f"exit status {self.proc.returncode}")
        raise RunError(f"nk-agent did not start: {why}")

    def release(self) -> None:
        """The command is done: the agent may leave once nothing holds a socket."""
        with contextlib.suppress(OSError):
            os.close(self._hold_w)

    def wait(self) -> None:
        self.proc.wait()
        self._forget_log()

    def _forget_log(self) -> None:
        """An agent that ended with nothing to say leaves no log behind."""
        with contextlib.suppress(OSError):
            if self.log.stat().st_size == 0:
                self.log.unlink()

    def stop(self) -> None:
        self.release()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=inst.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._forget_log()


def environment(base: dict[str, str], name: str, agent: Agent,
                paths: preload.Paths) -> dict[str, str]:
    """CMD's environment: the library preloaded (after libraries already preloaded, so a
    sanitizer runtime stays first and its interceptors call ours), the agent and the
    instance named."""
    env = dict(base)
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split()
              if p != str(paths.lib)]
    env["LD_PRELOAD"] = " ".join([*others, str(paths.lib)])
    env[preload.SOCKET_ENV] = str(agent.socket)
    env[preload.LIB_ENV] = str(paths.lib)
    env[preload.AGENT_ENV] = str(paths.agent)
    env["NETKERNEL_INSTANCE"] = name
    return env


def run(cmd: Sequence[str], *, instance: str | None = None, nsm: str = inst.DEFAULT_NSM,
        impl: str = inst.DEFAULT_IMPL) -> int:
    """Run ``cmd`` over NetKernel; its exit status. RunError when it cannot start."""
    if not cmd:
        raise RunError("no command given (usage: netkernel run [options] -- CMD [ARGS...])")
    program = _resolve(cmd[0], dict(os.environ))
    if program is None:
        raise RunError(f"{cmd[0]}: command not found")
    paths = preload.paths()
    if static_binary(program):
        raise RunError(f"{program} is statically linked: LD_PRELOAD cannot reach its socket"
                       " calls, so its traffic would bypass NetKernel (spec/preload.md PRE-10)")
    with _instance(instance, nsm, impl) as (name, embedded):
        agent = Agent(paths.agent, name, Path(cmd[0]).name[:64])
        try:
            env = environment(dict(os.environ), name, agent, paths)
            status, told_to_stop = _run_command(cmd, env)
            agent.release()
            if embedded and not told_to_stop:
                # The instance must outlive whatever the command left running; SIGTERM
                # now ends the wait (and everything) through the handler's SystemExit.
                with _signals_exit():
                    agent.wait()
        except BaseException:
            agent.stop()
            raise
    return 128 - status if status < 0 else status


#: Signals `run` passes on to the command instead of dying of them (so that an embedded
#: instance is always stopped): SIGINT is the terminal's and reaches the command anyway.
_FORWARDED: Final = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _run_command(cmd: Sequence[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run the command to its end: its status, and whether we were asked to stop."""
    told: list[int] = []
    proc: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        told.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command's
    try:
        proc = subprocess.Popen(list(cmd), env=env, restore_signals=True,
                                preexec_fn=_default_signals)
        return proc.wait(), bool(told)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in _FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _default_signals() -> None:
    for sig in (signal.SIGINT, *_FORWARDED):
        signal.signal(sig, signal.SIG_DFL)


def cli_main(argv_cmd: Sequence[str], *, instance: str | None, nsm: str, impl: str,
             prog: str = "netkernel run") -> int:
    cmd = list(argv_cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        return run(cmd, instance=instance, nsm=nsm, impl=impl)
    except (RunError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND if "command not found" in str(exc) else EXIT_CANNOT_RUN
