"""API-level scenarios for tests/test_preload_api.py, one per subcommand.

Each scenario uses the socket API the way programs do and prints what it observed
(never a port number, never a timing), one line per fact, so that its output under
libnkpreload.so can be compared with its output on plain Linux: Linux is the oracle.
Run: python tests/preload/scenarios.py NAME [ARGS...]
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

SCENARIOS: dict[str, Callable[..., None]] = {}


def scenario(f: Callable[..., None]) -> Callable[..., None]:
    SCENARIOS[f.__name__] = f
    return f


def say(*what: object) -> None:
    print(*what, flush=True)


def err_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def listener(family: int = socket.AF_INET) -> socket.socket:
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    lst.listen(8)
    return lst


_KEEP: list[socket.socket] = []


def refusing_port() -> int:
    """A port bound but not listening: a connection to it is refused. (Not a listener
    just closed: NetKernel's close is asynchronous, a CONNECT right after it may still
    meet the listener and be reset instead.)"""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _KEEP.append(s)
    port: int = s.getsockname()[1]
    return port


def recv_all(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


@scenario
def tcp_pair(family_name: str = "inet") -> None:
    """Client and server in one process, both ways, then orderly close."""
    family = socket.AF_INET6 if family_name == "inet6" else socket.AF_INET
    lst = listener(family)
    say("listen name", lst.getsockname()[0], "type", lst.getsockopt(socket.SOL_SOCKET,
                                                                    socket.SO_TYPE))
    say("acceptconn", lst.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    port = lst.getsockname()[1]
    cli = socket.socket(family, socket.SOCK_STREAM)
    cli.connect((lst.getsockname()[0], port))
    srv, peer = lst.accept()
    say("peer is client", peer[:2] == cli.getsockname()[:2])
    say("client peer is listener", cli.getpeername()[1] == port)
    say("server name port", srv.getsockname()[1] == port)
    say("so_error", cli.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    say("domain", cli.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == family)
    cli.sendall(b"ping" * 1000)
    say("server got", len(recv_all(srv, 4000)))
    srv.sendall(b"x" * 300000)
    say("client got", len(recv_all(cli, 300000)))
    cli.shutdown(socket.SHUT_WR)
    say("server eof", srv.recv(10))
    srv.sendall(b"after")
    say("client still reads", cli.recv(10))
    srv.close()
    say("client eof", cli.recv(10))
    data, addr = b"", None
    try:
        data, addr = cli.recvfrom(10)
    except OSError as exc:
        say("recvfrom error", err_name(exc))
    say("recvfrom after eof", data, addr)
    cli.close()
    lst.close()


@scenario
def tcp_to(host: str, port: str, count: str = "1") -> None:
    """A client of a server outside (a kernel socket or a NetKernel one): echo."""
    for k in range(int(count)):
        with socket.create_connection((host, int(port)), timeout=20) as s:
            payload = bytes(range(256)) * (40 + k)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            back = recv_all(s, len(payload) + 1)
            say("echo", k, back == payload)


@scenario
def tcp_serve(count: str = "1") -> None:
    """A server for a client outside: prints its port, echoes `count` connections."""
    lst = listener()
    say(lst.getsockname()[1])
    for _ in range(int(count)):
        conn, _ = lst.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    say("served")


@scenario
def nonblocking_connect() -> None:
    """Non-blocking connect, then select/poll/epoll over a NetKernel fd and a pipe."""
    lst = listener()
    r, w = os.pipe()
    c = socket.socket()
    c.setblocking(False)
    try:
        c.connect(lst.getsockname())
        say("connect", "done at once")
    except BlockingIOError as exc:
        say("connect", err_name(exc))
    _, wr, _ = select.select([r], [c], [], 10)
    say("select writable", wr == [c])
    say("so_error", c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    srv, _ = lst.accept()
    p = select.poll()
    p.register(c, select.POLLIN)
    p.register(r, select.POLLIN)
    say("poll idle", p.poll(100))
    os.write(w, b"p")
    say("poll pipe", [fd == r for fd, _ in p.poll(5000)])
    os.read(r, 1)
    srv.send(b"s")
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN)
    ep.register(r, select.EPOLLIN)
    ready = ep.poll(5)
    say("epoll socket", [fd == c.fileno() for fd, _ in ready])
    say("recv", c.recv(1))
    try:
        c.recv(1)
    except BlockingIOError as exc:
        say("recv empty", err_name(exc))
    say("select(0) sleeps", select.select([], [], [], 0.05))
    c2 = socket.socket()
    c2.setblocking(False)
    port = refusing_port()
    try:
        c2.connect(("127.0.0.1", port))
    except OSError as exc:
        say("refused connect", err_name(exc))
    select.select([], [c2], [], 10)
    say("refused so_error", errno.errorcode.get(
        c2.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))
    c3 = socket.socket()
    try:
        c3.connect(("127.0.0.1", port))
    except OSError as exc:
        say("blocking refused", err_name(exc))


@scenario
def unconnected() -> None:
    """Data calls on stream sockets without a connection: fresh, listening, refused."""
    def attempt(what: str, call: Callable[[], object]) -> None:
        try:
            say(what, "returned", call())
        except OSError as exc:
            say(what, err_name(exc))

    fresh = socket.socket()
    attempt("fresh recv", lambda: fresh.recv(10))
    attempt("fresh send", lambda: fresh.send(b"x", socket.MSG_NOSIGNAL))
    attempt("fresh recvfrom", lambda: fresh.recvfrom(10))
    attempt("fresh getpeername", fresh.getpeername)
    lst = listener()
    attempt("listening recv", lambda: lst.recv(10))
    attempt("listening send", lambda: lst.send(b"x", socket.MSG_NOSIGNAL))
    lst.setblocking(False)
    attempt("listening accept is fine", lst.accept)
    port = refusing_port()
    refused = socket.socket()
    attempt("refused connect", lambda: refused.connect(("127.0.0.1", port)))
    attempt("refused send", lambda: refused.send(b"x", socket.MSG_NOSIGNAL))
    attempt("refused recv", lambda: refused.recv(10))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.write(fresh.fileno(), b"dies")
    say("not reached")


@scenario
def epoll_sets() -> None:
    """One fd in two epoll sets, and an epoll set inside another."""
    lst = listener()
    c = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    a, b, outer = select.epoll(), select.epoll(), select.epoll()
    a.register(c.fileno(), select.EPOLLIN)
    b.register(c.fileno(), select.EPOLLIN)
    outer.register(a.fileno(), select.EPOLLIN)
    say("before", a.poll(0), b.poll(0), outer.poll(0))
    srv.send(b"data")
    say("a", [fd == c.fileno() for fd, _ in a.poll(5)])
    say("b", [fd == c.fileno() for fd, _ in b.poll(5)])
    say("outer", [fd == a.fileno() for fd, _ in outer.poll(5)])
    say("data", c.recv(10))
    srv.close()
    say("hup seen", bool(a.poll(5)))
    say("eof", c.recv(10))


@scenario
def dup_fcntl() -> None:
    """dup, dup2, F_DUPFD: the copies are the same socket."""
    import fcntl

    lst = listener()
    c = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    d = os.dup(c.fileno())
    d2 = 100
    os.dup2(c.fileno(), d2)
    d3 = fcntl.fcntl(c.fileno(), fcntl.F_DUPFD, 200)
    say("dupfd >= 200", d3 >= 200)
    names = set()
    for fd in (d, d2, d3):
        s = socket.socket(fileno=fd)
        names.add(s.getsockname())
        s.detach()
    say("same name", names == {c.getsockname()})
    os.write(d, b"1")
    os.write(d2, b"2")
    os.write(d3, b"3")
    c.close()
    say("server got", recv_all(srv, 3))
    os.close(d)
    os.close(d2)
    os.close(d3)
    say("eof after last close", srv.recv(10))
    flags = fcntl.fcntl(srv.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(srv.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        srv.recv(1)
        say("nonblock", "read something")
    except BlockingIOError as exc:
        say("nonblock", err_name(exc))
    except OSError as exc:
        say("nonblock other", err_name(exc))


@scenario
def fork_inherit() -> None:
    """The child uses an inherited connected socket and accepts on an inherited listener."""
    lst = listener()
    c = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    pid = os.fork()
    if pid == 0:
        try:
            c.sendall(b"from child")
            conn, _ = lst.accept()
            conn.sendall(b"accepted in child")
            conn.close()
            x = socket.socket()  # a new socket in the child works too
            x.connect(lst.getsockname())
            x.close()
            os._exit(0)
        except BaseException as exc:
            print("child failed", exc, file=sys.stderr, flush=True)
            os._exit(1)
    c2 = socket.create_connection(lst.getsockname())
    say("parent got", recv_all(srv, 10))
    say("child accepted", recv_all(c2, 17))
    say("child status", os.waitpid(pid, 0)[1])
    c.sendall(b"parent still")
    say("server", recv_all(srv, 12))
    c.close()
    say("eof", srv.recv(10))


@scenario
def exec_inherit(stage: str = "parent", fd: str = "") -> None:
    """A socket without CLOEXEC survives exec; LD_PRELOAD cleared by the program is put back."""
    if stage == "child":
        tcp_fd, udp_fd = (int(x) for x in fd.split(","))
        s = socket.socket(fileno=tcp_fd)
        say("child name is inet", s.family == socket.AF_INET or s.family)
        say("child sockname", s.getsockname()[0])
        u = socket.socket(fileno=udp_fd)
        data, src = u.recvfrom(100)
        say("child udp", data, src[0])
        u.sendto(b"udp back", src)
        s.sendall(b"from exec")
        say("child got", recv_all(s, 6))
        say("child new socket works", bool(socket.socket().fileno() >= 0))
        s.close()
        return
    lst = listener()
    c = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    c.set_inheritable(True)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.set_inheritable(True)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.sendto(b"before exec", u.getsockname())
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    pid = os.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, __file__, "exec_inherit", "child",
                                   f"{c.fileno()},{u.fileno()}"], env)
    c.close()
    u.close()
    say("parent udp", peer.recvfrom(100)[0])
    say("parent got", recv_all(srv, 9))
    srv.sendall(b"answer")
    say("child status", os.waitpid(pid, 0)[1])
    say("eof", srv.recv(10))


@scenario
def show_env() -> None:
    say("LD_PRELOAD", os.environ.get("LD_PRELOAD", ""))
    say("NETKERNEL_AGENT", os.environ.get("NETKERNEL_AGENT", ""))


@scenario
def udp() -> None:
    """sendto/recvfrom, connected UDP, MSG_PEEK, MSG_TRUNC, EDESTADDRREQ, FIONREAD."""
    import array
    import fcntl
    import termios

    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    say("type", a.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
    try:
        a.send(b"nowhere")
    except OSError as exc:
        say("send unconnected", err_name(exc))
    a.sendto(b"hello", b.getsockname())
    a.sendto(b"", b.getsockname())
    a.sendto(b"x" * 3000, b.getsockname())
    data, src = b.recvfrom(100, socket.MSG_PEEK)
    say("peek", data, src == a.getsockname())
    buf = array.array("i", [0])
    fcntl.ioctl(b.fileno(), termios.FIONREAD, buf)
    say("fionread", buf[0])
    data, src = b.recvfrom(100)
    say("recv", data, src == a.getsockname())
    say("empty datagram", b.recvfrom(100)[0])
    n, _, flags, _ = b.recvmsg_into([bytearray(10)])
    say("truncated", n, bool(flags & socket.MSG_TRUNC))
    b.setblocking(False)
    try:
        b.recv(10)
    except BlockingIOError as exc:
        say("empty queue", err_name(exc))
    b.setblocking(True)
    a.connect(b.getsockname())
    say("peer", a.getpeername() == b.getsockname())
    a.send(b"connected")
    os.write(a.fileno(), b"written")
    say("recv2", b.recv(100), os.read(b.fileno(), 100))
    b.sendto(b"big", a.getsockname())
    say("connected recv", a.recvfrom(100)[0])
    try:
        a.sendto(b"z" * 70000, b.getsockname())
    except OSError as exc:
        say("too big", err_name(exc))
    msgs = [b"one", b"two", b"three"]
    for m in msgs:
        a.send(m)
    say("three", [b.recv(10) for _ in msgs])
    six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    six.bind(("::1", 0))
    seven = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    seven.sendto(b"v6", six.getsockname())
    data, src = six.recvfrom(10)
    say("v6", data, src[0], src[1] == seven.getsockname()[1])


@scenario
def eintr() -> None:
    """A blocked recv returns EINTR when a handler without SA_RESTART runs."""
    lst = listener()
    c = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()

    class Interrupted(Exception):
        pass

    def handler(_sig: int, _frame: object) -> None:
        raise Interrupted

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        c.recv(10)
        say("recv returned")
    except Interrupted:
        say("recv interrupted")
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        lst.accept()
        say("accept returned")
    except Interrupted:
        say("accept interrupted")
    srv.sendall(b"later")
    say("then data", c.recv(10))


@scenario
def unix_untouched() -> None:
    """AF_UNIX sockets are the kernel's."""
    a, b = socket.socketpair()
    a.sendall(b"pair")
    say("pair", b.recv(10))
    path = f"/tmp/nk-preload-{os.getpid()}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    conn, _ = srv.accept()
    say("name", srv.getsockname() == path, c.getpeername() == path)
    c.sendall(b"unix")
    say("unix", conn.recv(10))
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.bind(path + ".d")
    e = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    e.sendto(b"dgram", path + ".d")
    say("dgram", d.recvfrom(10)[0])
    os.unlink(path)
    os.unlink(path + ".d")


