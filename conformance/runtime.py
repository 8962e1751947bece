"""Running instances for the runtime roles: CoreEngine and NSM processes, tenants the suite drives.

The runtime roles (spec/runtime.md, spec/nsm.md, spec/guestlib.md) are
processes talking over an instance's runtime directory, so their tests need
one running. This module holds what the suite needs for that, written from
the spec (it is the suite's own client of the control protocol, not the
reference's):

* :class:`Control` — one connection to ``engine.sock``, JSON lines each way
  (RT-2); :func:`control` for a one-shot request;
* :class:`Instance` — a runtime directory with a running CoreEngine and the
  NSMs started in it, each by a :class:`~netkernel.conformance.targets.Launcher`;
* :class:`RawTenant` — a tenant device the suite drives NQE by NQE through a
  real CoreEngine: it writes requests into its own JOB and SEND rings and reads
  replies and events from COMPLETION and RECEIVE;
* :class:`EngineDouble` — the suite in the CoreEngine's place for one NSM: it
  serves the NSM's attach, creates the devices, writes calls into the NSM's
  COMPLETION and RECEIVE rings and reads every reply and event, so what a real
  CoreEngine would mask (rings, tags, order across rings, bad buffers) shows.

Devices, rings, bells and the codec come from the reference: they are the
suite's tools here, not what is under test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from netkernel.conformance.targets import REFERENCE_PROCESSES, Launcher, Process
from netkernel.reference import bell, bufpool, shm
from netkernel.reference import device as dev
from netkernel.reference.nqe import NQE, Op, pack, unpack

DEFAULT_ROOT: Final = "/dev/shm/netkernel"  # RT-1
ENGINE_SOCK: Final = "engine.sock"
START_TIMEOUT: Final = 10.0
GRANULE: Final = 4096
#: Ops a tenant puts on SEND; every other request goes on JOB (DEV-8).
TENANT_SEND_OPS: Final = frozenset({Op.SEND, Op.BUF_RETURN})
#: Ops the CoreEngine puts on an NSM's RECEIVE ring; the other calls go on COMPLETION.
NSM_RECEIVE_OPS: Final = frozenset({Op.SEND, Op.BUF_RETURN, Op.TENANT_MAP, Op.TENANT_UNMAP})


def instance_dir(name: str) -> Path:
    """RT-1: ``<root>/<name>``, the root moved by ``NETKERNEL_ROOT``."""
    return Path(os.environ.get("NETKERNEL_ROOT", DEFAULT_ROOT)) / name


def unique_name(prefix: str = "conf") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(what: str, ready: Callable[[], Any], timeout: float = 5.0,
               poll: float = 0.005) -> Any:
    """``ready()``'s first truthy value; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(poll)


# -- the control protocol ---------------------------------------------------------------------



class Side:
    """One side of the comparison: a socket factory, a listener and a UDP peer."""

    def __init__(self, make: Callable[..., Any], family: int) -> None:
        self.make = make
        self.host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.listener = make(family, socket.SOCK_STREAM)
        self.listener.bind((self.host, 0))
        self.listener.listen(64)
        self.listener.settimeout(0.05)
        self.udp = make(family, socket.SOCK_DGRAM)
        self.udp.bind((self.host, 0))
        self.held: list[Any] = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            with contextlib.suppress(OSError):
                self.held.append(self.listener.accept()[0])

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        for s in [self.listener, self.udp, *self.held]:
            s.close()


