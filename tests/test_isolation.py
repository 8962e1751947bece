"""Isolation on a live instance (issue 3, Tests: "Isolation").

Tenant A is this test process, attached as a tenant with
``coreengine.attach`` and writing raw NQEs (reference.nqe's layout) into its
own device's rings: it forges tenant B's socket IDs, B's VM ID on the wire,
offsets outside its data area or in the wrong half, unknown ops, non-zero
reserved bytes. Tenant B is a GuestLib process echoing over a live TCP
connection the whole time. Checked: A gets exactly the answer spec/security.md
(SEC-6's table) gives, the CoreEngine counts each refusal in A's ``rejected``
(CE-23), and B sees nothing: its echo never fails and its counters and
sockets do not move.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket as std
import time
from collections.abc import Iterator

import pytest

from netkernel.reference import bell, coreengine
from netkernel.reference import device as dev
from netkernel.reference import nqe as nq
from netkernel.reference.nqe import NQE, OP_UNKNOWN_REPLY, REPLY_BIT, Op
from netkernel.reference.ring import HEAD, TAIL
from tests.live import Program, own_instance, status, tenant_entry, time_limit, until

#: Tenant B: a GuestLib listener, client and server end in one process, echoing random
#: messages as fast as it can; "ids" -> its VM ID and socket IDs, "stats" -> progress.
TENANT_B = r"""
import json, random, sys, threading
from netkernel.reference import guestlib

lst = guestlib.create_server(("127.0.0.1", 0))
c = guestlib.create_connection(lst.getsockname(), timeout=10)
s, _ = lst.accept()
s.settimeout(10)
stats = {"rounds": 0, "errors": []}
stop = threading.Event()

def echo_server():
    try:
        while data := s.recv(65536):
            s.sendall(data)
    except OSError as exc:
        stats["errors"].append("server: " + repr(exc))

def echo_client():
    rng = random.Random(7)
    try:
        while not stop.is_set():
            msg = rng.randbytes(rng.randrange(1, 3000))
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = c.recv(65536)
                if not chunk:
                    raise EOFError("EOF on the echo connection")
                got += chunk
            if got != msg:
                raise ValueError("echo mismatch")
            stats["rounds"] += 1
    except Exception as exc:
        stats["errors"].append("client: " + repr(exc))

server = threading.Thread(target=echo_server, daemon=True)
client = threading.Thread(target=echo_client, daemon=True)
server.start()
client.start()
ids = [x._conn.sock_id for x in (lst, c, s)]
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "ids":
        print(json.dumps({"vm": guestlib.device().vm_id, "ids": ids}), flush=True)
    elif cmd == "stats":
        print(json.dumps(stats), flush=True)
