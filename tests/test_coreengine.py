"""The CoreEngine process (reference/coreengine.py): control socket, hotplug, switching.

The CoreEngine runs as its own process; the tenant is this test process and
the NSM is ``FAKE_NSM``, a small separate process that plays an NSM directly
on its device's rings (answers calls, sends events), released step by step
through its stdin so the tests can fill the CoreEngine's destination rings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netkernel.reference import bell, coreengine, shm
from netkernel.reference import device as dev
from netkernel.reference.nqe import NQE, REPLY_BIT, Op, pack, unpack

DEADLINE = 10.0
TENANT_RING = 64  # tenant rings (and so its in-flight quota, SEC-5)
NSM_RING = 4  # NSM rings: small, so the CoreEngine's path to the NSM fills up


def _until(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@dataclasses.dataclass
class Instance:
    name: str
    ce: subprocess.Popen[bytes]

    def status(self) -> dict[str, Any]:
        return coreengine.request({"cmd": "status"}, self.name)

    @property
    def dir(self) -> Path:
        return shm.instance_dir(self.name)


def start_engine(module: str, name: str, log: Path, *args: str,
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m MODULE --instance NAME ARGS`` (a CoreEngine, stderr appended to ``log``),
    once it answers on engine.sock; the fast path's tests start theirs with it too."""
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, "--instance", name, *args],
                                stdin=subprocess.DEVNULL, stderr=err,
                                env=None if env is None else {**os.environ, **env})
    _until(f"{module} to answer on engine.sock", lambda: _answers(name) or
           proc.poll() is not None)
    assert proc.poll() is None, log.read_text()
    return proc


def stop_engine(proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
    """SIGTERM (SIGKILL after 5 s), remove the instance's files, and print the log."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shm.remove_instance(name)
    sys.stderr.write(log.read_text())  # shown if the test failed


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Instance]:
    """A CoreEngine process on a fresh instance; killed and cleaned up afterwards."""
    name = f"t-ce-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "engine.log"  # read by pytest's report on failure
    ce = start_engine("netkernel.reference.coreengine", name, log, "--ring-entries",
                      str(TENANT_RING), "--nsm-ring-entries", str(NSM_RING))
    try:
        yield Instance(name, ce)
    finally:
        stop_engine(ce, name, log)


def _answers(name: str) -> bool:
    try:
        coreengine.request({"cmd": "status"}, name, timeout=0.5)
    except OSError:
        return False
    return True


def _raw(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    s.connect(str(shm.engine_socket(name)))
    return s


def _ask(s: socket.socket, line: bytes) -> dict[str, Any]:
    s.sendall(line + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        assert chunk, "the CoreEngine hung up"
        buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


# -- control: attach, detach, status, refusals ------------------------------------------


def test_attach_creates_a_ready_device_and_eof_detaches_it(inst: Instance) -> None:
    t = coreengine.attach("tenant", "t1", inst.name)
    n = coreengine.attach("nsm", "n1", inst.name)
    assert (t.id, t.path) == (1, inst.dir / "vm-1.nk")
    assert (n.id, n.path) == (1, inst.dir / "nsm-1.nk")
    assert t.dmap.state is dev.State.READY and t.dmap.header("dev_id") == 1
    assert t.dmap.header("owner_pid") == os.getpid()
    assert t.dmap.geo.kind is dev.Kind.TENANT and t.dmap.geo.ring_entries == TENANT_RING
    assert n.dmap.geo.kind is dev.Kind.NSM and n.dmap.geo.ring_entries == NSM_RING
    t2 = coreengine.attach("tenant", "t2", inst.name)
    assert t2.id == 2

    st = inst.status()
    assert [(d["id"], d["name"], d["pid"]) for d in st["tenants"]] == [
        (1, "t1", os.getpid()), (2, "t2", os.getpid())]
    assert [d["name"] for d in st["nsms"]] == ["n1"]

    t.close()  # EOF on the control connection = detach
    _until("vm-1.nk removed", lambda: not (inst.dir / "vm-1.nk").exists())
    assert [d["id"] for d in inst.status()["tenants"]] == [2]
    again = coreengine.attach("tenant", "t3", inst.name)
    assert again.id == 1  # the lowest free VM ID is reused
    for a in (n, t2, again):
        a.close()
    _until("every device file removed", lambda: not list(inst.dir.glob("*.nk")))


def test_killed_client_detaches_its_device(inst: Instance) -> None:
    code = textwrap.dedent(f"""
        from netkernel.reference import coreengine
        a = coreengine.attach("tenant", "doomed", {inst.name!r})
        print(a.path, flush=True)
        import time; time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
        assert path.exists()
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        _until("the device file to go", lambda: not path.exists(), timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert inst.status()["tenants"] == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("line", "error"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"cmd": "fly"}', "unknown cmd 'fly'"),
    (b'{"cmd": "attach", "kind": "vm", "pid": 1}', "kind must be one of ['nsm', 'tenant']"),
    (b'{"cmd": "attach", "kind": "tenant"}', "pid must be a positive integer, got None"),
    (b'{"cmd": "attach", "kind": "tenant", "pid": -4}', "pid must be a positive integer"),
    (b'{"cmd": "attach", "kind": "tenant", "pid": true}', "pid must be a positive integer"),
    (b'{"cmd": "attach", "kind": "nsm", "pid": 9, "name": 7}', "name must be a string"),
])
def test_bad_requests_get_a_clear_json_error(inst: Instance, line: bytes, error: str) -> None:
    with _raw(inst.name) as s:
        reply = _ask(s, line)
        assert reply["ok"] is False and error in reply["error"]
        assert _ask(s, b'{"cmd": "status"}')["ok"] is True  # the connection stays usable
    assert not list(inst.dir.glob("*.nk"))


