"""ServiceLib: the device side of an NSM (spec/device.md DEV-8, BUF-*; spec/nqe.md).

Everything an NSM needs that is not about its network stack lives here:
attaching to the CoreEngine, the NSM's own device (calls in on COMPLETION and
RECEIVE, replies and events out on JOB and SEND, the bells), the data areas
of the tenants it serves (TENANT_MAP / TENANT_UNMAP) and the receive slice it
allocates EV_DATA buffers from (BUF_RETURN). A stack (the kernel-stack NSM,
:mod:`netkernel.reference.nsm_kernel`) plugs in through :class:`Stack` and
sees only socket calls, tenant areas and "buffers came back".

Which ring an output goes on (DEV-8):

=====================================  ==========
the NSM publishes                      ring
=====================================  ==========
reply to a call read from COMPLETION   JOB
reply to a call read from RECEIVE      SEND
event (EV_DATA, EV_FIN, ...)           SEND
=====================================  ==========

Outputs are queued per ring in order and published in batches; a full ring
keeps them queued, never drops one (RING-4). Every output gets a *ticket*,
the ring index it occupies once published; :meth:`ServiceLib.consumed` tells
when the CoreEngine has read past a ticket. The stack uses tickets to keep
order across the two rings: a new connection's events wait until the
CoreEngine has read the reply that created it, and a CLOSE is answered only
after the CoreEngine has read the socket's last event (NQE-16).

Defence in depth: the CoreEngine checks every buffer (NQE-14), and ServiceLib
checks again against the tenant area it mapped, answering -EFAULT for
anything outside (:meth:`TenantArea.address`). It never trusts a tenant.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from . import bell as bells
from . import bufpool, shm
from . import device as dev
from .nqe import NQE, NQEError, Op, encode_result, pack, unpack, unpack_unchecked

log = logging.getLogger("netkernel.servicelib")

CALL_RINGS: Final = (dev.RingId.COMPLETION, dev.RingId.RECEIVE)
#: DEV-8: a call's reply goes out on the ring paired with the one it came in on.
REPLY_RING: Final[dict[dev.RingId, dev.RingId]] = {
    dev.RingId.COMPLETION: dev.RingId.JOB,
    dev.RingId.RECEIVE: dev.RingId.SEND,
}
EVENT_RING: Final = dev.RingId.SEND
BATCH: Final = 64  # NQEs taken from one ring per poll (RING-8)
HALF: Final = 1 << 31
U32: Final = 1 << 32
ATTACH_TIMEOUT: Final = 5.0

#: Ops a stack executes (spec/nqe.md, the requests of the op table).
SOCKET_CALLS: Final = frozenset({
    Op.SOCKET, Op.BIND, Op.LISTEN, Op.CONNECT, Op.ACCEPT, Op.SEND, Op.SHUTDOWN, Op.CLOSE,
    Op.SETSOCKOPT, Op.GETSOCKOPT, Op.GETSOCKNAME, Op.GETPEERNAME,
})


class AttachError(RuntimeError):
    """The CoreEngine refused the attach, or could not be reached."""


@dataclasses.dataclass(frozen=True)
class Call:
    """One NQE the CoreEngine sent, with the queue set and ring it was read from."""

    nqe: NQE
    qset: int
    ring: dev.RingId

    @property
    def op(self) -> int:
        return self.nqe.op

    @property
    def reply_ring(self) -> dev.RingId:
        return REPLY_RING[self.ring]


@dataclasses.dataclass(frozen=True)
class Ticket:
    """Where an output will sit once published: ring ``ring`` of ``qset``, index ``index``."""

    qset: int
    ring: dev.RingId
    index: int


class Stack(Protocol):
    """What a network stack gives ServiceLib (the kernel-stack NSM is one)."""

    def call(self, call: Call, area: TenantArea) -> None:
        """Execute a socket call of the tenant owning ``area``; answer with ServiceLib.reply."""

    def tenant_unmapped(self, vm_id: int) -> None:
        """Close every socket of ``vm_id`` at once, answering nothing (TENANT_UNMAP)."""

    def buffers_returned(self, vm_id: int, returned: list[tuple[object, int]]) -> None:
        """Receive buffers came back, as ``(owner, bytes)``: reading may resume (BUF-7)."""


class TenantArea:
    """One tenant's data area, mapped by the NSM, and the receive slice it was granted.

    Offsets are those of NQEs (NQE-6). :meth:`address` turns a checked span
    into a virtual address the kernel reads or writes in place; :meth:`lend`
    and :meth:`take_back` run the receive slice (BUF-4, BUF-7) with the
    reference allocator (:class:`netkernel.reference.bufpool.ReceiveAllocator`).
    """

    def __init__(self, vm_id: int, dmap: shm.DeviceMap, grant: bufpool.Span) -> None:
        if dmap.geo.kind is not dev.Kind.TENANT:
            raise dev.DeviceError(f"{dmap.path} is not a tenant device")
        self.vm_id = vm_id
        self.dmap = dmap
        self.geo = dmap.geo
        self.grant = grant
        self.pool = bufpool.ReceiveAllocator(self.geo, grant)  # BufError for a bad slice
        self._data = dmap.base + self.geo.data_offset
        self._send = bufpool.half_bounds(self.geo, bufpool.Half.SEND)
        self._lent: dict[int, tuple[object, int]] = {}  # offset -> (owner, size named in EV_DATA)

    def address(self, offset: int, size: int) -> int | None:
        """Virtual address of a call's buffer, or None if it is not inside the send half.

        A size of 0 names no buffer (NQE-6): its address is 0, the NULL the
        kernel gets. Calls name send-half buffers only (NQE-6); the caller
        answers None with -EFAULT (NQE-14).
        """
        if size == 0:
            return 0
        if not bufpool.within(self._send, offset, size):
            return None
        return self._data + offset

    def view(self, offset: int, size: int) -> memoryview:
        """The bytes of a span of the data area (checked against the whole area)."""
        if not bufpool.within(bufpool.Span(0, self.geo.data_size), offset, size):
            raise bufpool.BufError(f"span ({offset:#x}, {size}) outside the data area",
                                   errno=errno.EFAULT)
        return self.dmap.data()[offset:offset + size]

    def lend(self, size: int, owner: object) -> tuple[int, int] | None:
        """Allocate a receive buffer of ``size`` bytes for ``owner``: (offset, address) or None.

        None when no run of free granules fits (BUF-7): the caller stops
        reading. ``size`` larger than the slice is clamped by the caller.
        """
        span = self.pool.alloc(size)
        if span is None:
            return None
        self._lent[span.offset] = (owner, 0)
        return span.offset, self._data + span.offset

    def named(self, offset: int, size: int) -> None:
        """Record the size an EV_DATA named for the buffer at ``offset`` (BUF-4)."""
        owner, _ = self._lent[offset]
        self._lent[offset] = (owner, size)

    def take_back(self, offset: int, size: int) -> tuple[object, int]:
        """A BUF_RETURN (or an unsent buffer): free it; returns (owner, bytes freed).

        BufError EFAULT outside the slice, EINVAL unless exactly a lent buffer
        as its EV_DATA named it (BUF-5, BUF-6).
        """
        if size == 0 or not bufpool.within(self.grant, offset, size):
            raise bufpool.BufError(f"({offset:#x}, {size}) is not inside the slice {self.grant}",
                                   errno=errno.EFAULT)
        lent = self._lent.get(offset)
        if lent is None or lent[1] != size:
            raise bufpool.BufError(f"no buffer ({offset:#x}, {size}) is lent", errno=errno.EINVAL)
        span = self.pool.free(offset)
        del self._lent[offset]
        return lent[0], span.size

    def unsend(self, offset: int) -> None:
        """Free a buffer allocated but never named in an EV_DATA (nothing was read into it)."""
        self.pool.free(offset)
        del self._lent[offset]

    def close(self) -> None:
        self.dmap.close()


class ServiceLib:
    """The NSM's device driver: one NSM device, the tenants it serves, the CoreEngine link.

    Use :meth:`attach` in an NSM process; tests build one on a device file
    they created (``ServiceLib(shm.open_device(path), runtime)``) and play
    the CoreEngine themselves.
    """

    def __init__(self, dmap: shm.DeviceMap, runtime: Path, *,
                 control: socket.socket | None = None, nsm_id: int = 0) -> None:
        if dmap.geo.kind is not dev.Kind.NSM:
            raise dev.DeviceError(f"{dmap.path} is not an NSM device")
        self.dmap = dmap
        self.runtime = runtime
        self.control = control
        self.nsm_id = nsm_id
        self.geo = dmap.geo
        qsets = range(self.geo.n_qsets)
        self._in = [(q, r, dmap.ring(q, r)) for q in qsets for r in CALL_RINGS]
        self._out = {(q, r): dmap.ring(q, r) for q in qsets for r in REPLY_RING.values()}
        self._outbox: dict[tuple[int, dev.RingId], collections.deque[bytes]] = {
            k: collections.deque() for k in self._out}
        self._device_bells = [dmap.bell(q, dev.Bell.DEVICE) for q in qsets]
        self._engine_bells = [dmap.bell(q, dev.Bell.ENGINE) for q in qsets]
        self._held: list[tuple[Ticket, Call, int, int | None]] = []  # replies after a ticket
        self.tenants: dict[int, TenantArea] = {}
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    # -- attach ------------------------------------------------------------------------
    @classmethod
    def attach(cls, runtime: Path, *, name: str = "kernel",
               timeout: float = ATTACH_TIMEOUT) -> ServiceLib:
        """Hotplug into the CoreEngine at ``runtime/engine.sock`` and map the NSM device.

        The connection stays open for the device's lifetime: its EOF is how
        the CoreEngine learns that this NSM is gone, and how the NSM learns
        that the CoreEngine is (:meth:`control_lost`).
        """
        ctl, dmap, nsm_id = connect_nsm(runtime, name=name, timeout=timeout)
        ctl.setblocking(False)
        log.info("attached as NSM %s, device %s", nsm_id, dmap.path)
        return cls(dmap, runtime, control=ctl, nsm_id=nsm_id)

    def control_lost(self) -> bool:
        """Read the control connection: True once the CoreEngine has gone (EOF or error)."""
        if self.control is None:
            return False
        try:
            while True:
                data = self.control.recv(4096)
                if not data:
                    return True
                log.debug("ignoring %d bytes from the CoreEngine", len(data))
        except BlockingIOError:
            return False
        except OSError:
            return True

    # -- calls in ------------------------------------------------------------------------
    def poll(self, stack: Stack, limit: int = BATCH) -> int:
        """Take up to ``limit`` NQEs from every incoming ring and act on them; returns how many."""
        done = 0
        for qset, ring_id, ring in self._in:
            for raw in ring.pop_many(limit):
                done += 1
                self._dispatch(raw, qset, ring_id, stack)
        return done

    def _dispatch(self, raw: bytes, qset: int, ring_id: dev.RingId, stack: Stack) -> None:
        self.counters["nqe_in"] += 1
        try:
            nqe = unpack(raw)
        except NQEError as exc:
            self._malformed(raw, qset, ring_id, exc)
            return
        call = Call(nqe, qset, ring_id)
        if nqe.is_reply or nqe.op in _EVENTS:
            self.counters["dropped"] += 1  # NQE-10: replies and events are never answered
            log.warning("dropping %s from the CoreEngine", nqe)
            return
        handler = _CONTROL.get(nqe.op)
        if handler is not None:
            handler(self, call, stack)
        elif nqe.op in SOCKET_CALLS:
            area = self.tenants.get(nqe.vm_id)
            if area is None:
                self.reply(call, -errno.EFAULT)  # no area mapped: no buffer can be inside it
                return
            try:
                stack.call(call, area)
            except Exception:  # a bug in the stack must not take every tenant down
                self.counters["errors"] += 1
                log.exception("%s failed", call.nqe)
                self.reply(call, -errno.EIO)
        else:
            self.reply(call, -errno.EINVAL)  # ATTACH, DETACH: not an NSM's to answer

    def _malformed(self, raw: bytes, qset: int, ring_id: dev.RingId, exc: NQEError) -> None:
        """NQE-10, NQE-11, NQE-12: answer a malformed request, drop a malformed reply."""
        self.counters["malformed"] += 1
        if exc.field == "length":
            return
        c = unpack_unchecked(raw)
        if c.op & 0x80 or c.op in _EVENTS:
            return
        bare = NQE(op=c.op, qset=c.qset, vm_id=c.vm_id, sock_id=c.sock_id, op_data=0,
                   data_ptr=c.data_ptr, size=c.size, tag=c.tag)
        self._enqueue(qset, REPLY_RING[ring_id], bare.reply(-exc.errno))

    # -- control ops ---------------------------------------------------------------------
    def _tenant_map(self, call: Call, stack: Stack) -> None:
        """TENANT_MAP: map vm-<id>.nk and take the granted slice (BUF-8)."""
        nqe = call.nqe
        vm_id = nqe.op_data
        grant = bufpool.Span(nqe.data_ptr, nqe.size)
        old = self.tenants.get(vm_id)
        if old is not None:
            self.reply(call, 0 if old.grant == grant else -errno.EEXIST)
            return
        if not 0 < vm_id <= 0xFF:
            self.reply(call, -errno.EINVAL)
            return
        path = self.runtime / f"{shm.PREFIX[dev.Kind.TENANT]}-{vm_id}{shm.DEVICE_SUFFIX}"
        try:
            dmap = shm.open_device(path)
        except OSError as exc:
            self.reply(call, -(exc.errno or errno.EIO))
            return
        except dev.DeviceError:
            self.reply(call, -errno.EINVAL)
            return
        try:
            self.tenants[vm_id] = TenantArea(vm_id, dmap, grant)
        except (bufpool.BufError, dev.DeviceError) as exc:
            dmap.close()
            self.reply(call, -getattr(exc, "errno", errno.EINVAL))
            return
        log.info("mapped tenant %d, slice %s", vm_id, grant)
        self.reply(call, 0)

    def _tenant_unmap(self, call: Call, stack: Stack) -> None:
        """TENANT_UNMAP: the stack closes the tenant's sockets, then the area goes."""
        vm_id = call.nqe.op_data
        self.forget_tenant(vm_id, stack)
        self.reply(call, 0)

    def forget_tenant(self, vm_id: int, stack: Stack) -> None:
        """Close every socket of ``vm_id``, drop its queued outputs, unmap its area."""
        stack.tenant_unmapped(vm_id)
        for box in self._outbox.values():
            keep = [raw for raw in box if raw[2] != vm_id]  # byte 2 is vm_id (NQE-2)
            box.clear()
            box.extend(keep)
        self._held = [h for h in self._held if h[1].nqe.vm_id != vm_id]
        area = self.tenants.pop(vm_id, None)
        if area is not None:
            area.close()
            log.info("unmapped tenant %d", vm_id)

    def _buf_return(self, call: Call, stack: Stack) -> None:
        """BUF_RETURN: a receive buffer is the NSM's again (BUF-4, BUF-5); reading may resume."""
        nqe = call.nqe
        area = self.tenants.get(nqe.vm_id)
        if area is None:
            self.reply(call, -errno.EFAULT)
            return
        try:
            returned = area.take_back(nqe.data_ptr, nqe.size)
        except bufpool.BufError as exc:
            self.reply(call, -exc.errno)
            return
        self.counters["buf_return"] += 1
        stack.buffers_returned(nqe.vm_id, [returned])

    # -- outputs -------------------------------------------------------------------------
    def reply(self, call: Call, result: int, *, size: int | None = None) -> Ticket:
        """Answer ``call`` with ``result`` (>= 0, or -errno) on its reply ring (NQE-8, NQE-13)."""
        return self._enqueue(call.qset, call.reply_ring, call.nqe.reply(result, size=size))

    def reply_after(self, ticket: Ticket, call: Call, result: int,
                    *, size: int | None = None) -> None:
        """Answer ``call`` once the CoreEngine has read the output ``ticket`` names."""
        if self.consumed(ticket):
            self.reply(call, result, size=size)
        else:
            self._held.append((ticket, call, result, size))

    def event(self, qset: int, vm_id: int, sock_id: int, op: Op, op_data: int = 0,
              data_ptr: int = 0, size: int = 0) -> Ticket:
        """Publish an event of a socket on the SEND ring of its queue set (NQE-16)."""
        nqe = NQE(op=int(op), qset=qset, vm_id=vm_id, sock_id=sock_id,
                  op_data=encode_result(op_data), data_ptr=data_ptr, size=size)
        return self._enqueue(qset, EVENT_RING, nqe)

    def last_ticket(self, qset: int, ring: dev.RingId) -> Ticket:
        """The ticket of the newest output queued for ``ring`` (published or not)."""
        box = self._outbox[(qset, ring)]
        return Ticket(qset, ring, (self._out[(qset, ring)].tail + len(box)) % U32)

    def _enqueue(self, qset: int, ring: dev.RingId, nqe: NQE) -> Ticket:
        box = self._outbox[(qset, ring)]
        box.append(pack(nqe))
        self.counters["nqe_out"] += 1
        return Ticket(qset, ring, (self._out[(qset, ring)].tail + len(box)) % U32)

    def consumed(self, ticket: Ticket) -> bool:
        """True once the CoreEngine has read the output ``ticket`` names (RING-3 arithmetic)."""
        head = self._out[(ticket.qset, ticket.ring)].head
        return (head - ticket.index) % U32 < HALF

    def flush(self) -> bool:
        """Publish queued outputs, ring the CoreEngine's bells; True when nothing is left.

        A full ring keeps the rest queued, in order (RING-4); replies held
        for a ticket are released once it is consumed.
        """
        if self._held:
            waiting = []
            for item in self._held:
                ticket, call, result, size = item
                if self.consumed(ticket):
                    self.reply(call, result, size=size)
                else:
                    waiting.append(item)
            self._held = waiting
        empty = True
        for (qset, ring_id), box in self._outbox.items():
            if not box:
                continue
            ring = self._out[(qset, ring_id)]
            n = ring.push_many(list(box) if len(box) <= ring.entries else
                               [box[i] for i in range(ring.entries)])
            for _ in range(n):
                box.popleft()
            if n:
                bells.notify(ring, self._engine_bells[qset])
            empty = empty and not box
        return empty and not self._held

    def pending_outputs(self) -> int:
        """Outputs queued and not yet published, plus replies held for a ticket."""
        return sum(len(b) for b in self._outbox.values()) + len(self._held)

    # -- sleeping ------------------------------------------------------------------------
    def start_watcher(self) -> None:
        """Start the thread that turns DEVICE bell rings into readability of :attr:`wake_fd`.

        The NSM sleeps in its selector (sockets and bells at once); the
        thread sleeps on the bells with futex (DEV-9) and writes the eventfd
        whenever a bell word changed since it last looked.
        """
        if self._watcher is not None:
            return
        self._watching.set()
        self._watcher = threading.Thread(target=self._watch, name="nsm-bells", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        seen = [b.value() for b in self._device_bells]
        while self._watching.is_set():
            now = [b.value() for b in self._device_bells]
            if now != seen:
                seen = now
                self.counters["bell_wakeups"] += 1  # only this thread writes this key
                os.eventfd_write(self.wake_fd, 1)
            try:
                if len(now) == 1:
                    self._device_bells[0].wait(now[0], bells.MAX_SLEEP)
                else:
                    bells.wait_any(list(zip(self._device_bells, now, strict=True)),
                                   bells.MAX_SLEEP)
            except OSError:  # the device was unmapped under us: we are closing
                return

    def drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake_fd)

    def prepare_sleep(self) -> bool:
        """Set NEED_WAKEUP on every incoming ring; False if one has work (RING-6).

        Always pair with :meth:`finish_sleep`.
        """
        return all(ring.prepare_sleep() for _, _, ring in self._in)

    def finish_sleep(self) -> None:
        for _, _, ring in self._in:
            ring.finish_sleep()  # RING-11

    # -- teardown ------------------------------------------------------------------------
    def close(self, stack: Stack | None = None) -> None:
        """Close every tenant's sockets (if ``stack``), unmap everything, detach."""
        self._watching.clear()
        if self._watcher is not None:
            self._watcher.join(timeout=2 * bells.MAX_SLEEP + 1)
            self._watcher = None
        for vm_id in list(self.tenants):
            if stack is not None:
                stack.tenant_unmapped(vm_id)
            self.tenants.pop(vm_id).close()
        if self.control is not None:
            self.control.close()
            self.control = None
        self.dmap.close()
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1


