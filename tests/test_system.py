"""System tests on a live instance: load, bulk transfer, no bypass (issue 3, "Tests").

Everything here runs on the real runtime: a CoreEngine and a kernel-stack NSM
started by ``netkernel.instance.up`` (``nk_instance`` in conftest.py), tenants
in separate processes using GuestLib over real shared memory, and real Linux
sockets in the NSM. Each test is bounded by :func:`tests.live.time_limit`.

``NK_BULK_BYTES`` sets the size of the bulk transfer (default 100 MiB).
"""

from __future__ import annotations

import errno
import os
import random
import socket as std
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from netkernel.reference import guestlib
from tests.live import Program, status, tenant_entry, time_limit, until

BULK_BYTES = int(os.environ.get("NK_BULK_BYTES", str(100 << 20)))

#: A GuestLib echo server in its own process (a tenant of its own): prints its port, echoes
#: every connection in a thread, answers "stats" with what it saw, exits at stdin EOF.
ECHO_SERVER = r"""
import json, sys, threading
from netkernel.reference import guestlib

lst = guestlib.create_server(("127.0.0.1", 0), backlog=int(sys.argv[1]))
lock = threading.Lock()
stats = {"accepted": 0, "bytes": 0, "errors": []}

def serve(c):
    try:
        with c:
            while data := c.recv(65536):
                c.sendall(data)
                with lock:
                    stats["bytes"] += len(data)
    except OSError as exc:
        with lock:
            stats["errors"].append(repr(exc))

def accept():
    while True:
        try:
            c, _ = lst.accept()
        except OSError:
            return
        with lock:
            stats["accepted"] += 1
        threading.Thread(target=serve, args=(c,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
for line in sys.stdin:
    with lock:
        print(json.dumps(stats), flush=True)
"""


@pytest.fixture
def echo_server(nk_instance: str) -> Iterator[tuple[Program, int]]:
    with Program(ECHO_SERVER, "256", instance=nk_instance) as server:
        port = server.read()["port"]
        yield server, port
        assert server.finish() == 0


def _echo_once(port: int, msg: bytes) -> bytes:
    with guestlib.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _open_sockets(name: str) -> int:
    count: int = status(name)["sockets"]
    return count


def test_thousand_sequential_connections(nk_instance: str,
                                         echo_server: tuple[Program, int]) -> None:
    """Issue 3, Tests: "1,000 sequential ... connections" — each echoes a small message
    between two GuestLib tenants; afterwards the connection table holds no entry of them."""
    server, port = echo_server
    with time_limit(90):
        before = _open_sockets(nk_instance)
        rng = random.Random(1000)
        for i in range(1000):
            msg = b"%d:" % i + rng.randbytes(rng.randrange(1, 200))
            assert _echo_once(port, msg) == msg, i
        stats = server.ask("stats")
        assert stats["accepted"] == 1000 and stats["errors"] == []
        # every CLOSE reached the CoreEngine: the table is back where it was (CE-7)
        until("the 2,000 connection entries to go",
              lambda: _open_sockets(nk_instance) == before)
        mine = tenant_entry(nk_instance, os.getpid())
        assert mine is not None and mine["counters"]["ops"]["SOCKET"] >= 1000
        assert mine["counters"]["rejected"] == 0


def test_hundred_concurrent_connections(nk_instance: str,
                                        echo_server: tuple[Program, int]) -> None:
    """Issue 3, Tests: "100 concurrent connections" — 100 GuestLib connections open at
    the same time (all 200 ends in the connection table at once), each echoing its own
    message, all checked."""
    server, port = echo_server
    n = 100
    with time_limit(60):
        before = _open_sockets(nk_instance)
        connected = threading.Barrier(n + 1, timeout=30)
        results: dict[int, bytes] = {}
        failures: list[BaseException] = []

        def client(i: int) -> None:
            try:
                with guestlib.create_connection(("127.0.0.1", port), timeout=30) as c:
                    connected.wait()  # every connection is open before any sends
                    connected.wait()  # ... and the test has counted them
                    msg = f"client {i:03d} ".encode() * (i + 1)
                    c.sendall(msg)
                    got = b""
                    while len(got) < len(msg) and (chunk := c.recv(65536)):
                        got += chunk
                    results[i] = got
            except BaseException as exc:
                failures.append(exc)
                connected.abort()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        connected.wait()
        # the client ends are all open; the server's accept()s follow: then both ends of
        # every connection are in the table at once
        until("both ends of 100 connections open",
              lambda: _open_sockets(nk_instance) >= before + 2 * n, timeout=20)
        server_entry = tenant_entry(nk_instance, server.pid)
        assert server_entry is not None and server_entry["sockets"] >= n + 1  # + listener
        connected.wait()
        for t in threads:
            t.join(30)
        assert failures == []
        assert results == {i: f"client {i:03d} ".encode() * (i + 1) for i in range(n)}
        assert server.ask("stats")["accepted"] == n
        until("the 200 connection entries to go", lambda: _open_sockets(nk_instance) == before)


#: Bulk receiver: accepts one connection, reads with random sizes until EOF hashing
#: everything, sends its digest back, prints what it got.
BULK_RECEIVER = r"""
import hashlib, json, random, sys, time
from netkernel.reference import guestlib

lst = guestlib.create_server(("127.0.0.1", 0))
print(json.dumps({"port": lst.getsockname()[1]}), flush=True)
c, _ = lst.accept()
rng = random.Random(int(sys.argv[1]))
sha, total, calls = hashlib.sha256(), 0, 0
start = time.monotonic()
while data := c.recv(rng.choice([1, 7, 100, 1500, 4096, 65536, 1 << 20])):
    sha.update(data)
    total += len(data)
    calls += 1
seconds = time.monotonic() - start
c.sendall(sha.hexdigest().encode())
c.close()
print(json.dumps({"bytes": total, "sha256": sha.hexdigest(), "recv_calls": calls,
                  "seconds": seconds}), flush=True)
"""