stop.set()
client.join(10)
c.close()  # the server end sees EOF and ends its loop
server.join(10)
s.close()
lst.close()
"""

OWN = 0x7000_0001  # A's own socket
SENTINEL_TAG = 0xFFF0
U64_MAX = nq.U64_MAX
GRANULE = 4096  # A places its buffers at multiples of this in its send half


def raw(op: int, sock_id: int = 0, *, vm_id: int = 0, qset: int = 0, op_data: int = 0,
        data_ptr: int = 0, size: int = 0, tag: int = 0, reserved: bytes = b"\0\0\0") -> bytes:
    """32 bytes as a device side may write them: no validation (NQE-1 layout)."""
    out: bytes = nq.NQE_STRUCT.build({
        "op": op, "qset": qset, "vm_id": vm_id, "sock_id": sock_id, "op_data": op_data,
        "data_ptr": data_ptr, "size": size, "tag": tag, "reserved": reserved})
    return out


class RawTenant:
    """This process as a tenant that writes NQEs straight into its own rings."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.a = coreengine.attach("tenant", "attacker", instance)
        m = self.a.dmap
        self.id = self.a.id
        self.geo = m.geo
        self.data = m.data()
        self.rings = {r: m.ring(0, r) for r in dev.RingId}
        self.engine_bell = m.bell(0, dev.Bell.ENGINE)
        self.device_bell = m.bell(0, dev.Bell.DEVICE)

    def push(self, nqe: bytes, ring: dev.RingId = dev.RingId.JOB) -> None:
        assert self.rings[ring].push(nqe)
        bell.notify(self.rings[ring], self.engine_bell)

    def take(self, ring: dev.RingId = dev.RingId.COMPLETION, timeout: float = 5.0) -> NQE:
        deadline = time.monotonic() + timeout
        while (got := self.rings[ring].pop()) is None:
            assert time.monotonic() < deadline, f"nothing on {ring.name} after {timeout} s"
            bell.sleep_until_work(self.device_bell, [self.rings[ring]], 0.01)
        return nq.unpack_unchecked(got)

    def call(self, op: Op, sock_id: int, tag: int, *, vm_id: int = 0, qset: int = 0,
             op_data: int = 0, data_ptr: int = 0, size: int = 0) -> NQE:
        """A request and its reply (nothing else may arrive in between)."""
        self.push(raw(op, sock_id, tag=tag, vm_id=vm_id, qset=qset, op_data=op_data,
                      data_ptr=data_ptr, size=size))
        reply = self.take()
        assert (reply.op, reply.sock_id, reply.tag) == (op | REPLY_BIT, sock_id, tag), reply
        return reply

    def rejected(self) -> int:
        """A's ``rejected`` counter in the CoreEngine's status (CE-23)."""
        entry = tenant_entry(self.instance, os.getpid())
        assert entry is not None
        count: int = entry["counters"]["rejected"]
        return count

    def close(self) -> None:
        self.a.close()


@dataclasses.dataclass(frozen=True)
class Forgery:
    """One forged NQE, the ring it is written to, and what SEC-6 says A gets back."""

    what: str
    nqe: bytes
    reply_op: int | None  # None: dropped, no answer at all
    errno: int = 0
    ring: dev.RingId = dev.RingId.JOB


