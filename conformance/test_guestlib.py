"""The GuestLib role (spec/guestlib.md) and its side of the control protocol (spec/runtime.md).

The target's ``guestlib`` role is a socket factory shaped like the ``socket``
module (``socket``, ``create_connection``, ``create_server``); it finds its
instance through ``NETKERNEL_INSTANCE`` (RT-1), which the fixtures set to the
session's instance: the target's CoreEngine and NSM, or the reference's
(targets.py). Linux sockets are the peers and the oracle. Tests that kill
processes get an instance of their own; tests about a whole process (exit,
one device, a killed tenant) run a child Python that imports the role's
module by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from netkernel.conformance.runtime import (
    Instance,
    Runtime,
    Side,
    peer_sees,
    unique_name,
    wait_until,
)

LOOP = "127.0.0.1"
LOOP6 = "::1"
HOSTS = {socket.AF_INET: LOOP, socket.AF_INET6: LOOP6}


@pytest.fixture
def inst(guestlib: Any, nk_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Instance:
    """The session's instance, named by NETKERNEL_INSTANCE for the test (RT-1)."""
    shared = nk_runtime.shared()
    monkeypatch.setenv("NETKERNEL_INSTANCE", shared.name)
    return shared


@pytest.fixture
def linux_server() -> Iterator[socket.socket]:
    with socket.create_server((LOOP, 0), backlog=16) as srv:
        srv.settimeout(5)
        yield srv


def mine(inst: Instance, pid: int | None = None) -> list[dict[str, Any]]:
    """The GuestLib devices of a process in the instance (the suite's raw tenants aside)."""
    pid = os.getpid() if pid is None else pid
    return [t for t in inst.status()["tenants"]
            if t["pid"] == pid and not str(t["name"]).startswith("conformance-")]


def child(guestlib: Any, body: str, inst: Instance, **popen: Any) -> subprocess.Popen[str]:
    """A Python process running ``body`` with the role's module imported as ``gl``."""
    code = f"import importlib\ngl = importlib.import_module({guestlib.__name__!r})\n"
    code += textwrap.dedent(body)
    env = dict(os.environ, NETKERNEL_INSTANCE=inst.name)
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **popen)


# -- the socket -----------------------------------------------------------------------------------


@pytest.mark.req("GL-1")
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_drop_in_for_socket_socket(inst: Instance, guestlib: Any, family: int) -> None:
    host = HOSTS[family]
    for type_ in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with guestlib.socket(family, type_) as s, socket.socket(family, type_) as k:
            assert (s.family, s.type, s.proto) == (k.family, k.type, k.proto)
            assert isinstance(s.family, socket.AddressFamily)
            assert isinstance(s.type, socket.SocketKind)
        assert s.fileno() == -1  # the context manager closed it
    with guestlib.socket(family) as srv:
        srv.bind((host, 0))
        srv.listen()
        c = guestlib.create_connection(srv.getsockname()[:2], timeout=5)
        a, addr = srv.accept()
        assert type(a) is type(srv) and addr == c.getsockname()
        with c, a:
            c.sendall(b"hello, ")
            assert c.send(b"world\n") == 6
            buf = bytearray(7)
            assert a.recv_into(buf) == 7 and buf == b"hello, "
            with a.makefile("rb") as f:
                assert f.readline() == b"world\n"
            # as on Linux: the first collects create_connection's timed connect, then EISCONN
            assert [c.connect_ex(srv.getsockname()) for _ in "ab"] == [0, errno.EISCONN]
            assert a.getpeername() == c.getsockname()
            a.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            a.shutdown(socket.SHUT_WR)
            assert c.recv(10) == b""
    with guestlib.socket(family, socket.SOCK_DGRAM) as u, \
            guestlib.socket(family, socket.SOCK_DGRAM) as v:
        u.bind((host, 0))
        v.bind((host, 0))
        assert v.sendto(b"dgram", u.getsockname()) == 5
        u.settimeout(5)
        data, src = u.recvfrom(100)
        assert (data, src) == (b"dgram", v.getsockname())
        v.sendto(b"into", u.getsockname())
        buf = bytearray(10)
        assert u.recvfrom_into(buf) == (4, v.getsockname())
    with guestlib.create_server((host, 0), family=family) as srv2:
        assert srv2.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    for args, code in (((socket.AF_UNIX, socket.SOCK_STREAM), errno.EAFNOSUPPORT),
                       ((family, socket.SOCK_RAW), errno.ESOCKTNOSUPPORT),
                       ((family, socket.SOCK_SEQPACKET), errno.ESOCKTNOSUPPORT)):
        with pytest.raises(OSError) as exc:
            guestlib.socket(*args)
        assert exc.value.errno == code, args