_EVENTS: Final = frozenset({Op.EV_DATA, Op.EV_FIN, Op.EV_ERROR, Op.EV_ACCEPTABLE})
#: Control ops ServiceLib answers itself (spec/nqe.md op table).
_CONTROL: Final[dict[int, Callable[[ServiceLib, Call, Stack], None]]] = {
    Op.TENANT_MAP: ServiceLib._tenant_map,
    Op.TENANT_UNMAP: ServiceLib._tenant_unmap,
    Op.BUF_RETURN: ServiceLib._buf_return,
}


def connect_nsm(runtime: Path, *, name: str = "kernel", timeout: float = ATTACH_TIMEOUT,
                ) -> tuple[socket.socket, shm.DeviceMap, int]:
    """The NSM's attach (RT-3): the control connection, the mapped NSM device, the NSM ID.

    One JSON line on ``runtime/engine.sock``; the answer names the device,
    which is mapped here. AttachError if the CoreEngine cannot be reached or
    refuses. The connection is left blocking, with ``timeout`` set.
    """
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        ctl.settimeout(timeout)
        ctl.connect(str(runtime / shm.ENGINE_SOCK))
        hello = {"cmd": "attach", "kind": "nsm", "pid": os.getpid(), "name": name}
        ctl.sendall(json.dumps(hello).encode() + b"\n")
        line = _read_line(ctl)
        answer = json.loads(line)
        if not isinstance(answer, dict) or not answer.get("ok"):
            raise AttachError(f"the CoreEngine refused the attach: {line.decode().strip()}")
        nsm_id = int(answer["id"])
        dmap = shm.open_device(Path(answer["path"]))
    except (OSError, ValueError, KeyError) as exc:
        ctl.close()
        raise AttachError(f"cannot attach to {runtime / shm.ENGINE_SOCK}: {exc}") from exc
    except BaseException:
        ctl.close()
        raise
    return ctl, dmap, nsm_id