#: Bulk sender: messages of log-uniform random sizes (1 B .. 1 MiB) taken at random
#: offsets of a random pool, hashed as sent; reads the receiver's digest at the end.
BULK_SENDER = r"""
import hashlib, json, math, os, random, socket, sys, time
from netkernel.reference import guestlib

port, total, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
pool = memoryview(os.urandom(8 << 20))
c = guestlib.create_connection(("127.0.0.1", port), timeout=120)
sha, sent, messages = hashlib.sha256(), 0, 0
start = time.monotonic()
while sent < total:
    size = min(total - sent, int(math.exp(rng.uniform(0, math.log(1 << 20)))))
    off = rng.randrange(len(pool) - size)
    chunk = pool[off:off + size]
    sha.update(chunk)
    c.sendall(chunk)
    sent += size
    messages += 1
c.shutdown(socket.SHUT_WR)
seconds = time.monotonic() - start
peer = b""
while data := c.recv(100):
    peer += data
c.close()
print(json.dumps({"bytes": sent, "sha256": sha.hexdigest(), "peer_sha256": peer.decode(),
                  "messages": messages, "seconds": seconds}), flush=True)
"""


def test_bulk_transfer_with_random_sizes_and_checksums(
        nk_instance: str, record_property: Callable[[str, object], None]) -> None:
    """Issue 3, Tests: "100 MB transferred with random message sizes and a checksum on
    both sides" — GuestLib sender and GuestLib receiver in two processes, random send and
    recv sizes, sha256 computed independently on each side and compared."""
    seed = random.randrange(1 << 32)
    with time_limit(150), \
            Program(BULK_RECEIVER, str(seed), instance=nk_instance) as receiver:
        port = receiver.read()["port"]
        with Program(BULK_SENDER, str(port), str(BULK_BYTES), str(seed),
                     instance=nk_instance) as sender:
            sent = sender.read(timeout=140)
            got = receiver.read(timeout=10)
            assert sender.finish() == 0 and receiver.finish() == 0
    assert sent["bytes"] == got["bytes"] == BULK_BYTES, seed
    assert sent["sha256"] == got["sha256"] == sent["peer_sha256"], seed
    assert sent["messages"] > 50 and got["recv_calls"] > 50  # really many random sizes
    rate = BULK_BYTES / max(sent["seconds"], 1e-9) / 1e6
    record_property("bulk_mb_per_s", round(rate, 1))
    print(f"bulk: {BULK_BYTES} B in {sent['seconds']:.1f} s ({rate:.1f} MB/s),"
          f" {sent['messages']} messages, {got['recv_calls']} recv calls, seed {seed}")


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


#: A tenant inside a network namespace with no network: proves the direct way fails,
#: then talks to the root-namespace server through NetKernel.
NO_NETWORK_TENANT = r"""
import errno, json, os, socket, sys
from netkernel.reference import guestlib

port = int(sys.argv[1])
direct = socket.socket()
direct.settimeout(5)
try:
    direct.connect(("127.0.0.1", port))
    direct_errno = 0
except OSError as exc:
    direct_errno = exc.errno
direct.close()
out = {"netns": os.stat("/proc/self/ns/net").st_ino, "direct_errno": direct_errno,
       "links": sorted(name for _, name in socket.if_nameindex())}
with guestlib.create_connection(("127.0.0.1", port), timeout=10) as c:
    out["name"] = c.getsockname()[0]
    c.sendall(sys.stdin.readline().encode())
    got = b""
    while chunk := c.recv(65536):
        got += chunk
    out["reply"] = got.decode()
print(json.dumps(out), flush=True)
"""


@pytest.mark.skipif(not _unshare_works(), reason="`unshare -n` is not permitted here")
def test_tenant_without_network_reaches_a_root_namespace_server(nk_instance: str) -> None:
    """Issue 3, Tests: "No bypass" — a tenant process inside a network namespace with no
    network at all (`unshare -n`): a stdlib connect to the root-namespace server fails
    there, and the same connect through NetKernel reaches it and gets the right bytes."""
    with time_limit(30), std.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(20)
        port = server.getsockname()[1]
        token = os.urandom(16).hex()
        with Program(NO_NETWORK_TENANT, str(port), instance=nk_instance,
                     wrapper=("unshare", "-n")) as tenant:
            tenant.send(token)
            conn, peer = server.accept()  # only the NetKernel connection arrives
            with conn:
                conn.settimeout(10)
                request = b""
                while not request.endswith(b"\n"):
                    chunk = conn.recv(100)
                    assert chunk, "EOF before the request line"
                    request += chunk
                conn.sendall(b"root namespace saw " + request.strip()[::-1])
            out = tenant.read()
            assert tenant.finish() == 0
    assert out["netns"] != os.stat("/proc/self/ns/net").st_ino  # really another namespace
    assert out["links"] == ["lo"]  # no network: not even a loopback that is up
    assert out["direct_errno"] in (errno.ENETUNREACH, errno.ECONNREFUSED)
    assert request == token.encode() + b"\n" and peer[0] == "127.0.0.1"
    assert out["reply"] == "root namespace saw " + token[::-1]
    assert out["name"] == "127.0.0.1"  # the NSM's socket, in the root namespace
