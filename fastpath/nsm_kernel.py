"""The kernel-stack NSM in C: ``python -m netkernel.fastpath.nsm_kernel --instance NAME``.

A drop-in for :mod:`netkernel.reference.nsm_kernel` (spec/nsm.md): the same
command line, the same attach, the same replies and events; the loop runs in
C (:mod:`netkernel.fastpath.servicelib`, fastpath/csrc/nsm.c) with the GIL
released. SIGTERM and SIGINT reach the C loop through Python's signal wakeup
fd, which the loop watches in its epoll set: on either, every tenant socket
is closed, the control connection hung up, and the exit status is 0 (NSM-2).
While it runs, ``<runtime>/nsm-<ID>.stats.json`` holds its placement and
per-tenant counters (``netkernel status``); it is removed at exit. The shm
NSM (:mod:`netkernel.fastpath.nsm_shm`) is this main with pairing on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from netkernel.reference import nsm_kernel as ref_nsm
from netkernel.reference import shm

from . import servicelib

log = logging.getLogger("netkernel.fastpath.nsm_kernel")


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The wakeup fd already told the C loop; nothing to do in Python."""


#: How often the per-tenant counters file is rewritten (``netkernel status`` reads it).
STATS_PERIOD: Final = 0.25


def stats_path(runtime: Path, nsm_id: int) -> Path:
    """``<runtime>/nsm-<ID>.stats.json``: the NSM's placement and per-tenant counters (SHM-7)."""
    return runtime / f"nsm-{nsm_id}.stats.json"


def write_stats(nsm: servicelib.ServiceLib, path: Path, placement: str,
                last: str = "") -> str:
    """Replace ``path`` atomically with every mapped tenant's counters, unless they are
    ``last`` (the text written before); returns the text."""
    tenants = {}
    for vm in range(1, 255):
        c = nsm.tenant_counters(vm)
        if c is not None:
            tenants[str(vm)] = c
    text = json.dumps({"nsm": nsm.att.nsm_id, "placement": placement, "tenants": tenants}) + "\n"
    if text != last:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return text


def _stats_loop(nsm: servicelib.ServiceLib, path: Path, placement: str, last: str,
                done: threading.Event) -> None:
    """While the C loop runs (the GIL is released in nk_nsm_run): rewrite the stats file
    when the counters changed."""
    while not done.wait(STATS_PERIOD):
        try:
            last = write_stats(nsm, path, placement, last)
        except OSError as exc:  # the runtime directory is gone: the instance is going down
            log.debug("stats file: %s", exc)


def main(argv: Sequence[str] | None = None, *, placement: str = "kernel",
         name: str = "kernel", prog: str = "python -m netkernel.fastpath.nsm_kernel",
         description: str = "NetKernel kernel-stack NSM (C fast path): "
                            "tenants' sockets on Linux sockets",
         placements: Sequence[str] = ()) -> int:
    """Attach and serve. ``placements``: the ``--placement`` values the command line takes
    (none: fixed ``placement``); ``name``: the default NSM name given to the CoreEngine."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if placements:
        pre = argparse.ArgumentParser(prog=prog, add_help=False)
        pre.add_argument("--placement", choices=list(placements), default=placement)
        known, argv = pre.parse_known_args(argv)
        placement = known.placement
        default = pre.get_default("placement")
        description += f" (--placement {'|'.join(placements)}: default {default})"
    args = ref_nsm.start(["--name", name, *argv], prog=prog, description=description)
    # Signals: Python's C-level handler writes the wakeup fd at once, even while the
    # loop runs in C without the GIL; the loop stops when it becomes readable.
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    tool = prog.rsplit(".", 1)[-1]
    try:
        runtime = shm.instance_dir(args.instance)
        att = servicelib.attach(runtime, name=args.name)
    except (servicelib.AttachError, ValueError) as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return 1
    nsm = servicelib.ServiceLib(att, stop_fd=rfd, placement=placement)
    path = stats_path(att.runtime, att.nsm_id)
    done = threading.Event()
    last = ""
    with contextlib.suppress(OSError):
        last = write_stats(nsm, path, placement)
    stats = threading.Thread(target=_stats_loop, args=(nsm, path, placement, last, done),
                             name="nsm-stats", daemon=True)
    stats.start()
    try:
        why = nsm.run()
    except OSError as exc:  # RING-10: the CoreEngine broke a ring; the reference dies too
        log.error("NSM %d stops: %s", att.nsm_id, exc)
        return 1
    finally:
        done.set()
        stats.join()
        with contextlib.suppress(OSError):
            path.unlink()
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
