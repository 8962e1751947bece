"""The C kernel-stack NSM (fastpath/csrc/nsm.c) against the reference and through NetKernel.

Four layers, each beyond what ``pytest conformance --target fastpath`` covers:

* the reference NSM's own unit tests (tests/test_nsm_kernel.py), re-run on the C
  NSM: the same :class:`FakeCoreEngine`, the C loop in a thread in its place;
* differential (hypothesis): the same call sequences, with the same bytes, into
  the reference NSM and the C NSM; every reply (op, result, size, tag, the ring
  it came on, the bytes written into the tenant's buffer, ports aside) must be
  the same; a deliberately broken NSM is shown to be caught;
* the entry point ``python -m netkernel.fastpath.nsm_kernel``: attach, serve
  across processes, exit 0 on SIGTERM and when the CoreEngine goes (NSM-2);
* whole system: the C CoreEngine + reference GuestLib tenants in their own
  processes + the C NSM: many MB through one connection intact, many
  connections at once, a tenant that dies with open sockets (NSM-12).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkernel import instance
from netkernel.fastpath import servicelib as fast
from netkernel.reference import bell, guestlib, shm
from netkernel.reference import device as dev
from netkernel.reference.nqe import NQE, REPLY_BIT, Op
from netkernel.reference.nsm_kernel import KernelNSM
from netkernel.reference.servicelib import ServiceLib as RefServiceLib
from tests import test_nsm_kernel as ref_tests
from tests.live import Program, in_threads, status, until
from tests.test_nsm_kernel import (
    DGRAM,
    LOOP,
    STREAM,
    FakeCoreEngine,
    connect,
    opt,
    sockaddr_in,
    sockaddr_in6,
)

# -- 1. the reference NSM's unit tests, on the C NSM -------------------------------------------

#: Those that start ``netkernel.reference.nsm_kernel`` as a process are redone below for ours.
_PROCESS_TESTS = {"test_entry_point_attaches_and_exits_when_the_coreengine_goes",
                  "test_entry_point_inside_a_network_namespace",
                  "test_entry_point_without_a_coreengine_fails_cleanly"}
for _name in dir(ref_tests):
    if _name.startswith("test_") and _name not in _PROCESS_TESTS:
        globals()[_name] = getattr(ref_tests, _name)


class CNSM:
    """The C loop in a thread of this process, shaped like the reference rig's KernelNSM."""

    def __init__(self, ce: FakeCoreEngine, *, rx_cap: int | None = None) -> None:
        att = fast.Attachment(None, shm.open_device(ce.nsm_path), 1, ce.runtime)
        self.svc = fast.ServiceLib(att, rx_cap=rx_cap or 0)
        self.result: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result.append(self.svc.run())
        except OSError as exc:
            self.result.append(-(exc.errno or 0))

    @property
    def lib(self) -> CNSM:
        return self

    @property
    def counters(self) -> dict[str, int]:
        return self.svc.counters()

    def stop(self) -> None:
        self.svc.stop()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "nk_nsm_run did not return"
        assert self.result == [fast.STOPPED]
        self.svc.close()


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., tuple[FakeCoreEngine, CNSM]]]:
    """As tests/test_nsm_kernel.py's, with the C NSM in the thread."""
    made: list[tuple[FakeCoreEngine, CNSM]] = []

    def make(*, rx_cap: int | None = None, grant: bool = True,
             **geo: int) -> tuple[FakeCoreEngine, CNSM]:
        ce = FakeCoreEngine(tmp_path, **geo)
        nsm = CNSM(ce, rx_cap=rx_cap)
        made.append((ce, nsm))
        if grant:
            assert ce.grant().result == 0
        return ce, nsm

    yield make
    for ce, nsm in made:
        nsm.stop()
        ce.close()


@pytest.fixture
def rig(make_rig: Callable[..., tuple[FakeCoreEngine, CNSM]]) -> FakeCoreEngine:
    return make_rig()[0]