def forgeries(b_vm: int, b_ids: list[int], geo: dev.Geometry, a_vm: int) -> list[Forgery]:
    """Everything A tries, in the order of spec/security.md's SEC-6 table where it applies."""
    b_lst, b_client, b_server = b_ids
    end, send_end = geo.data_size, geo.send_size
    sa = 16  # a sockaddr_in's length
    return [
        # SEC-1 / CE-9: B's socket IDs are not A's: -EBADF, nothing forwarded
        Forgery("CLOSE of B's listening socket", raw(Op.CLOSE, b_lst, tag=1),
                Op.CLOSE | REPLY_BIT, errno.EBADF),
        Forgery("SEND on B's connection", raw(Op.SEND, b_client, data_ptr=0, size=5, tag=2),
                Op.SEND | REPLY_BIT, errno.EBADF, ring=dev.RingId.SEND),
        Forgery("SHUTDOWN of B's accepted socket", raw(Op.SHUTDOWN, b_server, op_data=2, tag=3),
                Op.SHUTDOWN | REPLY_BIT, errno.EBADF),
        # SEC-2 / CE-8: B's VM ID (and a queue set) on the wire change nothing
        Forgery("CLOSE of B's socket with B's VM ID on the wire",
                raw(Op.CLOSE, b_client, vm_id=b_vm, tag=4), Op.CLOSE | REPLY_BIT, errno.EBADF),
        Forgery("GETPEERNAME of B's socket with B's VM ID and queue set 3",
                raw(Op.GETPEERNAME, b_server, vm_id=b_vm, qset=3, data_ptr=GRANULE, size=28,
                    tag=5),
                Op.GETPEERNAME | REPLY_BIT, errno.EBADF),
        # SEC-3 / CE-14 / NQE-14: buffers outside the data area or in the wrong half
        Forgery("BIND with a buffer past the end of the data area",
                raw(Op.BIND, OWN, data_ptr=end, size=sa, tag=6), Op.BIND | REPLY_BIT,
                errno.EFAULT),
        Forgery("BIND with a buffer straddling the end of the data area",
                raw(Op.BIND, OWN, data_ptr=end - 8, size=sa, tag=7), Op.BIND | REPLY_BIT,
                errno.EFAULT),
        Forgery("GETSOCKNAME with data_ptr + size overflowing 64 bits",
                raw(Op.GETSOCKNAME, OWN, data_ptr=U64_MAX - 7, size=28, tag=8),
                Op.GETSOCKNAME | REPLY_BIT, errno.EFAULT),
        Forgery("GETSOCKNAME with a buffer far beyond the data area",
                raw(Op.GETSOCKNAME, OWN, data_ptr=1 << 40, size=28, tag=9),
                Op.GETSOCKNAME | REPLY_BIT, errno.EFAULT),
        Forgery("BIND with its address in the receive half (wrong half)",
                raw(Op.BIND, OWN, data_ptr=send_end, size=sa, tag=10), Op.BIND | REPLY_BIT,
                errno.EFAULT),
        Forgery("SEND straddling the send and receive halves",
                raw(Op.SEND, OWN, data_ptr=send_end - 4, size=64, tag=11),
                Op.SEND | REPLY_BIT, errno.EFAULT, ring=dev.RingId.SEND),
        Forgery("BUF_RETURN of a send-half buffer (wrong half)",
                raw(Op.BUF_RETURN, 0, data_ptr=0, size=GRANULE, tag=12),
                Op.BUF_RETURN | REPLY_BIT, errno.EFAULT, ring=dev.RingId.SEND),
        Forgery("BUF_RETURN of a receive buffer A was never lent",
                raw(Op.BUF_RETURN, 0, data_ptr=send_end, size=GRANULE, tag=13),
                Op.BUF_RETURN | REPLY_BIT, errno.EINVAL, ring=dev.RingId.SEND),
        # NQE-11 / SEC-6 rows 1-2: unknown ops
        Forgery("an unknown op", raw(0x30, OWN, tag=14), OP_UNKNOWN_REPLY, errno.ENOSYS),
        Forgery("an unknown op with bit 7 set", raw(0xB0, b_lst, tag=15), None),
        # NQE-10 / SEC-6 rows 3-4: reserved bytes
        Forgery("GETSOCKNAME with non-zero reserved bytes",
                raw(Op.GETSOCKNAME, OWN, data_ptr=GRANULE, size=28, tag=16,
                    reserved=b"\0\x01\0"),
                Op.GETSOCKNAME | REPLY_BIT, errno.EINVAL),
        Forgery("a reply with non-zero reserved bytes",
                raw(Op.CLOSE | REPLY_BIT, b_lst, tag=17, reserved=b"\xff\xff\xff"), None),
        # SEC-10: a tenant cannot inject events, forge replies or map tenants
        Forgery("EV_DATA injected toward B's socket",
                raw(Op.EV_DATA, b_client, vm_id=b_vm, data_ptr=send_end, size=10, tag=18),
                None, ring=dev.RingId.SEND),
        Forgery("EV_FIN injected toward B's socket", raw(Op.EV_FIN, b_server, vm_id=b_vm),
                None, ring=dev.RingId.SEND),
        Forgery("a forged CLOSE reply naming B's socket",
                raw(Op.CLOSE | REPLY_BIT, b_client, vm_id=b_vm, tag=19), None),
        Forgery("TENANT_MAP of B into the NSM",
                raw(Op.TENANT_MAP, 0, vm_id=a_vm, op_data=b_vm, data_ptr=send_end,
                    size=GRANULE, tag=20),
                Op.TENANT_MAP | REPLY_BIT, errno.EPERM),
    ]


def _nsm_pid(name: str) -> int:
    """The pid of the instance's one NSM, as the CoreEngine knows it."""
    (nsm,) = status(name)["nsms"]
    pid: int = nsm["pid"]
    return pid


