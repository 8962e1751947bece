"""GuestLib (reference/guestlib.py): the Python drop-in for socket.socket.

Three groups:

* pure parts: the NQE wire twin, sockaddr parsing against the standard library;
* the device side against a scripted fake CoreEngine (:class:`FakeEngine`): the
  test reads the tenant's NQEs off its JOB and SEND rings and answers on
  COMPLETION and RECEIVE, so reply matching, buffer ownership, readiness,
  errors and a dying CoreEngine are checked NQE by NQE;
* end to end on a real instance (``nk_instance`` in conftest.py): TCP and UDP
  echo, select/selectors/asyncio, timeouts, makefile, errors, http.client
  against http.server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import selectors
import socket as std
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netkernel.conformance.runtime import Side
from netkernel.reference import bell, guestlib, shm
from netkernel.reference import device as dev
from netkernel.reference import nqe as nq
from netkernel.reference.nqe import NQE, Op
from tests import live

# -- pure parts ----------------------------------------------------------------------------


@given(st.builds(
    NQE, op=st.sampled_from([int(o) for o in Op]), qset=st.just(0), vm_id=st.just(0),
    sock_id=st.integers(0, nq.U32_MAX), op_data=st.integers(0, nq.U64_MAX),
    data_ptr=st.integers(0, nq.U64_MAX), size=st.integers(0, nq.U32_MAX),
    tag=st.integers(0, nq.U16_MAX)))
def test_wire_twin_packs_like_the_codec(n: NQE) -> None:
    raw = guestlib.pack_nqe(n.op, n.sock_id, n.op_data, n.data_ptr, n.size, n.tag)
    assert raw == nq.pack(n)
    assert nq.unpack(raw) == n


def test_negative_results_travel_as_twos_complement() -> None:
    raw = guestlib.pack_nqe(Op.SEND | nq.REPLY_BIT, 7, -errno.EPIPE)
    assert nq.unpack(raw).result == -errno.EPIPE


ADDRESSES: list[tuple[int, Any]] = [
    (std.AF_INET, ("127.0.0.1", 80)),
    (std.AF_INET, ("", 0)),
    (std.AF_INET, ("localhost", 65535)),
    (std.AF_INET, (b"127.0.0.1", 1)),
    (std.AF_INET, ("<broadcast>", 9)),
    (std.AF_INET6, ("::1", 80)),
    (std.AF_INET6, ("::1", 80, 5, 0)),
    (std.AF_INET6, ("::ffff:127.0.0.1", 8080)),
    (std.AF_INET6, ("", 0, 0, 0)),
]
BAD_ADDRESSES: list[tuple[int, Any]] = [
    (std.AF_INET, "127.0.0.1"),
    (std.AF_INET, ("127.0.0.1",)),
    (std.AF_INET, ("127.0.0.1", 80, 1)),
    (std.AF_INET, ("127.0.0.1", 70000)),
    (std.AF_INET, ("127.0.0.1", -1)),
    (std.AF_INET, ("127.0.0.1", "80")),
    (std.AF_INET, (1, 2)),
    (std.AF_INET, ("::1", 80)),
    (std.AF_INET, ("no-such-host.invalid", 80)),
    (std.AF_INET6, ("::1",)),
    (std.AF_INET6, ("::1", 0, 1, 2, 3)),
    (std.AF_INET6, ("::1", 0, -1)),
    (std.AF_INET6, ("127.0.0.1", 0)),
]


def _stdlib_sockaddr(family: int, address: Any) -> tuple[Any, ...]:
    """What the kernel makes of ``address``: bind a UDP socket there and read it back."""
    with std.socket(family, std.SOCK_DGRAM) as s:
        host = address[0]
        if family == std.AF_INET and host == "<broadcast>":
            return ("255.255.255.255", address[1])
        try:
            s.bind(address)
        except OSError as exc:  # a port or address in use here: compare the parse only
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                raise
            return ()
        return s.getsockname()


@pytest.mark.parametrize(("family", "address"), ADDRESSES)
def test_addresses_encode_as_the_kernel_reads_them(family: int, address: Any) -> None:
    raw = guestlib.encode_address(family, address, "bind")
    assert len(raw) == (16 if family == std.AF_INET else 28)
    decoded = guestlib.decode_address(raw)
    host = address[0].decode() if isinstance(address[0], bytes) else address[0]
    expect_host = {"": "0.0.0.0" if family == std.AF_INET else "::", "localhost": "127.0.0.1",
                   "<broadcast>": "255.255.255.255"}.get(host, host)
    assert decoded[:2] == (expect_host, address[1])
    if family == std.AF_INET6:
        assert decoded[2] == (address[2] if len(address) > 2 else 0)
    kernel = _stdlib_sockaddr(family, (address[0], 0, *tuple(address[2:])))
    if kernel:
        assert kernel[0] == decoded[0]


@pytest.mark.parametrize(("family", "address"), BAD_ADDRESSES)
def test_bad_addresses_fail_as_in_the_standard_library(family: int, address: Any) -> None:
    with std.socket(family, std.SOCK_DGRAM) as s, pytest.raises(Exception) as want:
        s.bind(address)
    with pytest.raises(Exception) as got:
        guestlib.encode_address(family, address, "bind")
    assert type(got.value) is type(want.value)
    assert got.value.args == want.value.args


def test_decode_address_renders_like_the_kernel() -> None:
    raw = nq.pack_sockaddr(nq.Sockaddr(std.AF_INET6, "::ffff:127.0.0.1", 443, 0, 0))
    assert guestlib.decode_address(raw) == ("::ffff:127.0.0.1", 443, 0, 0)
    with pytest.raises(ValueError):
        guestlib.decode_address(b"\x02\x00")


# -- a scripted CoreEngine ---------------------------------------------------------------

GEO = dev.Geometry(n_qsets=1, ring_entries=64, data_size=1 << 20, send_size=256 << 10,
                   buf_size=16 << 10)
Handler = Callable[[NQE], "int | tuple[int, bytes] | None"]


class FakeEngine:
    """CoreEngine and NSM in one, scripted by the test, for one tenant device.

    It serves the attach on ``engine.sock`` exactly as RUNTIME.md says, then a
    responder thread answers requests with ``handlers[op](nqe)``: an int is the
    result, ``(result, bytes)`` also writes the bytes into the request's
    buffer first (names, options), None leaves the request for the test
    (``held``). Every request and BUF_RETURN is recorded in ``seen``.
    """

    def __init__(self, root: Path, instance: str) -> None:
        self.dir = root / instance
        self.dir.mkdir(parents=True)
        self.srv = std.socket(std.AF_UNIX, std.SOCK_STREAM)
        self.srv.bind(str(self.dir / shm.ENGINE_SOCK))
        self.srv.listen()
        self.attached = threading.Event()
        self.conn: std.socket | None = None
        self.map: shm.DeviceMap | None = None
        self.seen: list[NQE] = []
        self.held: list[NQE] = []
        self.lock = threading.Lock()
        self.handlers: dict[int, Handler] = {
            Op.SOCKET: lambda n: 0, Op.BIND: lambda n: 0, Op.LISTEN: lambda n: 0,
            Op.CLOSE: lambda n: 0, Op.SETSOCKOPT: lambda n: 0, Op.SHUTDOWN: lambda n: 0,
            Op.SEND: lambda n: n.size - (n.op_data >> 32),
            Op.GETSOCKNAME: lambda n: (16, nq.pack_sockaddr(nq.Sockaddr(2, "127.0.0.1", 4242))),
            Op.GETSOCKOPT: lambda n: (4, struct.pack("=i", 0 if n.op_data == 1 | 4 << 32
                                                     else 7)),  # SO_ERROR 0, others 7
        }
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve_attach, daemon=True),
                        threading.Thread(target=self._respond, daemon=True)]
        for t in self.threads:
            t.start()
        self.rx_next = GEO.send_size

    def _serve_attach(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.srv.accept()
            msg = json.loads(conn.makefile("rb").readline())
            assert msg["cmd"] == "attach" and msg["kind"] == "tenant"
            path = self.dir / "vm-1.nk"
            self.map = shm.create_device(path, GEO, owner_pid=msg["pid"], dev_id=1)
            self.map.set_header("state", dev.State.READY)
            self.conn = conn
            self.attached.set()
            conn.sendall(json.dumps({"ok": True, "id": 1, "path": str(path)}).encode() + b"\n")

    def ring(self, rid: dev.RingId) -> Any:
        assert self.map is not None
        return self.map.ring(0, rid)

    def _respond(self) -> None:
        while not self.stop.is_set():
            if not self.attached.wait(0.05):
                continue
            got = self.ring(dev.RingId.JOB).pop_many(64) + self.ring(dev.RingId.SEND).pop_many(64)
            if not got:
                time.sleep(0.0005)
                continue
            for raw in got:
                n = nq.unpack(raw)
                with self.lock:
                    self.seen.append(n)
                handler = self.handlers.get(n.op)
                out = handler(n) if handler is not None else None
                if out is None:
                    if n.op != Op.BUF_RETURN:
                        with self.lock:
                            self.held.append(n)
                    continue
                self.answer(n, *(out if isinstance(out, tuple) else (out,)))

    def answer(self, n: NQE, result: int, out: bytes = b"") -> None:
        """Reply to ``n``: write ``out`` into its buffer, then push the reply (NQE-8)."""
        assert self.map is not None
        if out:
            data = self.map.data()
            data[n.data_ptr:n.data_ptr + len(out)] = out
        self._push(dev.RingId.COMPLETION, nq.pack(n.reply(result)))

    def event(self, op: Op, sock_id: int, op_data: int = 0, payload: bytes | None = None,
              prefix: bytes = b"") -> tuple[int, int]:
        """Push an event; with ``payload``, first write ``prefix + payload`` into the
        receive half (a fresh granule each time) and name it (EV_DATA)."""
        assert self.map is not None
        ptr = size = 0
        if payload is not None:
            ptr, size = self.rx_next, len(prefix) + len(payload)
            self.rx_next += -(-max(size, 1) // GEO.buf_size) * GEO.buf_size
            self.map.data()[ptr:ptr + size] = prefix + payload
        self._push(dev.RingId.RECEIVE, nq.pack(NQE(op=op, sock_id=sock_id,
                                                   op_data=nq.encode_result(op_data),
                                                   data_ptr=ptr, size=size)))
        return ptr, size

    def _push(self, rid: dev.RingId, raw: bytes) -> None:
        assert self.map is not None
        ring = self.ring(rid)
        with self.lock:
            assert ring.push(raw)
            bell.notify(ring, self.map.bell(0, dev.Bell.DEVICE))

    def requests(self, op: Op) -> list[NQE]:
        with self.lock:
            return [n for n in self.seen if n.op == op]

    def wait_for(self, op: Op, count: int = 1, timeout: float = 2.0) -> list[NQE]:
        deadline = time.monotonic() + timeout
        while len(found := self.requests(op)) < count:
            assert time.monotonic() < deadline, f"no {op.name} after {timeout} s: {self.seen}"
            time.sleep(0.002)
        return found

    def take_held(self, op: Op, timeout: float = 2.0) -> NQE:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                for n in self.held:
                    if n.op == op:
                        self.held.remove(n)
                        return n
            assert time.monotonic() < deadline, f"no held {op.name}"
            time.sleep(0.002)

    def kill(self) -> None:
        """The CoreEngine dies: engine.sock's connection closes."""
        if self.conn is not None:
            self.conn.close()

    def close(self) -> None:
        self.stop.set()
        self.kill()
        self.srv.close()
        for t in self.threads:
            t.join(1)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeEngine]:
    name = f"fake-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("NETKERNEL_ROOT", str(tmp_path))
    monkeypatch.setenv("NETKERNEL_INSTANCE", name)
    engine = FakeEngine(tmp_path, name)
    yield engine
    engine.close()


