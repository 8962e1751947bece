"""nk-agent, the tenant's guest-side relay, driven from Python as libnkpreload.so drives it.

Each test starts an instance and an nk-agent on it, opens a control connection
(AF_UNIX SOCK_SEQPACKET), and speaks struct nk_ag_req / struct nk_ag_rep
(include/nk/agent_proto.h) with the app ends received by SCM_RIGHTS. The peers are
plain kernel sockets on 127.0.0.1: every byte crosses the agent, the CoreEngine and
the kernel NSM. Spec: PRE-1 (attach & lifetime), PRE-2, PRE-4 (relay and flow
control, BUF-4), PRE-5 (connect), PRE-6 (shutdown/close), PRE-7 (listen/accept
records), PRE-8 (UDP records), PRE-9 (failures).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netkernel.fastpath import preload
from tests.live import own_instance, time_limit

CSRC = Path(__file__).resolve().parent.parent / "fastpath" / "csrc"

# struct nk_ag_req { u32 op, len; u64 ino; i64 arg[3]; u8 data[256]; }
REQ = struct.Struct("<IIQqqq256s")
# struct nk_ag_rep { i64 result, arg0; u32 len, pad; u8 data[256]; }
REP = struct.Struct("<qqII256s")
RECORD = struct.Struct("<I28s")  # struct nk_ag_accept and struct nk_ag_dgram

HELLO, SOCKET, LOOKUP, BIND, LISTEN, CONNECT = 1, 2, 3, 4, 5, 6
SETSOCKOPT, GETSOCKOPT, GETSOCKNAME, GETPEERNAME, SHUTDOWN, NREAD = 7, 8, 9, 10, 11, 12
KIND_STREAM, KIND_DGRAM, KIND_LISTEN = 1, 2, 4


def test_the_python_mirror_has_the_c_layout_and_numbers() -> None:
    """The records and numbers this file speaks are agent_proto.h's: sizes and field
    offsets from the compiled header (cffi checks its declarations against it)."""
    from netkernel.fastpath._lib import ffi, lib

    def offsets(fmt: struct.Struct) -> list[int]:
        """Where each item of a little-endian format starts ("256s" is one item)."""
        out, at = [], 0
        for code in re.findall(r"\d*[a-zA-Z]", fmt.format.lstrip("<")):
            out.append(at)
            at += struct.calcsize("<" + code)
        return out

    assert (ffi.sizeof("struct nk_ag_req"), ffi.sizeof("struct nk_ag_rep")) == (REQ.size,
                                                                                REP.size)
    assert ffi.sizeof("struct nk_ag_accept") == ffi.sizeof("struct nk_ag_dgram") == RECORD.size
    req = [ffi.offsetof("struct nk_ag_req", f) for f in ("op", "len", "ino", "arg", "data")]
    assert req == [*offsets(REQ)[:4], offsets(REQ)[6]]  # arg[3] is three items in REQ
    rep = [ffi.offsetof("struct nk_ag_rep", f) for f in ("result", "arg0", "len", "pad", "data")]
    assert rep == offsets(REP)
    assert ffi.offsetof("struct nk_ag_accept", "addr") == offsets(RECORD)[1]
    assert lib.NK_AG_DATA_MAX == 256
    assert [HELLO, SOCKET, LOOKUP, BIND, LISTEN, CONNECT, SETSOCKOPT, GETSOCKOPT, GETSOCKNAME,
            GETPEERNAME, SHUTDOWN, NREAD] == [
        lib.NK_AG_HELLO, lib.NK_AG_SOCKET, lib.NK_AG_LOOKUP, lib.NK_AG_BIND, lib.NK_AG_LISTEN,
        lib.NK_AG_CONNECT, lib.NK_AG_SETSOCKOPT, lib.NK_AG_GETSOCKOPT, lib.NK_AG_GETSOCKNAME,
        lib.NK_AG_GETPEERNAME, lib.NK_AG_SHUTDOWN, lib.NK_AG_NREAD]
    assert (KIND_STREAM, KIND_DGRAM, KIND_LISTEN) == (
        lib.NK_AG_KIND_STREAM, lib.NK_AG_KIND_DGRAM, lib.NK_AG_KIND_LISTEN)


def sockaddr_in(host: str, port: int) -> bytes:
    return struct.pack("<H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_aton(host) + bytes(8)


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    return socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]


@pytest.fixture(scope="module")
def agent_bin() -> Path:
    """The installed agent (pip builds it), or NETKERNEL_AGENT_BIN's (a sanitizer build)."""
    return preload.paths().agent