# -- Linux is the oracle -------------------------------------------------------------------------


def _nonblocking(s: Any, fn: Callable[[], Any]) -> Any:
    s.setblocking(False)
    try:
        return fn()
    finally:
        s.setblocking(True)


def _call(side: Side, s: Any, call: str, closed: int) -> Any:
    """One call; the outcome keeps what both must agree on (not port numbers)."""
    udp = s.type == socket.SOCK_DGRAM
    table: dict[str, Callable[[], Any]] = {
        "bind": lambda: s.bind((side.host, 0)),
        "listen": lambda: s.listen(4),
        "connect": lambda: s.connect((side.host, side.udp.getsockname()[1] if udp
                                      else side.listener.getsockname()[1])),
        "connect_refused": lambda: s.connect((side.host, closed)),
        "connect_nb": lambda: _nonblocking(s, lambda: s.connect_ex(
            (side.host, side.listener.getsockname()[1]))),
        "accept_nb": lambda: _nonblocking(s, lambda: s.accept()[1][0]),
        "send": lambda: s.send(b"abc", socket.MSG_DONTWAIT),
        "sendto": lambda: s.sendto(b"dgram", side.udp.getsockname()),
        "recv_nb": lambda: s.recv(10, socket.MSG_DONTWAIT),
        "shutdown_rd": lambda: s.shutdown(socket.SHUT_RD),
        "shutdown_wr": lambda: s.shutdown(socket.SHUT_WR),
        "shutdown_rdwr": lambda: s.shutdown(socket.SHUT_RDWR),
        "close": s.close,
        "getsockname": lambda: s.getsockname()[0],
        "getpeername": lambda: s.getpeername()[0],
        "getsockopt": lambda: (s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
                               s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
        "so_error": lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
        "setsockopt": lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
    }
    try:
        return ("ok", table[call]())
    except OSError as exc:
        return ("error", type(exc).__name__, exc.errno)


#: Call sequences, each run on a TCP and a UDP socket of each family.
SEQUENCES = [
    ["connect_refused", "recv_nb", "getpeername", "send", "so_error", "close", "recv_nb"],
    ["bind", "bind", "listen", "getsockopt", "accept_nb", "connect", "shutdown_rd", "close"],
    ["connect", "connect", "getpeername", "shutdown_wr", "send", "recv_nb", "so_error"],
    ["listen", "send", "recv_nb", "connect", "shutdown_rdwr", "listen", "getsockname"],
    ["shutdown_rd", "recv_nb", "shutdown_wr", "connect", "send", "getpeername"],
    ["connect_nb", "connect_nb", "connect", "getpeername", "accept_nb"],
    ["accept_nb", "setsockopt", "getsockname", "sendto", "recv_nb"],
    ["close", "close", "getsockname", "bind", "send"],
    ["bind", "connect", "send", "sendto", "so_error", "shutdown_wr", "send", "recv_nb"],
    ["connect_refused", "send", "recv_nb", "so_error", "connect_refused", "recv_nb"],
]
#: After these calls Linux has settled within the call (loopback); NetKernel a moment later.
SETTLE = {"connect": 0.02, "connect_nb": 0.02, "connect_refused": 0.01, "send": 0.01,
          "sendto": 0.01, "close": 0.01}


@pytest.mark.req("GL-2")
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_call_sequences_give_linux_results(inst: Instance, guestlib: Any, family: int) -> None:
    with socket.socket(family) as probe:
        probe.bind((HOSTS[family], 0))
        closed = probe.getsockname()[1]  # nothing will listen there
    linux, nk = Side(socket.socket, family), Side(guestlib.socket, family)
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            for calls in SEQUENCES:
                socks = [linux.make(family, kind), nk.make(family, kind)]
                try:
                    for call in calls:
                        got = [_call(side, s, call, closed)
                               for side, s in zip((linux, nk), socks, strict=True)]
                        time.sleep(SETTLE.get(call, 0))
                        assert got[1] == got[0], (kind, calls, call)
                finally:
                    for s in socks:
                        s.close()
    finally:
        linux.close()
        nk.close()


def _close_after_reading(factory: Any, read: int) -> str:
    """Accept on ``factory``'s server, let a Linux peer send, read ``read`` bytes, close.

    How the peer sees the end: "reset" (recv raised ConnectionResetError) or "eof".
    """
    with factory.create_server((LOOP, 0)) as server, \
            socket.create_connection(server.getsockname()[:2], timeout=5) as peer:
        conn, _ = server.accept()
        peer.sendall(b"0123456789")
        assert select.select([conn], [], [], 5)[0], "the data never arrived"
        if read:
            conn.settimeout(5)
            assert conn.recv(read) == b"0123456789"[:read]
        conn.close()
        return peer_sees(peer)


@pytest.mark.req("GL-2")
def test_closing_with_unread_data_resets_as_linux_does(inst: Instance, guestlib: Any) -> None:
    for read in (0, 4, 10):
        linux = _close_after_reading(socket, read)
        assert linux == ("eof" if read == 10 else "reset")  # tcp_close: unread data, RST
        assert _close_after_reading(guestlib, read) == linux, f"close after reading {read} of 10"


# -- readiness and waiting ------------------------------------------------------------------------


@pytest.mark.req("GL-3")
def test_fileno_shows_readiness_as_linux_would(inst: Instance, guestlib: Any) -> None:
    with guestlib.create_server((LOOP, 0)) as lst:
        fd = lst.fileno()
        os.fstat(fd)  # a real descriptor of the process
        assert select.select([lst], [], [], 0)[0] == []
        c = guestlib.create_connection(lst.getsockname(), timeout=5)
        assert select.select([lst], [], [], 5)[0] == [lst], "a pending connection"
        s, _ = lst.accept()
        assert select.select([lst], [], [], 0)[0] == []
        with c, s:
            sel = selectors.DefaultSelector()
            sel.register(s, selectors.EVENT_READ)
            assert sel.select(0) == []
            assert select.select([], [c], [], 5)[1] == [c], "a connected socket is writable"
            c.sendall(b"ping")
            assert [k.fileobj for k, _ in sel.select(5)] == [s], "data to read"
            assert s.recv(10) == b"ping"
            assert sel.select(0) == []
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            c.close()  # a reset: an error, then the end of the stream
            assert [k.fileobj for k, _ in sel.select(5)] == [s]
            with pytest.raises(ConnectionResetError):
                s.recv(10)
            assert select.select([s], [], [], 0)[0] == [s] and s.recv(10) == b""
            sel.close()
    assert lst.fileno() == -1


@pytest.mark.req("GL-3")
def test_a_connecting_socket_is_not_writable_until_settled(inst: Instance, guestlib: Any) -> None:
    with socket.create_server((LOOP, 0), backlog=0) as full:
        filler = socket.create_connection(full.getsockname())  # the accept queue is full now
        c = guestlib.socket()
        c.setblocking(False)
        assert c.connect_ex(full.getsockname()) == errno.EINPROGRESS
        assert select.select([], [c], [], 0.3)[1] == [], "writable while the SYN is unanswered"
        full.accept()[0].close()  # room again: the retransmitted SYN gets through
        assert select.select([], [c], [], 5)[1] == [c]
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        c.close()
        filler.close()


@pytest.mark.req("GL-3", "GL-4")
def test_asyncio_drives_guestlib_sockets(inst: Instance, guestlib: Any) -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        lst = guestlib.create_server((LOOP, 0))
        lst.setblocking(False)
        c = guestlib.socket()
        c.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(lst))
        await loop.sock_connect(c, lst.getsockname())
        s, _ = await accept
        await loop.sock_sendall(c, b"x" * 100_000)
        got = b""
        while len(got) < 100_000:
            got += await loop.sock_recv(s, 65536)
        for sock in (c, s, lst):
            sock.close()
        return got

    assert asyncio.run(asyncio.wait_for(main(), 20)) == b"x" * 100_000


