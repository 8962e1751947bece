"""ServiceLib in C: the NSM's device side, driven by ``nk_nsm_run`` (fastpath/csrc/nsm.c).

The attach is the reference's (:func:`~netkernel.reference.servicelib.connect_nsm`,
spec/runtime.md RT-3): one JSON line on
``engine.sock``, the answer names the NSM device, which is mapped and its
header validated here in Python (DEV-2, DEV-12..DEV-14). From then on
everything per NQE and per byte runs in C with the GIL released: the calls
on COMPLETION and RECEIVE, the tenants' data areas (TENANT_MAP maps
``vm-<V>.nk`` in C, NSM-11), the receive slices (BUF-*), the Linux sockets,
the replies and events on JOB and SEND (DEV-8). See the comment at the top
of nsm.c for the threads and how the loop sleeps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from pathlib import Path
from typing import Any, Final

from netkernel.reference import device as dev
from netkernel.reference import shm
from netkernel.reference.servicelib import ATTACH_TIMEOUT, AttachError, connect_nsm

from ._lib import ffi, lib

log = logging.getLogger("netkernel.fastpath.servicelib")

#: nk_nsm_run's reasons to return (enum nk_nsm_exit)
STOPPED: Final = 0
LOST: Final = 1


@dataclasses.dataclass
class Attachment:
    """What the attach gave: the control connection, the mapped NSM device, the NSM ID."""

    control: socket.socket | None  # None: no CoreEngine to watch (tests)
    dmap: shm.DeviceMap
    nsm_id: int
    runtime: Path


def attach(runtime: Path, *, name: str = "kernel",
           timeout: float = ATTACH_TIMEOUT) -> Attachment:
    """Hotplug into the CoreEngine at ``runtime/engine.sock`` and map the NSM device (RT-3).

    The connection stays open for the device's lifetime: its EOF is how each
    side learns that the other is gone (RT-4, NSM-2).
    """
    ctl, dmap, nsm_id = connect_nsm(runtime, name=name, timeout=timeout)
    if dmap.geo.kind is not dev.Kind.NSM:
        dmap.close()
        ctl.close()
        raise AttachError(f"{dmap.path} is not an NSM device")
    ctl.setblocking(False)
    log.info("attached as NSM %s, device %s", nsm_id, dmap.path)
    return Attachment(ctl, dmap, nsm_id, runtime)


#: Where a TCP connection between two tenants of the NSM goes (enum nk_nsm_placement).
PLACEMENTS: Final[dict[str, int]] = {"kernel": 0, "auto": 1, "shm": 2}


class ServiceLib:
    """The C loop over one attached NSM device (``struct nk_nsm``).

    ``stop_fd``: an fd whose readability makes :meth:`run` return (the
    signal wakeup fd of the process). ``rx_chunk``/``rx_cap`` as the
    reference KernelNSM's.
    """

    def __init__(self, att: Attachment, *, stop_fd: int = -1, rx_chunk: int = 0,
                 rx_cap: int = 0, placement: str = "kernel") -> None:
        self.att = att
        ctl = att.control.fileno() if att.control is not None else -1
        self._ptr: Any = lib.nk_nsm_new(ffi.cast("void *", att.dmap.base), len(att.dmap.buf),
                                        str(att.runtime).encode(), ctl, stop_fd)
        if self._ptr == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"nk_nsm_new: {os.strerror(err)}")
        lib.nk_nsm_set_rx(self._ptr, rx_chunk, rx_cap)
        if placement not in PLACEMENTS:
            self.close()
            raise ValueError(f"unknown placement {placement!r} (known: {', '.join(PLACEMENTS)})")
        lib.nk_nsm_set_placement(self._ptr, PLACEMENTS[placement])

    def run(self) -> int:
        """Serve until stopped (:data:`STOPPED`) or the CoreEngine is gone (:data:`LOST`).

        The GIL is released for the whole call (cffi releases it around every C call).
        """
        rc: int = lib.nk_nsm_run(self._ptr)
        if rc < 0:
            raise OSError(-rc, f"nk_nsm_run: {os.strerror(-rc)}")
        return rc

    def stop(self) -> None:
        """From any thread: make :meth:`run` return soon."""
        lib.nk_nsm_stop(self._ptr)

    def counters(self) -> dict[str, int]:
        c = ffi.new("struct nk_nsm_counters *")
        lib.nk_nsm_get_counters(self._ptr, c)
        return {f: int(getattr(c, f)) for f, _ in ffi.typeof("struct nk_nsm_counters").fields}

    def tenant_counters(self, vm: int) -> dict[str, int] | None:
        """Tenant ``vm``'s counters (spec/shm.md SHM-7), or None when it is not mapped.

        Safe from any thread while :meth:`run` runs.
        """
        c = ffi.new("struct nk_nsm_tenant_counters *")
        if lib.nk_nsm_get_tenant_counters(self._ptr, vm, c) < 0:
            return None
        return {f: int(getattr(c, f))
                for f, _ in ffi.typeof("struct nk_nsm_tenant_counters").fields}

    def close(self) -> None:
        """Close every tenant socket, unmap the tenants, hang up, unmap the device."""
        if self._ptr is not None:
            lib.nk_nsm_free(self._ptr)
            self._ptr = None
        if self.att.control is not None:
            self.att.control.close()
        self.att.dmap.close()


__all__ = ["LOST", "PLACEMENTS", "STOPPED", "AttachError", "Attachment", "ServiceLib", "attach"]