class Agent:
    """One nk-agent process and control connections to it."""

    def __init__(self, binary: Path, instance: str, tmp: Path, idle_ms: int = 300,
                 hold: bool = False, env: dict[str, str] | None = None) -> None:
        self.path = str(tmp / "agent.sock")
        rd, wr = os.pipe()
        self.hold_r = self.hold_w = -1
        fds = [wr]
        args = [str(binary), "--socket", self.path, "--instance", instance,
                "--ready-fd", str(wr), "--idle-ms", str(idle_ms)]
        if hold:
            self.hold_r, self.hold_w = os.pipe()
            fds.append(self.hold_r)
            args += ["--hold-fd", str(self.hold_r)]
        full = dict(os.environ, **(env or {}))
        full.pop("NETKERNEL_ROOT", None)
        self.proc = subprocess.Popen(args, pass_fds=fds, env=full, stderr=subprocess.PIPE)
        os.close(wr)
        if self.hold_r >= 0:
            os.close(self.hold_r)
        ready, _, _ = select.select([rd], [], [], 10)
        got = os.read(rd, 1) if ready else b""
        os.close(rd)
        assert got == b"\x01", f"agent not ready: {self.proc.poll()}"

    def connect(self) -> Control:
        return Control(self.path)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.hold_w >= 0:
            os.close(self.hold_w)
            self.hold_w = -1
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Control:
    """A control connection: requests answered in order (agent_proto.h)."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.s.settimeout(10)
        self.s.connect(path)

    def send(self, op: int, ino: int = 0, args: tuple[int, int, int] = (0, 0, 0),
             data: bytes = b"") -> None:
        self.s.send(REQ.pack(op, len(data), ino, *args, data))

    def recv(self) -> tuple[int, int, bytes, list[int]]:
        msg, fds, _, _ = socket.recv_fds(self.s, REP.size, 1)
        assert len(msg) == REP.size
        result, arg0, n, _, data = REP.unpack(msg)
        return result, arg0, data[:n], fds

    def call(self, op: int, ino: int = 0, args: tuple[int, int, int] = (0, 0, 0),
             data: bytes = b"") -> tuple[int, int, bytes, list[int]]:
        self.send(op, ino, args, data)
        return self.recv()

    def socket(self, kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, int]:
        result, ino, _, fds = self.call(SOCKET, args=(socket.AF_INET, kind, 0))
        assert result == 0 and len(fds) == 1, result
        app = socket.socket(fileno=fds[0])
        assert os.fstat(app.fileno()).st_ino == ino
        return app, ino

    def so_error(self, ino: int) -> int:
        result, _, data, _ = self.call(GETSOCKOPT, ino, (socket.SOL_SOCKET, socket.SO_ERROR, 4))
        assert result == 4
        value: int = struct.unpack("<i", data)[0]
        return value

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[Agent]:
    with own_instance() as name:
        a = Agent(agent_bin, name, tmp_path)
        try:
            yield a
        finally:
            a.close()


@pytest.fixture(params=["sock_diag", "proc"])
def closing_agent(request: pytest.FixtureRequest, agent_bin: Path,
                  tmp_path: Path) -> Iterator[Agent]:
    """An agent that tells a closed app end by sock_diag, and one that walks /proc as it
    does on a kernel without unix_diag (a guest's, spec/vm.md)."""
    with own_instance() as name:
        env = {"NK_AGENT_DIAG": "proc"} if request.param == "proc" else {}
        a = Agent(agent_bin, name, tmp_path, env=env)
        try:
            yield a
        finally:
            a.close()


def connected(ctl: Control, port: int) -> tuple[socket.socket, int]:
    """A NetKernel TCP socket connected to 127.0.0.1:port (PRE-5: EINPROGRESS, then
    writable, then SO_ERROR 0)."""
    app, ino = ctl.socket()
    result, _, _, _ = ctl.call(CONNECT, ino, data=sockaddr_in("127.0.0.1", port))
    assert result == -errno.EINPROGRESS
    _, w, _ = select.select([], [app], [], 10)
    assert w, "app end never became writable"
    assert ctl.so_error(ino) == 0
    return app, ino


def kernel_listener() -> socket.socket:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    return lst


def test_hello_and_unknown_inode(agent: Agent) -> None:
    """HELLO answers the agent's pid; an inode that is not the agent's is -ENOENT (PRE-3)."""
    with time_limit(20):
        ctl = agent.connect()
        result, vm_id, _, _ = ctl.call(HELLO, args=(1, 0, 0))
        assert result == agent.proc.pid and vm_id >= 0
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ino = os.fstat(other.fileno()).st_ino
        assert ctl.call(LOOKUP, ino)[0] == -errno.ENOENT
        assert ctl.call(GETSOCKNAME, ino)[0] == -errno.ENOENT
        app, ino = ctl.socket()
        assert ctl.call(LOOKUP, ino)[0] == KIND_STREAM
        u, uino = ctl.socket(socket.SOCK_DGRAM)
        assert ctl.call(LOOKUP, uino)[0] == KIND_DGRAM
        assert ctl.call(SOCKET, args=(socket.AF_UNIX, socket.SOCK_STREAM, 0))[0] == \
            -errno.EAFNOSUPPORT
        app.close()
        u.close()
        other.close()
        ctl.close()


def test_connect_settles_writability_and_bulk_both_ways(agent: Agent) -> None:
    """PRE-5: the app end is not writable before CONNECT settles, writable after; PRE-4:
    several MB each way through the agent arrive intact (checksums)."""
    size = 8 << 20
    payload = os.urandom(size)
    with time_limit(60):
        lst = kernel_listener()
        port = lst.getsockname()[1]
        ctl = agent.connect()
        app, ino = ctl.socket()
        _, w, _ = select.select([], [app], [], 0.2)
        assert not w, "a new stream socket must not be writable"
        got_digest: list[str] = []

        def server() -> None:
            conn, _ = lst.accept()
            with conn:
                h = hashlib.sha256()
                n = 0
                while n < size:
                    chunk = conn.recv(1 << 16)
                    assert chunk
                    h.update(chunk)
                    n += len(chunk)
                got_digest.append(h.hexdigest())
                conn.sendall(payload[::-1])
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)

        t = threading.Thread(target=server, daemon=True)
        t.start()
        result, _, _, _ = ctl.call(CONNECT, ino, data=sockaddr_in("127.0.0.1", port))
        assert result == -errno.EINPROGRESS
        _, w, _ = select.select([], [app], [], 10)
        assert w
        assert ctl.so_error(ino) == 0
        assert ctl.call(GETPEERNAME, ino)[2][:8] == sockaddr_in("127.0.0.1", port)[:8]
        app.sendall(payload)
        back = hashlib.sha256()
        n = 0
        while chunk := app.recv(1 << 16):
            back.update(chunk)
            n += len(chunk)
        assert n == size
        assert back.hexdigest() == hashlib.sha256(payload[::-1]).hexdigest()
        t.join(10)
        assert got_digest == [hashlib.sha256(payload).hexdigest()]
        app.close()
        lst.close()
        ctl.close()


