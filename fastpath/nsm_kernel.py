"""The kernel-stack NSM in C: ``python -m netkernel.fastpath.nsm_kernel --instance NAME``.

A drop-in for :mod:`netkernel.reference.nsm_kernel` (spec/nsm.md): the same
command line, the same attach, the same replies and events; the loop runs in
C (:mod:`netkernel.fastpath.servicelib`, fastpath/csrc/nsm.c) with the GIL
released. SIGTERM and SIGINT reach the C loop through Python's signal wakeup
fd, which the loop watches in its epoll set: on either, every tenant socket
is closed, the control connection hung up, and the exit status is 0 (NSM-2).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from netkernel.reference import nsm_kernel as ref_nsm
from netkernel.reference import shm

from . import servicelib

log = logging.getLogger("netkernel.fastpath.nsm_kernel")


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The wakeup fd already told the C loop; nothing to do in Python."""


def main(argv: Sequence[str] | None = None) -> int:
    args = ref_nsm.start(argv, prog="python -m netkernel.fastpath.nsm_kernel",
                         description="NetKernel kernel-stack NSM (C fast path): "
                                     "tenants' sockets on Linux sockets")
    # Signals: Python's C-level handler writes the wakeup fd at once, even while the
    # loop runs in C without the GIL; the loop stops when it becomes readable.
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    try:
        runtime = shm.instance_dir(args.instance)
        att = servicelib.attach(runtime, name=args.name)
    except (servicelib.AttachError, ValueError) as exc:
        print(f"nsm_kernel: {exc}", file=sys.stderr)
        return 1
    nsm = servicelib.ServiceLib(att, stop_fd=rfd)
    try:
        why = nsm.run()
    except OSError as exc:  # RING-10: the CoreEngine broke a ring; the reference dies too
        log.error("NSM %d stops: %s", att.nsm_id, exc)
        return 1
    finally:
        nsm.close()
    log.info("NSM %d stopped%s", att.nsm_id,
             " (CoreEngine lost)" if why == servicelib.LOST else "")
    return 0


def reference_with_this_nsm() -> Any:
    """A conformance target: the reference in every role but ``nsm``, which is this module.

    ``pytest conformance --target netkernel.fastpath.nsm_kernel:reference_with_this_nsm``
    runs the GuestLib and runtime tests (reference GuestLib + reference CoreEngine) on
    the C NSM, before the fast path has a GuestLib or CoreEngine of its own.
    """
    from netkernel.conformance import targets

    ref = targets.reference()
    roles = dict(ref.roles, nsm=targets.Launcher(
        ("{python}", "-m", "netkernel.fastpath.nsm_kernel", "--instance", "{instance}")))
    return targets.Target("reference+fastpath-nsm", roles, ref.features)


if __name__ == "__main__":
    sys.exit(main())