def _readable(sock: guestlib.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _writable(sock: guestlib.socket) -> bool:
    return bool(select.select([], [sock], [], 0)[1])


def _connected_pair(fake: FakeEngine) -> guestlib.socket:
    """A TCP socket the fake engine reports connected."""
    fake.handlers[Op.CONNECT] = lambda n: 0
    s = guestlib.socket()
    s.connect(("127.0.0.1", 9))
    return s


def test_socket_and_close_travel_as_nqes(fake: FakeEngine) -> None:
    s = guestlib.socket(std.AF_INET6, std.SOCK_DGRAM)
    (req,) = fake.wait_for(Op.SOCKET)
    assert req.sock_id != 0 and req.vm_id == 0 and req.qset == 0
    assert req.op_data == std.AF_INET6 | std.SOCK_DGRAM << 16
    assert s.family == std.AF_INET6 and s.type == std.SOCK_DGRAM and s.proto == 0
    assert s.fileno() >= 0 and s.gettimeout() is None
    s.close()
    (close,) = fake.wait_for(Op.CLOSE)
    assert close.sock_id == req.sock_id
    assert s.fileno() == -1
    with pytest.raises(OSError) as exc:
        s.getsockname()
    assert exc.value.errno == errno.EBADF
    s.close()  # twice is fine


def test_unsupported_family_and_type_fail_locally(fake: FakeEngine) -> None:
    with pytest.raises(OSError) as exc:
        guestlib.socket(std.AF_UNIX, std.SOCK_STREAM)
    assert exc.value.errno == errno.EAFNOSUPPORT
    with pytest.raises(OSError) as exc:
        guestlib.socket(std.AF_INET, std.SOCK_RAW)
    assert exc.value.errno == errno.ESOCKTNOSUPPORT
    assert not fake.requests(Op.SOCKET)


def test_stack_errors_come_back_as_the_same_oserror(fake: FakeEngine) -> None:
    fake.handlers[Op.BIND] = lambda n: -errno.EADDRINUSE
    s = guestlib.socket()
    with pytest.raises(OSError) as exc:
        s.bind(("127.0.0.1", 80))
    assert exc.value.errno == errno.EADDRINUSE
    (bind,) = fake.requests(Op.BIND)
    assert bind.size == 16 and bind.data_ptr < GEO.send_size  # a send-half buffer (BUF-1)
    fake.handlers[Op.SOCKET] = lambda n: -errno.EMFILE
    with pytest.raises(OSError) as exc:
        guestlib.socket()
    assert exc.value.errno == errno.EMFILE
    s.close()


def test_names_and_options_come_from_the_stack(fake: FakeEngine) -> None:
    s = guestlib.socket()
    assert s.getsockname() == ("127.0.0.1", 4242)
    assert s.getsockopt(std.SOL_SOCKET, std.SO_RCVBUF) == 7
    s.setsockopt(std.IPPROTO_TCP, std.TCP_NODELAY, 1)
    (opt,) = fake.requests(Op.SETSOCKOPT)
    assert opt.op_data == std.IPPROTO_TCP | std.TCP_NODELAY << 32 and opt.size == 4
    (get,) = fake.requests(Op.GETSOCKOPT)
    assert get.op_data == std.SOL_SOCKET | std.SO_RCVBUF << 32
    s.close()


def test_replies_are_matched_by_tag_in_any_order(fake: FakeEngine) -> None:
    fake.handlers[Op.GETSOCKNAME] = lambda n: None  # held: answered below, reversed
    s = guestlib.socket()
    results: dict[int, Any] = {}

    def ask(i: int) -> None:
        results[i] = s.getsockname()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    held = [fake.take_held(Op.GETSOCKNAME) for _ in range(3)]
    assert len({n.tag for n in held}) == 3  # unique among requests in flight (NQE-9)
    for port, n in zip((1, 2, 3), reversed(held), strict=True):
        fake.answer(n, 16, nq.pack_sockaddr(nq.Sockaddr(2, "10.0.0.1", port)))
    for t in threads:
        t.join(2)
    assert sorted(r[1] for r in results.values()) == [1, 2, 3]
    s.close()


def test_received_data_is_read_then_returned(fake: FakeEngine) -> None:
    s = _connected_pair(fake)
    assert not _readable(s) and _writable(s)
    sid = fake.requests(Op.SOCKET)[0].sock_id
    span1 = fake.event(Op.EV_DATA, sid, 0, b"hello ")
    span2 = fake.event(Op.EV_DATA, sid, 0, b"world")
    deadline = time.monotonic() + 2
    while not _readable(s):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert s.recv(3, std.MSG_PEEK) == b"hel"
    assert s.recv(8) == b"hello wo"
    (ret,) = fake.wait_for(Op.BUF_RETURN)  # the first buffer is consumed: back (BUF-4)
    assert (ret.data_ptr, ret.size, ret.sock_id) == (*span1, 0)
    assert _readable(s)
    buf = bytearray(10)
    assert s.recv_into(buf) == 3 and buf[:3] == b"rld"
    assert [(n.data_ptr, n.size) for n in fake.wait_for(Op.BUF_RETURN, 2)] == [span1, span2]
    assert not _readable(s)
    fake.event(Op.EV_FIN, sid)
    assert s.recv(10) == b""  # EOF once the data is read
    assert _readable(s)
    s.close()


def test_datagrams_keep_boundaries_and_source(fake: FakeEngine) -> None:
    s = guestlib.socket(std.AF_INET, std.SOCK_DGRAM)
    sid = fake.requests(Op.SOCKET)[0].sock_id
    src = nq.pack_sockaddr(nq.Sockaddr(2, "10.1.2.3", 5353))
    fake.event(Op.EV_DATA, sid, 16, b"first", prefix=src)
    fake.event(Op.EV_DATA, sid, 16, b"second", prefix=src)
    s.settimeout(2)
    assert s.recvfrom(3) == (b"fir", ("10.1.2.3", 5353))  # truncated, rest dropped
    assert s.recvfrom(100) == (b"second", ("10.1.2.3", 5353))
    assert s.sendto(b"xyz", ("10.9.9.9", 53)) == 3
    (send,) = fake.requests(Op.SEND)
    assert send.op_data == 16 << 32 and send.size == 19  # address prefix + payload
    s.close()


def test_async_error_is_reported_once_then_eof_and_epipe(fake: FakeEngine) -> None:
    s = _connected_pair(fake)
    sid = fake.requests(Op.SOCKET)[0].sock_id
    fake.event(Op.EV_ERROR, sid, -errno.ECONNRESET)
    s.settimeout(2)
    with pytest.raises(ConnectionResetError):
        s.recv(10)
    assert s.recv(10) == b""  # as Linux after a reset
    with pytest.raises(BrokenPipeError):
        s.send(b"x")
    s.close()


def test_sends_are_queued_up_to_a_limit_then_block(fake: FakeEngine) -> None:
    fake.handlers[Op.SEND] = lambda n: None  # the stack takes nothing yet
    s = _connected_pair(fake)
    s.setblocking(False)
    limit = guestlib.device().send_limit
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            sent += s.send(b"x" * GEO.buf_size)
    assert sent == limit  # SO_SNDBUF-like: that much waits in the stack, no more
    held = [fake.take_held(Op.SEND) for _ in range(sent // GEO.buf_size)]
    assert {n.data_ptr + n.size <= GEO.send_size for n in held} == {True}  # send half
    assert len({n.data_ptr for n in held}) == len(held)  # no two share a buffer (BUF-2)
    fake.answer(held[0], held[0].size)
    deadline = time.monotonic() + 2
    while True:
        with contextlib.suppress(BlockingIOError):
            assert s.send(b"y" * 100) == 100
            break
        assert time.monotonic() < deadline
        time.sleep(0.002)
    s.close()
    time.sleep(0.05)
    assert not fake.requests(Op.CLOSE)  # CLOSE waits for the SENDs (it would overtake them)
    for n in [*held[1:], fake.take_held(Op.SEND)]:
        fake.answer(n, n.size)
    fake.wait_for(Op.CLOSE)


def test_large_messages_split_into_granules_and_sendall_waits(fake: FakeEngine) -> None:
    s = _connected_pair(fake)
    payload = os.urandom(GEO.buf_size * 3 + 100)
    s.sendall(payload)
    sends = fake.requests(Op.SEND)
    assert [n.size for n in sends] == [GEO.buf_size] * 3 + [100]
    s.close()


def test_failed_send_surfaces_on_the_next_call(fake: FakeEngine) -> None:
    fake.handlers[Op.SEND] = lambda n: -errno.ECONNRESET
    s = _connected_pair(fake)
    assert s.send(b"abc") == 3  # queued, like a kernel socket buffer
    fake.wait_for(Op.SEND)
    deadline = time.monotonic() + 2
    while (err := s.getsockopt(std.SOL_SOCKET, std.SO_ERROR)) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert err == errno.ECONNRESET  # read once, then the connection is over: EPIPE
    with pytest.raises(BrokenPipeError):
        s.sendall(b"more")
    s.close()


def test_nonblocking_connect_is_not_writable_until_answered(fake: FakeEngine) -> None:
    fake.handlers[Op.CONNECT] = lambda n: None
    s = guestlib.socket()
    s.setblocking(False)
    assert s.connect_ex(("127.0.0.1", 9)) == errno.EINPROGRESS
    assert not _writable(s)
    assert s.connect_ex(("127.0.0.1", 9)) == errno.EALREADY
    fake.answer(fake.take_held(Op.CONNECT), -errno.ECONNREFUSED)
    deadline = time.monotonic() + 2
    while not _writable(s):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert s.getsockopt(std.SOL_SOCKET, std.SO_ERROR) == errno.ECONNREFUSED
    assert s.connect_ex(("127.0.0.1", 9)) == errno.ECONNABORTED  # error already read
    s.close()


def test_timeouts_raise_timeouterror(fake: FakeEngine) -> None:
    fake.handlers[Op.CONNECT] = lambda n: None
    s = guestlib.socket()
    s.settimeout(0.05)
    with pytest.raises(TimeoutError, match="timed out"):
        s.connect(("127.0.0.1", 9))
    fake.answer(fake.take_held(Op.CONNECT), 0)
    deadline = time.monotonic() + 2
    while s.connect_ex(("127.0.0.1", 9)) == errno.EALREADY:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    with pytest.raises(TimeoutError):
        s.recv(1)
    s.settimeout(0)
    with pytest.raises(BlockingIOError) as exc:
        s.recv(1)
    assert exc.value.errno == errno.EAGAIN
    s.close()


def test_accept_queue_is_local_and_readable(fake: FakeEngine) -> None:
    fake.handlers[Op.ACCEPT] = lambda n: None
    lst = guestlib.socket()
    lst.listen()
    posted = fake.take_held(Op.ACCEPT)
    new_id = posted.op_data & 0xFFFF_FFFF
    assert new_id != posted.sock_id and not posted.op_data >> 32  # a waiting ACCEPT
    lst.settimeout(0.05)
    with pytest.raises(TimeoutError):
        lst.accept()
    assert not _readable(lst)
    fake.event(Op.EV_DATA, new_id, 0, b"early")  # may overtake the ACCEPT reply
    fake.answer(posted, 16, nq.pack_sockaddr(nq.Sockaddr(2, "10.0.0.7", 5000)))
    deadline = time.monotonic() + 2
    while not _readable(lst):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    conn, addr = lst.accept()
    assert addr == ("10.0.0.7", 5000) and conn.gettimeout() is None
    assert conn.recv(10) == b"early"
    fake.take_held(Op.ACCEPT)  # the next one is posted
    conn.close()
    lst.close()


def test_dead_coreengine_fails_blocked_and_later_calls_within_a_second(
        fake: FakeEngine) -> None:
    s = _connected_pair(fake)
    fake.handlers[Op.GETSOCKNAME] = lambda n: None
    errors: list[BaseException] = []

    def blocked(call: Callable[[], object]) -> None:
        try:
            call()
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=blocked, args=(lambda: s.recv(10),)),
               threading.Thread(target=blocked, args=(s.getsockname,))]
    for t in threads:
        t.start()
    fake.take_held(Op.GETSOCKNAME)
    time.sleep(0.05)
    start = time.monotonic()
    fake.kill()
    for t in threads:
        t.join(2)
    assert time.monotonic() - start < 1.0
    assert sorted(e.errno or 0 for e in errors) == [errno.ECONNRESET] * 2
    with pytest.raises(BrokenPipeError):
        s.send(b"x")
    with pytest.raises(ConnectionResetError):
        s.getpeername()
    s.close()


def test_makefile_reads_lines_and_writes(fake: FakeEngine) -> None:
    s = _connected_pair(fake)
    sid = fake.requests(Op.SOCKET)[0].sock_id
    fake.event(Op.EV_DATA, sid, 0, b"line one\nline two\n")
    fake.event(Op.EV_FIN, sid)
    with s.makefile("rwb") as f:
        assert f.readline() == b"line one\n"
        f.write(b"reply\n")
        f.flush()
        assert f.read() == b"line two\n"
    s.close()
    assert fake.wait_for(Op.SEND)[0].size == 6
    fake.wait_for(Op.CLOSE)


def test_fork_child_gets_its_own_device(fake: FakeEngine) -> None:
    s = guestlib.socket()
    pid = os.fork()
    if pid == 0:  # the child: the inherited socket is not usable here
        try:
            s.getsockname()
            code = 1
        except OSError as exc:
            code = 0 if exc.errno == errno.EBADF and s.fileno() == -1 else 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.getsockname() == ("127.0.0.1", 4242)  # the parent is unaffected
    s.close()


def test_no_instance_is_enetdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETKERNEL_ROOT", str(tmp_path))
    with pytest.raises(OSError) as exc:
        guestlib.socket(instance="nowhere")
    assert exc.value.errno == errno.ENETDOWN


# -- end to end on a real instance -----------------------------------------------------------

@pytest.mark.parametrize("family", [std.AF_INET, std.AF_INET6])
def test_tcp_echo(nk_instance: str, family: int) -> None:
    host = "127.0.0.1" if family == std.AF_INET else "::1"
    with guestlib.socket(family) as lst:
        lst.setsockopt(std.SOL_SOCKET, std.SO_REUSEADDR, 1)
        lst.bind((host, 0))
        lst.listen()
        port = lst.getsockname()[1]
        server = live.echo_server(lst)
        with guestlib.socket(family) as c:
            c.settimeout(10)
            c.connect((host, port))
            assert c.getpeername()[:2] == (host, port)
            payload = os.urandom(200_000)
            c.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                got += c.recv(65536)
            assert bytes(got) == payload
            c.shutdown(std.SHUT_WR)
            assert c.recv(10) == b""
        server.join(10)


@pytest.mark.parametrize("family", [std.AF_INET, std.AF_INET6])
def test_udp_echo(nk_instance: str, family: int) -> None:
    host = "127.0.0.1" if family == std.AF_INET else "::1"
    with guestlib.socket(family, std.SOCK_DGRAM) as a, \
            guestlib.socket(family, std.SOCK_DGRAM) as b:
        a.bind((host, 0))
        b.bind((host, 0))
        a.settimeout(5)
        b.settimeout(5)
        for size in (0, 1, 1400, 30_000):
            msg = os.urandom(size)
            a.sendto(msg, b.getsockname())
            got, src = b.recvfrom(65536)
            assert got == msg and src[:2] == a.getsockname()[:2]
            b.sendto(got, src)
            assert a.recv(65536) == msg


def test_readiness_with_select_and_selectors(nk_instance: str) -> None:
    with guestlib.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        assert select.select([lst], [], [], 0)[0] == []
        c = guestlib.create_connection(("127.0.0.1", port), timeout=5)
        assert select.select([lst], [], [], 5)[0] == [lst]
        s, _ = lst.accept()
        with c, s:
            sel = selectors.DefaultSelector()
            sel.register(s, selectors.EVENT_READ)
            assert sel.select(0) == []
            c.sendall(b"ping")
            assert [k.fileobj for k, _ in sel.select(5)] == [s]
            assert s.recv(10) == b"ping"
            assert sel.select(0) == []
            c.close()
            assert [k.fileobj for k, _ in sel.select(5)] == [s]
            assert s.recv(10) == b""
            sel.close()


def test_asyncio_loop_drives_nonblocking_sockets(nk_instance: str) -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        lst = guestlib.create_server(("127.0.0.1", 0))
        lst.setblocking(False)
        c = guestlib.socket()
        c.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(lst))  # type: ignore[arg-type]
        await loop.sock_connect(c, lst.getsockname())  # type: ignore[arg-type]
        s, _ = await accept
        await loop.sock_sendall(c, b"x" * 100_000)  # type: ignore[arg-type]
        got = b""
        while len(got) < 100_000:
            got += await loop.sock_recv(s, 65536)
        for sock in (c, s, lst):
            sock.close()
        return got

    assert asyncio.run(asyncio.wait_for(main(), 20)) == b"x" * 100_000