def test_a_ring_with_impossible_indices_stops_the_loop(tmp_path: Path) -> None:
    """RING-10: the CoreEngine's tail runs more than a ring ahead of our head: nk_nsm_run
    returns -EBADMSG (as the reference NSM dies of RingError) instead of reading slots."""
    ce = FakeCoreEngine(tmp_path)
    nsm = CNSM(ce)
    try:
        assert ce.grant().result == 0
        ring = ce.nsm.ring(0, dev.RingId.COMPLETION)
        off = ce.nsm_geo.ring_offset(0, dev.RingId.COMPLETION)  # tail at +0 (RING-1)
        ce.nsm.buf[off:off + 4].cast("I")[0] = (ring.head + ring.entries + 5) % (1 << 32)
        ce.nsm.bell(0, dev.Bell.DEVICE).ring()
        nsm.thread.join(timeout=5)
        assert nsm.result == [-errno.EBADMSG]
    finally:
        nsm.svc.stop()
        nsm.thread.join(timeout=5)
        nsm.svc.close()
        ce.close()


def test_a_lingering_close_does_not_block_the_loop(rig: FakeCoreEngine) -> None:
    """SO_LINGER {1, 30} on a connection whose peer reads nothing: close(2) would block
    for 30 s, so the NSM closes it in a helper thread; the CLOSE and later calls are
    answered meanwhile (FakeCoreEngine waits 5 s for a reply)."""
    with socket.socket() as server:
        server.bind((LOOP, 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.listen(1)
        assert rig.do(Op.SOCKET, 1, STREAM) == 0
        assert rig.do(Op.SETSOCKOPT, 1, opt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                      struct.pack("i", 4096)) == 0
        assert rig.do(Op.CONNECT, 1, 0, sockaddr_in(*server.getsockname())) == 0
        peer, _ = server.accept()
        with peer:
            assert rig.do(Op.SEND, 1, socket.MSG_DONTWAIT, bytes(60000)) > 0  # unread bytes
            assert rig.do(Op.SETSOCKOPT, 1, opt(socket.SOL_SOCKET, socket.SO_LINGER),
                          struct.pack("ii", 1, 30)) == 0
            assert rig.do(Op.CLOSE, 1) == 0
            assert rig.do(Op.SOCKET, 2, DGRAM) == 0
            assert rig.do(Op.CLOSE, 2) == 0


def _fails_with_broken_build(tmp_path: Path, flag: str, *test: str) -> None:
    """Build the extension with ``-D<flag>`` and run pytest on ``test`` with it (the
    CoreEngine and NSM processes inherit it): exactly one test must fail."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CFLAGS=f"-D{flag}")
    built = subprocess.run([sys.executable, str(root / "fastpath" / "build.py"), "--out",
                            str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    env = dict(os.environ, NETKERNEL_FASTPATH_EXT=built.stdout.strip().splitlines()[-1])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *test],
                         env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == 1 and "1 failed" in run.stdout, run.stdout


def test_the_lingering_close_test_catches_a_loop_that_blocks(tmp_path: Path) -> None:
    """A build with -DNK_BROKEN_LINGER closes lingering sockets in the loop itself: the
    test above must fail on it."""
    _fails_with_broken_build(tmp_path, "NK_BROKEN_LINGER",
                             f"{__file__}::test_a_lingering_close_does_not_block_the_loop")


def test_the_flow_control_test_catches_a_paired_connection_that_drops(tmp_path: Path) -> None:
    """A build with -DNK_BROKEN_PAIR_DROP answers a paired SEND whole when the peer's
    slice is full and drops the rest: the SHM-6 conformance test must fail on it."""
    _fails_with_broken_build(
        tmp_path, "NK_BROKEN_PAIR_DROP", "--target", "fastpath",
        "conformance/test_shm.py::test_a_reader_that_stops_stops_its_writer_and_nothing_is_lost")


# -- 2. differential: the reference NSM and the C NSM, call for call ----------------------------


class RefNSM:
    """The reference KernelNSM in a thread, on a FakeCoreEngine's device."""

    def __init__(self, ce: FakeCoreEngine) -> None:
        self.lib = RefServiceLib(shm.open_device(ce.nsm_path), ce.runtime)
        self.nsm = KernelNSM(self.lib)
        self.thread = threading.Thread(target=self.nsm.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.nsm.stop()
        self.thread.join(timeout=5)
        self.nsm.close()
        assert self.lib.counters["errors"] == 0
        self.lib.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeCoreEngine,
                                                                     FakeCoreEngine]]:
    """Two rigs, one per NSM, on devices of the same geometry; each granted its tenant."""
    ref_ce = FakeCoreEngine(tmp_path_factory.mktemp("ref"))
    c_ce = FakeCoreEngine(tmp_path_factory.mktemp("c"))
    nsms = [RefNSM(ref_ce), CNSM(c_ce)]
    try:
        for ce in (ref_ce, c_ce):
            assert ce.grant().result == 0
        yield ref_ce, c_ce
    finally:
        for n in nsms:
            n.stop()
        ref_ce.close()
        c_ce.close()


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, bytes]]:
    """Addresses the calls name: a Linux listener, a closed port, a UDP socket."""
    with socket.create_server((LOOP, 0), backlog=128) as lst, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((LOOP, 0))
        held: list[socket.socket] = []  # accepted and kept open: the backlog never fills
        lst.settimeout(0.2)

        def drain() -> None:
            while lst.fileno() >= 0:
                try:
                    held.append(lst.accept()[0])
                except TimeoutError:
                    continue
                except OSError:
                    return

        threading.Thread(target=drain, daemon=True).start()
        closed = socket.socket()
        closed.bind((LOOP, 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        yield {"listen": sockaddr_in(*lst.getsockname()), "closed": sockaddr_in(LOOP, closed_port),
               "udp": sockaddr_in(*udp.getsockname()), "any4": sockaddr_in(LOOP, 0),
               "any6": sockaddr_in6("::1", 0), "short": b"\x02\x00", "junk": b"\xff" * 16,
               "unspec": bytes(16)}


ADDRS = ("listen", "closed", "udp", "any4", "any6", "short", "junk", "unspec")
SOCKOPTS = [opt(socket.SOL_SOCKET, o) for o in (socket.SO_REUSEADDR, socket.SO_TYPE,
                                                socket.SO_ERROR, socket.SO_KEEPALIVE,
                                                socket.SO_RCVBUF, socket.SO_LINGER, 36, 25)]
SOCKOPTS += [opt(socket.IPPROTO_TCP, socket.TCP_NODELAY), opt(socket.IPPROTO_TCP, 13),
             opt(socket.IPPROTO_IP, socket.IP_TTL), opt(41, 26), opt(0x7777, 1)]
SOCKET_ARGS = [d | t << 16 | p << 32 for d in (2, 10, 1) for t in (1, 2, 3, 5, 1 | 0x800, 1 | 0x40)
               for p in (0, 6, 17)]

step = st.one_of(
    st.tuples(st.just(Op.SOCKET), st.sampled_from(SOCKET_ARGS)),
    st.tuples(st.sampled_from([Op.BIND, Op.CONNECT]), st.sampled_from(ADDRS)),
    st.tuples(st.just(Op.LISTEN), st.sampled_from([-1, 0, 5])),
    st.tuples(st.just(Op.SHUTDOWN), st.integers(0, 3)),
    st.tuples(st.sampled_from([Op.GETSOCKNAME, Op.GETPEERNAME]), st.sampled_from([0, 4, 16, 28])),
    st.tuples(st.just(Op.GETSOCKOPT), st.tuples(st.sampled_from(SOCKOPTS),
                                                  st.sampled_from([0, 1, 4, 8, 16]))),
    st.tuples(st.just(Op.SETSOCKOPT), st.tuples(st.sampled_from(SOCKOPTS),
                                                  st.binary(max_size=8))),
    st.tuples(st.just(Op.SEND), st.tuples(st.sampled_from([0, socket.MSG_DONTWAIT]),
                                            st.binary(max_size=64),
                                            st.sampled_from([None, "udp", "closed", "short"]))),
    st.tuples(st.just(Op.CLOSE), st.sampled_from([0, 1])),
    st.tuples(st.just(Op.ACCEPT), st.sampled_from([0, 4, 28])),  # with bit 32: never waits
    st.tuples(st.just("raw"), st.tuples(st.sampled_from([0x3E, 0x7F, 0xC1, 0xFE, Op.EV_DATA,
                                                         Op.ATTACH, Op.DETACH, Op.GETSOCKNAME,
                                                         Op.SOCKET | REPLY_BIT]),
                                        st.binary(min_size=3, max_size=3))),
)
steps = st.lists(st.tuples(st.integers(0, 2), step), min_size=1, max_size=12)
_ids = iter(range(1000, 1 << 30, 8))


def run_steps(ce: Any, plan: list[tuple[int, Any]], peers: dict[str, bytes],
              base: int) -> list[tuple[Any, ...]]:
    """Play ``plan`` on sockets ``base + 0..2``; what a tenant observes of each reply."""
    seen: list[tuple[Any, ...]] = []
    for i, (k, (op, arg)) in enumerate(plan):
        sock = base + k
        if op == "raw":
            code, reserved = arg
            _push_raw(ce, code, sock, 60000 + i, reserved)
            continue
        out, data, op_data = 0, b"", 0
        if op is Op.SOCKET:
            op_data = arg
        elif op in (Op.BIND, Op.CONNECT):
            data = peers[arg]
        elif op in (Op.LISTEN, Op.SHUTDOWN):
            op_data = arg & 0xFFFF_FFFF
        elif op in (Op.GETSOCKNAME, Op.GETPEERNAME):
            out = arg
        elif op is Op.GETSOCKOPT:
            op_data, out = arg
        elif op is Op.SETSOCKOPT:
            op_data, data = arg
        elif op is Op.SEND:
            flags, payload, dest = arg
            prefix = peers[dest] if dest else b""
            op_data, data = flags | len(prefix) << 32, prefix + payload
        elif op is Op.CLOSE:
            op_data = arg
        elif op is Op.ACCEPT:
            op_data, out = (base + 5) | 1 << 32, arg  # NSM-7: -EAGAIN at once, or an error
        rep = ce.call(op, sock, op_data, data, out=out)
        written = ce.last_out if out and rep.result > 0 else b""
        if op in (Op.GETSOCKNAME, Op.GETPEERNAME) and len(written) >= 4:
            written = written[:2] + written[4:]  # the port is the kernel's choice
        seen.append((i, op, rep.op, rep.result, rep.size, rep.tag, written))
    for k in range(3):  # leave nothing open
        rep = ce.call(Op.CLOSE, base + k)
        seen.append(("close", rep.result))
    return seen


def _push_raw(ce: FakeCoreEngine, code: int, sock: int, tag: int, reserved: bytes) -> None:
    """An NQE as its 32 bytes, malformed ones included (NSM-10)."""
    raw = struct.pack("<BBBIQQIH3s", code, 0, 3, sock, 0, 0, 0, tag, reserved)
    ring = ce.nsm.ring(0, dev.RingId.COMPLETION)
    assert ring.push(raw)
    bell.notify(ring, ce.nsm.bell(0, dev.Bell.DEVICE))


def _raw_answers(ce: FakeCoreEngine) -> list[tuple[int, int, int, int]]:
    """Replies to raw NQEs (tags >= 60000), taken from the rig."""
    time.sleep(0.05)
    ce.pump()
    got = sorted((n.tag, n.op, n.result, n.sock_id % 8) for key, (_, _, n) in ce.replies.items()
                 if n.tag >= 60000)
    for key in [k for k, (_, _, n) in ce.replies.items() if n.tag >= 60000]:
        del ce.replies[key]
    return got


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_the_c_nsm_answers_as_the_reference_does(pair: tuple[FakeCoreEngine, FakeCoreEngine],
                                                 peers: dict[str, bytes],
                                                 plan: list[tuple[int, Any]]) -> None:
    """NSM-3..NSM-10 differentially: same calls, same replies and buffer contents."""
    base = next(_ids)
    ref_ce, c_ce = pair
    want = run_steps(ref_ce, plan, peers, base)
    got = run_steps(c_ce, plan, peers, base)
    assert got == want
    assert _raw_answers(c_ce) == _raw_answers(ref_ce)


def run_datagrams(ce: FakeCoreEngine, plan: list[tuple[int, bool, int]],
                  sock: int) -> list[tuple[int, int, int, bytes]]:
    """Datagrams into a tenant UDP socket, buffers returned in the plan's order: the
    EV_DATAs as (op_data, data_ptr, size, payload after the sockaddr).

    At most two buffers (three granules each) are held at once, so the slice and the
    socket's cap always have room: every datagram is read at once, and each BUF_RETURN
    is known to be done (a call behind it on the same ring was answered) before the next
    datagram arrives, so the buffers the NSM picks are determined (first fit, BUF-2).
    """
    assert ce.do(Op.SOCKET, sock, DGRAM) == 0
    assert ce.do(Op.BIND, sock, 0, sockaddr_in(LOOP, 0)) == 0
    assert ce.do(Op.GETSOCKNAME, sock, out=16) == 16
    dest = ref_tests.parse_sockaddr(ce.last_out)
    held: list[NQE] = []
    seen = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        for size, give_back, which in plan:
            peer.sendto(bytes([size % 251]) * size, dest)
            ev = ce.event(lambda e: e.sock_id == sock)
            seen.append((ev.op, ev.op_data, ev.data_ptr, ev.size, ce.payload(ev)[16:]))
            held.append(ev)
            if give_back or len(held) == 2:
                ce.buf_return(held.pop(which % len(held)))
                # a call on RECEIVE behind the BUF_RETURN: once answered, the return is done
                assert ce.do(Op.SEND, sock + 1, socket.MSG_DONTWAIT) == -errno.EBADF
    for ev in held:
        ce.buf_return(ev)
    assert ce.do(Op.CLOSE, sock) == 0
    return seen


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(st.integers(0, 3 * 4096 - 16), st.booleans(), st.integers(0, 1)),
                     min_size=1, max_size=24))
