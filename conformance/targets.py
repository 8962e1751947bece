"""Targets: what the conformance suite runs against (DESIGN §9).

A target is an adapter object exposing *roles*. A test asks for a role by
fixture name (``codec``, ``ring``, ...); when the target lacks it, the test is
skipped as not applicable and the report says so. A vendor certifies an
implementation by writing a target: a module with a ``target()`` function
returning a :class:`Target`, selected with ``--target module:NAME``.

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
``coreengine`` the sans-IO switching core (netkernel.reference.engine)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

ROLES = ("codec", "device", "ring", "bufpool", "sockets", "conntable", "coreengine")


class RoleMissing(LookupError):
    """The target does not implement a role."""


@dataclasses.dataclass
class Target:
    name: str
    roles: dict[str, Any]
    #: Optional features the target claims (e.g. "FUTEX_BELLS"); a test of a
    #: feature not claimed is reported "unsupported", not failed.
    features: frozenset[str] = frozenset()

    def role(self, name: str) -> Any:
        try:
            return self.roles[name]
        except KeyError:
            raise RoleMissing(f"target {self.name!r} provides no {name!r} role") from None


_REFERENCE_MODULES = {
    "codec": "netkernel.reference.nqe",
    "device": "netkernel.reference.device",
    "ring": "netkernel.reference.ring",
    "bufpool": "netkernel.reference.bufpool",
    "sockets": "netkernel.reference.sockstate",
    "conntable": "netkernel.reference.conntable",
    "coreengine": "netkernel.reference.engine",
}


def reference() -> Target:
    """The pure-Python reference model: the judge every other target is held to."""
    roles = {role: importlib.import_module(mod) for role, mod in _REFERENCE_MODULES.items()}
    return Target("reference", roles, frozenset({"FUTEX_BELLS"}))


def load(spec: str) -> Target:
    """Resolve ``--target``: ``reference``, ``fastpath``, or ``package.module[:function]``."""
    if spec == "reference":
        return reference()
    if spec == "fastpath":
        try:
            mod = importlib.import_module("netkernel.fastpath.target")
        except ImportError as exc:
            raise SystemExit(
                f"--target fastpath: the C fast path is not built in this checkout ({exc})"
            ) from None
        made: Target = mod.target()
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