@scenario
def threads() -> None:
    """Sockets made and used by several threads at once."""
    lst = listener()
    n = 8
    results: list[bool] = []

    def serve() -> None:
        for _ in range(n):
            conn, _ = lst.accept()
            with conn:
                conn.sendall(recv_all(conn, 1000))

    def client(k: int) -> None:
        with socket.create_connection(lst.getsockname()) as s:
            s.sendall(bytes([k]) * 1000)
            results.append(recv_all(s, 1000) == bytes([k]) * 1000)

    t = threading.Thread(target=serve)
    t.start()
    cs = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for c in cs:
        c.start()
    for c in cs:
        c.join(30)
    t.join(30)
    say("all echoed", results == [True] * n)


@scenario
def fork_threads() -> None:
    """fork while other threads make sockets (their control requests in flight): every
    child makes its own socket and exits; nobody deadlocks (pthread_atfork handler)."""
    lst = listener()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            socket.socket().close()
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.getsockname()
            u.close()

    workers = [threading.Thread(target=churn) for _ in range(3)]
    for w in workers:
        w.start()
    statuses = []
    for _ in range(10):
        pid = os.fork()
        if pid == 0:
            try:
                c = socket.create_connection(lst.getsockname(), timeout=20)
                c.sendall(b"k")
                c.close()
                os._exit(0)
            except BaseException:
                os._exit(1)
        statuses.append(os.waitpid(pid, 0)[1])
        conn, _ = lst.accept()
        statuses.append(conn.recv(1) == b"k")
        conn.close()
    stop.set()
    for w in workers:
        w.join()
    say("children", statuses == [0, True] * 10)