def test_the_c_nsm_lends_the_buffers_the_reference_lends(
        pair: tuple[FakeCoreEngine, FakeCoreEngine], plan: list[tuple[int, bool, int]]) -> None:
    """NSM-15, NSM-16, BUF-2, BUF-4: the same datagrams and returns give the same EV_DATAs,
    byte for byte: same buffer offsets, sizes, sockaddr prefix lengths and payloads."""
    base = next(_ids)
    ref_ce, c_ce = pair
    assert run_datagrams(c_ce, plan, base) == run_datagrams(ref_ce, plan, base)


class _Broken:
    """A rig whose NSM gets one errno wrong: the differential test must notice."""

    def __init__(self, ce: FakeCoreEngine) -> None:
        self.ce = ce

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ce, name)

    def call(self, op: Op, *args: Any, **kw: Any) -> NQE:
        rep: NQE = self.ce.call(op, *args, **kw)
        if op is Op.LISTEN and rep.result < 0:
            return NQE(op=rep.op, sock_id=rep.sock_id, op_data=(-22) & ((1 << 64) - 1),
                       size=rep.size, tag=rep.tag)
        return rep


def test_the_differential_test_catches_a_wrong_errno(
        pair: tuple[FakeCoreEngine, FakeCoreEngine], peers: dict[str, bytes]) -> None:
    ref_ce, c_ce = pair
    plan = [(0, (Op.SOCKET, DGRAM)), (0, (Op.LISTEN, 5))]  # UDP: -EOPNOTSUPP, broken: -EINVAL
    base = next(_ids)
    assert run_steps(ref_ce, plan, peers, base) == run_steps(c_ce, plan, peers, base)
    base = next(_ids)
    assert run_steps(ref_ce, plan, peers, base) != run_steps(_Broken(c_ce), plan, peers, base)


