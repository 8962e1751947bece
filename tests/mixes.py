"""Targets that mix implementations (tests/test_fastpath_interop.py).

``--target tests.mixes:reference_guestlib``: the reference GuestLib (and the
reference codec etc.) against the fast-path CoreEngine and NSM processes.
``--target tests.mixes:fastpath_guestlib``: the fast-path GuestLib against the
reference CoreEngine and NSM.
"""

from __future__ import annotations

from netkernel.conformance.targets import Target, reference
from netkernel.fastpath import target as fastpath

RUNTIME_ROLES = ("coreengine", "nsm")


def reference_guestlib() -> Target:
    fast = fastpath.target()
    roles = {**reference().roles, **{r: fast.roles[r] for r in RUNTIME_ROLES}}
    return Target("reference-guestlib+fastpath-runtime", roles, fast.features)


def fastpath_guestlib() -> Target:
    ref = reference()
    fast = fastpath.target()
    roles = {**ref.roles, "guestlib": fast.roles["guestlib"]}
    return Target("fastpath-guestlib+reference-runtime", roles, ref.features)