def test_one_device_per_connection(inst: Instance) -> None:
    with _raw(inst.name) as s:
        first = _ask(s, b'{"cmd": "attach", "kind": "tenant", "pid": %d}' % os.getpid())
        assert first["ok"] and Path(first["path"]).exists()
        second = _ask(s, b'{"cmd": "attach", "kind": "nsm", "pid": %d}' % os.getpid())
        assert second["ok"] is False and "already holds device 1" in second["error"]
    _until("detach on close", lambda: not Path(first["path"]).exists())


def test_status_json(inst: Instance) -> None:
    with coreengine.attach("tenant", "web", inst.name) as _t:
        st = inst.status()
    assert st["ok"] is True and st["instance"] == inst.name and st["pid"] == inst.ce.pid
    assert st["dir"] == str(inst.dir) and st["uptime"] >= 0
    assert st["sockets"] == 0 and st["nsms"] == [] and st["pending"] == 0
    (t,) = st["tenants"]
    assert (t["id"], t["name"], t["sockets"], t["attached"]) == (1, "web", 0, True)
    assert t["path"] == str(inst.dir / "vm-1.nk")
    assert set(t["counters"]) >= {"nqes_in", "nqes_out", "bytes_in", "bytes_out", "rejected"}
    json.dumps(st)  # plain JSON all the way down


def test_shutdown_detaches_everything_and_exits(inst: Instance) -> None:
    t = coreengine.attach("tenant", "", inst.name)
    assert coreengine.request({"cmd": "shutdown"}, inst.name) == {"ok": True}
    assert inst.ce.wait(timeout=5) == 0
    assert t.conn.recv(1) == b""  # hung up on
    assert not t.path.exists() and not (inst.dir / "engine.sock").exists()
    t.close()


# -- switching between a tenant and a (fake) NSM -------------------------------------------

FAKE_NSM = r"""
import collections, os, select, sys
from netkernel.reference import bell, coreengine, device as dev
from netkernel.reference.nqe import NQE, Op, pack, unpack

a = coreengine.attach("nsm", "fake", sys.argv[1])
buf_size = int(sys.argv[2])  # the tenant's receive buffer granule
m = a.dmap
ins = [(r, m.ring(0, r)) for r in (dev.RingId.COMPLETION, dev.RingId.RECEIVE)]
reply_ring = {dev.RingId.COMPLETION: dev.RingId.JOB, dev.RingId.RECEIVE: dev.RingId.SEND}
outs = {r: m.ring(0, r) for r in (dev.RingId.JOB, dev.RingId.SEND)}
outbox = {r: collections.deque() for r in outs}
engine_bell = m.bell(0, dev.Bell.ENGINE)
allow, grant, sock, log, pending = 0, None, None, [], b""
print("ready", a.id, flush=True)
while True:
    lines = []
    if select.select([0], [], [], 0.001)[0]:
        data = os.read(0, 4096)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
    for line in lines:
        cmd, _, arg = line.decode().partition(" ")
        if cmd == "allow":
            allow += int(arg)
        elif cmd == "events":  # EV_DATA on the last socket, one receive buffer each
            for i in range(int(arg)):
                off = grant[0] + i * buf_size
                outbox[dev.RingId.SEND].append(pack(NQE(
                    op=Op.EV_DATA, sock_id=sock, data_ptr=off, size=100 + i)))
        elif cmd == "log":
            print(" ".join(log), flush=True)
    for ring_id, ring in ins:
        for raw in ring.pop_many(min(allow, 64)):
            allow -= 1
            n = unpack(raw)
            log.append(f"{Op(n.op).name}:{n.tag}")
            result = 0
            if n.op == Op.TENANT_MAP:
                grant = (n.data_ptr, n.size)
            elif n.op == Op.SOCKET:
                sock = n.sock_id
            elif n.op == Op.SEND:
                result = n.size
            outbox[reply_ring[ring_id]].append(pack(n.reply(result)))
    for ring_id, q in outbox.items():
        sent = outs[ring_id].push_many(list(q)[:64])
        for _ in range(sent):
            q.popleft()
        if sent:
            bell.notify(outs[ring_id], engine_bell)
"""


