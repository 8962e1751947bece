"""The preload role (spec/preload.md): unmodified programs over NetKernel.

The target's ``preload`` role gives the paths of its LD_PRELOAD library and its
agent (``paths()``). Every test runs an unmodified program — CPython, whose
``socket`` module calls libc's socket functions — with the library preloaded
and an agent attached to the session's instance (``netkernel.run``'s
:class:`~netkernel.run.Agent`), against Linux sockets in this process as
peers; the CoreEngine's status proves that the sockets went through
NetKernel. Tests that kill an NSM get an instance of their own.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netkernel import run
from netkernel.conformance.runtime import Instance, Runtime, peer_sees, wait_until

LOOP = "127.0.0.1"
TIMEOUT = 60


class Tenant:
    """An agent on an instance, and the environment that preloads its library."""

    def __init__(self, preload: Any, inst: Instance) -> None:
        self.inst = inst
        self.paths = preload.paths()
        self.agent = run.Agent(self.paths.agent, inst.name, "conformance")
        self.env = run.environment(dict(os.environ), inst.name, self.agent, self.paths)

    def popen(self, code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kw)

    def python(self, code: str, *args: str) -> str:
        """Run ``code`` preloaded; its stdout. AssertionError with its stderr if it failed."""
        proc = self.popen(code, *args)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the program hung:\n{err}") from None
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{err}"
        return out

    def sockets(self) -> int:
        """Sockets the CoreEngine lists for this tenant's device."""
        return sum(t.get("sockets", 0) for t in self.inst.status()["tenants"]
                   if t.get("name") == "conformance")

    def stop(self) -> None:
        self.agent.stop()


@pytest.fixture
def tenant(preload: Any, nk_runtime: Runtime) -> Iterator[Tenant]:
    t = Tenant(preload, nk_runtime.shared())
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.create_server((LOOP, 0), backlog=64) as srv:
        srv.settimeout(TIMEOUT)
        yield srv


def _accept_and(srv: socket.socket, work: Any) -> threading.Thread:
    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            work(conn)
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return th


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