@scenario
def agent_dies(host: str, port: str) -> None:
    """A client of an outside server; told (stdin) when its agent was killed: the open
    socket ends (never a hang), a new socket gets a fresh agent (PRE-1, PRE-9)."""
    s = socket.create_connection((host, int(port)), timeout=20)
    s.sendall(b"before")
    say("echo", recv_all(s, 6))
    say("ready")
    sys.stdin.readline()  # the agent is gone now
    s.settimeout(20)
    try:
        say("read after", s.recv(10))
    except OSError as exc:
        say("read after", err_name(exc))
    try:
        s.sendall(b"x" * 100000)
        s.sendall(b"x" * 100000)
        say("send after", "ok")
    except OSError as exc:
        say("send after", err_name(exc))
    try:
        say("name after", s.getsockname()[0])
    except OSError as exc:
        say("name after", err_name(exc))
    s.close()
    t = socket.create_connection((host, int(port)), timeout=20)
    t.sendall(b"again")
    say("new socket", recv_all(t, 5))
    say("agent", os.environ.get("NETKERNEL_AGENT", "").rsplit("/", 1)[-1].startswith("agent-"))


@scenario
def asyncio_echo() -> None:
    """asyncio's epoll loop: 20 concurrent TCP echo clients, and a UDP endpoint pair."""
    import asyncio

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]

        async def client(k: int) -> bool:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            payload = bytes([k]) * 200000
            w.write(payload)
            await w.drain()
            w.write_eof()
            got = await r.read(-1)
            w.close()
            return got == payload

        say("tcp", await asyncio.gather(*(client(k) for k in range(20))) == [True] * 20)
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class Sink(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if not got.done():
                    got.set_result(data)

        t1, _ = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
        t2, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=t1.get_extra_info("sockname"))
        t2.sendto(b"dgram")
        say("udp", await asyncio.wait_for(got, 20))
        srv.close()

    asyncio.run(main())


@scenario
def sleep_then(seconds: str) -> None:
    time.sleep(float(seconds))


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