@pytest.mark.req("GL-4")
def test_blocking_nonblocking_and_timeouts(inst: Instance, guestlib: Any,
                                           linux_server: socket.socket) -> None:
    c = guestlib.create_connection(linux_server.getsockname(), timeout=5)
    peer, _ = linux_server.accept()
    with c, peer:
        c.setblocking(False)
        assert (c.getblocking(), c.gettimeout()) == (False, 0.0)
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError) as exc:
            c.recv(10)
        assert exc.value.errno == errno.EAGAIN and time.monotonic() - t0 < 0.1
        c.settimeout(0.2)
        assert (c.getblocking(), c.gettimeout()) == (True, 0.2)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            c.recv(10)
        assert 0.2 <= time.monotonic() - t0 < 0.7
        c.setblocking(True)
        assert c.gettimeout() is None
        threading.Timer(0.1, peer.sendall, args=(b"late",)).start()
        t0 = time.monotonic()
        assert c.recv(10) == b"late" and time.monotonic() - t0 >= 0.09
    with guestlib.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as nb:
        assert nb.getblocking() is False
        nb.bind((LOOP, 0))
        nb.listen()
        with pytest.raises(BlockingIOError):
            nb.accept()
    default = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.15)
    try:
        with guestlib.socket() as d:
            assert d.gettimeout() == 0.15
    finally:
        socket.setdefaulttimeout(default)
    with guestlib.socket() as nbc:
        nbc.setblocking(False)
        assert nbc.connect_ex(linux_server.getsockname()) == errno.EINPROGRESS
        linux_server.accept()[0].close()