def test_connect_refused_sets_so_error(agent: Agent) -> None:
    """PRE-5: a refused connect makes the app end writable with SO_ERROR ECONNREFUSED."""
    with time_limit(20):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        ctl = agent.connect()
        app, ino = ctl.socket()
        assert ctl.call(CONNECT, ino, data=sockaddr_in("127.0.0.1", port))[0] == \
            -errno.EINPROGRESS
        _, w, _ = select.select([], [app], [], 10)
        assert w
        assert ctl.so_error(ino) == errno.ECONNREFUSED
        assert ctl.so_error(ino) == 0  # taken and cleared
        app.close()
        app, ino = ctl.socket()
        assert ctl.call(CONNECT, ino, data=sockaddr_in("127.0.0.1", port))[0] == \
            -errno.EINPROGRESS
        _, w, _ = select.select([], [app], [], 10)
        assert w
        # connect again before SO_ERROR was read: the failure, as on Linux
        assert ctl.call(CONNECT, ino, data=sockaddr_in("127.0.0.1", port))[0] == \
            -errno.ECONNREFUSED
        app.close()
        ctl.close()


def test_closing_a_connecting_socket_frees_it_at_once(agent: Agent) -> None:
    """PRE-6: the last close of a socket whose CONNECT is still out (a silent address)
    sends CLOSE without waiting for the connect's minutes-long timeout."""
    with time_limit(30):
        full = socket.socket()  # a listener whose queue is full drops SYNs: a silent peer
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        ctl = agent.connect()
        app, ino = ctl.socket()
        result = ctl.call(CONNECT, ino, data=sockaddr_in("127.0.0.1", port))[0]
        assert result == -errno.EINPROGRESS
        _, w, _ = select.select([], [app], [], 0.5)
        assert not w, "the connect should still be in progress"
        app.close()
        deadline = time.monotonic() + 3
        while ctl.call(LOOKUP, ino)[0] != -errno.ENOENT:
            assert time.monotonic() < deadline, "the socket outlived its last close"
            time.sleep(0.02)
        ctl.close()
        assert agent.wait(10) == 0, "the agent did not go idle"
        for f in fillers:
            f.close()
        full.close()