@dataclasses.dataclass
class FakeNsm:
    proc: subprocess.Popen[str]
    id: int

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def log(self) -> list[str]:
        self.tell("log")
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        assert ready, "the fake NSM did not answer"
        return self.proc.stdout.readline().split()


@contextlib.contextmanager
def running_fake_nsm(instance: str) -> Iterator[FakeNsm]:
    """:data:`FAKE_NSM` attached to ``instance``, killed on the way out."""
    buf_size = str(coreengine.GEOMETRY[dev.Kind.TENANT].buf_size)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_NSM, instance, buf_size], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        word, nsm_id = proc.stdout.readline().split()
        assert word == "ready"
        yield FakeNsm(proc, int(nsm_id))
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def fake_nsm(inst: Instance) -> Iterator[FakeNsm]:
    with running_fake_nsm(inst.name) as fake:
        yield fake


class Tenant:
    """This test process as a tenant, driving its device's rings directly."""

    def __init__(self, instance: str) -> None:
        self.a = coreengine.attach("tenant", "test", instance)
        m = self.a.dmap
        self.geo = m.geo
        self.rings = {r: m.ring(0, r) for r in dev.RingId}
        self.engine_bell = m.bell(0, dev.Bell.ENGINE)
        self.device_bell = m.bell(0, dev.Bell.DEVICE)

    def push(self, ring: dev.RingId, *nqes: NQE) -> None:
        assert self.rings[ring].push_many([pack(n) for n in nqes]) == len(nqes)
        bell.notify(self.rings[ring], self.engine_bell)

    def take(self, ring: dev.RingId, count: int) -> list[NQE]:
        got: list[NQE] = []
        deadline = time.monotonic() + DEADLINE
        while len(got) < count:
            batch = self.rings[ring].pop_many(count - len(got))
            got += [unpack(raw) for raw in batch]
            if not batch:
                assert time.monotonic() < deadline, f"got {len(got)} of {count} from {ring.name}"
                bell.sleep_until_work(self.device_bell, [self.rings[ring]], 0.01)
        return got

    def close(self) -> None:
        self.a.close()


@pytest.fixture
def tenant(inst: Instance) -> Iterator[Tenant]:
    t = Tenant(inst.name)
    yield t
    t.close()


def _open_socket(tenant: Tenant, fake: FakeNsm, sock_id: int = 7) -> None:
    fake.tell("allow 2")  # TENANT_MAP, then the SOCKET itself
    tenant.push(dev.RingId.JOB, NQE(op=Op.SOCKET, sock_id=sock_id, op_data=2 | 1 << 16, tag=1))
    (reply,) = tenant.take(dev.RingId.COMPLETION, 1)
    assert (reply.op, reply.result, reply.sock_id, reply.tag) == (
        Op.SOCKET | REPLY_BIT, 0, sock_id, 1)