#: Every isolation test runs on one NSM serving several tenants (issue 6, multiplexing):
#: A, B and C on the kernel NSM, then on the shm NSM, where B's and C's echo connections
#: are paired in shared memory (spec/shm.md) and A's forgeries meet a different NSM.
PLACEMENTS = ["kernel", "auto"]


@pytest.fixture(scope="module", params=PLACEMENTS, ids=[f"nsm={p}" for p in PLACEMENTS])
def isolation_instance(request: pytest.FixtureRequest) -> Iterator[str]:
    with own_instance(nsm=request.param) as name:
        yield name


@pytest.fixture
def tenant_b(isolation_instance: str) -> Iterator[tuple[Program, int, list[int]]]:
    """Tenant B, and beside it tenant C (the same program) on the same NSM: the tests
    watch B; C is checked at the end, as one more tenant that must see nothing."""
    with Program(TENANT_B, instance=isolation_instance) as b, \
            Program(TENANT_B, instance=isolation_instance) as c:
        ids = b.ask("ids")
        for who, p in (("B", b), ("C", c)):
            until(f"{who}'s echo to run", lambda p=p: p.ask("stats")["rounds"] > 10)
        c_rounds = c.ask("stats")["rounds"]
        yield b, ids["vm"], ids["ids"]
        finals = [p.ask("stats") for p in (b, c)]
        assert b.finish() == 0 and c.finish() == 0
        assert finals[0]["errors"] == [] and finals[1]["errors"] == []
        assert finals[1]["rounds"] > c_rounds  # C went on the whole time


@pytest.fixture
def tenant_a(isolation_instance: str) -> Iterator[RawTenant]:
    a = RawTenant(isolation_instance)
    yield a
    a.close()