def test_peer_close_is_eof_and_last_close_is_peer_eof(closing_agent: Agent) -> None:
    """PRE-6: the kernel peer's close reads as EOF on the app end; the app end's last close
    (after a dup) reaches the peer as EOF."""
    with time_limit(20):
        lst = kernel_listener()
        ctl = closing_agent.connect()
        app, _ = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        peer.sendall(b"bye")
        peer.close()
        assert app.recv(10) == b"bye"
        assert app.recv(10) == b""
        app.close()

        app, _ = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        peer.settimeout(10)
        app.sendall(b"last words")
        dup = app.dup()
        app.close()
        time.sleep(0.1)
        dup.close()  # the last reference
        data = b""
        while chunk := peer.recv(100):
            data += chunk
        assert data == b"last words"
        peer.close()
        lst.close()
        ctl.close()


def test_close_with_unread_data_resets_the_peer(agent: Agent) -> None:
    """PRE-6, GL-2: the app closes with received data it never read: CLOSE carries ABORT
    and the kernel peer sees a reset, as with Linux sockets; without unread data the
    same close is an orderly EOF."""
    with time_limit(30):
        lst = kernel_listener()
        ctl = agent.connect()
        app, _ = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        peer.settimeout(10)
        peer.sendall(b"never read")
        time.sleep(0.3)  # in the app end's queue
        app.close()
        with pytest.raises(ConnectionResetError):
            while peer.recv(100):
                pass
        peer.close()
        lst.close()
        ctl.close()


def test_a_child_process_holds_the_socket(agent: Agent) -> None:
    """PRE-2, PRE-6: the app end inherited by another process keeps the socket alive after
    the parent's close; the child's writes arrive and its exit is the last close (EOF)."""
    with time_limit(30):
        lst = kernel_listener()
        ctl = agent.connect()
        app, _ = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        peer.settimeout(10)
        code = "import os, socket; s = socket.socket(fileno=int(os.sys.argv[1])); " \
               "s.sendall(b'from the child ' * 1000)"
        child = subprocess.Popen([sys.executable, "-c", code, str(app.fileno())],
                                 pass_fds=[app.fileno()])
        app.close()
        assert child.wait(10) == 0
        data = b""
        while chunk := peer.recv(1 << 16):
            data += chunk
        assert data == b"from the child " * 1000
        peer.close()
        lst.close()
        ctl.close()


def test_listen_accept_records(agent: Agent) -> None:
    """PRE-7: a listening app end delivers one 32-byte record + SCM_RIGHTS per connection
    from a plain kernel client; data flows both ways on the accepted socket."""
    with time_limit(30):
        ctl = agent.connect()
        lst, ino = ctl.socket()
        assert ctl.call(BIND, ino, data=sockaddr_in("127.0.0.1", 0))[0] == 0
        assert ctl.call(LISTEN, ino, args=(8, 0, 0))[0] == 0
        assert ctl.call(LOOKUP, ino)[0] == KIND_STREAM | KIND_LISTEN
        result, _, name, _ = ctl.call(GETSOCKNAME, ino)
        assert result == 16
        host, port = parse_sockaddr_in(name)
        _, w, _ = select.select([], [lst], [], 0.1)
        assert not w, "a listener is never writable"
        clients = [socket.create_connection((host, port), timeout=10) for _ in range(3)]
        for k, c in enumerate(clients):
            msg, fds, _, _ = socket.recv_fds(lst, RECORD.size, 1)
            assert len(msg) == RECORD.size and len(fds) == 1
            alen, addr = RECORD.unpack(msg)
            assert alen == 16
            assert parse_sockaddr_in(addr[:16]) == c.getsockname()
            conn = socket.socket(fileno=fds[0])
            conn.settimeout(10)
            c.sendall(b"ping %d" % k)
            assert conn.recv(100) == b"ping %d" % k
            conn.sendall(b"pong %d" % k)
            assert c.recv(100) == b"pong %d" % k
            conn.close()
            assert c.recv(100) == b""
            c.close()
        lst.close()
        ctl.close()


