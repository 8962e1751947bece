"""The CoreEngine process: devices, bells and the control socket around the sans-IO engine.

:mod:`netkernel.reference.engine` decides what happens to every NQE (the
connection table, VM ID stamping, bounds checks, detach cleanup, counters).
This file does the I/O it leaves out, in two threads:

* the **control thread** serves ``engine.sock`` (line-delimited JSON, one
  request per line, one reply line each). ``attach`` creates, initializes and
  hot-plugs a device file; the client keeps its connection open for the
  device's lifetime and EOF on it (exit or crash) is the detach. ``status``
  and ``shutdown`` are one-shot.
* the **switching loop** (main thread) takes NQEs from every device's
  to-engine rings (JOB, SEND; DEV-8), hands each to the engine, pushes the
  engine's outputs to their destination rings and rings the bells. A full
  destination ring keeps the outputs queued in order and stops reading from
  the source that produced them until they are delivered: nothing is dropped
  and no NQE overtakes another on its way to a ring (RING-4). One exception:
  an NSM's ring is not stopped for a tenant that does not read its rings
  (up to :data:`TENANT_BACKLOG` NQEs waiting for it), since that ring also
  carries every other tenant's replies and events. When no ring has
  work it sleeps on every ENGINE bell at once (futex_waitv), at most
  ``bell.MAX_SLEEP`` (RING-6, RING-7).

The engine is shared by both threads under one lock; the loop holds it for a
pass, the control thread for an attach, detach or status.

Control protocol (``engine.sock``): one JSON object per line each way.

- ``{"cmd": "attach", "kind": "tenant"|"nsm", "pid": N, "name": S}`` ->
  ``{"ok": true, "id": N, "kind": K, "path": P}``; the connection then holds
  the device until it closes. With ``"guest": true`` the device is for a
  virtual machine (spec/vm.md VM-1): its file is a power of two long (the
  reply's ``"size"``) and its bells are polled (VM-2).
- ``{"cmd": "status"}`` -> ``{"ok": true, ...}`` (:meth:`CoreEngine.status`).
- ``{"cmd": "shutdown"}`` -> ``{"ok": true}``, then the CoreEngine detaches
  everything and exits.
- anything else -> ``{"ok": false, "error": "..."}``; the connection stays usable.

Clients use :func:`attach` (keeps the connection) and :func:`request`
(one-shot); run the process with ``python -m netkernel.reference.coreengine
--instance NAME``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, cast

from . import bell as bells
from . import device as dev
from . import engine as eng
from . import shm
from .ring import Ring, RingError

log = logging.getLogger("netkernel.coreengine")

ID_MIN: Final = 1  # CE-2
ID_MAX: Final = 254
BATCH: Final = 64  # NQEs taken from one ring per visit (RING-8)
SPIN: Final = 16  # empty passes before the loop sleeps
BLOCKED_SLEEP: Final = 0.001  # while outputs wait for room, poll the destination this often
MAX_LINE: Final = 64 << 10
POLL_MIN: Final = 50e-6  # VM-2: the first bounded sleep after work on a POLLED device
POLL_MAX: Final = 1e-3  # ... doubling up to this
#: NQEs from NSMs that may wait for one full tenant ring before the CoreEngine stops reading
#: the NSM ring they came from. What an NSM owes a tenant is bounded by what the tenant holds
#: there (its requests in flight, SEC-5; its receive buffers; an EV_FIN/EV_ERROR per socket,
#: each a file descriptor of the NSM), so a tenant that stops reading its rings holds up only
#: itself; the bound only guards the CoreEngine's memory against a runaway NSM.
TENANT_BACKLOG: Final = 1 << 16
KINDS: Final[dict[str, dev.Kind]] = {"tenant": dev.Kind.TENANT, "nsm": dev.Kind.NSM}
TO_ENGINE: Final = tuple(r for r in dev.RingId if r.to_engine)
#: Geometry of the devices the CoreEngine creates, per kind.
GEOMETRY: Final[dict[dev.Kind, dev.Geometry]] = {
    dev.Kind.TENANT: dev.Geometry(kind=dev.Kind.TENANT),
    dev.Kind.NSM: dev.Geometry(kind=dev.Kind.NSM, data_size=64 << 10, send_size=32 << 10,
                               buf_size=4 << 10),
}



class ControlError(ValueError):
    """A control request the CoreEngine refuses; the message goes back to the client."""


@dataclasses.dataclass
class Attached:
    """One hot-plugged device and the connection that holds it."""

    kind: dev.Kind
    id: int
    name: str
    pid: int
    dmap: shm.DeviceMap
    conn: socket.socket
    inputs: list[tuple[int, dev.RingId, Ring]]  # to-engine rings, in polling order
    outputs: dict[tuple[int, dev.RingId], Ring]  # engine-to-device rings
    engine_bells: list[bells.Bell]  # per queue set: we sleep here
    device_bells: list[bells.Bell]  # per queue set: we ring here
    polled: bool = False  # VM-2: a guest's device, whose bells wake nobody

    @classmethod
    def of(cls, kind: dev.Kind, dev_id: int, name: str, pid: int, dmap: shm.DeviceMap,
           conn: socket.socket, *, polled: bool = False) -> Attached:
        qsets = range(dmap.geo.n_qsets)
        return cls(
            kind, dev_id, name, pid, dmap, conn, polled=polled,
            inputs=[(q, r, dmap.ring(q, r)) for q in qsets for r in TO_ENGINE],
            outputs={(q, r): dmap.ring(q, r) for q in qsets for r in dev.RingId
                     if not r.to_engine},
            engine_bells=[dmap.bell(q, dev.Bell.ENGINE) for q in qsets],
            device_bells=[dmap.bell(q, dev.Bell.DEVICE) for q in qsets],
        )

    @property
    def key(self) -> eng.Dev:
        return eng.Dev(self.kind, self.id)

    def describe(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": self.id, "name": self.name, "pid": self.pid,
                               "path": str(self.dmap.path)}
        if self.polled:
            doc["guest"] = True
        return doc


class CoreEngine:
    """One CoreEngine: the engine, the attached devices, the pending outputs."""

    def __init__(self, instance: str | None = None,
                 geometry: dict[dev.Kind, dev.Geometry] | None = None,
                 engine: eng.Engine | None = None) -> None:
        self.instance = shm.instance_name(instance)
        self.dir = shm.instance_dir(self.instance)
        self.geometry = dict(GEOMETRY if geometry is None else geometry)
        self.engine = engine if engine is not None else eng.Engine()
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.devices: dict[eng.Dev, Attached] = {}
        self.by_conn: dict[socket.socket, eng.Dev] = {}
        # outputs waiting for room in their destination ring, in order, with their source
        self.pending: dict[eng.Dest, collections.deque[tuple[bytes, eng.Dest | None]]] = {}
        self.held: collections.Counter[eng.Dest] = collections.Counter()  # source -> waiting
        self.started = time.time()
        #: the switching loop's own counters: passes that moved NQEs, sleeps and how they ended
        self.loop: collections.Counter[str] = collections.Counter()
        self.listener: socket.socket | None = None

    # -- control: attach / detach / status --------------------------------------------
    def _plug(self, kind: dev.Kind) -> tuple[eng.Engine, int]:
        """The engine with a new device of ``kind`` at the lowest ID that is free in the
        engine (CE-22: not draining), here and on disk."""
        used = {d.ident for d in self.devices if d.kind is kind}
        for candidate in range(ID_MIN, ID_MAX + 1):
            if candidate in used or shm.device_path(self.instance, kind, candidate).exists():
                continue
            try:
                engine, d = eng.attach(self.engine, self.geometry[kind], candidate)
            except eng.EngineError:
                continue  # e.g. a VM ID whose TENANT_UNMAP is still unanswered (CE-18)
            return engine, d.ident
        raise ControlError(f"no free {kind.name.lower()} ID: all of {ID_MIN}..{ID_MAX} in use")

    def attach(self, conn: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
        """Create and hot-plug a device for the client on ``conn`` (DEV-4)."""
        if conn in self.by_conn:
            raise ControlError(f"this connection already holds device {self.by_conn[conn][1]};"
                               " open another connection to attach another device")
        kind_name = msg.get("kind")
        if kind_name not in KINDS:
            raise ControlError(f"attach: kind must be one of {sorted(KINDS)}, got {kind_name!r}")
        pid = msg.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ControlError(f"attach: pid must be a positive integer, got {pid!r}")
        name = msg.get("name", "")
        if not isinstance(name, str) or len(name) > 64:
            raise ControlError("attach: name must be a string of at most 64 characters")
        guest = msg.get("guest", False)
        if not isinstance(guest, bool):
            raise ControlError(f"attach: guest must be true or false, got {guest!r}")
        kind = KINDS[kind_name]
        geo = self.geometry[kind]
        # VM-1: a guest maps the file as a PCI BAR (a power of two); its bells are polled
        features = dev.Feature.POLLED if guest else dev.Feature.FUTEX_BELLS
        size = shm.bar_size(geo.total_size) if guest else geo.total_size
        with self.lock:
            engine, dev_id = self._plug(kind)
            path = shm.device_path(self.instance, kind, dev_id)
            dmap = shm.create_device(path, geo, owner_pid=pid, dev_id=dev_id,
                                     features=features, file_size=size)
            a = Attached.of(kind, dev_id, name, pid, dmap, conn, polled=guest)
            dmap.set_header("state", dev.State.READY)  # DEV-4: before anyone is told the path
            self.engine = engine
            self.devices[a.key] = a
            self.by_conn[conn] = a.key
        log.info("attached %s %d (%s, pid %d%s) at %s", kind_name, dev_id, name, pid,
                 ", for a guest" if guest else "", path)
        reply: dict[str, Any] = {"ok": True, "id": dev_id, "kind": kind_name, "path": str(path)}
        if guest:
            reply["size"] = size
        return reply

    def detach(self, key: eng.Dev) -> None:
        """Tear a device down: engine cleanup, state DETACHED, file removed (DEV-4)."""
        with self.lock:
            a = self.devices.pop(key, None)
            if a is None:
                return
            self.by_conn.pop(a.conn, None)
            for rk in [rk for rk in self.pending if rk.dev == key]:
                for _, source in self.pending.pop(rk):
                    self._release(source)
            for q, r, _ in a.inputs:
                self.held.pop(eng.Dest(a.kind, a.id, q, r), None)
            for rk, queue in self.pending.items():  # its outputs still go; nothing waits on them
                if any(src is not None and src.dev == key for _, src in queue):
                    self.pending[rk] = collections.deque(
                        (raw, None if src is not None and src.dev == key else src)
                        for raw, src in queue)
            self.engine, outputs = eng.detach(self.engine, a.key)  # CE-18, CE-19
            self._route(outputs, None)
            with contextlib.suppress(ValueError):
                a.dmap.set_header("state", dev.State.DETACHED)
            a.dmap.close()
            a.dmap.path.unlink(missing_ok=True)
        log.info("detached %s %d (%s)", a.kind.name.lower(), a.id, a.name)

    def status(self) -> dict[str, Any]:
        """Everything ``netkernel status`` shows: devices, sockets, counters."""
        with self.lock:
            doc = eng.status(self.engine)  # CE-23
            devices = cast(list[dict[str, Any]], doc.pop("devices"))
            known = {(d["kind"], d["id"]): d for d in devices}

            def entry(a: Attached) -> dict[str, Any]:
                d = known.get((a.kind.name.lower(), a.id), {})
                return dict(a.describe(), attached=bool(d), sockets=d.get("sockets", 0),
                            counters=d.get("counters", {}))

            return {
                "ok": True, "instance": self.instance, "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3), "dir": str(self.dir),
                "tenants": [entry(a) for a in self._of_kind(dev.Kind.TENANT)],
                "nsms": [entry(a) for a in self._of_kind(dev.Kind.NSM)],
                **doc,
                "pending": sum(len(q) for q in self.pending.values()),
                "blocked_sources": len(self.held),
                "loop": dict(sorted(self.loop.items())),
            }

    def _of_kind(self, kind: dev.Kind) -> list[Attached]:
        return [self.devices[k] for k in sorted(k for k in self.devices if k[0] is kind)]

    def command(self, conn: socket.socket, line: bytes) -> dict[str, Any]:
        """One control request in, its reply out; refusals become ``ok: false``."""
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ControlError("a request is a JSON object such as {\"cmd\": \"status\"}")
            cmd = msg.get("cmd")
            if cmd == "attach":
                return self.attach(conn, msg)
            if cmd == "status":
                return self.status()
            if cmd == "shutdown":
                self.stop.set()
                return {"ok": True}
            raise ControlError(f"unknown cmd {cmd!r} (known: attach, status, shutdown)")
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        except (ControlError, dev.DeviceError, OSError) as exc:
            return {"ok": False, "error": str(exc)}

    def serve_control(self, listener: socket.socket) -> None:
        """The control thread: every client of ``engine.sock`` until :attr:`stop`."""
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while not self.stop.is_set():
                for key, _ in sel.select(timeout=bells.MAX_SLEEP):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is listener:
                        with contextlib.suppress(BlockingIOError):
                            conn, _ = listener.accept()
                            conn.setblocking(False)
                            buffers[conn] = bytearray()
                            sel.register(conn, selectors.EVENT_READ)
                        continue
                    if not self._serve_client(sock, buffers[sock]):
                        sel.unregister(sock)
                        del buffers[sock]
                        self._hang_up(sock)
        finally:
            for conn in buffers:
                sel.unregister(conn)
            sel.close()

    def _serve_client(self, conn: socket.socket, buf: bytearray) -> bool:
        """Read and answer what a client sent; False once it hung up (or misbehaved)."""
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            reply = self.command(conn, line)
            try:
                conn.setblocking(True)
                conn.settimeout(1.0)
                conn.sendall(json.dumps(reply).encode() + b"\n")
                conn.setblocking(False)
            except OSError:
                return False
        if len(buf) > MAX_LINE:
            with contextlib.suppress(OSError):
                conn.sendall(b'{"ok": false, "error": "request line too long"}\n')
            return False
        return True

    def _hang_up(self, conn: socket.socket) -> None:
        """Client EOF: detach its device, if it holds one (DEV-4)."""
        key = self.by_conn.get(conn)
        if key is not None:
            self.detach(key)
        conn.close()

    # -- switching ------------------------------------------------------------------------
    def _route(self, outputs: list[eng.Output], source: eng.Dest | None) -> None:
        """Queue the engine's outputs behind anything already waiting for the same ring."""
        for dest, raw in outputs:
            if dest.dev not in self.devices:
                continue  # its device detached meanwhile: nobody will read it
            queue = self.pending.setdefault(dest, collections.deque())
            if source is not None and source.kind is dev.Kind.NSM \
                    and dest.kind is dev.Kind.TENANT and len(queue) < TENANT_BACKLOG:
                queue.append((raw, None))  # a slow tenant must not stop the NSM's ring
                continue
            queue.append((raw, source))
            if source is not None:
                self.held[source] += 1

    def _release(self, source: eng.Dest | None) -> None:
        if source is not None and self.held[source] > 0:
            self.held[source] -= 1
            if not self.held[source]:
                del self.held[source]

    def flush(self) -> int:
        """Deliver queued outputs to their rings, oldest first; returns how many went."""
        sent = 0
        for dest in list(self.pending):
            queue = self.pending.get(dest)
            if queue is None:
                continue  # its device was detached earlier in this pass
            a = self.devices.get(dest.dev)
            if a is None:
                for _, source in self.pending.pop(dest):
                    self._release(source)
                continue
            ring = a.outputs[(dest.qset, dest.ring)]
            try:
                n = ring.push_many([raw for raw, _ in itertools.islice(queue, ring.entries)])
            except RingError as exc:  # the device side moved its head impossibly (RING-10)
                log.warning("%s %d broke its ring: %s; detaching", a.kind.name, a.id, exc)
                self.detach(a.key)
                continue
            for _ in range(n):
                _, source = queue.popleft()
                self._release(source)
            if n:
                sent += n
                bells.notify(ring, a.device_bells[dest.qset])  # RING-6
            if not queue:
                del self.pending[dest]
        return sent

    def poll_once(self) -> int:
        """One pass over every device: read, switch, deliver. Returns NQEs moved."""
        moved = 0
        with self.lock:
            moved += self.flush()
            for a in list(self.devices.values()):
                for qset, ring_id, ring in a.inputs:
                    if self.devices.get(a.key) is not a:
                        break  # detached during this pass (a broken ring): unmapped now
                    source = eng.Dest(a.kind, a.id, qset, ring_id)
                    if self.held.get(source):
                        continue  # its earlier outputs still wait for room: keep order
                    try:
                        batch = ring.pop_many(BATCH)
                    except RingError as exc:
                        log.warning("%s %d broke its ring: %s; detaching", a.kind.name, a.id, exc)
                        self.detach(a.key)
                        break
                    for raw in batch:
                        self._route(self._switch(a, qset, ring_id, raw), source)
                    moved += len(batch)
                    if batch:
                        moved += self.flush()
        return moved

    def _switch(self, a: Attached, qset: int, ring: dev.RingId, raw: bytes) -> list[eng.Output]:
        """One NQE through the engine (CE-8). An engine bug costs that NQE, not the process."""
        outputs: list[eng.Output]
        try:
            self.engine, outputs = eng.switch(self.engine, a.key, qset, ring, raw)
        except Exception:
            log.exception("engine failed on %s from %s %d qset %d %s", raw.hex(),
                          a.kind.name, a.id, qset, ring.name)
            return []
        return outputs

    def _sleep(self, timeout: float) -> None:
        """Sleep on every ENGINE bell at once unless a to-engine ring has work (RING-6)."""
        with self.lock:
            sleepers = [(a, q) for a in self.devices.values() for q in range(a.dmap.geo.n_qsets)]
            # a POLLED device's bell wakes nobody (VM-2), and a guest flipping it must not
            # keep us awake: its rings are looked at when the bounded sleep ends
            woken = [(a, q) for a, q in sleepers if not a.polled]
            if len(woken) > bells.WAITV_MAX:
                woken, timeout = [], min(timeout, BLOCKED_SLEEP)
            watch = [(a.engine_bells[q], a.engine_bells[q].value()) for a, q in woken]
            rings = [r for a, q in sleepers for qq, _, r in a.inputs if qq == q]
            try:
                idle = all([r.prepare_sleep() for r in rings])  # every flag set, re-checked
            except RingError:  # a device broke its ring since the last pass: that pass
                idle = False  # detaches it (RING-10); the flags are cleared below
        try:
            if idle:
                self.loop["sleeps"] += 1
                woke = bells.wait_any(watch, timeout)
                self.loop["timeouts" if woke is None else "wakeups"] += 1
        except OSError as exc:  # a device detached meanwhile and its bell was unmapped
            log.debug("sleep ended early: %s", exc)
        finally:
            with self.lock:
                for r in rings:
                    with contextlib.suppress(ValueError):
                        r.finish_sleep()

    def run_switch(self) -> None:
        """The switching loop, until :attr:`stop`."""
        idle = 0
        poll = POLL_MIN
        while not self.stop.is_set():
            if self.poll_once():
                self.loop["busy_passes"] += 1
                idle = 0
                poll = POLL_MIN
                continue
            idle += 1
            if idle < SPIN:
                os.sched_yield()
                continue
            timeout = BLOCKED_SLEEP if self.pending else bells.MAX_SLEEP
            if any(a.polled for a in self.devices.values()):
                # VM-2: a guest's bell wakes nobody here: look again after `poll`, which
                # doubles while nothing comes, up to POLL_MAX
                timeout, poll = min(timeout, poll), min(poll * 2, POLL_MAX)
            self._sleep(timeout)

    # -- the process --------------------------------------------------------------------
    def listen(self) -> socket.socket:
        """Create the runtime directory and bind ``engine.sock``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / shm.ENGINE_SOCK
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale socket of a dead CoreEngine
        else:
            raise ControlError(f"a CoreEngine already serves {path}")
        finally:
            probe.close()
        for stale in self.dir.glob(f"*{shm.DEVICE_SUFFIX}"):
            log.warning("removing %s, left by a CoreEngine that died", stale)
            stale.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(path))
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        return listener

    def run(self) -> None:
        """Serve until shutdown: control thread + switching loop, then clean up."""
        listener = self.listener or self.listen()
        control = threading.Thread(target=self.serve_control, args=(listener,),
                                   name="nk-control", daemon=True)
        control.start()
        try:
            self.run_switch()
        finally:
            self.stop.set()
            control.join(timeout=2.0)
            self.close()

    def close(self) -> None:
        """Detach everything, hang up every client, remove ``engine.sock``."""
        for key in list(self.devices):
            a = self.devices.get(key)
            self.detach(key)
            if a is not None:
                with contextlib.suppress(OSError):
                    a.conn.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            (self.dir / shm.ENGINE_SOCK).unlink(missing_ok=True)


# -- clients ------------------------------------------------------------------------------


def _connect(instance: str | None, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(shm.engine_socket(instance)))
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(sock: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
    sock.sendall(json.dumps(msg).encode() + b"\n")
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the CoreEngine closed the control connection")
        buf += chunk
        if len(buf) > (16 << 20):
            raise ConnectionError("reply from the CoreEngine is too long")
    reply = json.loads(bytes(buf).partition(b"\n")[0])
    if not isinstance(reply, dict):
        raise ConnectionError(f"the CoreEngine sent {reply!r}, not a JSON object")
    return reply


def request(msg: dict[str, Any], instance: str | None = None, *,
            timeout: float = 2.0) -> dict[str, Any]:
    """Send one control request (``status``, ``shutdown``) and return the reply.

    OSError if no CoreEngine answers on the instance's ``engine.sock``.
    """
    with _connect(instance, timeout) as sock:
        return _exchange(sock, msg)


@dataclasses.dataclass
class Attachment:
    """A device held by this process: closing it (or exiting) detaches it."""

    conn: socket.socket
    id: int
    path: Path
    dmap: shm.DeviceMap

    def close(self) -> None:
        self.dmap.close()
        self.conn.close()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(kind: str, name: str = "", instance: str | None = None, *,
           timeout: float = 5.0, guest: bool = False) -> Attachment:
    """Hot-plug a device of ``kind`` (``tenant`` or ``nsm``) and map it.

    ``guest``: the device is for a virtual machine (VM-1): a power-of-two file, polled bells.
    ConnectionRefusedError/FileNotFoundError if the instance is not running;
    ControlError with the CoreEngine's message if it refuses.
    """
    conn = _connect(instance, timeout)
    msg: dict[str, Any] = {"cmd": "attach", "kind": kind, "pid": os.getpid(), "name": name}
    if guest:
        msg["guest"] = True
    try:
        reply = _exchange(conn, msg)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", reply)))
        path = Path(reply["path"])
        dmap = shm.open_device(path)
    except BaseException:
        conn.close()
        raise
    return Attachment(conn, int(reply["id"]), path, dmap)


def geometries(ring_entries: int | None = None,
               nsm_ring_entries: int | None = None) -> dict[dev.Kind, dev.Geometry]:
    """:data:`GEOMETRY` with other ring sizes; DeviceError if a size is not allowed."""
    sizes = {dev.Kind.TENANT: ring_entries, dev.Kind.NSM: nsm_ring_entries}
    out = dict(GEOMETRY)
    for kind, entries in sizes.items():
        if entries is not None:
            out[kind] = dataclasses.replace(out[kind], ring_entries=entries)
    return out


@contextlib.contextmanager
def running(instance: str | None = None,
            geometry: dict[dev.Kind, dev.Geometry] | None = None, *,
            engine_class: type[CoreEngine] = CoreEngine) -> Iterator[CoreEngine]:
    """A CoreEngine (of ``engine_class``) in a thread of this process, for tests and
    ``netkernel demo``."""
    ce = engine_class(instance, geometry)
    ce.listen()
    thread = threading.Thread(target=ce.run, name="nk-coreengine", daemon=True)
    thread.start()
    try:
        yield ce
    finally:
        ce.stop.set()
        thread.join(timeout=5.0)


def main(argv: list[str] | None = None, *, engine_class: type[CoreEngine] = CoreEngine,
         prog: str = "netkernel-coreengine", label: str = "CoreEngine") -> int:
    """``python -m netkernel.reference.coreengine --instance NAME``.

    The fast path's CoreEngine process is this with its ``engine_class`` (and its
    ``prog`` and ``label`` for the help and the log).
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--instance", default=None, help="instance name (NETKERNEL_INSTANCE)")
    parser.add_argument("--ring-entries", type=int, default=None, metavar="N",
                        help="NQE slots per ring of tenant devices (a power of two)")
    parser.add_argument("--nsm-ring-entries", type=int, default=None, metavar="N",
                        help="NQE slots per ring of NSM devices (a power of two)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        geometry = geometries(args.ring_entries, args.nsm_ring_entries)
    except dev.DeviceError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s coreengine %(levelname)s %(message)s")
    ce = engine_class(args.instance, geometry)
    ce.listen()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        ce.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("%s of instance %s serving %s", label, ce.instance, ce.dir / shm.ENGINE_SOCK)
    ce.run()
    log.info("CoreEngine of instance %s stopped", ce.instance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
