"""``--target fastpath``: the C fast path, role by role (conformance/targets.py).

Every role the fast path implements is here; a role it does not implement is
listed in :data:`NOT_APPLICABLE` with the reason, and the suite reports its
tests as not applicable.
"""

from __future__ import annotations

import importlib
from typing import Any

from netkernel.conformance.targets import Launcher, Target, WithProcess

#: role -> the fast-path module that plays it
MODULES = {
    "codec": "netkernel.fastpath.nqe",
    "device": "netkernel.fastpath.device",
    "ring": "netkernel.fastpath.ring",
    "bufpool": "netkernel.fastpath.bufpool",
    "conntable": "netkernel.fastpath.conntable",
    "coreengine": "netkernel.fastpath.engine",
    "guestlib": "netkernel.fastpath.guestlib",
    "preload": "netkernel.fastpath.preload",
}
PROCESSES = {
    "coreengine": Launcher(("{python}", "-m", "netkernel.fastpath.coreengine",
                            "--instance", "{instance}")),
    "nsm": Launcher(("{python}", "-m", "netkernel.fastpath.nsm_kernel",
                     "--instance", "{instance}")),
}
NOT_APPLICABLE = {
    "sockets": "the fast path keeps no socket state machine of its own: the NSM's stack"
               " (Linux TCP) is the state machine, checked end to end by the nsm and"
               " guestlib roles",
}


#: ``--target fastpath-shm``: the shm NSM (spec/shm.md), pairing with placement auto.
SHM_NSM = Launcher(("{python}", "-m", "netkernel.fastpath.nsm_shm", "--placement", "auto",
                    "--instance", "{instance}"))


def target() -> Target:
    roles: dict[str, Any] = {role: importlib.import_module(name) for role, name in MODULES.items()}
    roles["coreengine"] = WithProcess(roles["coreengine"], PROCESSES["coreengine"])
    roles["nsm"] = PROCESSES["nsm"]
    return Target("fastpath", roles, frozenset({"FUTEX_BELLS"}), dict(NOT_APPLICABLE))


def shm_target() -> Target:
    """The fast path with the shm NSM: every conformance test, plus SHM-* (SHM_PAIRING)."""
    base = target()
    roles = dict(base.roles, nsm=SHM_NSM)
    return Target("fastpath-shm", roles, base.features | {"SHM_PAIRING"},
                  dict(base.not_applicable))