def peer_sees(peer: socket.socket, timeout: float = 5) -> str:
    """How a Linux end sees its connection end: "reset" (ECONNRESET) or "eof"."""
    peer.settimeout(timeout)
    try:
        while peer.recv(1 << 16):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def closes_within(sock: socket.socket, timeout: float) -> bool:
    """True if the peer of ``sock`` closes the connection within ``timeout`` s (data is
    read and dropped meanwhile)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True

class Control:
    """One connection to an instance's ``engine.sock`` (RT-2): a JSON object per line each way."""

    def __init__(self, directory: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(directory / ENGINE_SOCK))
        except BaseException:
            self.sock.close()
            raise
        self._buf = b""

    def send_line(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def read_reply(self) -> Any:
        """The next reply line, decoded; ConnectionResetError on EOF."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the CoreEngine closed the control connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send_line(json.dumps(msg).encode() + b"\n")
        reply = self.read_reply()
        assert isinstance(reply, dict), f"RT-2: a reply is a JSON object, got {reply!r}"
        return reply

    def at_eof(self, timeout: float) -> bool:
        """True if the other side closes the connection within ``timeout`` s."""
        return closes_within(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


def control(directory: Path, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request on a fresh connection."""
    ctl = Control(directory, timeout)
    try:
        return ctl.request(msg)
    finally:
        ctl.close()


# -- instances ------------------------------------------------------------------------------------


class Instance:
    """A runtime directory with a CoreEngine process and the NSM processes started in it."""

    def __init__(self, engine: Launcher, logs: Path, name: str | None = None) -> None:
        self.name = name or unique_name()
        self.dir = instance_dir(self.name)
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.nsms: list[Process] = []
        self.engine = engine.start(self.name, logs / f"{self.name}-engine.log")
        try:
            wait_until("the CoreEngine answers on engine.sock", self._answers, START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if not self.engine.alive():
            raise AssertionError(f"the CoreEngine exited: {self.log_tail('engine')}")
        try:
            return bool(self.status().get("ok"))
        except OSError:
            return False

    def log_tail(self, which: str, lines: int = 20) -> str:
        path = self.logs / f"{self.name}-{which}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def status(self) -> dict[str, Any]:
        return control(self.dir, {"cmd": "status"})

    def nsm_ids(self) -> set[int]:
        return {int(n["id"]) for n in self.status()["nsms"]}

    def start_nsm(self, launcher: Launcher, timeout: float = START_TIMEOUT) -> Process:
        """Start an NSM and wait until the CoreEngine lists a new NSM (RT-3)."""
        before = self.nsm_ids()
        which = f"nsm{len(self.nsms)}"
        proc = launcher.start(self.name, self.logs / f"{self.name}-{which}.log")
        self.nsms.append(proc)

        def attached() -> set[int]:
            if not proc.alive():
                raise AssertionError(f"the NSM exited with {proc.popen.returncode}:\n"
                                     f"{self.log_tail(which)}")
            return self.nsm_ids() - before

        wait_until("the NSM attaches", attached, timeout)
        return proc

    def stop(self) -> None:
        """Stop every process and remove the runtime directory."""
        for nsm in self.nsms:
            nsm.stop(2.0)
        with contextlib.suppress(OSError):
            control(self.dir, {"cmd": "shutdown"}, timeout=1.0)
        self.engine.stop(5.0)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- driving a device NQE by NQE ------------------------------------------------------------------


class Port:
    """One side of a device: the rings it produces on and consumes, in every queue set.

    Replies are kept by ``(sock_id, tag)`` with the queue set and ring they came
    on; events in arrival order; :attr:`seen` keeps everything read, in order.
    ``consume`` can stop reading a ring, to hold the other side's outputs back
    (NQE-16 order tests).
    """

    def __init__(self, dmap: shm.DeviceMap, produce: tuple[dev.RingId, dev.RingId],
                 consume: tuple[dev.RingId, dev.RingId], wake: dev.Bell) -> None:
        self.dmap = dmap
        qsets = range(dmap.geo.n_qsets)
        self.out = {(q, r): dmap.ring(q, r) for q in qsets for r in produce}
        self.inp = {(q, r): dmap.ring(q, r) for q in qsets for r in consume}
        self.wake = [dmap.bell(q, wake) for q in qsets]
        self.consume = dict.fromkeys(consume, True)
        self.replies: dict[tuple[int, int], tuple[dev.RingId, NQE]] = {}
        self.events: list[NQE] = []
        self.seen: list[tuple[dev.RingId, NQE]] = []  # everything read, in order
        self._tags = itertools.count(1)

    def tag(self) -> int:
        return next(self._tags) % 0xFFFF + 1

    def push_raw(self, raw: bytes, ring: dev.RingId, qset: int = 0,
                 timeout: float = 5.0) -> None:
        r = self.out[(qset, ring)]
        deadline = time.monotonic() + timeout
        while not r.push(raw):
            assert time.monotonic() < deadline, f"{ring.name} stayed full"
            self.pump()
            time.sleep(0.001)
        bell.notify(r, self.wake[qset])

    def pump(self) -> int:
        n = 0
        for (qset, ring_id), ring in self.inp.items():
            if not self.consume[ring_id]:
                continue
            for raw in ring.pop_many(256):
                n += 1
                nqe = unpack(raw)
                assert nqe.qset == qset, f"{nqe} read from queue set {qset}"
                self.seen.append((ring_id, nqe))
                if nqe.is_reply:
                    key = (nqe.sock_id, nqe.tag)
                    assert key not in self.replies, f"a second reply for {key}: {nqe}"
                    self.replies[key] = (ring_id, nqe)
                else:
                    self.events.append(nqe)
        return n

    def wait_reply(self, sock: int, tag: int, timeout: float = 5.0) -> tuple[dev.RingId, NQE]:
        def got() -> bool:
            self.pump()
            return (sock, tag) in self.replies
        wait_until(f"a reply to sock {sock} tag {tag}", got, timeout, 0.0005)
        return self.replies.pop((sock, tag))

    def has_reply(self, sock: int, tag: int) -> bool:
        self.pump()
        return (sock, tag) in self.replies

    def event(self, pred: Callable[[NQE], bool], timeout: float = 5.0) -> NQE:
        """Take the first event matching ``pred``, waiting for it."""
        found: list[NQE] = []

        def got() -> bool:
            self.pump()
            for i, ev in enumerate(self.events):
                if pred(ev):
                    found.append(self.events.pop(i))
                    return True
            return False
        wait_until(f"an event; have {self.events[:8]}", got, timeout, 0.0005)
        return found[0]

    def quiet(self, pred: Callable[[NQE], bool], seconds: float) -> bool:
        """True if no event matching ``pred`` arrives within ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump()
            if any(pred(ev) for ev in self.events):
                return False
            time.sleep(0.002)
        return True


class RawTenant(Port):
    """A tenant device attached to a real CoreEngine, driven by the suite NQE by NQE.

    It names its own socket IDs (:meth:`new_id`), allocates request buffers in
    its send half, and reads its replies and events itself; :meth:`close`
    hangs up ``engine.sock``, which detaches it (RT-4).
    """

    def __init__(self, directory: Path, name: str = "conformance-raw") -> None:
        self.ctl = Control(directory)
        try:
            self.attach_reply = self.ctl.request(
                {"cmd": "attach", "kind": "tenant", "pid": os.getpid(), "name": name})
            assert self.attach_reply.get("ok"), self.attach_reply
            self.id = int(self.attach_reply["id"])
            self.path = Path(self.attach_reply["path"])
            dmap = shm.open_device(self.path)
        except BaseException:
            self.ctl.close()
            raise
        super().__init__(dmap, (dev.RingId.JOB, dev.RingId.SEND),
                         (dev.RingId.COMPLETION, dev.RingId.RECEIVE), dev.Bell.ENGINE)
        self.geo = dmap.geo
        self.sendbufs = bufpool.SendAllocator(self.geo)
        self._bufs: dict[tuple[int, int], bufpool.Span] = {}
        self._ids = itertools.count(1)
        self.last_out = b""

    def new_id(self) -> int:
        return next(self._ids)

    def data(self) -> memoryview:
        return self.dmap.data()

    def post(self, op: Op, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
             out: int = 0, ptr: int | None = None, size: int | None = None,
             tag: int | None = None) -> tuple[int, int]:
        """Publish a request; ``data`` (and ``out`` bytes of room) in a fresh send buffer,
        or the raw ``ptr``/``size`` given. Returns ``(sock, tag)``."""
        tag = self.tag() if tag is None else tag
        if ptr is None:
            ptr = length = 0
            if data or out:
                length = max(len(data), out)
                span = self.sendbufs.alloc(length)
                assert span is not None, "the suite's send half is full"
                ptr = span.offset
                self.data()[ptr:ptr + len(data)] = data
                self._bufs[(sock, tag)] = span
            size = length if size is None else size
        ring = dev.RingId.SEND if op in TENANT_SEND_OPS else dev.RingId.JOB
        self.push_raw(pack(NQE(op=int(op), sock_id=sock, op_data=op_data & ((1 << 64) - 1),
                               data_ptr=ptr, size=size or 0, tag=tag)), ring)
        return sock, tag

    def reply(self, sock: int, tag: int, timeout: float = 5.0) -> NQE:
        """Wait for the reply to ``(sock, tag)``; its buffer's bytes go to :attr:`last_out`."""
        _, nqe = self.wait_reply(sock, tag, timeout)
        span = self._bufs.pop((sock, tag), None)
        if span is not None:
            n = max(0, min(nqe.result, nqe.size)) if nqe.result >= 0 else 0
            self.last_out = bytes(self.data()[span.offset:span.offset + n])
            self.sendbufs.free(span.offset)
        return nqe

    def call(self, op: Op, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
             out: int = 0, timeout: float = 5.0, **raw: Any) -> NQE:
        return self.reply(*self.post(op, sock, op_data, data, out=out, **raw), timeout=timeout)

    def do(self, op: Op, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
           out: int = 0, timeout: float = 5.0) -> int:
        """A request's signed result (NQE-13)."""
        return self.call(op, sock, op_data, data, out=out, timeout=timeout).result

    def payload(self, ev: NQE) -> bytes:
        return bytes(self.data()[ev.data_ptr:ev.data_ptr + ev.size])

    def buf_return(self, ev: NQE) -> None:
        """Give an EV_DATA buffer back (BUF-4)."""
        self.post(Op.BUF_RETURN, 0, ptr=ev.data_ptr, size=ev.size)

    def close(self) -> None:
        """Hang up engine.sock: the CoreEngine detaches the device (RT-4)."""
        self.ctl.close()
        self.dmap.close()

    def __enter__(self) -> RawTenant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineDouble:
    """The suite in the CoreEngine's place, for one NSM.

    It listens on ``engine.sock`` of a fresh runtime directory, answers the
    NSM's attach with an NSM device it created (RT-3), creates tenant devices
    ``vm-<id>.nk`` for TENANT_MAP, and plays the CoreEngine's side of the NSM
    device (:attr:`port`): calls in on COMPLETION/RECEIVE, replies and events
    out on JOB/SEND.
    """

    NSM_GEO: Final = dev.Geometry(kind=dev.Kind.NSM, n_qsets=2, ring_entries=64,
                                  data_size=2 * GRANULE,
                                  send_size=GRANULE, buf_size=GRANULE)
    TENANT_GEO: Final = dev.Geometry(kind=dev.Kind.TENANT, ring_entries=64,
                                     data_size=256 * GRANULE, send_size=128 * GRANULE,
                                     buf_size=GRANULE)

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name("double")
        self.dir = instance_dir(self.name)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(str(self.dir / ENGINE_SOCK))
        self.listener.listen(4)
        self.conn: socket.socket | None = None
        self.hello: dict[str, Any] = {}
        self.tenants: dict[int, shm.DeviceMap] = {}
        self.sendbufs: dict[int, bufpool.SendAllocator] = {}
        self._port: Port | None = None

    @property
    def port(self) -> Port:
        assert self._port is not None, "no NSM attached yet"
        return self._port

    def serve_attach(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Accept the NSM's connection, read its attach, answer with NSM device 1."""
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        conn.settimeout(timeout)
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            assert chunk, "the NSM hung up before its attach request"
            line += chunk
        self.conn = conn
        self.hello = json.loads(line)
        path = self.dir / "nsm-1.nk"
        dmap = shm.create_device(path, self.NSM_GEO, owner_pid=int(self.hello.get("pid", 0)),
                                 dev_id=1)
        dmap.set_header("state", dev.State.READY)
        self._port = Port(dmap, (dev.RingId.COMPLETION, dev.RingId.RECEIVE),
                          (dev.RingId.JOB, dev.RingId.SEND), dev.Bell.DEVICE)
        reply = {"ok": True, "id": 1, "kind": "nsm", "path": str(path)}
        conn.sendall(json.dumps(reply).encode() + b"\n")
        return self.hello

    def add_tenant(self, vm_id: int) -> shm.DeviceMap:
        dmap = shm.create_device(self.dir / f"vm-{vm_id}.nk", self.TENANT_GEO, dev_id=vm_id)
        dmap.set_header("state", dev.State.READY)
        self.tenants[vm_id] = dmap
        self.sendbufs[vm_id] = bufpool.SendAllocator(self.TENANT_GEO)
        return dmap

    def receive_half(self) -> bufpool.Span:
        g = self.TENANT_GEO
        return bufpool.Span(g.send_size, g.data_size - g.send_size)

    def post(self, op: Op, vm: int, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
             out: int = 0, ptr: int | None = None, size: int | None = None,
             tag: int | None = None, raw: bytes | None = None, qset: int = 0,
             ring: dev.RingId | None = None) -> tuple[int, int]:
        """Send the NSM a call on behalf of tenant ``vm`` (its VM ID stamped, CE-8), on
        the ring DEV-8 gives it unless ``ring`` says otherwise; ``raw`` bytes as they are."""
        port = self.port
        tag = port.tag() if tag is None else tag
        if ptr is None:
            ptr = length = 0
            if data or out:
                length = max(len(data), out)
                span = self.sendbufs[vm].alloc(length)
                assert span is not None
                ptr = span.offset
                self.tenants[vm].data()[ptr:ptr + len(data)] = data
            size = length if size is None else size
        if ring is None:
            ring = dev.RingId.RECEIVE if op in NSM_RECEIVE_OPS else dev.RingId.COMPLETION
        if raw is None:
            raw = pack(NQE(op=int(op), qset=qset, vm_id=vm, sock_id=sock,
                           op_data=op_data & ((1 << 64) - 1), data_ptr=ptr, size=size or 0,
                           tag=tag))
        port.push_raw(raw, ring, qset)
        return sock, tag

    def call(self, op: Op, vm: int, sock: int = 0, op_data: int = 0, data: bytes = b"", *,
             timeout: float = 5.0, **kw: Any) -> tuple[dev.RingId, NQE]:
        """A call and its reply, with the ring the reply came on."""
        return self.port.wait_reply(*self.post(op, vm, sock, op_data, data, **kw),
                                    timeout=timeout)

    def map_tenant(self, vm: int, grant: bufpool.Span | None = None) -> int:
        """TENANT_MAP for ``vm`` (creating its device), by default the whole receive half."""
        if vm not in self.tenants:
            self.add_tenant(vm)
        grant = grant or self.receive_half()
        _, rep = self.call(Op.TENANT_MAP, 0, 0, vm, ptr=grant.offset, size=grant.size, tag=vm)
        return rep.result

    def nsm_gone(self, timeout: float) -> bool:
        assert self.conn is not None
        return closes_within(self.conn, timeout)

    def close(self) -> None:
        """Hang up on the NSM (it is to exit, NSM-2) and remove the directory."""
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        for dmap in self.tenants.values():
            dmap.close()
        if self._port is not None:
            self._port.dmap.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the session's instances ------------------------------------------------------------------


def engine_launcher(target: Any) -> Launcher:
    """The target's running CoreEngine, else the reference's (infrastructure)."""
    role = target.roles.get("coreengine")
    process = getattr(role, "process", None) if role is not None else None
    return process if isinstance(process, Launcher) else REFERENCE_PROCESSES["coreengine"]


def nsm_launcher(target: Any) -> Launcher:
    """The target's NSM, else the reference's (infrastructure for GuestLib tests)."""
    role = target.roles.get("nsm")
    return role if isinstance(role, Launcher) else REFERENCE_PROCESSES["nsm"]


class Runtime:
    """The instances of one test session: a shared one, started on first use, and
    instances of a test's own (for tests that kill processes)."""

    def __init__(self, target: Any, logs: Path) -> None:
        self.engine = engine_launcher(target)
        self.nsm = nsm_launcher(target)
        self.logs = logs
        self._shared: Instance | None = None

    def shared(self) -> Instance:
        """A CoreEngine with one NSM, for every test that leaves it running."""
        if self._shared is None:
            inst = Instance(self.engine, self.logs)
            try:
                inst.start_nsm(self.nsm)
            except BaseException:
                inst.stop()
                raise
            self._shared = inst
        return self._shared

    def new(self, *, nsm: bool = True) -> Instance:
        """An instance of the caller's own; the caller stops it."""
        inst = Instance(self.engine, self.logs)
        if nsm:
            try:
                inst.start_nsm(self.nsm)
            except BaseException:
                inst.stop()
                raise
        return inst

    def close(self) -> None:
        if self._shared is not None:
            self._shared.stop()
            self._shared = None


# -- sockaddrs and option names as NQE buffers carry them (NQE-15) ---------------------

LOOP, LOOP6 = "127.0.0.1", "::1"
#: SOCKET's op_data: family | type << 16 (spec/nqe.md)
STREAM = socket.AF_INET | socket.SOCK_STREAM << 16
STREAM6 = socket.AF_INET6 | socket.SOCK_STREAM << 16
DGRAM = socket.AF_INET | socket.SOCK_DGRAM << 16


def sa4(host: str, port: int) -> bytes:
    """NQE-15: a Linux sockaddr_in."""
    return (struct.pack("<H", socket.AF_INET) + struct.pack(">H", port)
            + socket.inet_aton(host) + bytes(8))


def sa6(host: str, port: int) -> bytes:
    """NQE-15: a Linux sockaddr_in6."""
    return (struct.pack("<H", socket.AF_INET6) + struct.pack(">HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("<I", 0))


def parse_sa(raw: bytes) -> tuple[str, int]:
    """(host, port) of a sockaddr_in or sockaddr_in6."""
    family, port = struct.unpack_from("<H", raw)[0], struct.unpack_from(">H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntoa(raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def opt(level: int, name: int) -> int:
    """SETSOCKOPT/GETSOCKOPT ``op_data``: the level, and the option name above bit 32."""
    return level | name << 32


class HandedAgent:
    """A GuestLib agent on a device it is handed (spec/vm.md VM-3), as inside a guest.

    ``paths`` is a ``preload`` role's ``paths()`` (``.lib``, ``.agent``). The agent is
    told an instance that does not exist, so it has no engine.sock and no attach;
    ``NETKERNEL_DEVICE`` names the device (a file, ``pci``, or empty for the automatic
    choice). A pipe held open keeps it running while we use it, as ``netkernel run``
    does (PRE-1); :meth:`release` lets it leave once idle.
    """

    def __init__(self, paths: Any, device: str, tmp: Path, *,
                 env: dict[str, str] | None = None, idle_ms: int = 300) -> None:
        self.paths = paths
        self.socket = str(tmp / f"agent-{uuid.uuid4().hex[:6]}.sock")
        self.env = dict(os.environ, NETKERNEL_DEVICE=device, **(env or {}))
        self.env.pop("NETKERNEL_ROOT", None)
        self.env["NETKERNEL_INSTANCE"] = f"no-such-{uuid.uuid4().hex[:6]}"
        rd, wr = os.pipe()
        hold_r, self.hold_w = os.pipe()
        self.err = tmp / f"agent-{uuid.uuid4().hex[:6]}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [str(paths.agent), "--socket", self.socket, "--ready-fd", str(wr),
                 "--hold-fd", str(hold_r), "--idle-ms", str(idle_ms), "--name", "guest"],
                pass_fds=[wr, hold_r], env=self.env, stdin=subprocess.DEVNULL, stderr=err)
        os.close(wr)
        os.close(hold_r)
        ready, _, _ = select.select([rd], [], [], 10)
        self.ready = bool(ready) and os.read(rd, 1) == b"\x01"
        os.close(rd)
        # what a preloaded program of this agent runs with (spec/preload.md)
        self.prog_env = dict(self.env, LD_PRELOAD=str(paths.lib), NETKERNEL_AGENT=self.socket,
                             NETKERNEL_PRELOAD=str(paths.lib),
                             NETKERNEL_AGENT_BIN=str(paths.agent))

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def popen(self, code: str, *args: str) -> subprocess.Popen[str]:
        """A preloaded Python program of this agent, running ``code``."""
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                                env=self.prog_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, argv: list[str], timeout: float = 60) -> str:
        """Run ``argv`` preloaded on this agent; its stdout (AssertionError if it failed)."""
        proc = subprocess.run(argv, env=self.prog_env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{argv[0]} exit {proc.returncode}:\n{proc.stderr}" \
                                     f"\nagent:\n{self.stderr()}"
        return proc.stdout

    def release(self) -> None:
        """We are done: the agent may leave once idle (PRE-1)."""
        if self.hold_w >= 0:
            os.close(self.hold_w)
            self.hold_w = -1

    def close(self) -> int | None:
        """Release, then end the agent (SIGTERM, SIGKILL after 10 s); its exit status."""
        self.release()
        return Process(self.proc, self.proc.args).stop(10)


@contextlib.contextmanager
def handed(paths: Any, device: str | Path, tmp: Path, **kw: Any) -> Iterator[HandedAgent]:
    """A :class:`HandedAgent` that started (AssertionError with its stderr if not)."""
    agent = HandedAgent(paths, str(device), tmp, **kw)
    try:
        assert agent.ready, f"the agent did not start:\n{agent.stderr()}"
        yield agent
    finally:
        agent.close()
