"""Targets: what the conformance suite runs against (DESIGN §9).

A target is an adapter object exposing *roles*. A test asks for a role by
fixture name (``codec``, ``ring``, ...); when the target lacks it, the test is
skipped as not applicable and the report says so. A vendor certifies an
implementation by writing a target: a module with a ``target()`` function
returning a :class:`Target`, selected with ``--target module:NAME``; or, for
an NSM that is a program, with ``--target exec:CMD`` (no Python needed: the
suite starts ``CMD`` as the NSM and plays everything else with the reference).

Roles and what they must provide (duck-typed; the reference modules are the
model):

``codec``      ``pack(NQE) -> bytes``, ``unpack(bytes) -> NQE``, ``NQEError``
               (netkernel.reference.nqe)
``device``     ``Geometry``, ``init_header(buf, geo)``, ``read_header(buf) -> Geometry``,
               ``DeviceError`` (netkernel.reference.device)
``ring``       ``Ring(buf, offset, entries)`` with push/push_many/pop/pop_many/free/
               prepare_sleep/finish_sleep/consumer_sleeping, ``RingError``
               (netkernel.reference.ring)
``bufpool``    the data-area buffer ownership model (netkernel.reference.bufpool)
``sockets``    the socket state machine (netkernel.reference.sockstate)
``conntable``  the connection table's pure functions (netkernel.reference.conntable)
``coreengine`` the sans-IO switching core (netkernel.reference.engine), and as
               ``process`` a :class:`Launcher` of the running CoreEngine
               (``python -m netkernel.reference.coreengine --instance {instance}``):
               the control protocol of spec/runtime.md. A coreengine role without
               ``process`` leaves the running-CoreEngine tests not applicable.
``nsm``        a :class:`Launcher`: ``start(instance, log)`` starts one NSM process
               for the instance the suite created and returns a :class:`Process`
               (``python -m netkernel.reference.nsm_kernel --instance {instance}``)
``guestlib``   an importable module shaped like the ``socket`` module's factories:
               ``socket(family, type, proto)`` (a ``socket.socket`` look-alike),
               ``create_connection``, ``create_server``; the instance is the one
               ``NETKERNEL_INSTANCE`` names; tests about a whole process import it by
               ``__name__`` in a child Python (netkernel.reference.guestlib)
``preload``    ``paths()`` returning ``.lib`` (the LD_PRELOAD library) and ``.agent``
               (the agent program) of a GuestLib for unmodified programs
               (spec/preload.md; netkernel.fastpath.preload). The reference has none.

Roles played by a process (the running CoreEngine, ``nsm``) are started by the
suite for each instance it creates (``netkernel.conformance.runtime``). Where a
target lacks the process an instance needs as infrastructure, the suite runs
the reference's: ``--target exec:CMD`` gets the reference CoreEngine, a target
with a ``guestlib`` role and no ``nsm`` the reference NSM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import IO, Any

ROLES = ("codec", "device", "ring", "bufpool", "sockets", "conntable", "coreengine", "nsm",
         "guestlib", "preload")


class RoleMissing(LookupError):
    """The target does not implement a role."""


@dataclasses.dataclass
class Target:
    name: str
    roles: dict[str, Any]
    #: Optional features the target claims (e.g. "FUTEX_BELLS"); a test of a
    #: feature not claimed is reported "unsupported", not failed.
    features: frozenset[str] = frozenset()
    #: Roles the target deliberately does not implement, with the reason the report gives.
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The implementation's version, as the certification report states it.
    version: str | None = None

    def role(self, name: str) -> Any:
        try:
            return self.roles[name]
        except KeyError:
            why = self.not_applicable.get(name)
            raise RoleMissing(f"target {self.name!r} provides no {name!r} role"
                              + (f": {why}" if why else "")) from None


class Process:
    """A process the suite started for a role; :meth:`stop` ends it."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str]) -> None:
        self.popen = popen
        self.argv = argv

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit status once the process has ended within ``timeout`` s, else None."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit status."""
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.popen.wait()
        return code