def _read_line(sock: socket.socket) -> bytes:
    """One newline-terminated line (the attach answer); nothing after it is consumed."""
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AttachError("the CoreEngine closed the connection during attach")
        out += chunk
    return bytes(out)


def serve(lib: ServiceLib, step: Callable[[float], bool], stop: Callable[[], bool],
          *, spin: float = 50e-6) -> None:
    """Call ``step(timeout)`` until ``stop()``: spin a little, then sleep (RING-6, RING-7).

    ``step`` does one round of work, waiting up to ``timeout`` seconds for
    something to happen (a socket, or :attr:`ServiceLib.wake_fd`), and says
    whether it did any work. Before a sleeping round NEED_WAKEUP is set on
    every incoming ring, and cleared after it (RING-11); a ring that already
    has work turns the sleep into a poll. Sleeps are bounded by
    ``bell.MAX_SLEEP`` (RING-7), and kept short while outputs wait for room
    or for a ticket.
    """
    idle_since: float | None = None
    while not stop():
        if idle_since is None or time.monotonic() - idle_since < spin:
            worked = step(0.0)
        else:
            sleep = lib.prepare_sleep()
            try:
                timeout = bells.MAX_SLEEP if lib.pending_outputs() == 0 else 0.001
                worked = step(timeout if sleep else 0.0)
            finally:
                lib.finish_sleep()
        if worked:
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