def test_forged_nqes_are_refused_counted_and_b_is_unaffected(
        isolation_instance: str, tenant_a: RawTenant,
        tenant_b: tuple[Program, int, list[int]]) -> None:
    """Issue 3, Tests: "Isolation: tenant A forges B's socket IDs, a foreign VM ID, and
    offsets outside its data area; the CoreEngine rejects each as the spec says, counts
    it, and B is unaffected" (SEC-1, SEC-2, SEC-3, SEC-6, SEC-10, CE-23; plus unknown ops
    and reserved bytes, NQE-10, NQE-11)."""
    b, b_vm, b_ids = tenant_b
    a = tenant_a
    name = isolation_instance
    with time_limit(60):
        nsm = _nsm_pid(name)
        assert a.id != b_vm and OWN not in b_ids
        # A's own socket, bound: the target of the buffer forgeries
        assert a.call(Op.SOCKET, OWN, 1, op_data=std.AF_INET | std.SOCK_STREAM << 16).result == 0
        a.data[0:16] = nq.pack_sockaddr(nq.Sockaddr(std.AF_INET, "127.0.0.1", 0))
        assert a.call(Op.BIND, OWN, 2, data_ptr=0, size=16).result == 0

        b_before = tenant_entry(name, b.pid)
        assert b_before is not None
        rounds_before = b.ask("stats")["rounds"]
        rejected = a.rejected()
        assert rejected == 0
        for f in forgeries(b_vm, b_ids, a.geo, a.id):
            a.push(f.nqe, f.ring)
            # a request of A's own behind it: its reply comes after any answer to the forgery
            a.push(raw(Op.GETSOCKNAME, OWN, data_ptr=2 * GRANULE, size=28, tag=SENTINEL_TAG))
            got = [a.take()]
            while got[-1].tag != SENTINEL_TAG or got[-1].op != Op.GETSOCKNAME | REPLY_BIT:
                got.append(a.take())
            *answers, sentinel = got
            assert sentinel.result == 16, f.what  # A's own socket still works (SEC-8)
            sent = nq.unpack_unchecked(f.nqe)
            if f.reply_op is None:
                assert answers == [], f.what
            else:
                (r,) = answers
                assert (r.op, r.result) == (f.reply_op, -f.errno), f.what
                # echoes the request, stamped with A's own VM ID and queue set (SEC-6, CE-8)
                assert (r.sock_id, r.tag, r.data_ptr, r.size) == (
                    sent.sock_id, sent.tag, sent.data_ptr, sent.size), f.what
                assert (r.vm_id, r.qset, r.reserved) == (a.id, 0, b"\0\0\0"), f.what
            rejected += 1
            assert a.rejected() == rejected, f.what  # every refusal counted once (CE-23)

        # B's VM ID on a request about A's own socket: served as A's, into A's area (SEC-2)
        a.data[3 * GRANULE:3 * GRANULE + 28] = bytes(28)
        r = a.call(Op.GETSOCKNAME, OWN, 3, vm_id=b_vm, qset=5, data_ptr=3 * GRANULE, size=28)
        assert (r.result, r.vm_id, r.qset) == (16, a.id, 0)
        assert nq.unpack_sockaddr(bytes(a.data[3 * GRANULE:3 * GRANULE + 16])).host == \
            "127.0.0.1"
        # B's socket IDs name A's own sockets in A's namespace: B's listener is untouched
        b_lst = b_ids[0]
        assert a.call(Op.SOCKET, b_lst, 4, op_data=std.AF_INET | std.SOCK_STREAM << 16
                      ).result == 0
        assert a.call(Op.CLOSE, b_lst, 5).result == 0
        assert a.rejected() == rejected  # none of these is a refusal

        time.sleep(0.2)
        assert a.rings[dev.RingId.COMPLETION].pop() is None  # nothing late or extra
        assert a.rings[dev.RingId.RECEIVE].pop() is None
        stats = until("B's echo to go on", lambda: (s := b.ask("stats"))["rounds"]
                      > rounds_before + 10 and s)
        assert stats["errors"] == []
        b_after = tenant_entry(name, b.pid)
        assert b_after is not None
        assert b_after["sockets"] == b_before["sockets"] == 3
        assert b_after["counters"]["rejected"] == 0
        assert a.call(Op.CLOSE, OWN, 6).result == 0
        assert _nsm_pid(name) == nsm  # the same NSM served it all: nothing A wrote broke it


