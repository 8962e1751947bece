"""The minimal C tenant (fastpath/csrc/tenant.c) against a running fast-path instance.

Two C tenants (one device each) talk through the C CoreEngine and the C
kernel NSM: an echo, a bulk transfer larger than both halves of the data area
(so send buffers come back on the SEND replies, BUF-3, and receive buffers on
BUF_RETURN, BUF-4) checked end to end, the C tenant against the fast-path
Python GuestLib, the errors a connect or accept gets from the stack, and a
smoke test of bench.kernel_nsm (which never asserts a speed).
"""

from __future__ import annotations

import errno
import os
import re
import socket as std
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("netkernel.fastpath._lib", reason="the C fast path is not built")

from netkernel.fastpath._lib import ffi, lib
from netkernel.fastpath.tenant import Tenant
from tests.live import own_instance, time_limit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fast_instance() -> Iterator[str]:
    with own_instance(impl="fastpath") as name:
        yield name


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _joined(th: threading.Thread, out: dict[str, Any]) -> Any:
    th.join(20)
    assert not th.is_alive(), "the peer thread hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _listener(t: Tenant) -> tuple[int, int]:
    s = t.socket()
    t.setsockopt(s, std.SOL_SOCKET, std.SO_REUSEADDR, 1)
    t.bind(s, ("127.0.0.1", 0))
    t.listen(s)
    return s, t.getsockname(s)[1]


def test_two_c_tenants_echo_through_netkernel(fast_instance: str) -> None:
    with time_limit(60), Tenant(fast_instance) as a, Tenant(fast_instance) as b:
        assert a.vm_id != b.vm_id
        lsock, port = _listener(a)

        def echo() -> tuple[str, int]:
            c, peer = a.accept(lsock)
            while data := a.recv(c, 65536):
                assert a.send(c, data) == len(data)
            a.close_socket(c)
            a.close_socket(lsock)
            return peer

        th, out = _in_thread(echo)
        s = b.socket()
        b.connect(s, ("127.0.0.1", port))
        for n in (1, 64, 1000, 16384, 40000):  # 40000: three granules, three SENDs
            msg = os.urandom(n)
            b.send(s, msg)
            got = b""
            while len(got) < n:
                got += b.recv(s, n - len(got))
            assert got == msg
        local = b.getsockname(s)
        b.close_socket(s)
        assert _joined(th, out) == local  # accept's peer address is the client's name
        stats = b.stats()
        # each echo came as EV_DATA and went back with BUF_RETURN (BUF-4); every reply matched
        assert stats["buf_returns"] >= 5
        assert stats["unmatched"] == 0


def test_bulk_transfer_between_c_tenants_arrives_whole_and_in_order(fast_instance: str) -> None:
    total = 9 << 20  # > the 2 MB send half and the 2 MB receive half: buffers are recycled
    with time_limit(120), Tenant(fast_instance) as a, Tenant(fast_instance) as b:
        port = ffi.new("uint16_t *")
        listener = lib.nk_bench_listen(a.ptr, port)
        assert listener > 0
        recv = ffi.new("struct nk_bench_result *")
        th, out = _in_thread(lambda: lib.nk_bench_bulk_recv(a.ptr, listener, 65536, 1, recv))
        sent = ffi.new("struct nk_bench_result *")
        assert lib.nk_bench_bulk_send(b.ptr, port[0], 8192, 0.0, total, 1, sent) == 0
        assert _joined(th, out) == 0
        assert sent.bytes == recv.bytes == total
        assert sent.checksum == recv.checksum
        assert b.stats()["requests"] >= total // (16 << 10)  # one SEND per granule at least


def _direct_bulk(total: int) -> tuple[Any, Any]:
    """The bulk workers over direct kernel sockets (t = NULL): sender's and receiver's results."""
    port = ffi.new("uint16_t *")
    listener = lib.nk_bench_listen(ffi.NULL, port)
    assert listener >= 0
    recv = ffi.new("struct nk_bench_result *")
    th, out = _in_thread(lambda: lib.nk_bench_bulk_recv(ffi.NULL, listener, 4096, 1, recv))
    sent = ffi.new("struct nk_bench_result *")
    assert lib.nk_bench_bulk_send(ffi.NULL, port[0], 8192, 0.0, total, 1, sent) == 0
    assert _joined(th, out) == 0
    return sent, recv