# -- PRE-1 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-1")
def test_run_gives_the_commands_exit_status_and_reaches_a_kernel_server(
        preload: Any, nk_runtime: Runtime, server: socket.socket) -> None:
    """`netkernel run --instance` preloads the command; its exit status comes back."""
    paths = preload.paths()
    env = dict(os.environ, NETKERNEL_PRELOAD=str(paths.lib), NETKERNEL_AGENT_BIN=str(paths.agent))
    th = _accept_and(server, _echo)
    code = ("import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
            "s.sendall(b'ping'); assert s.recv(4) == b'ping'; s.close(); sys.exit(7)")
    proc = subprocess.run([sys.executable, "-m", "netkernel", "run", "--instance",
                           nk_runtime.shared().name, "--", sys.executable, "-c", code,
                           str(server.getsockname()[1])],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 7, proc.stderr
    th.join(TIMEOUT)


@pytest.mark.req("PRE-1")
def test_run_refuses_an_instance_that_is_not_running(preload: Any) -> None:
    proc = subprocess.run([sys.executable, "-m", "netkernel", "run", "--instance",
                           "no-such-instance-here", "--", "true"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == run.EXIT_CANNOT_RUN
    assert "no-such-instance-here" in proc.stderr and "not running" in proc.stderr


@pytest.mark.req("PRE-1", "GL-10")
def test_bytes_written_before_exit_reach_the_peer_and_the_agent_then_leaves(
        tenant: Tenant, server: socket.socket) -> None:
    """The program exits right after writing 4 MiB; all of it arrives (GL-10), then the
    agent detaches once nothing holds a socket (RT-4)."""
    got = hashlib.sha256()
    size = [0]

    def drain(conn: socket.socket) -> None:
        while data := conn.recv(1 << 16):
            got.update(data)
            size[0] += len(data)

    th = _accept_and(server, drain)
    out = tenant.python("""
        import hashlib, os, socket, sys
        data = os.urandom(4 << 20)
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        s.sendall(data)
        print(hashlib.sha256(data).hexdigest())
        os._exit(0)   # no close, no flush: the kernel closes the descriptor
    """, str(server.getsockname()[1]))
    th.join(TIMEOUT)
    assert size[0] == 4 << 20 and got.hexdigest() == out.strip()
    tenant.agent.release()
    assert tenant.agent.proc.wait(timeout=TIMEOUT) == 0
    wait_until("the tenant device detaches",
               lambda: not [t for t in tenant.inst.status()["tenants"]
                            if t.get("name") == "conformance"])


# -- PRE-2 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-2")
def test_the_descriptor_is_a_kernel_socket_in_mixed_poll_and_epoll_sets(
        tenant: Tenant, server: socket.socket) -> None:
    th = _accept_and(server, lambda c: (c.recv(10), c.sendall(b"x" * 5), c.recv(10)))
    out = tenant.python("""
        import os, select, socket, stat, sys
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        assert stat.S_ISSOCK(os.fstat(s.fileno()).st_mode)
        r, w = os.pipe()
        ep1, ep2, outer = select.epoll(), select.epoll(), select.epoll()
        ep1.register(s.fileno(), select.EPOLLIN); ep1.register(r, select.EPOLLIN)
        ep2.register(s.fileno(), select.EPOLLIN)          # one fd in two epoll sets
        outer.register(ep1.fileno(), select.EPOLLIN)       # nested epoll
        s.sendall(b"go")
        assert outer.poll(10) and ep2.poll(10)
        assert [fd for fd, _ in ep1.poll(10)] == [s.fileno()]
        assert select.select([s, r], [], [], 10)[0] == [s]
        os.write(w, b"!")
        p = select.poll(); p.register(s, select.POLLIN); p.register(r, select.POLLIN)
        assert sorted(fd for fd, _ in p.poll(10000)) == sorted([s.fileno(), r])
        d = os.dup(s.fileno())
        print(os.read(d, 5).decode())
        os.close(d)
        s.sendall(b"bye")
    """, str(server.getsockname()[1]))
    th.join(TIMEOUT)
    assert out.strip() == "xxxxx"


@pytest.mark.req("PRE-2")
def test_a_forked_child_and_an_execd_program_keep_the_socket(
        tenant: Tenant, server: socket.socket) -> None:
    got: list[bytes] = []

    def collect(conn: socket.socket) -> None:
        while data := conn.recv(100):
            got.append(data)

    th = _accept_and(server, collect)
    tenant.python("""
        import os, socket, subprocess, sys
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        s.sendall(b"parent;")
        pid = os.fork()
        if pid == 0:
            s.sendall(b"child;")
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        s.set_inheritable(True)
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}   # cleared: put back
        code = "import os,socket,sys; s=socket.socket(fileno=int(sys.argv[1])); s.sendall(b'exec;')"
        subprocess.run([sys.executable, "-c", code, str(s.fileno())], env=env,
                       close_fds=False, check=True)
        s.close()
    """, str(server.getsockname()[1]))
    th.join(TIMEOUT)
    assert b"".join(got) == b"parent;child;exec;"


@pytest.mark.req("PRE-2")
def test_a_blocked_recv_returns_eintr_on_a_signal(tenant: Tenant, server: socket.socket) -> None:
    hold = threading.Event()
    th = _accept_and(server, lambda c: hold.wait(TIMEOUT))
    out = tenant.python("""
        import errno, signal, socket, sys
        signal.signal(signal.SIGALRM, lambda *a: None)
        signal.siginterrupt(signal.SIGALRM, True)
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(10)
        n = libc.recv(s.fileno(), buf, 10, 0)     # the C call: Python would retry EINTR
        print(n, errno.errorcode[ctypes.get_errno()])
    """, str(server.getsockname()[1]))
    hold.set()
    th.join(TIMEOUT)
    assert out.split() == ["-1", "EINTR"]


# -- PRE-3 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-3")
def test_inet_sockets_go_through_netkernel_and_unix_sockets_do_not(tenant: Tenant) -> None:
    proc = tenant.popen("""
        import socket, sys
        a, b = socket.socketpair()
        a.sendall(b"unix ok"); print(b.recv(7).decode(), flush=True)
        keep = [socket.socket(socket.AF_INET, socket.SOCK_STREAM),
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)]
        print("made", flush=True)
        sys.stdin.readline()
    """, stdin=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "unix ok"
        assert proc.stdout.readline().strip() == "made"
        wait_until("the CoreEngine lists the two INET sockets", lambda: tenant.sockets() == 2)
    finally:
        proc.stdin.close()
        proc.wait(TIMEOUT)
    wait_until("the sockets close with the process", lambda: tenant.sockets() == 0)


# -- PRE-4 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-4")
def test_bulk_transfer_both_ways_is_intact(tenant: Tenant, server: socket.socket) -> None:
    th = _accept_and(server, _echo)
    out = tenant.python("""
        import hashlib, os, socket, sys, threading
        data = os.urandom(16 << 20)
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        t = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        t.start()
        h, n = hashlib.sha256(), 0
        while chunk := s.recv(1 << 16):
            h.update(chunk); n += len(chunk)
        t.join()
        print(n == len(data) and h.digest() == hashlib.sha256(data).digest())
    """, str(server.getsockname()[1]))
    th.join(TIMEOUT)
    assert out.strip() == "True"


@pytest.mark.req("PRE-4", "NSM-16")
def test_a_peer_that_does_not_read_stops_the_writer_and_loses_nothing(
        tenant: Tenant, server: socket.socket) -> None:
    """Non-blocking sends end in EAGAIN (bounded buffering); then every byte arrives."""
    start = threading.Event()
    got = hashlib.sha256()

    def slow(conn: socket.socket) -> None:
        start.wait(TIMEOUT)
        while data := conn.recv(1 << 16):
            got.update(data)

    th = _accept_and(server, slow)
    proc = tenant.popen("""
        import hashlib, select, socket, sys
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        s.setblocking(False)
        h, sent, block = hashlib.sha256(), 0, bytes(range(256)) * 256
        while True:
            try:
                n = s.send(block)
            except BlockingIOError:
                break
            h.update(block[:n]); sent += n
            assert sent < 1 << 30, "no backpressure"
        print(sent, flush=True)
        sys.stdin.readline()
        s.setblocking(True)
        s.sendall(block); h.update(block)
        s.close()
        print(h.hexdigest(), flush=True)
    """, str(server.getsockname()[1]), stdin=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    sent = int(proc.stdout.readline())
    assert sent > 0
    start.set()
    proc.stdin.write("\n")
    proc.stdin.flush()
    digest = proc.stdout.readline().strip()
    proc.wait(TIMEOUT)
    th.join(TIMEOUT)
    assert got.hexdigest() == digest


# -- PRE-5 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-5")
def test_nonblocking_connect_is_einprogress_then_writable_with_so_error(
        tenant: Tenant, server: socket.socket) -> None:
    closed = socket.socket()
    closed.bind((LOOP, 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    th = _accept_and(server, lambda c: c.recv(1))
    out = tenant.python("""
        import errno, select, socket, sys
        def attempt(port):
            s = socket.socket(); s.setblocking(False)
            assert select.select([], [s], [], 0)[1] == []      # not writable before connect
            rc = s.connect_ex(("127.0.0.1", port))
            assert rc == errno.EINPROGRESS, rc
            assert select.select([], [s], [], 10)[1] == [s]
            return errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0")
        print(attempt(int(sys.argv[1])), attempt(int(sys.argv[2])))
        b = socket.socket()
        try:
            b.connect(("127.0.0.1", int(sys.argv[2])))
        except ConnectionRefusedError:
            print("refused")
    """, str(server.getsockname()[1]), str(dead_port))
    th.join(TIMEOUT)
    assert out.split() == ["0", "ECONNREFUSED", "refused"]


# -- PRE-6 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-6")
def test_close_with_unread_data_resets_and_a_clean_close_is_eof(
        tenant: Tenant, server: socket.socket) -> None:
    seen: list[str] = []

    def two(conn: socket.socket) -> None:
        seen.append(peer_sees(conn))                 # the clean close
        c2, _ = server.accept()
        with c2:
            c2.sendall(b"unread data")
            seen.append(peer_sees(c2))               # the close with data unread

    th = threading.Thread(target=lambda: _accept_and(server, two).join(TIMEOUT), daemon=True)
    th.start()
    out = tenant.python("""
        import socket, sys, time
        port = int(sys.argv[1])
        a = socket.create_connection(("127.0.0.1", port)); a.close()
        b = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.5)                               # the data arrives, unread
        b.close()
        print("done")
    """, str(server.getsockname()[1]))
    th.join(TIMEOUT)
    assert out.strip() == "done" and seen == ["eof", "reset"]


@pytest.mark.req("PRE-6")
def test_shutdown_wr_sends_fin_and_the_peers_fin_reads_as_eof(
        tenant: Tenant, server: socket.socket) -> None:
    def peer(conn: socket.socket) -> None:
        assert conn.recv(10) == b"req"
        assert conn.recv(10) == b""                   # the program's SHUT_WR
        conn.sendall(b"answer")
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)

    th = _accept_and(server, peer)
    out = tenant.python("""
        import socket, sys
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        s.sendall(b"req"); s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(100):
            data += chunk
        print(data.decode(), s.recv(10) == b"")
    """, str(server.getsockname()[1]))
    th.join(TIMEOUT)
    assert out.split() == ["answer", "True"]


# -- PRE-7 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-7")
def test_a_preforking_server_accepts_on_an_inherited_listening_socket(tenant: Tenant) -> None:
    proc = tenant.popen("""
        import errno, os, socket, sys
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(16)
        c = socket.socket()
        try:
            c.accept()
        except OSError as e:
            assert e.errno == errno.EINVAL, e      # not listening
        srv.setblocking(False)
        try:
            srv.accept()
        except BlockingIOError:
            pass
        srv.setblocking(True)
        print(srv.getsockname()[1], flush=True)
        kids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                for _ in range(3):
                    conn, addr = srv.accept()
                    assert addr[0] == "127.0.0.1"
                    conn.sendall(str(os.getpid()).encode()); conn.close()
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            assert os.waitpid(pid, 0)[1] == 0
    """)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    answers = []
    for _ in range(6):
        with socket.create_connection((LOOP, port), timeout=TIMEOUT) as c:
            answers.append(c.recv(20))
    assert proc.wait(TIMEOUT) == 0, proc.stderr.read() if proc.stderr else ""
    assert len(answers) == 6 and all(a.isdigit() for a in answers)


# -- PRE-8 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-8")
def test_udp_keeps_datagram_boundaries_and_addresses(tenant: Tenant) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind((LOOP, 0))
        peer.settimeout(TIMEOUT)

        def echo() -> None:
            for _ in range(3):
                data, addr = peer.recvfrom(2000)
                peer.sendto(data.upper(), addr)

        th = threading.Thread(target=echo, daemon=True)
        th.start()
        out = tenant.python("""
            import socket, sys
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dst = ("127.0.0.1", int(sys.argv[1]))
            s.sendto(b"one", dst); s.sendto(b"two!", dst)
            a, src = s.recvfrom(100); b, _ = s.recvfrom(100)
            s.sendto(b"x" * 50, dst)
            n, _, flags, _ = s.recvmsg_into([bytearray(10)])
            print(a.decode(), b.decode(), src == dst, n, bool(flags & socket.MSG_TRUNC))
        """, str(peer.getsockname()[1]))
        th.join(TIMEOUT)
    assert out.split() == ["ONE", "TWO!", "True", "10", "True"]


# -- PRE-9 -------------------------------------------------------------------------------


@pytest.mark.req("PRE-9", "GL-8")
def test_no_instance_is_enetdown(preload: Any) -> None:
    paths = preload.paths()
    env = dict(os.environ, LD_PRELOAD=str(paths.lib), NETKERNEL_INSTANCE="no-such-instance-x",
               NETKERNEL_AGENT_BIN=str(paths.agent), NETKERNEL_PRELOAD=str(paths.lib))
    env.pop("NETKERNEL_AGENT", None)
    proc = subprocess.run(
        [sys.executable, "-c", "import socket\ntry:\n socket.socket()\nexcept OSError as e:"
         "\n import errno; print(errno.errorcode[e.errno])"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.stdout.strip() == "ENETDOWN", proc.stderr


@pytest.mark.req("PRE-9", "GL-9")
def test_a_dead_nsm_ends_the_connection_with_econnreset(
        preload: Any, nk_runtime: Runtime, server: socket.socket) -> None:
    inst = nk_runtime.new()
    t = Tenant(preload, inst)
    hold = threading.Event()
    th = _accept_and(server, lambda c: hold.wait(TIMEOUT))
    try:
        proc = t.popen("""
            import errno, socket, sys, time
            s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
            print("connected", flush=True)
            start = time.monotonic()
            data = s.recv(10)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            print(data == b"", errno.errorcode.get(err), time.monotonic() - start < 5)
        """, str(server.getsockname()[1]))
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        inst.nsms[0].stop(2.0)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert out.split() == ["True", "ECONNRESET", "True"], err
    finally:
        hold.set()
        t.stop()
        inst.stop()
        th.join(TIMEOUT)


# -- PRE-10 ------------------------------------------------------------------------------


@pytest.mark.req("PRE-10")
def test_run_refuses_a_static_binary(preload: Any) -> None:
    static = next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig")
                   if os.path.exists(p) and run.static_binary(Path(p))),
                  None)
    if static is None:
        pytest.skip("no statically linked program on this machine to try")
    paths = preload.paths()
    env = dict(os.environ, NETKERNEL_PRELOAD=str(paths.lib), NETKERNEL_AGENT_BIN=str(paths.agent))
    proc = subprocess.run([sys.executable, "-m", "netkernel", "run", "--", static, "-p"],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == run.EXIT_CANNOT_RUN
    assert "statically linked" in proc.stderr