def test_a_flood_of_requests_hits_a_bound_and_b_keeps_going(
        isolation_instance: str, tenant_a: RawTenant,
        tenant_b: tuple[Program, int, list[int]]) -> None:
    """Issue 3, Tests, "Isolation": tenant A keeps as many requests in flight as it may
    (ACCEPTs that never complete on its own listener); one more is refused -ENOBUFS and
    counted (SEC-5), and B's echo keeps going meanwhile."""
    b, _b_vm, _b_ids = tenant_b
    a = tenant_a
    with time_limit(60):
        assert a.call(Op.SOCKET, OWN, 1, op_data=std.AF_INET | std.SOCK_STREAM << 16).result == 0
        a.data[0:16] = nq.pack_sockaddr(nq.Sockaddr(std.AF_INET, "127.0.0.1", 0))
        assert a.call(Op.BIND, OWN, 2, data_ptr=0, size=16).result == 0
        assert a.call(Op.LISTEN, OWN, 3, op_data=16).result == 0
        assert a.call(Op.GETSOCKNAME, OWN, 4, data_ptr=0, size=16).result == 16
        port = nq.unpack_sockaddr(bytes(a.data[0:16])).port
        bound = a.geo.n_qsets * a.geo.ring_entries  # SEC-5's default
        sent = 0
        while sent < bound:  # the JOB ring holds ring_entries: push as the CoreEngine drains
            if a.rings[dev.RingId.JOB].free():
                a.push(raw(Op.ACCEPT, OWN, op_data=0x1000 + sent, tag=100 + sent))
                sent += 1
            else:
                time.sleep(0.001)
        until("every ACCEPT in flight", lambda: status(a.instance)["in_flight"] >= bound)
        rounds = b.ask("stats")["rounds"]
        a.push(raw(Op.ACCEPT, OWN, op_data=0x1000 + bound, tag=100 + bound))
        a.push(raw(Op.CLOSE, OWN, tag=9))  # even a CLOSE: the bound counts every request
        refused = [a.take(), a.take()]
        assert [(r.op, r.result, r.tag) for r in refused] == [
            (Op.ACCEPT | REPLY_BIT, -errno.ENOBUFS, 100 + bound),
            (Op.CLOSE | REPLY_BIT, -errno.ENOBUFS, 9)]
        assert a.rejected() == 2
        until("B's echo to go on", lambda: b.ask("stats")["rounds"] > rounds + 10)
        # a connection from outside completes one ACCEPT: one slot is free again
        with std.create_connection(("127.0.0.1", port), timeout=5):
            done = a.take()
            assert (done.op, done.result) == (Op.ACCEPT | REPLY_BIT, 0)  # no address asked
            accepted = 0x1000 + done.tag - 100
            # closing the listener answers every other waiting ACCEPT, then the CLOSE
            a.push(raw(Op.CLOSE, OWN, tag=10))
            replies = [a.take() for _ in range(bound)]
            assert sorted(r.tag for r in replies) == sorted(
                {10, *range(100, 100 + bound)} - {done.tag})
            assert {r.result for r in replies if r.op == Op.ACCEPT | REPLY_BIT} <= {
                -errno.EINVAL, -errno.EBADF, -errno.ECONNABORTED}, replies
            assert a.call(Op.CLOSE, accepted, 11).result == 0
        assert b.ask("stats")["errors"] == []
        entry = tenant_entry(a.instance, b.pid)
        assert entry is not None and entry["counters"]["rejected"] == 0


def test_a_tenant_that_stops_reading_holds_up_only_itself(
        isolation_instance: str, tenant_a: RawTenant,
        tenant_b: tuple[Program, int, list[int]]) -> None:
    """Issue 3, Tests, "Isolation", "B is unaffected", and spec/security.md's threat model
    ("a tenant ... may stop reading its COMPLETION and RECEIVE rings"): A has more
    connections than its RECEIVE ring has slots and stops reading it; their peers close,
    so the NSM owes A more EV_FINs than fit. The NSM's event ring, which carries B's events
    too, must not stop: B's echo goes on. A then reads every EV_FIN, once each."""
    b, _b_vm, _b_ids = tenant_b
    a = tenant_a
    name = isolation_instance
    n = a.geo.ring_entries + 44
    with time_limit(60), std.create_server(("127.0.0.1", 0), backlog=n) as server:
        server.settimeout(10)
        a.data[0:16] = nq.pack_sockaddr(nq.Sockaddr(std.AF_INET, *server.getsockname()))
        peers = []
        for sock in range(1, n + 1):
            assert a.call(Op.SOCKET, sock, 1, op_data=std.AF_INET | std.SOCK_STREAM << 16
                          ).result == 0
            assert a.call(Op.CONNECT, sock, 2, data_ptr=0, size=16).result == 0
            peers.append(server.accept()[0])
        for peer in peers:
            peer.close()
        receive = a.rings[dev.RingId.RECEIVE]
        until("A's RECEIVE ring to fill", lambda: len(receive) == a.geo.ring_entries)
        rounds = b.ask("stats")["rounds"]
        until("B's echo to go on", lambda: b.ask("stats")["rounds"] > rounds + 10)
        # what A owes waits in the CoreEngine for A alone; the NSM's rings are still read
        until("A's other EV_FINs to wait", lambda: status(name)["pending"] == n - len(receive))
        assert status(name)["blocked_sources"] == 0
        fins = [a.take(dev.RingId.RECEIVE) for _ in range(n)]
        assert sorted((e.op, e.sock_id) for e in fins) == [
            (Op.EV_FIN, sock) for sock in range(1, n + 1)]
        assert status(name)["pending"] == 0 and b.ask("stats")["errors"] == []