def test_checksum_tells_streams_apart() -> None:
    """The bulk check can fail: a stream one byte shorter has another checksum."""
    sums = []
    for total in (8192 * 3, 8192 * 3 - 1):
        sent, recv = _direct_bulk(total)
        assert sent.checksum == recv.checksum and recv.bytes == total
        sums.append(recv.checksum)
    assert sums[0] != sums[1]


def test_c_tenant_talks_to_the_python_guestlib(fast_instance: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETKERNEL_INSTANCE", fast_instance)
    from netkernel.fastpath import guestlib

    with time_limit(60), Tenant(fast_instance) as t:
        srv = guestlib.socket(std.AF_INET, std.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def echo_upper() -> None:
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())
            srv.close()

        th, out = _in_thread(echo_upper)
        s = t.socket()
        t.connect(s, ("127.0.0.1", port))
        msg = bytes(range(97, 123)) * 5000  # 130 000 bytes: several granules
        t.send(s, msg)
        got = b""
        while len(got) < len(msg):
            got += t.recv(s, 65536)
        assert got == msg.upper()
        t.shutdown(s, std.SHUT_WR)
        assert t.recv(s, 10) == b""  # the GuestLib closed: EV_FIN, end of stream
        t.close_socket(s)
        _joined(th, out)


def test_connect_to_a_closed_port_is_refused(fast_instance: str) -> None:
    with time_limit(30), Tenant(fast_instance) as t:
        probe = std.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: the kernel refuses
        s = t.socket()
        with pytest.raises(OSError) as exc:
            t.connect(s, ("127.0.0.1", port))
        probe.close()
        assert exc.value.errno == errno.ECONNREFUSED
        t.close_socket(s)


def test_accept_on_a_socket_that_does_not_listen_is_einval(fast_instance: str) -> None:
    with time_limit(30), Tenant(fast_instance) as t:
        s = t.socket()
        t.bind(s, ("127.0.0.1", 0))
        with pytest.raises(OSError) as exc:
            t.accept(s)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError) as bad:
            t.send(12345, b"x")  # no such socket
        assert bad.value.errno == errno.EBADF
        t.close_socket(s)


def test_closing_with_unread_data_resets_the_peer(fast_instance: str) -> None:
    """GL-2, NSM-8: CLOSE carries ABORT when received data was never read; the peer's
    recv fails ECONNRESET, and its sends are EPIPE from then on (SOCK-6)."""
    with time_limit(60), Tenant(fast_instance) as a, Tenant(fast_instance) as b:
        lsock, port = _listener(a)
        th, out = _in_thread(lambda: a.accept(lsock)[0])
        s = b.socket()
        b.connect(s, ("127.0.0.1", port))
        c = _joined(th, out)
        b.send(s, b"never read")
        while a.stats()["events"] == 0:  # the EV_DATA is in the tenant, unread
            lib.nk_tenant_wait(a.ptr, 10_000_000)
        a.close_socket(c)
        with pytest.raises(OSError) as reset:
            b.recv(s, 100)
        assert reset.value.errno == errno.ECONNRESET
        with pytest.raises(OSError) as pipe:
            b.send(s, b"more")
        assert pipe.value.errno == errno.EPIPE
        b.close_socket(s)
        a.close_socket(lsock)


def test_bench_kernel_nsm_runs_and_prints_consistent_ratios() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.kernel_nsm", "--seconds", "0.3"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    name = re.search(r"embedded instance '([\w.-]+)'", run.stdout)
    assert name, run.stdout
    for row, goal in (("bulk 8192 B", 0.8), ("request/response 64 B", 0.7)):
        line = next(line for line in run.stdout.splitlines() if line.startswith(row))
        direct, nk, ratio = (float(x.replace(",", "")) for x in
                             re.findall(r"[\d,]+\.\d+", line)[:3])
        assert direct > 0 and nk > 0, line
        assert abs(ratio - nk / direct) <= 0.0005 + 0.05 * ratio, line
        assert f">= {goal}x: {ratio:.3f}x" in run.stdout  # the goal is stated with the ratio
    assert "where the time goes" in run.stdout
    from netkernel.reference import shm

    assert not shm.instance_dir(name.group(1)).exists()  # the embedded instance is gone
