"""The fast-path CoreEngine process: the reference's control plane around the C switching loop.

``python -m netkernel.fastpath.coreengine --instance NAME`` is a drop-in for
``python -m netkernel.reference.coreengine`` (spec/runtime.md): the same
``engine.sock`` protocol, device files and attach/detach bookkeeping, which
stay the reference's code (:class:`netkernel.reference.coreengine.CoreEngine`,
subclassed here). What changes is the switching loop: it runs in C
(``fastpath/csrc/ce.c``, ``nk_ce_run``) with the GIL released, and the
engine is the C one (``nk_engine``).

Threads. The main thread runs the loop: it calls ``nk_ce_run`` for at most
``MAX_SLEEP`` at a time while holding :attr:`lock`. The control thread never
touches the C structures while a run is in progress: before it takes the lock
(for an attach, a detach or a status) it rings the loop's control word
(``nk_ce_interrupt``), so the run returns and the main thread lets it in
(:meth:`_control`), and waits until the control thread is done before the
next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Final, cast

from netkernel.reference import coreengine as ref
from netkernel.reference import device as dev
from netkernel.reference import engine as ref_engine
from netkernel.reference import shm
from netkernel.reference.bell import MAX_SLEEP
from netkernel.reference.nqe import op_name

from ._lib import ffi, lib

__all__ = ["CoreEngine", "main", "running"]

log = logging.getLogger("netkernel.coreengine")

RUN_NS: Final = int(MAX_SLEEP * 1e9)  # longest stretch in C before the loop looks at `stop`
KIND_NAMES: Final = {dev.Kind.TENANT: "tenant", dev.Kind.NSM: "nsm"}
STATS: Final = ("busy_passes", "sleeps", "wakeups", "timeouts")
COUNTERS: Final = ("nqes_in", "nqes_out", "bytes_in", "bytes_out", "rejected", "stale")
WHY_BROKEN: Final = 2  # NK_CE_BROKEN


def geometry_struct(geo: dev.Geometry) -> Any:
    """A ``struct nk_geometry`` for ``geo``."""
    return ffi.new("struct nk_geometry *", {
        "n_qsets": geo.n_qsets, "ring_entries": geo.ring_entries, "data_size": geo.data_size,
        "send_size": geo.send_size, "buf_size": geo.buf_size, "kind": int(geo.kind)})


class CoreEngine(ref.CoreEngine):
    """The reference CoreEngine with the C engine and the C switching loop."""

    def __init__(self, instance: str | None = None,
                 geometry: dict[dev.Kind, dev.Geometry] | None = None,
                 slices: int = 1, max_inflight: int | None = None) -> None:
        super().__init__(instance, geometry)
        cfg = ffi.new("struct nk_engine_config *")
        cfg.slices = slices
        cfg.max_inflight = max_inflight or 0
        ce = lib.nk_ce_new(cfg)
        if ce == ffi.NULL:
            raise MemoryError("nk_ce_new")
        self.ce = ffi.gc(ce, lib.nk_ce_free)
        self.engine = None  # type: ignore[assignment]  # the state is the C engine's
        self._waiting = 0  # control threads that asked the loop to stop for them
        self._turn = threading.Condition()
        self._loop_thread: threading.Thread | None = None
        self._plugged: ref_engine.Dev | None = None

    # -- the control thread's turn ----------------------------------------------------
    @contextlib.contextmanager
    def _control(self) -> Iterator[None]:
        """Stop the C loop and hold it stopped (the lock) for the duration."""
        if threading.current_thread() is self._loop_thread:
            with self.lock:
                yield
            return
        with self._turn:
            self._waiting += 1
        try:
            lib.nk_ce_interrupt(self.ce)  # the run returns and the loop thread lets go
            with self.lock:
                yield
        finally:
            with self._turn:
                self._waiting -= 1
                self._turn.notify_all()

    def command(self, conn: socket.socket, line: bytes) -> dict[str, Any]:
        with self._control():
            return super().command(conn, line)

    def _hang_up(self, conn: socket.socket) -> None:
        with self._control():
            super()._hang_up(conn)

    # -- the C engine behind the reference's bookkeeping --------------------------------
    def _plug(self, kind: dev.Kind) -> tuple[Any, int]:
        """The lowest ID free here, on disk and in the C engine (CE-22: not draining).

        The C engine takes the device in :meth:`attach` once it is mapped; here it is
        only asked, by a trial attach that a detach undoes (a fresh device owes nothing).
        """
        used = {d.ident for d in self.devices if d.kind is kind}
        engine = lib.nk_ce_engine(self.ce)
        geo = geometry_struct(self.geometry[kind])
        for candidate in range(ref.ID_MIN, ref.ID_MAX + 1):
            if candidate in used or shm.device_path(self.instance, kind, candidate).exists():
                continue
            if lib.nk_engine_attach(engine, geo, candidate) < 0:
                continue  # e.g. a VM ID whose TENANT_UNMAP is still unanswered (CE-18)
            lib.nk_engine_detach(engine, int(kind), candidate)
            self._plugged = ref_engine.Dev(kind, candidate)
            return None, candidate
        raise ref.ControlError(f"no free {kind.name.lower()} ID: all of {ref.ID_MIN}..{ref.ID_MAX}"
                               " in use")

    def attach(self, conn: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
        with self._control():
            self._plugged = None
            reply = super().attach(conn, msg)
            key, self._plugged = self._plugged, None
            assert key is not None
            a = self.devices[key]
            rc = lib.nk_ce_add_device(self.ce, geometry_struct(a.dmap.geo), a.id,
                                      ffi.cast("void *", a.dmap.base))
            if rc < 0:
                self.devices.pop(key)
                self.by_conn.pop(conn, None)
                a.dmap.close()
                a.dmap.path.unlink(missing_ok=True)
                raise ref.ControlError(f"the engine refused {key.kind.name.lower()} {key.ident}:"
                                       f" errno {-rc}")
            if a.polled:  # VM-2: a guest's bells wake nobody here; VM-5: our flag, not its
                lib.nk_ce_set_polled(self.ce, int(a.kind), a.id, 1)
            return reply

    def detach(self, key: ref_engine.Dev) -> None:
        """Tear a device down: C engine cleanup, state DETACHED, file removed (DEV-4)."""
        with self._control():
            a = self.devices.pop(key, None)
            if a is None:
                return
            self.by_conn.pop(a.conn, None)
            lib.nk_ce_remove_device(self.ce, int(a.kind), a.id)  # CE-18, CE-19
            with contextlib.suppress(ValueError):
                a.dmap.set_header("state", dev.State.DETACHED)
            a.dmap.close()
            a.dmap.path.unlink(missing_ok=True)
        log.info("detached %s %d (%s)", KIND_NAMES[a.kind], a.id, a.name)

    def engine_status(self) -> dict[str, Any]:
        """What ``reference.engine.status`` gives, read from the C engine (CE-23)."""
        engine = lib.nk_ce_engine(self.ce)
        devices = []
        c = ffi.new("struct nk_counters *")
        for key in sorted(self.devices):
            if lib.nk_engine_counters(engine, int(key.kind), key.ident, c) < 0:
                continue
            ops = {op_name(op): int(c.ops[op]) for op in range(256) if c.ops[op]}
            counters = {f: int(getattr(c, f)) for f in COUNTERS}
            devices.append({"kind": KIND_NAMES[key.kind], "id": key.ident,
                            "sockets": int(lib.nk_engine_open_sockets(engine, int(key.kind),
                                                                      key.ident)),
                            "counters": {**counters, "ops": dict(sorted(ops.items()))}})
        n = lib.nk_engine_grants(engine, ffi.NULL, 0)
        grants = ffi.new("struct nk_grant_info[]", max(n, 1))
        n = lib.nk_engine_grants(engine, grants, n)
        return {
            "devices": devices,
            "sockets": int(lib.nk_engine_sockets(engine)),
            "in_flight": int(lib.nk_engine_in_flight(engine)),
            "grants": sorted(({"vm_id": g.vm, "nsm_id": g.nsm, "offset": int(g.offset),
                               "size": int(g.size), "ready": bool(g.ready)}
                              for g in grants[0:n]),
                             key=lambda g: (g["vm_id"], g["nsm_id"])),
        }

    def status(self) -> dict[str, Any]:
        """Everything ``netkernel status`` shows: devices, sockets, counters (RT-5)."""
        with self._control():
            doc = self.engine_status()
            known = {(d["kind"], d["id"]): d for d in doc.pop("devices")}

            def entry(a: ref.Attached) -> dict[str, Any]:
                d = known.get((KIND_NAMES[a.kind], a.id), {})
                return dict(a.describe(), attached=bool(d), sockets=d.get("sockets", 0),
                            counters=d.get("counters", {}))

            stats = ffi.new("struct nk_ce_stats *")
            lib.nk_ce_get_stats(self.ce, stats)
            return {
                "ok": True, "instance": self.instance, "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3), "dir": str(self.dir),
                "tenants": [entry(a) for a in self._of_kind(dev.Kind.TENANT)],
                "nsms": [entry(a) for a in self._of_kind(dev.Kind.NSM)],
                **doc,
                "pending": int(lib.nk_ce_pending(self.ce)),
                "blocked_sources": int(lib.nk_ce_blocked_sources(self.ce)),
                "loop": {k: int(getattr(stats, k)) for k in sorted(STATS) if getattr(stats, k)},
            }

    # -- switching, in C ------------------------------------------------------------------
    def poll_once(self) -> int:
        """One pass over every device (tests and benchmarks); returns NQEs moved."""
        with self.lock:
            moved = int(lib.nk_ce_poll(self.ce))
            self._detach_broken()
            return moved

    def _detach_broken(self) -> None:
        kinds = ffi.new("uint8_t[]", ref.ID_MAX * 2)
        idents = ffi.new("uint8_t[]", ref.ID_MAX * 2)
        for i in range(lib.nk_ce_broken(self.ce, kinds, idents, ref.ID_MAX * 2)):
            key = ref_engine.Dev(dev.Kind(kinds[i]), int(idents[i]))
            log.warning("%s %d broke its ring; detaching", key.kind.name, key.ident)
            a = self.devices.get(key)
            self.detach(key)
            if a is None:  # not ours (cannot happen): keep the loop from spinning on it
                lib.nk_ce_remove_device(self.ce, int(key.kind), key.ident)

    def run_switch(self) -> None:
        """The switching loop, until :attr:`stop`: C runs of at most MAX_SLEEP each."""
        self._loop_thread = threading.current_thread()
        while not self.stop.is_set():
            with self._turn:  # a control thread asked for the lock: let it have it first
                while self._waiting and not self.stop.is_set():
                    self._turn.wait(MAX_SLEEP)
            with self.lock:
                why = lib.nk_ce_run(self.ce, RUN_NS)  # the GIL is released in there
                if why == WHY_BROKEN:
                    self._detach_broken()


@contextlib.contextmanager
def running(instance: str | None = None,
            geometry: dict[dev.Kind, dev.Geometry] | None = None) -> Iterator[CoreEngine]:
    """A fast-path CoreEngine in a thread of this process, for tests and demos."""
    with ref.running(instance, geometry, engine_class=CoreEngine) as ce:
        yield cast(CoreEngine, ce)


def main(argv: list[str] | None = None) -> int:
    """``python -m netkernel.fastpath.coreengine --instance NAME`` (the reference's options)."""
    return ref.main(argv, engine_class=CoreEngine, prog="netkernel-coreengine-fastpath",
                    label="fast-path CoreEngine")


if __name__ == "__main__":
    sys.exit(main())