def test_errors_match_linux(nk_instance: str) -> None:
    with std.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]  # nothing listens there
    for make in (std.socket, guestlib.socket):
        s = make()
        with pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", free_port))
        with pytest.raises(OSError) as exc:
            s.recv(1)
        assert exc.value.errno == errno.ENOTCONN
        with pytest.raises(OSError) as exc:
            s.getpeername()
        assert exc.value.errno == errno.ENOTCONN
        with pytest.raises(BrokenPipeError):
            s.send(b"x")
        s.close()
        with pytest.raises(OSError) as exc:
            s.recv(1)
        assert exc.value.errno == errno.EBADF
        u = make(std.AF_INET, std.SOCK_DGRAM)
        with pytest.raises(OSError) as exc:
            u.send(b"x")
        assert exc.value.errno == errno.EDESTADDRREQ
        with pytest.raises(OSError) as exc:
            u.listen()
        assert exc.value.errno == errno.EOPNOTSUPP
        u.close()


def test_options_reach_the_kernel(nk_instance: str) -> None:
    with guestlib.socket() as s, std.socket() as k:
        for sock in (s, k):
            sock.setsockopt(std.SOL_SOCKET, std.SO_REUSEADDR, 1)
            sock.setsockopt(std.SOL_SOCKET, std.SO_KEEPALIVE, 1)
            sock.setsockopt(std.IPPROTO_TCP, std.TCP_NODELAY, 1)
            sock.setsockopt(std.SOL_SOCKET, std.SO_RCVBUF, 65536)
        for level, opt in ((std.SOL_SOCKET, std.SO_REUSEADDR), (std.SOL_SOCKET, std.SO_KEEPALIVE),
                           (std.SOL_SOCKET, std.SO_TYPE), (std.SOL_SOCKET, std.SO_ACCEPTCONN),
                           (std.SOL_SOCKET, std.SO_RCVBUF), (std.SOL_SOCKET, std.SO_ERROR),
                           (std.IPPROTO_TCP, std.TCP_NODELAY)):
            assert s.getsockopt(level, opt) == k.getsockopt(level, opt), (level, opt)
        s.listen()
        k.listen()
        assert s.getsockopt(std.SOL_SOCKET, std.SO_ACCEPTCONN) == 1