def test_shutdown_write_reaches_the_peer_after_the_data(agent: Agent) -> None:
    """PRE-6: shutdown(SHUT_WR) of the app end (and NK_AG_SHUTDOWN) reaches the kernel
    peer as EOF after every byte written before it; the other direction stays open."""
    with time_limit(30):
        lst = kernel_listener()
        ctl = agent.connect()
        app, ino = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        peer.settimeout(10)
        data = os.urandom(3 << 20)
        sender = threading.Thread(target=app.sendall, args=(data,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < 1 << 20:
            got += peer.recv(1 << 16)
        sender.join(10)
        app.shutdown(socket.SHUT_WR)  # what the library does, then it tells the agent
        assert ctl.call(SHUTDOWN, ino, args=(socket.SHUT_WR, 0, 0))[0] == 0
        while chunk := peer.recv(1 << 16):
            got += chunk
        assert bytes(got) == data
        peer.sendall(b"still open")
        peer.close()
        app.settimeout(10)
        assert app.recv(100) == b"still open"
        assert app.recv(100) == b""
        app.close()
        lst.close()
        ctl.close()


def test_shutdown_both_ways_is_not_a_close(closing_agent: Agent) -> None:
    """PRE-6: shutdown(SHUT_RDWR) makes the agent end look hung up while the app still holds
    the fd: the socket stays the agent's (LOOKUP, GETPEERNAME) until the last close."""
    with time_limit(30):
        lst = kernel_listener()
        ctl = closing_agent.connect()
        app, ino = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        peer.settimeout(10)
        app.sendall(b"before")
        app.shutdown(socket.SHUT_RDWR)
        assert ctl.call(SHUTDOWN, ino, args=(socket.SHUT_RDWR, 0, 0))[0] == 0
        assert peer.recv(100) == b"before"
        assert peer.recv(100) == b""
        time.sleep(0.2)
        assert ctl.call(LOOKUP, ino)[0] == KIND_STREAM
        assert ctl.call(GETPEERNAME, ino)[0] == 16
        app.close()
        deadline = time.monotonic() + 5
        while ctl.call(LOOKUP, ino)[0] != -errno.ENOENT:
            assert time.monotonic() < deadline, "the last close was not seen"
            time.sleep(0.02)
        peer.close()
        lst.close()
        ctl.close()


def test_backpressure_reaches_the_app_end(agent: Agent) -> None:
    """PRE-4: a peer that does not read stops the agent reading the agent end: the app
    end's writes end in EAGAIN (bounded buffering); once the peer reads, every byte arrives."""
    with time_limit(60):
        lst = kernel_listener()
        ctl = agent.connect()
        app, _ = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        app.setblocking(False)
        block = os.urandom(1 << 16)
        sent = bytearray()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            try:
                n = app.send(block)
                sent += block[:n]
                quiet_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        assert len(sent) < 64 << 20, "the agent buffered without bound"
        _, w, _ = select.select([], [app], [], 0)
        assert not w
        peer.settimeout(10)
        got = bytearray()
        while len(got) < len(sent):
            got += peer.recv(1 << 20)
        assert bytes(got) == bytes(sent)
        _, w, _ = select.select([], [app], [], 10)
        assert w, "writable again once the peer read"
        app.close()
        peer.close()
        lst.close()
        ctl.close()


def test_control_calls_get_buffers_while_data_fills_the_send_half(agent: Agent) -> None:
    """BUF-7: data that fills the send half waits; a control call still gets a buffer (the
    agent keeps a reserve), as iperf3's TCP_INFO in the middle of its transfer needs."""
    with time_limit(60):
        lst = kernel_listener()
        ctl = agent.connect()
        pairs = []
        for _ in range(6):  # 6 x 64 SENDs in flight could hold far more than the send half
            app, ino = connected(ctl, lst.getsockname()[1])
            pairs.append((app, ino, lst.accept()[0]))
            app.setblocking(False)
        block = os.urandom(1 << 16)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            for app, _, _ in pairs:
                try:
                    app.send(block)
                    quiet_since = time.monotonic()
                except BlockingIOError:
                    pass
            time.sleep(0.001)
        for _, ino, _ in pairs:
            result, _, value, _ = ctl.call(GETSOCKOPT, ino, args=(socket.SOL_SOCKET,
                                                                  socket.SO_RCVBUF, 4))
            assert result == 4 and int.from_bytes(value[:4], "little") > 0, result
        for app, _, peer in pairs:
            app.close()
            peer.close()
        lst.close()
        ctl.close()


def test_shutdown_of_a_listener_stops_it(agent: Agent) -> None:
    """PRE-7, as Linux: shutdown(SHUT_WR) of a listener is a no-op, SHUT_RDWR stops it
    listening (new connections are refused, accept reads the end)."""
    with time_limit(30):
        ctl = agent.connect()
        lst, ino = ctl.socket()
        assert ctl.call(BIND, ino, data=sockaddr_in("127.0.0.1", 0))[0] == 0
        assert ctl.call(LISTEN, ino, args=(8, 0, 0))[0] == 0
        port = parse_sockaddr_in(ctl.call(GETSOCKNAME, ino)[2])[1]
        assert ctl.call(SHUTDOWN, ino, args=(socket.SHUT_WR, 0, 0))[0] == 0
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        lst.shutdown(socket.SHUT_RDWR)  # the library's part
        assert ctl.call(SHUTDOWN, ino, args=(socket.SHUT_RDWR, 0, 0))[0] == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10)
        assert ctl.call(LOOKUP, ino)[0] == KIND_STREAM
        lst.close()
        ctl.close()


def test_accept_stops_at_the_backlog(agent: Agent) -> None:
    """PRE-7: records the app has not taken stay at most the backlog; the rest are
    accepted once it takes them."""
    with time_limit(30):
        ctl = agent.connect()
        lst, ino = ctl.socket()
        assert ctl.call(BIND, ino, data=sockaddr_in("127.0.0.1", 0))[0] == 0
        assert ctl.call(LISTEN, ino, args=(2, 0, 0))[0] == 0
        port = parse_sockaddr_in(ctl.call(GETSOCKNAME, ino)[2])[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
        time.sleep(0.5)
        import fcntl
        import termios
        queued = struct.unpack("i", fcntl.ioctl(lst.fileno(), termios.FIONREAD,
                                                bytes(4)))[0]
        assert 0 < queued <= 2 * RECORD.size, queued
        conns = []
        for _ in clients:
            msg, fds, _, _ = socket.recv_fds(lst, RECORD.size, 1)
            assert len(msg) == RECORD.size and len(fds) == 1
            conns.append(socket.socket(fileno=fds[0]))
        for c in conns + clients:
            c.close()
        lst.close()
        ctl.close()


def test_udp_records(agent: Agent) -> None:
    """PRE-8: sendto/recvfrom are struct nk_ag_dgram records on a SEQPACKET app end."""
    with time_limit(20):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(10)
        ctl = agent.connect()
        app, ino = ctl.socket(socket.SOCK_DGRAM)
        assert app.type == socket.SOCK_SEQPACKET
        assert ctl.call(BIND, ino, data=sockaddr_in("127.0.0.1", 0))[0] == 0
        _, _, name, _ = ctl.call(GETSOCKNAME, ino)
        mine = parse_sockaddr_in(name)
        dest = sockaddr_in(*peer.getsockname())
        for size in (0, 1, 1400, 60000):
            body = os.urandom(size)
            app.send(RECORD.pack(16, dest) + body)
            got, src = peer.recvfrom(65536)
            assert got == body and src == mine
        peer.sendto(b"reply", mine)
        rec = app.recv(65536)
        alen, addr = RECORD.unpack(rec[:32])
        assert alen == 16 and parse_sockaddr_in(addr[:16]) == peer.getsockname()
        assert rec[32:] == b"reply"
        assert ctl.call(NREAD, ino)[0] == 0
        assert ctl.call(CONNECT, ino, data=dest)[0] == 0
        app.send(RECORD.pack(0, b"") + b"connected")
        assert peer.recvfrom(100) == (b"connected", mine)
        app.close()
        peer.close()
        ctl.close()


def test_udp_datagrams_held_by_the_agent_keep_their_boundaries(agent: Agent) -> None:
    """PRE-8, PRE-4: datagrams arriving faster than the app reads fill the app end and then
    wait in the agent (NREAD = the next one's payload size); every one read is intact."""
    with time_limit(60):
        ctl = agent.connect()
        app, ino = ctl.socket(socket.SOCK_DGRAM)
        assert ctl.call(BIND, ino, data=sockaddr_in("127.0.0.1", 0))[0] == 0
        mine = parse_sockaddr_in(ctl.call(GETSOCKNAME, ino)[2])
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for k in range(1500):
            peer.sendto(struct.pack("<I", k) * 250, mine)
            if k % 100 == 99:
                time.sleep(0.01)  # the NSM keeps up; the app does not read
        deadline = time.monotonic() + 5
        while ctl.call(NREAD, ino)[0] == 0:
            assert time.monotonic() < deadline, "nothing held: the app end never filled"
            time.sleep(0.05)
        assert ctl.call(NREAD, ino)[0] == 1000
        app.settimeout(1)
        seen = []
        with contextlib.suppress(TimeoutError):
            while True:
                rec = app.recv(2048)
                assert len(rec) == 32 + 1000
                k = struct.unpack("<I", rec[32:36])[0]
                assert rec[32:] == struct.pack("<I", k) * 250
                seen.append(k)
        assert len(seen) >= 100 and seen == sorted(seen)  # UDP: the NSM may drop past its cap
        assert ctl.call(NREAD, ino)[0] == 0
        app.close()
        peer.close()
        ctl.close()


def test_no_instance_exits_3(agent_bin: Path, tmp_path: Path) -> None:
    """PRE-9: no instance: one line on stderr, exit status 3, quickly."""
    start = time.monotonic()
    r = subprocess.run([str(agent_bin), "--socket", str(tmp_path / "a.sock"), "--instance",
                        "no-such-instance-here"], capture_output=True, timeout=10, text=True)
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "nk-agent" in r.stderr
    assert time.monotonic() - start < 5
    assert not (tmp_path / "a.sock").exists()


def test_a_socket_path_longer_than_sun_path(agent_bin: Path, tmp_path: Path) -> None:
    """PRE-1: a --socket path past sockaddr_un's 108 bytes is bound through its directory
    (/proc/self/fd/N/name); a client reaches it the same way."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with time_limit(30), own_instance() as name:
        a = Agent(agent_bin, name, deep)
        try:
            assert len(a.path) > 108 and Path(a.path).exists()
            dfd = os.open(deep, os.O_PATH)
            try:
                ctl = Control(f"/proc/self/fd/{dfd}/agent.sock")
            finally:
                os.close(dfd)
            assert ctl.call(HELLO, args=(1, 0, 0))[0] == a.proc.pid
            ctl.close()
        finally:
            a.close()


def test_idle_exit_removes_the_socket(agent_bin: Path, tmp_path: Path) -> None:
    """PRE-1: no connection, no socket, --hold-fd at EOF for --idle-ms: exit 0, PATH gone;
    while the hold fd is open the agent stays."""
    with time_limit(40), own_instance() as name:
        a = Agent(agent_bin, name, tmp_path, idle_ms=200, hold=True)
        try:
            ctl = a.connect()
            app, _ = ctl.socket()
            ctl.close()
            app.close()
            time.sleep(0.8)
            assert a.proc.poll() is None, "exited while the hold fd was open"
            os.close(a.hold_w)
            a.hold_w = -1
            assert a.wait(10) == 0
            assert not Path(a.path).exists()
        finally:
            a.close()


def test_sigterm_exits_and_removes_the_socket(agent_bin: Path, tmp_path: Path) -> None:
    """PRE-1: SIGTERM is an idle exit now, with a control connection still open."""
    with time_limit(30), own_instance() as name:
        a = Agent(agent_bin, name, tmp_path, idle_ms=60000)
        try:
            ctl = a.connect()
            assert ctl.call(HELLO, args=(1, 0, 0))[0] == a.proc.pid
            a.proc.terminate()
            assert a.wait(10) == 0
            assert not Path(a.path).exists()
            ctl.close()
        finally:
            a.close()


def test_coreengine_gone_resets_sockets(agent_bin: Path, tmp_path: Path) -> None:
    """PRE-9: the instance goes down: a connected socket reads EOF with SO_ERROR
    ECONNRESET, a new SOCKET is -ENETDOWN, and the agent exits once idle."""
    from netkernel import instance

    with time_limit(60), own_instance() as name:
        a = Agent(agent_bin, name, tmp_path, idle_ms=200)
        lst = kernel_listener()
        ctl = a.connect()
        app, ino = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        instance.down(name)
        app.settimeout(10)
        assert app.recv(10) == b""
        assert ctl.so_error(ino) == errno.ECONNRESET
        assert ctl.call(SOCKET, args=(socket.AF_INET, socket.SOCK_STREAM, 0))[0] == \
                -errno.ENETDOWN
        app.close()
        ctl.close()
        assert a.wait(10) == 0
        peer.close()
        lst.close()
        a.close()


def test_nsm_gone_resets_sockets(agent_bin: Path, tmp_path: Path) -> None:
    """PRE-9: the NSM dies (EV_ERROR on socket 0): a blocked reader wakes with EOF and
    SO_ERROR ECONNRESET, its writes fail, and a new SOCKET is -ENETDOWN; never a hang."""
    import signal

    from netkernel.reference import shm

    with time_limit(60), own_instance() as name:
        a = Agent(agent_bin, name, tmp_path)
        try:
            lst = kernel_listener()
            ctl = a.connect()
            app, ino = connected(ctl, lst.getsockname()[1])
            peer, _ = lst.accept()
            (pid_file,) = shm.instance_dir(name).glob("nsm-*.pid")
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            app.settimeout(10)
            assert app.recv(10) == b""
            assert ctl.so_error(ino) == errno.ECONNRESET
            with pytest.raises(BrokenPipeError):
                app.send(b"x")
            assert ctl.call(SOCKET, args=(socket.AF_INET, socket.SOCK_STREAM, 0))[0] == \
                -errno.ENETDOWN
            app.close()
            peer.close()
            lst.close()
            ctl.close()
            assert a.wait(10) == 0, "the agent did not exit once idle"
        finally:
            a.close()


def test_many_connections_share_the_send_half(agent: Agent) -> None:
    """PRE-4: 32 connections echo 1 MB each at once through one agent: the send half
    (2 MB) and the call slots are shared; a socket that finds none waits, none is lost."""
    count, size = 32, 1 << 20
    with time_limit(120):
        lst = kernel_listener()
        lst.listen(64)

        def echo() -> None:
            for _ in range(count):
                conn, _ = lst.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        def serve(conn: socket.socket) -> None:
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

        threading.Thread(target=echo, daemon=True).start()
        ctl = agent.connect()
        apps = [connected(ctl, lst.getsockname()[1])[0] for _ in range(count)]
        errors: list[BaseException] = []

        def client(app: socket.socket) -> None:
            try:
                data = os.urandom(size)
                t = threading.Thread(target=app.sendall, args=(data,), daemon=True)
                t.start()
                got = bytearray()
                app.settimeout(60)
                while len(got) < size:
                    chunk = app.recv(1 << 16)
                    assert chunk
                    got += chunk
                t.join(60)
                assert bytes(got) == data
                app.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(app,)) for app in apps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors, errors[:3]
        lst.close()
        ctl.close()


def test_bulk_throughput_figure(agent: Agent) -> None:
    """A figure, not an assertion: 64 MB through the agent vs direct kernel TCP."""
    size = 64 << 20
    block = os.urandom(1 << 20)

    def sink(lst: socket.socket, out: list[int]) -> None:
        conn, _ = lst.accept()
        n = 0
        while chunk := conn.recv(1 << 20):
            n += len(chunk)
        out.append(n)
        conn.close()

    def run(make: object) -> float:
        lst = kernel_listener()
        out: list[int] = []
        t = threading.Thread(target=sink, args=(lst, out), daemon=True)
        t.start()
        start = time.perf_counter()
        s = make(lst.getsockname()[1])  # type: ignore[operator]
        for _ in range(size // len(block)):
            s.sendall(block)
        s.close()
        t.join(60)
        elapsed = time.perf_counter() - start
        assert out == [size]
        lst.close()
        return elapsed

    with time_limit(120):
        ctl = agent.connect()
        direct = run(lambda port: socket.create_connection(("127.0.0.1", port)))
        via = run(lambda port: connected(ctl, port)[0])
        print(f"\nbulk 64 MB: direct {size / direct / 1e6:.0f} MB/s, "
              f"via nk-agent {size / via / 1e6:.0f} MB/s, ratio {via / direct:.1f}x slower")
        ctl.close()


def test_ping_pong_figure(agent: Agent) -> None:
    """A figure, not an assertion: 2000 one-byte round trips through the agent vs direct
    (a lost wake-up would show here as RING-7's 50 ms stalls)."""
    rounds = 2000

    def run(s: socket.socket, peer: socket.socket) -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            s.sendall(b"x")
            assert peer.recv(1) == b"x"
            peer.sendall(b"y")
            assert s.recv(1) == b"y"
        return (time.perf_counter() - start) / rounds

    with time_limit(120):
        lst = kernel_listener()
        ctl = agent.connect()
        direct_c = socket.create_connection(lst.getsockname())
        direct_p, _ = lst.accept()
        app, _ = connected(ctl, lst.getsockname()[1])
        peer, _ = lst.accept()
        for s in (direct_c, direct_p, app, peer):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if s is not app else None
        direct = run(direct_c, direct_p)
        via = run(app, peer)
        print(f"\nround trip: direct {direct * 1e6:.0f} us, via nk-agent {via * 1e6:.0f} us")
        for s in (direct_c, direct_p, app, peer, lst):
            s.close()
        ctl.close()