@pytest.mark.req("GL-5")
def test_sock_cloexec_stays_in_the_tenant(inst: Instance, guestlib: Any,
                                          linux_server: socket.socket) -> None:
    with guestlib.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        assert s.type == socket.SOCK_STREAM
        assert fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        s.connect(linux_server.getsockname())
        s.sendall(b"cloexec")
        peer, _ = linux_server.accept()
        with peer:
            assert peer.recv(10) == b"cloexec"
    with guestlib.socket() as plain:
        assert not os.get_inheritable(plain.fileno())


# -- the process and its device ------------------------------------------------------------------


@pytest.mark.req("GL-6", "RT-1", "RT-3")
def test_one_device_per_process(inst: Instance, guestlib: Any) -> None:
    socks: list[Any] = []
    lock = threading.Lock()

    def make() -> None:
        for _ in range(5):
            s = guestlib.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with lock:
                socks.append(s)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(socks) == 20
    (dev,) = mine(inst)  # RT-1: NETKERNEL_INSTANCE named the instance; GL-6: one device
    assert dev["path"].startswith(str(inst.dir) + "/vm-")  # RT-3: a tenant device
    assert dev["sockets"] >= 20
    for s in socks:
        s.close()


@pytest.mark.req("GL-7")
def test_a_forked_child_gets_a_device_of_its_own(inst: Instance, guestlib: Any,
                                                 linux_server: socket.socket) -> None:
    c = guestlib.create_connection(linux_server.getsockname(), timeout=5)
    peer, _ = linux_server.accept()
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        code = 10
        try:
            code = 11 if c.fileno() != -1 else code
            try:
                c.send(b"x")
                code = 12
            except OSError as exc:
                code = 13 if exc.errno != errno.EBADF else code
            c.close()
            with guestlib.create_connection(linux_server.getsockname(), timeout=5) as own:
                own.sendall(b"from the child")
            code = 0 if code == 10 else code
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_peer, _ = linux_server.accept()
    with child_peer, peer, c:
        child_peer.settimeout(5)
        assert child_peer.recv(100) == b"from the child"
        c.sendall(b"parent still works")
        peer.settimeout(5)
        assert peer.recv(100) == b"parent still works"
        wait_until("the child's device is gone", lambda: not mine(inst, pid), 2.0)