def test_calls_cross_to_the_nsm_and_replies_come_back(inst: Instance, tenant: Tenant,
                                                       fake_nsm: FakeNsm) -> None:
    _open_socket(tenant, fake_nsm)
    assert fake_nsm.log() == ["TENANT_MAP:1", "SOCKET:1"]
    st = inst.status()
    assert st["sockets"] == 1 and st["tenants"][0]["sockets"] == 1
    fake_nsm.tell("allow 1")
    tenant.push(dev.RingId.SEND, NQE(op=Op.SEND, sock_id=7, data_ptr=0, size=300, tag=9))
    (r,) = tenant.take(dev.RingId.COMPLETION, 1)
    assert (r.op, r.result, r.sock_id, r.tag, r.vm_id) == (Op.SEND | REPLY_BIT, 300, 7, 9, 1)
    counters = inst.status()["tenants"][0]["counters"]
    assert counters["nqes_in"] == 2 and counters["nqes_out"] == 2 and counters["bytes_in"] == 300


def test_full_nsm_ring_holds_outputs_in_order_and_stops_reading(
        inst: Instance, tenant: Tenant, fake_nsm: FakeNsm) -> None:
    """The NSM does not read: 4 SENDs fill its ring, the rest wait in the CoreEngine in
    order, and the tenant's later SENDs stay unread in its ring until there is room."""
    _open_socket(tenant, fake_nsm)
    buf = tenant.geo.buf_size
    first = [NQE(op=Op.SEND, sock_id=7, data_ptr=i * buf, size=10 + i, tag=100 + i)
             for i in range(20)]
    later = [NQE(op=Op.SEND, sock_id=7, data_ptr=i * buf, size=10 + i, tag=100 + i)
             for i in range(20, 40)]
    tenant.push(dev.RingId.SEND, *first)
    _until("16 SENDs held", lambda: inst.status()["pending"] == 16)
    assert inst.status()["blocked_sources"] == 1
    tenant.push(dev.RingId.SEND, *later)
    time.sleep(0.2)  # plenty of loop passes: the source stays blocked
    assert len(tenant.rings[dev.RingId.SEND]) == 20
    assert inst.status()["pending"] == 16

    fake_nsm.tell("allow 40")
    replies = tenant.take(dev.RingId.COMPLETION, 40)
    assert [(r.op, r.tag, r.result) for r in replies] == [
        (Op.SEND | REPLY_BIT, n.tag, n.size) for n in first + later]
    assert fake_nsm.log()[2:] == [f"SEND:{100 + i}" for i in range(40)]
    st = inst.status()
    assert (st["pending"], st["blocked_sources"]) == (0, 0)
    assert st["tenants"][0]["counters"]["rejected"] == 0


def test_full_tenant_ring_holds_events_in_order(inst: Instance, tenant: Tenant,
                                               fake_nsm: FakeNsm) -> None:
    """100 EV_DATA for a tenant whose 64-slot receive ring it does not read: nothing lost."""
    _open_socket(tenant, fake_nsm)
    fake_nsm.tell("events 100")
    _until("the tenant's receive ring to fill",
           lambda: len(tenant.rings[dev.RingId.RECEIVE]) == TENANT_RING)
    _until("the rest held", lambda: inst.status()["pending"] > 0)
    events = tenant.take(dev.RingId.RECEIVE, 100)
    recv0 = tenant.geo.send_size
    assert [(e.op, e.sock_id, e.vm_id, e.size, e.data_ptr) for e in events] == [
        (Op.EV_DATA, 7, 1, 100 + i, recv0 + i * tenant.geo.buf_size) for i in range(100)]
    assert inst.status()["tenants"][0]["counters"]["bytes_out"] == sum(range(100, 200))


def test_tenant_detach_unmaps_it_from_the_nsm(inst: Instance, fake_nsm: FakeNsm) -> None:
    t = Tenant(inst.name)
    _open_socket(t, fake_nsm)
    fake_nsm.tell("allow 1")
    t.close()
    _until("TENANT_UNMAP at the NSM", lambda: fake_nsm.log()[2:] == ["TENANT_UNMAP:1"])
    st = inst.status()
    assert st["tenants"] == [] and st["sockets"] == 0


def test_an_embedded_coreengine_cleans_up_when_it_stops() -> None:
    """coreengine.running(): the CoreEngine in a thread of this process (netkernel demo)."""
    name = f"t-ce-{uuid.uuid4().hex[:8]}"
    try:
        with coreengine.running(name) as ce:
            t = coreengine.attach("tenant", "embedded", name)
            assert [d["name"] for d in ce.status()["tenants"]] == ["embedded"]
            assert coreengine.request({"cmd": "status"}, name)["pid"] == os.getpid()
        assert t.conn.recv(1) == b""
        assert not t.path.exists() and not shm.engine_socket(name).exists()
        t.close()
    finally:
        shm.remove_instance(name)
