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
    # the default NSM of `netkernel up` (--nsm auto): the shm NSM, pairing connections
    # between tenants in shared memory (spec/shm.md)
    "nsm": Launcher(("{python}", "-m", "netkernel.fastpath.nsm_shm", "--placement", "auto",
                     "--instance", "{instance}")),
}
#: ``--target fastpath-kernel``: the kernel NSM (`netkernel up --nsm kernel`), no pairing.
KERNEL_NSM = Launcher(("{python}", "-m", "netkernel.fastpath.nsm_kernel",
                       "--instance", "{instance}"))
NOT_APPLICABLE = {
    "sockets": "the fast path keeps no socket state machine of its own: the NSM's stack"
               " (Linux TCP) is the state machine, checked end to end by the nsm and"
               " guestlib roles",
}


def target() -> Target:
    """``--target fastpath``: every role, with the default NSM (the shm NSM, SHM_PAIRING)."""
    roles: dict[str, Any] = {role: importlib.import_module(name) for role, name in MODULES.items()}
    roles["coreengine"] = WithProcess(roles["coreengine"], PROCESSES["coreengine"])
    roles["nsm"] = PROCESSES["nsm"]
    return Target("fastpath", roles, frozenset({"FUTEX_BELLS", "SHM_PAIRING"}),
                  dict(NOT_APPLICABLE))


def kernel_target() -> Target:
    """``--target fastpath-kernel``: the same with the kernel NSM, which pairs nothing."""
    base = target()
    return Target("fastpath-kernel", dict(base.roles, nsm=KERNEL_NSM),
                  base.features - {"SHM_PAIRING"}, dict(base.not_applicable))