# -- 3. the entry point --------------------------------------------------------------------------


FAST_NSM = "netkernel.fastpath.nsm_kernel"


@pytest.fixture
def nsm_module() -> str:
    """The entry-point tests of tests/test_nsm_kernel.py, reused below, start the C NSM."""
    return FAST_NSM


test_entry_point_attaches_and_exits_when_the_coreengine_goes = \
    ref_tests.test_entry_point_attaches_and_exits_when_the_coreengine_goes
test_entry_point_without_a_coreengine_fails_cleanly = \
    ref_tests.test_entry_point_without_a_coreengine_fails_cleanly


def test_entry_point_exits_0_on_sigterm_closing_every_socket(tmp_path: Path) -> None:
    nsm = ref_tests.NSMProcess(tmp_path, FAST_NSM)
    try:
        with socket.create_server((LOOP, 0)) as srv:
            connect(nsm.ce, 1, srv.getsockname()[1])
            peer, _ = srv.accept()
            assert nsm.ce.do(Op.SOCKET, 2, DGRAM) == 0
            nsm.proc.send_signal(signal.SIGTERM)
            assert nsm.proc.wait(timeout=2) == 0
            peer.settimeout(2)
            with peer:
                assert peer.recv(10) == b"", "the NSM exited without closing its sockets"
    finally:
        err = nsm.close()
    assert "Traceback" not in err, err