@pytest.mark.req("GL-8")
def test_no_instance_is_enetdown(guestlib: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETKERNEL_INSTANCE", unique_name("none"))
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        guestlib.socket()
    assert exc.value.errno == errno.ENETDOWN and time.monotonic() - t0 < 1.0


@pytest.mark.req("GL-10")
def test_sent_data_is_delivered_when_the_process_ends(inst: Instance, guestlib: Any,
                                                      linux_server: socket.socket) -> None:
    port = linux_server.getsockname()[1]
    proc = child(guestlib, f"""
        a = gl.create_connection(("{LOOP}", {port}))
        a.sendall(b"a" * 300_000)
        a.close()                       # closed at once after sendall
        b = gl.create_connection(("{LOOP}", {port}))
        for _ in range(64):
            b.send(b"b" * 16384)        # and straight to exit: no close, no sendall
    """, inst, stderr=subprocess.PIPE)
    got = []
    for _ in range(2):
        s, _ = linux_server.accept()
        with s:
            s.settimeout(10)
            data = bytearray()
            while chunk := s.recv(1 << 20):
                data += chunk
            got.append(bytes(data))
    assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    assert got == [b"a" * 300_000, b"b" * (64 * 16384)]


@pytest.mark.req("GL-11")
def test_long_transfers_make_progress_both_ways(inst: Instance, guestlib: Any,
                                                linux_server: socket.socket) -> None:
    size = 12 << 20  # several times a data area's halves
    c = guestlib.create_connection(linux_server.getsockname(), timeout=10)
    peer, _ = linux_server.accept()
    payload = os.urandom(1 << 20) * (size >> 20)
    received = hashlib.sha256()
    count = 0

    def linux_side() -> None:
        peer.sendall(payload)
        peer.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=linux_side, daemon=True)
    t.start()
    with c, peer:
        buf = bytearray(1 << 16)
        while n := c.recv_into(buf):
            received.update(memoryview(buf)[:n])
            count += n
        t.join(10)
        assert count == size and received.digest() == hashlib.sha256(payload).digest()
        back = hashlib.sha256()
        back_count = 0

        def drain() -> None:
            nonlocal back_count
            while chunk := peer.recv(1 << 20):
                back.update(chunk)
                back_count += len(chunk)

        d = threading.Thread(target=drain, daemon=True)
        d.start()
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        d.join(20)
        assert back_count == size and back.digest() == hashlib.sha256(payload).digest()


# -- failures -------------------------------------------------------------------------------------


@pytest.mark.req("RT-4", "GL-6")
def test_a_killed_tenants_sockets_close_within_a_second(inst: Instance, guestlib: Any,
                                                        linux_server: socket.socket) -> None:
    port = linux_server.getsockname()[1]
    proc = child(guestlib, f"""
        import sys, time
        c = gl.create_connection(("{LOOP}", {port}))
        print("ready", flush=True)
        time.sleep(60)
    """, inst, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        peer, _ = linux_server.accept()
        assert len(mine(inst, proc.pid)) == 1
        killed = time.monotonic()
        proc.kill()
        proc.wait(5)
        peer.settimeout(1.0)
        with peer, contextlib.suppress(ConnectionResetError):
            assert peer.recv(10) == b""
        assert time.monotonic() - killed < 1.0
        wait_until("the device is unplugged", lambda: not mine(inst, proc.pid), 1.0)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def own(guestlib: Any, nk_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[Instance]:
    inst = nk_runtime.new()
    monkeypatch.setenv("NETKERNEL_INSTANCE", inst.name)
    try:
        yield inst
    finally:
        inst.stop()


def _blocked_reader(s: Any) -> list[tuple[float, BaseException]]:
    failed: list[tuple[float, BaseException]] = []

    def run() -> None:
        try:
            while s.recv(65536):
                pass
            failed.append((time.monotonic(), EOFError("recv returned b''")))
        except OSError as exc:
            failed.append((time.monotonic(), exc))

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.05)  # it blocks in recv now
    return failed


@pytest.mark.req("GL-9")
def test_a_dead_nsm_or_coreengine_fails_calls_within_a_second(
        own: Instance, guestlib: Any, nk_runtime: Runtime, linux_server: socket.socket) -> None:
    for victim in ("nsm", "coreengine"):
        c = guestlib.create_connection(linux_server.getsockname(), timeout=5)
        c.settimeout(None)
        peer, _ = linux_server.accept()
        failed = _blocked_reader(c)
        proc = own.nsms[-1] if victim == "nsm" else own.engine
        killed = time.monotonic()
        proc.signal(signal.SIGKILL)
        wait_until(f"the blocked recv fails ({victim} killed)", lambda f=failed: f, 2.0)
        when, exc = failed[0]
        assert when - killed < 1.0, f"{victim}: {when - killed:.2f} s"
        assert isinstance(exc, ConnectionResetError), (victim, exc)
        with pytest.raises(BrokenPipeError):
            c.send(b"x")  # the reset was read: later sends say EPIPE
        assert c.recv(10) == b""
        t0 = time.monotonic()
        with pytest.raises(OSError) as new:
            guestlib.socket()
        assert new.value.errno == errno.ENETDOWN and time.monotonic() - t0 < 1.0, victim
        c.close()
        peer.close()
        if victim == "nsm":
            own.start_nsm(nk_runtime.nsm)  # a new NSM: sockets work again