def test_http_client_fetches_from_http_server(nk_instance: str) -> None:
    import http.client
    import http.server
    import socketserver

    body = os.urandom(300_000)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.HTTPServer):
        def __init__(self, address: tuple[str, int]) -> None:
            socketserver.BaseServer.__init__(self, address, Handler)
            self.socket = guestlib.socket(self.address_family, self.socket_type)  # type: ignore[assignment]
            self.server_bind()
            self.server_activate()

    class Client(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = guestlib.create_connection((self.host, self.port), self.timeout)

    server = Server(("127.0.0.1", 0))
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    try:
        client = Client("127.0.0.1", server.server_address[1], timeout=10)
        for _ in range(3):  # keep-alive: one connection, three requests
            client.request("GET", "/")
            resp = client.getresponse()
            assert resp.status == 200 and resp.read() == body
        client.close()
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


# -- Linux is the oracle: the same call sequences on both --------------------------------

CALLS = st.sampled_from([
    "bind", "listen", "connect", "connect_refused", "connect_nb", "accept", "send", "recv",
    "shutdown_rd", "shutdown_wr", "shutdown_rdwr", "close", "getsockname", "getpeername",
    "setsockopt", "getsockopt", "so_error", "sendto",
])


class Backend(Side):
    """One side of the comparison: the conformance suite's listener and UDP peer, with
    their ports at hand."""

    def __init__(self, make: Callable[..., Any], family: int) -> None:
        super().__init__(make, family)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.udp_port = self.udp.getsockname()[1]


def _nonblocking(s: Any, mode: float | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` on ``s`` made non-blocking for the call, then back to ``mode``."""
    s.setblocking(False)
    try:
        return fn()
    finally:
        s.settimeout(mode)


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        result = fn()
    except OSError as exc:
        return ("error", type(exc).__name__, exc.errno)
    return ("ok", result)


def _run_call(b: Backend, s: Any, call: str, closed_port: int, mode: float | None) -> Any:
    """One call; the result keeps only what both sides must agree on (not port numbers)."""
    def name(get: Callable[[], tuple[Any, ...]]) -> Callable[[], Any]:
        return lambda: get()[0]

    table: dict[str, Callable[[], Any]] = {
        "bind": lambda: s.bind((b.host, 0)),
        "listen": lambda: s.listen(4),
        "connect": lambda: s.connect((b.host, b.udp_port if s.type == std.SOCK_DGRAM
                                      else b.port)),
        "connect_refused": lambda: s.connect((b.host, closed_port)),
        "connect_nb": lambda: _nonblocking(s, mode, lambda: s.connect_ex((b.host, b.port))),
        "accept": lambda: _nonblocking(s, mode, lambda: s.accept()[1][0]),
        "send": lambda: s.send(b"abc", std.MSG_DONTWAIT),
        "recv": lambda: s.recv(10, std.MSG_DONTWAIT),
        "shutdown_rd": lambda: s.shutdown(std.SHUT_RD),
        "shutdown_wr": lambda: s.shutdown(std.SHUT_WR),
        "shutdown_rdwr": lambda: s.shutdown(std.SHUT_RDWR),
        "close": s.close,
        "getsockname": name(s.getsockname),
        "getpeername": name(s.getpeername),
        "setsockopt": lambda: s.setsockopt(std.SOL_SOCKET, std.SO_KEEPALIVE, 1),
        "getsockopt": lambda: (s.getsockopt(std.SOL_SOCKET, std.SO_TYPE),
                               s.getsockopt(std.SOL_SOCKET, std.SO_ACCEPTCONN)),
        "so_error": lambda: s.getsockopt(std.SOL_SOCKET, std.SO_ERROR),
        "sendto": lambda: s.sendto(b"dgram", (b.host, b.udp_port)),
    }
    return _outcome(table[call])


@pytest.mark.parametrize("family", [std.AF_INET, std.AF_INET6])
@pytest.mark.parametrize("kind", [std.SOCK_STREAM, std.SOCK_DGRAM])
def test_call_sequences_match_linux(nk_instance: str, family: int, kind: int) -> None:
    with std.socket(family) as probe:
        probe.bind(("127.0.0.1" if family == std.AF_INET else "::1", 0))
        closed_port = probe.getsockname()[1]  # nothing will listen there
    linux, netkernel = Backend(std.socket, family), Backend(guestlib.socket, family)

    # blocking (None), non-blocking (0.0) or a timeout: CPython behaves differently in each
    @given(st.lists(CALLS, min_size=1, max_size=8), st.sampled_from([None, 0.0, 0.25]))
    def run(calls: list[str], mode: float | None) -> None:
        socks = [linux.make(family, kind), netkernel.make(family, kind)]
        for s in socks:
            s.settimeout(mode)
        try:
            for call in calls:
                got = [_run_call(b, s, call, closed_port, mode)
                       for b, s in zip((linux, netkernel), socks, strict=True)]
                if call == "connect_nb" or (call.startswith("connect") and mode == 0.0):
                    # on loopback Linux completes the handshake within connect(); through
                    # NetKernel it completes a round trip later: wait for both
                    time.sleep(0.02)
                elif kind == std.SOCK_DGRAM and call in ("send", "sendto"):
                    # an ICMP error reaches Linux's socket within send(); through NetKernel
                    # it is an EV_ERROR a moment later
                    time.sleep(0.01)
                assert got[1] == got[0], (calls, call)
        finally:
            for s in socks:
                s.close()

    try:
        run()
    finally:
        linux.close()
        netkernel.close()


# -- faults, fork and load on a real instance ----------------------------------------------

@pytest.fixture
def own_instance(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An instance of this test alone (the test may break it)."""
    with live.own_instance(monkeypatch) as name:
        yield name


def test_dead_nsm_fails_blocked_and_later_calls_within_a_second(own_instance: str) -> None:
    import signal

    lst = guestlib.create_server(("127.0.0.1", 0))
    c = guestlib.create_connection(lst.getsockname())
    s, _ = lst.accept()
    failed: list[tuple[float, OSError]] = []

    def reader() -> None:
        try:
            while s.recv(65536):
                pass
        except OSError as exc:
            failed.append((time.monotonic(), exc))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    c.sendall(os.urandom(300_000))  # mid-transfer
    (pid_file,) = shm.instance_dir(own_instance).glob("nsm-*.pid")
    killed = time.monotonic()
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    t.join(3)
    assert failed, "the blocked recv did not fail"
    when, exc = failed[0]
    assert when - killed < 1.0 and exc.errno == errno.ECONNRESET
    with pytest.raises(ConnectionResetError):
        c.send(b"x")  # the first call reports the reset ...
    with pytest.raises(BrokenPipeError):
        c.send(b"x")  # ... later sends the broken pipe, as on Linux
    with pytest.raises(OSError) as no_nsm:
        guestlib.socket()
    assert no_nsm.value.errno == errno.ENETDOWN  # no NSM left to serve a new socket
    for sock in (c, s, lst):
        sock.close()


def test_forked_child_gets_a_device_of_its_own(nk_instance: str) -> None:
    with guestlib.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with guestlib.create_connection(("127.0.0.1", port), timeout=10) as c:
                    c.sendall(b"from the child")
                    code = 0 if c.recv(100) == b"hello child" else 2
            finally:
                os._exit(code)
        lst.settimeout(10)
        s, _ = lst.accept()
        with s:
            assert s.recv(100) == b"from the child"
            s.sendall(b"hello child")
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_concurrent_connections(nk_instance: str) -> None:
    n = 50
    with guestlib.create_server(("127.0.0.1", 0), backlog=n) as lst:
        server = live.echo_server(lst, count=n)
        results: list[bool] = []

        def client(i: int) -> None:
            with guestlib.create_connection(lst.getsockname(), timeout=20) as c:
                msg = f"client {i} ".encode() * 100
                c.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += c.recv(65536)
                results.append(got == msg)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        server.join(30)
        assert results == [True] * n


def test_data_queued_at_exit_is_delivered(nk_instance: str) -> None:
    """send() returns before the stack took the bytes; exiting must not lose them."""
    import subprocess
    import sys

    with guestlib.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        code = ("from netkernel.reference import guestlib\n"
                f"c = guestlib.create_connection(('127.0.0.1', {port}))\n"
                "for _ in range(64):\n"
                "    c.send(b'z' * 16384)\n")  # no close, no sendall: straight to exit
        child = subprocess.Popen([sys.executable, "-W", "error::ResourceWarning", "-c", code],
                                 stderr=subprocess.PIPE)
        lst.settimeout(10)
        s, _ = lst.accept()
        with s:
            s.settimeout(10)
            got = 0
            while data := s.recv(65536):
                got += len(data)
        assert child.wait(10) == 0, child.stderr.read() if child.stderr else ""
        assert got == 64 * 16384


def test_asyncio_streams_over_netkernel_sockets(nk_instance: str) -> None:
    async def main() -> list[bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                writer.write(line.upper())
                await writer.drain()
            writer.close()

        lst = guestlib.create_server(("127.0.0.1", 0))
        server = await asyncio.start_server(echo, sock=lst)  # type: ignore[arg-type]
        c = guestlib.create_connection(lst.getsockname())
        reader, writer = await asyncio.open_connection(sock=c)  # type: ignore[arg-type]
        got = []
        for word in (b"one\n", b"two\n", b"x" * 60_000 + b"\n"):
            writer.write(word)
            await writer.drain()
            got.append(await reader.readline())
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert got == [b"ONE\n", b"TWO\n", b"X" * 60_000 + b"\n"]