# -- 4. the whole system: the C CoreEngine and NSM, the reference GuestLib -----------------


@pytest.fixture(scope="module", params=["kernel", "auto"], ids=["nsm=kernel", "nsm=auto"])
def c_instance(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fast-path instance (``netkernel up --impl fastpath --nsm …``): its NSM is ours,
    the kernel NSM, then the shm NSM (the default), which pairs these tests' connections."""
    name = f"test-fpnsm-{os.getpid()}-{request.param}"
    module = {"kernel": b"netkernel.fastpath.nsm_kernel", "auto": b"netkernel.fastpath.nsm_shm"}
    try:
        instance.up(name, impl="fastpath", nsm=request.param)
        nsm = status(name)["nsms"]
        assert len(nsm) == 1
        with open(f"/proc/{nsm[0]['pid']}/cmdline", "rb") as f:
            assert module[request.param] in f.read()
        yield name
    finally:
        instance.down(name)


@pytest.fixture
def on_c(c_instance: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("NETKERNEL_INSTANCE", c_instance)
    monkeypatch.delenv("NETKERNEL_ROOT", raising=False)
    return c_instance


#: A GuestLib tenant process: an echo server on every connection; prints its port.
ECHO = r"""
import json, sys, threading
from netkernel.reference import guestlib
lst = guestlib.create_server(("127.0.0.1", 0), backlog=128)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def accept():
    while True:
        c, _ = lst.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
sys.stdin.read()
"""

#: A GuestLib tenant process: sends N pseudo-random bytes in 8 KB messages, then the digest.
SENDER = r"""
import hashlib, json, random, sys
from netkernel.reference import guestlib
port, total = int(sys.argv[1]), int(sys.argv[2])
rng, h, sent = random.Random(7), hashlib.sha256(), 0
with guestlib.create_connection(("127.0.0.1", port), timeout=30) as c:
    while sent < total:
        block = rng.randbytes(min(8192, total - sent))
        c.sendall(block)
        h.update(block)
        sent += len(block)
print(json.dumps({"sent": sent, "sha": h.hexdigest()}), flush=True)
"""


def test_many_megabytes_through_one_connection_arrive_intact(on_c: str) -> None:
    """A tenant process sends 48 MiB in 8 KB messages to a Linux server, through GuestLib,
    the CoreEngine and the C NSM; every byte arrives once, in order (NSM-6, NSM-15)."""
    total = 48 << 20
    with socket.create_server((LOOP, 0)) as srv:
        srv.settimeout(30)
        with Program(SENDER, str(srv.getsockname()[1]), str(total), instance=on_c) as tenant:
            conn, _ = srv.accept()
            h, got = hashlib.sha256(), 0
            with conn:
                conn.settimeout(60)
                while data := conn.recv(1 << 20):
                    h.update(data)
                    got += len(data)
            report = tenant.read(timeout=60)
            assert tenant.finish() == 0
    assert (got, h.hexdigest()) == (report["sent"], report["sha"]) == (total, report["sha"])


def test_a_tenant_receives_many_megabytes_intact(on_c: str) -> None:
    """The other direction: a Linux sender, a GuestLib receiver; EV_DATA and BUF_RETURN
    cycle the slice many times over (NSM-16)."""
    total = 32 << 20
    payload = random.Random(11).randbytes(1 << 20)
    with socket.create_server((LOOP, 0)) as srv:
        port = srv.getsockname()[1]

        def feed() -> None:
            conn, _ = srv.accept()
            with conn:
                for _ in range(total // len(payload)):
                    conn.sendall(payload)

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        h, got = hashlib.sha256(), 0
        with guestlib.create_connection((LOOP, port), timeout=30) as c:
            while data := c.recv(1 << 16):
                h.update(data)
                got += len(data)
        t.join(10)
    assert got == total
    assert h.hexdigest() == hashlib.sha256(payload * (total // len(payload))).hexdigest()


def test_many_connections_at_once(on_c: str) -> None:
    """64 GuestLib connections to a GuestLib echo server (both tenants on the C NSM), each
    with its own bytes, interleaved over 8 threads."""
    with Program(ECHO, instance=on_c) as server:
        port = server.read()["port"]

        def client(k: int) -> None:
            for j in range(8):
                msg = hashlib.sha256(b"%d/%d" % (k, j)).digest() * (64 + 32 * j)
                with guestlib.create_connection((LOOP, port), timeout=20) as c:
                    c.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = c.recv(65536)
                        assert chunk, "EOF before the echo was complete"
                        got += chunk
                    assert got == msg

        errors = in_threads(client, 8, timeout=60)
        assert not errors, errors
        server.kill()


def test_a_dying_tenants_sockets_are_closed(on_c: str) -> None:
    """A tenant process with a connection, a listener and a UDP socket is killed: the
    CoreEngine detaches it, and the C NSM closes all three (NSM-12)."""
    code = r"""
import json, sys
from netkernel.reference import guestlib
c = guestlib.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
lst = guestlib.create_server(("127.0.0.1", 0))
import socket as std
u = guestlib.socket(std.AF_INET, std.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
print(json.dumps({"tcp": lst.getsockname()[1], "udp": u.getsockname()[1]}), flush=True)
sys.stdin.read()
"""
    with socket.create_server((LOOP, 0)) as srv:
        srv.settimeout(10)
        with Program(code, str(srv.getsockname()[1]), instance=on_c) as tenant:
            peer, _ = srv.accept()
            ports = tenant.read()
            tenant.kill()
        peer.settimeout(3)
        with peer:
            assert peer.recv(10) == b"", "the connection of a dead tenant stayed open"

    def free(kind: int, port: int) -> bool:
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((LOOP, port))
            except OSError:
                return False
            return True

    until("the dead tenant's ports are free", lambda: free(socket.SOCK_STREAM, ports["tcp"])
          and free(socket.SOCK_DGRAM, ports["udp"]), 3.0)
    nsm_entry = status(on_c)["nsms"][0]
    assert nsm_entry["counters"]["rejected"] == 0, nsm_entry


__all__ = ["STREAM"]