@dataclasses.dataclass(frozen=True)
class Launcher:
    """How to start the process that plays a role, for one instance.

    ``argv`` is a command line in which ``{instance}`` is replaced by the name
    of the instance the suite created and ``{python}`` by this interpreter. With
    ``{device}`` in it, the suite attaches the NSM device and the program gets
    its path there and the control connection on ``NETKERNEL_CONTROL_FD`` (RT-7).
    The process runs with ``NETKERNEL_INSTANCE`` set to that name (and
    ``NETKERNEL_ROOT`` passed on when set), its output going to ``log``.
    """

    argv: tuple[str, ...]

    @classmethod
    def command(cls, cmd: str) -> Launcher:
        """A launcher from a shell-style command line (``--target exec:CMD``)."""
        argv = tuple(shlex.split(cmd))
        if not argv:
            raise ValueError("empty command")
        return cls(argv)

    def start(self, instance: str, log: Path | IO[bytes] | None = None) -> Process:
        argv = [a.replace("{instance}", instance).replace("{python}", sys.executable)
                for a in self.argv]
        if any("{device}" in a for a in argv):
            # RT-7: the suite attaches the device for the program, which then holds the
            # control connection on NETKERNEL_CONTROL_FD (conformance/execshim.py)
            argv = [sys.executable, "-m", "netkernel.conformance.execshim", "--", *argv]
        env = dict(os.environ, NETKERNEL_INSTANCE=instance, PYTHONUNBUFFERED="1")
        with contextlib.ExitStack() as stack:
            out: Any = subprocess.DEVNULL
            if isinstance(log, Path):
                out = stack.enter_context(open(log, "ab"))  # the child keeps its own copy
            elif log is not None:
                out = log
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env, close_fds=True)
        return Process(popen, argv)


class WithProcess:
    """A role's module, plus the :class:`Launcher` of the process that plays the role."""

    def __init__(self, module: ModuleType, process: Launcher) -> None:
        self._module = module
        self.process = process

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __repr__(self) -> str:
        return f"<{self._module.__name__} + process {' '.join(self.process.argv)}>"


_REFERENCE_MODULES = {
    "codec": "netkernel.reference.nqe",
    "device": "netkernel.reference.device",
    "ring": "netkernel.reference.ring",
    "bufpool": "netkernel.reference.bufpool",
    "sockets": "netkernel.reference.sockstate",
    "conntable": "netkernel.reference.conntable",
    "coreengine": "netkernel.reference.engine",
    "nsm": "netkernel.reference.nsm_kernel",
    "guestlib": "netkernel.reference.guestlib",
}
#: Roles played by a process: the command line that starts the reference's.
REFERENCE_PROCESSES = {
    "coreengine": Launcher(("{python}", "-m", "netkernel.reference.coreengine",
                            "--instance", "{instance}")),
    "nsm": Launcher(("{python}", "-m", "netkernel.reference.nsm_kernel",
                     "--instance", "{instance}")),
}


def reference() -> Target:
    """The pure-Python reference model: the judge every other target is held to."""
    roles: dict[str, Any] = {role: importlib.import_module(mod)
                             for role, mod in _REFERENCE_MODULES.items() if role != "nsm"}
    roles["coreengine"] = WithProcess(roles["coreengine"], REFERENCE_PROCESSES["coreengine"])
    roles["nsm"] = REFERENCE_PROCESSES["nsm"]
    return Target("reference", roles, frozenset({"FUTEX_BELLS"}), dict(REFERENCE_NOT_APPLICABLE),
                  version=_distribution_version())


def _distribution_version() -> str | None:
    try:
        return importlib.metadata.version("netkernel")
    except importlib.metadata.PackageNotFoundError:
        return None


#: What the reference deliberately leaves to other targets, and why (the report says it).
REFERENCE_NOT_APPLICABLE = {
    "preload": "the reference's tenant side is the Python GuestLib (guestlib role); the"
               " LD_PRELOAD GuestLib for unmodified programs is C (--target fastpath)",
}


def exec_nsm(cmd: str) -> Target:
    """``--target exec:CMD``: ``CMD`` is an NSM program, started once per instance the
    suite creates (``{instance}`` in it is replaced by the instance's name). The suite
    runs the reference CoreEngine around it; every role but ``nsm`` is not applicable."""
    try:
        launcher = Launcher.command(cmd)
    except ValueError as exc:
        raise SystemExit(f"--target exec:{cmd}: {exc}") from None
    return Target(f"exec:{cmd}", {"nsm": launcher})


def load(spec: str) -> Target:
    """Resolve ``--target``: ``reference``, ``fastpath`` (the fast path with its default
    NSM, the shm NSM), ``fastpath-kernel`` (with the kernel NSM), ``exec:CMD``, or
    ``package.module[:function]``."""
    if spec == "reference":
        return reference()
    if spec.startswith("exec:"):
        return exec_nsm(spec.removeprefix("exec:"))
    if spec in ("fastpath", "fastpath-kernel"):
        try:
            mod = importlib.import_module("netkernel.fastpath.target")
        except ImportError as exc:
            raise SystemExit(
                f"--target {spec}: the C fast path is not built in this checkout ({exc})"
            ) from None
        made: Target = mod.target() if spec == "fastpath" else mod.kernel_target()
        return made
    module, _, func = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"--target {spec}: cannot import {module!r}: {exc}") from None
    made = getattr(mod, func or "target")()
    if not isinstance(made, Target):
        raise SystemExit(f"--target {spec}: {func or 'target'}() did not return a Target")
    return made