@pytest.mark.parametrize(("ring", "index"), [(dev.RingId.JOB, TAIL),
                                             (dev.RingId.COMPLETION, HEAD)],
                         ids=["JOB tail", "COMPLETION head"])
def test_a_tenant_that_breaks_its_rings_is_detached_and_b_keeps_going(
        isolation_instance: str, tenant_a: RawTenant,
        tenant_b: tuple[Program, int, list[int]], ring: dev.RingId, index: int) -> None:
    """Issue 3, Tests, "Isolation": A writes an impossible index into one of its own rings
    (the producer index of JOB, the consumer index of COMPLETION: both are A's to write,
    RING-2). The CoreEngine sees it (RING-10), detaches A alone, and goes on switching:
    B's echo never notices."""
    b, _b_vm, _b_ids = tenant_b
    a = tenant_a
    name = isolation_instance
    with time_limit(30):
        nsm = _nsm_pid(name)
        assert tenant_entry(name, os.getpid()) is not None
        rounds = b.ask("stats")["rounds"]
        at = a.geo.ring_offset(0, ring) + index
        bad = (int.from_bytes(a.a.dmap.buf[at:at + 4], "little") + a.geo.ring_entries + 7) % (
            1 << 32)
        a.a.dmap.buf[at:at + 4] = bad.to_bytes(4, "little")
        if ring is dev.RingId.COMPLETION:  # something the CoreEngine must write there
            job = a.rings[dev.RingId.JOB]
            assert job.push(raw(0x30, OWN, tag=1))
            bell.notify(job, a.engine_bell)
        else:
            bell.notify(a.rings[ring], a.engine_bell)
        until("A's device to go", lambda: not a.a.path.exists()
              and tenant_entry(name, os.getpid()) is None)
        until("B's echo to go on", lambda: b.ask("stats")["rounds"] > rounds + 10)
        assert b.ask("stats")["errors"] == []
        assert _nsm_pid(name) == nsm and len(status(name)["tenants"]) == 2  # B and C


def test_one_nsm_serves_every_tenant_and_counts_each(
        isolation_instance: str, tenant_b: tuple[Program, int, list[int]]) -> None:
    """Issue 6, multiplexing: B and C are served by the instance's one NSM, whose status
    shows each tenant's own counters (SHM-7, RT-7); on the shm NSM, each one's echo
    connection is paired in shared memory and its bytes are counted as such."""
    b, b_vm, _b_ids = tenant_b
    name = isolation_instance
    with time_limit(30):
        (nsm,) = status(name)["nsms"]
        tenants = {t["id"] for t in status(name)["tenants"]}
        assert len(tenants) == 2 and b_vm in tenants

        carried = "shm_bytes_out" if nsm["name"] == "shm" else "stack_bytes_out"

        def served() -> dict[str, dict[str, int]] | None:
            """The NSM's per-tenant counters once it published both tenants' echo bytes
            (the file is rewritten every 0.25 s: it may still show a tenant before its
            first round trip)."""
            from netkernel import instance
            (entry,) = instance.status(name)["nsms"]
            got: dict[str, dict[str, int]] = entry.get("served", {})
            done = {int(v) for v, c in got.items() if c.get(carried, 0) > 0}
            return got if done >= tenants else None

        rounds = b.ask("stats")["rounds"]
        until("B's echo to go on", lambda: b.ask("stats")["rounds"] > rounds + 10)
        counts = until("the NSM to publish both tenants", served)
        for vm in tenants:
            mine = counts[str(vm)]
            assert mine["sockets"] == 3  # listener, client, server end
            if nsm["name"] == "shm":
                assert mine["paired"] == 2 and mine["paired_now"] == 2
                assert mine["shm_bytes_out"] > 0 and mine["stack_bytes_out"] == 0
            else:
                assert mine["paired"] == 0 and mine["stack_bytes_out"] > 0
