"""Unmodified real programs over NetKernel (issue 5, "Real programs"; spec/preload.md).

Each test runs Debian-packaged programs (or Python's own http.server/asyncio) as
processes, one or both of them under ``python -m netkernel run --instance NAME`` (the
preloaded GuestLib, PRE-1), against one instance shared by the module, and checks what
the programs did, not only how they exited: bodies and transfers byte for byte or by
sha256, every HTTP status, the load generators' error counts, the servers' own counters,
and the NSM's byte counters (the traffic went through NetKernel). The same runs without
NetKernel are here too (``direct``), as the baseline the NetKernel runs must match.
``test_curl_in_empty_netns_*`` runs the NetKernel side inside ``unshare -n`` (no network
at all): it can only work through NetKernel, whose NSM is in the root namespace.

Marked ``programs`` (``pytest -m programs`` selects them, ``-m 'not programs'`` leaves
them out). A test whose program is not installed is skipped, naming the binary and the
Debian package (tests.programs.APT_PACKAGES); CI installs them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from netkernel.instance import status as nk_status
from tests import programs as pg
from tests.live import time_limit
from tests.programs import DIRECT, Via

pytestmark = pytest.mark.programs

#: Seconds each test may take, everything included (start-up, the run, clean-up).
BUDGET = 240.0
BULK_SIZE = 64 << 20
BIG_FILE = 10 << 20


@pytest.fixture(autouse=True)
def _budget() -> Iterator[None]:
    with time_limit(BUDGET):
        yield


@pytest.fixture
def tmp() -> Iterator[Path]:
    with pg.workdir() as path:
        yield path


def need(*binaries: str) -> None:
    if gone := pg.missing(*binaries):
        pytest.skip(f"not installed: {', '.join(gone)} (Debian packages: "
                    f"{' '.join(pg.APT_PACKAGES)})")


def side(kind: str, instance: str) -> Via:
    return pg.under(instance) if kind == "nk" else DIRECT


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes to ``path``; their sha256."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 1 << 20))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def assert_tenant(instance: str, program: str, sockets: int = 1) -> None:
    """PRE-1: ``program``, run under NetKernel, is an attached tenant of the instance
    holding at least ``sockets`` sockets (its listening ones)."""
    found = pg.tenants(instance, program)
    assert found, f"no tenant {program!r} in {nk_status(instance)['tenants']}"
    assert any(entry["sockets"] >= sockets for entry in found), found


class Through:
    """The NSM byte counters across a block: ``with Through(name, n): ...`` fails unless
    the instance's NSMs moved at least ``n`` more bytes (both directions summed)."""

    def __init__(self, instance: str, at_least: int) -> None:
        self.instance, self.at_least = instance, at_least

    def __enter__(self) -> Through:
        self.before = pg.nsm_bytes(self.instance)
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            moved = pg.nsm_bytes(self.instance) - self.before
            assert moved >= self.at_least, (
                f"the NSMs moved {moved} bytes, expected at least {self.at_least}:"
                " the traffic did not go through NetKernel")


def through(instance: str, at_least: int, *vias: Via) -> Through | _Nothing:
    """:class:`Through` if one of ``vias`` runs under NetKernel."""
    return Through(instance, at_least) if any(v.nk for v in vias) else _Nothing()


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


# ---- curl and Python's http.server -------------------------------------------------------

@pytest.fixture
def site(tmp: Path) -> tuple[Path, dict[str, bytes]]:
    """A document root with a small page and a 1 MiB binary file."""
    root = tmp / "www"
    root.mkdir()
    files = {"index.html": b"<html><body>NetKernel</body></html>\n",
             "blob.bin": random.Random(5).randbytes(1 << 20)}
    for name, body in files.items():
        (root / name).write_bytes(body)
    return root, files


def fetch(url: str, out: Path, via: Via, timeout: float = 60.0) -> pg.Result:
    return pg.run(["curl", "-sS", "--fail", "--max-time", str(int(timeout)), "-o", str(out),
                   url], via, timeout=timeout + 10)


@pytest.mark.parametrize(("client", "server"), [("direct", "direct"), ("nk", "direct"),
                                                ("direct", "nk"), ("nk", "nk")])
def test_curl_fetches_byte_identical_files_from_http_server(
        client: str, server: str, nk_instance_name: str, tmp: Path,
        site: tuple[Path, dict[str, bytes]]) -> None:
    """PRE-1, PRE-4, PRE-5, PRE-7: curl (client) and Python's ThreadingHTTPServer (server),
    either or both under NetKernel; every body arrives byte for byte."""
    need("curl")
    root, files = site
    cvia, svia = side(client, nk_instance_name), side(server, nk_instance_name)
    port = pg.free_port()
    with pg.tcp_server(pg.http_server(port, root), svia, port, tmp / "server.log"), \
            through(nk_instance_name, sum(map(len, files.values())), cvia, svia):
        for name, body in files.items():
            out = tmp / f"got-{name}"
            fetch(f"http://127.0.0.1:{port}/{name}", out, cvia).ok()
            assert out.read_bytes() == body, f"{name} differs"


def test_curl_in_empty_netns_reaches_server_only_through_netkernel(
        nk_instance_name: str, tmp: Path, site: tuple[Path, dict[str, bytes]]) -> None:
    """PRE-3 (nothing bypasses NetKernel): inside ``unshare -n`` (a network namespace with
    no network: its loopback is down), curl cannot reach a server of the root namespace;
    the same curl under NetKernel in the same kind of namespace fetches the file, because
    its socket is the NSM's, in the root namespace."""
    need("curl", "unshare")
    root, files = site
    port = pg.free_port()
    url = f"http://127.0.0.1:{port}/blob.bin"
    with pg.tcp_server(pg.http_server(port, root), DIRECT, port, tmp / "server.log"):
        alone = fetch(url, tmp / "alone", Via(None, netns=True), timeout=10)
        assert alone.returncode == 7, f"curl in an empty netns should not connect:\n{alone}"
        with Through(nk_instance_name, len(files["blob.bin"])):
            fetch(url, tmp / "nk", pg.under(nk_instance_name, netns=True)).ok()
        assert (tmp / "nk").read_bytes() == files["blob.bin"]


def test_curl_in_empty_netns_fetches_from_server_in_empty_netns(
        nk_instance_name: str, tmp: Path, site: tuple[Path, dict[str, bytes]]) -> None:
    """PRE-3: server and client each in a network namespace of their own with no network,
    both under NetKernel: the only path between them is NetKernel."""
    need("curl", "unshare")
    root, files = site
    port = pg.free_port()
    in_netns = pg.under(nk_instance_name, netns=True)
    with pg.tcp_server(pg.http_server(port, root), in_netns, port, tmp / "server.log"), \
            Through(nk_instance_name, 2 * len(files["blob.bin"])):
        fetch(f"http://127.0.0.1:{port}/blob.bin", tmp / "nk", in_netns).ok()
    assert (tmp / "nk").read_bytes() == files["blob.bin"]


# ---- nginx -------------------------------------------------------------------------------

@pytest.fixture
def nginx_site(tmp: Path) -> tuple[Path, Path, str]:
    """nginx's prefix directory, its document root (a page and a 10 MB file), the file's
    sha256."""
    docroot = tmp / "www"
    docroot.mkdir()
    (docroot / "index.html").write_bytes(b"<html><body>" + b"x" * 500 + b"</body></html>\n")
    digest = random_file(docroot / "big.bin", BIG_FILE, 10)
    prefix = tmp / "nginx"
    prefix.mkdir()
    return prefix, docroot, digest


def nginx(via: Via, prefix: Path, docroot: Path,
          user: str | None = None) -> tuple[pg.Server, int]:
    port = pg.free_port()
    cmd = pg.nginx_conf(prefix, port, docroot, user=user)
    return pg.tcp_server(cmd, via, port, prefix / "console.log"), port


@pytest.mark.parametrize(("client", "server"), [("direct", "direct"), ("direct", "nk"),
                                                ("nk", "nk")])
def test_nginx_serves_10mb_file_to_curl_intact(client: str, server: str,
                                               nk_instance_name: str,
                                               nginx_site: tuple[Path, Path, str],
                                               tmp: Path) -> None:
    """PRE-2 (fork: nginx's worker accepts on the socket its master listened on; sendfile
    into the app end), PRE-4: a 10 MB file reaches curl with the same sha256, three
    times, each request logged 200."""
    need("nginx", "curl")
    prefix, docroot, digest = nginx_site
    cvia, svia = side(client, nk_instance_name), side(server, nk_instance_name)
    srv, port = nginx(svia, prefix, docroot)
    with srv, through(nk_instance_name, 3 * BIG_FILE, cvia, svia):
        if svia.nk:
            assert_tenant(nk_instance_name, "nginx")
        for k in range(3):
            out = tmp / f"big-{k}"
            fetch(f"http://127.0.0.1:{port}/big.bin", out, cvia).ok()
            assert out.stat().st_size == BIG_FILE
            assert sha256(out) == digest
    assert pg.nginx_statuses(prefix) == {200: 3}


@pytest.mark.parametrize(("client", "server"), [("direct", "direct"), ("direct", "nk"),
                                                ("nk", "nk")])
def test_nginx_answers_every_wrk_request_200(client: str, server: str, nk_instance_name: str,
                                             nginx_site: tuple[Path, Path, str]) -> None:
    """PRE-2 (epoll, non-blocking connect and accept), PRE-5, PRE-7: wrk's keep-alive load
    on nginx: no socket error, no non-2xx answer, and nginx's access log shows only 200s,
    at least as many as wrk counted."""
    need("nginx", "wrk")
    prefix, docroot, _ = nginx_site
    cvia, svia = side(client, nk_instance_name), side(server, nk_instance_name)
    srv, port = nginx(svia, prefix, docroot)
    with srv:
        res = pg.run(["wrk", "-t2", "-c16", "-d3s", f"http://127.0.0.1:{port}/index.html"],
                     cvia, timeout=60).ok()
    report = pg.wrk_report(res.stdout)
    why = f"{res}\nnginx's error log:\n{pg.nginx_errors(prefix)}"
    assert report["requests"] > 0, why
    assert {k: report[k] for k in ("non_2xx", "connect", "read", "write", "timeout")} == \
        dict.fromkeys(("non_2xx", "connect", "read", "write", "timeout"), 0.0), why
    statuses = pg.nginx_statuses(prefix)
    assert set(statuses) == {200}, statuses
    assert statuses[200] >= report["requests"], (statuses, report)


@pytest.mark.parametrize(("client", "server"), [("direct", "nk"), ("nk", "nk")])
def test_nginx_answers_every_ab_request_200(client: str, server: str, nk_instance_name: str,
                                            nginx_site: tuple[Path, Path, str]) -> None:
    """PRE-2, PRE-5, PRE-6, PRE-7: ab, 2000 requests on 8 connections, half keep-alive:
    all complete, none failed (ab checks each length), and exactly 2000 200s in the log."""
    need("nginx", "ab")
    prefix, docroot, _ = nginx_site
    cvia, svia = side(client, nk_instance_name), side(server, nk_instance_name)
    srv, port = nginx(svia, prefix, docroot)
    url = f"http://127.0.0.1:{port}/index.html"
    with srv:
        runs = [pg.run(["ab", "-q", "-n", "1000", "-c", "8", *keepalive, url], cvia,
                       timeout=120).ok() for keepalive in ([], ["-k"])]
    for res in runs:
        report = pg.ab_report(res.stdout)
        assert (report["complete"], report["failed"], report["non_2xx"]) == (1000, 0, 0), \
            f"{res}\nnginx's error log:\n{pg.nginx_errors(prefix)}"
    assert pg.nginx_statuses(prefix) == {200: 2000}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's nginx workers change user")
def test_nginx_workers_that_drop_privileges_keep_their_sockets(
        nk_instance_name: str, nginx_site: tuple[Path, Path, str]) -> None:
    """PRE-2, PRE-3 (children): nginx started as root under NetKernel with its default
    behaviour, workers switching to ``nobody``: keep-alive connections (the worker's own
    socket calls after the switch: setsockopt TCP_NODELAY) all succeed, as with root
    workers."""
    need("nginx", "ab")
    prefix, docroot, _ = nginx_site
    nk = pg.under(nk_instance_name)
    srv, port = nginx(nk, prefix, docroot, user="nobody nogroup")
    with srv:
        res = pg.run(["ab", "-q", "-n", "1000", "-c", "8", "-k",
                      f"http://127.0.0.1:{port}/index.html"], nk, timeout=120).ok()
    report = pg.ab_report(res.stdout)
    assert (report["complete"], report["failed"], report["non_2xx"]) == (1000, 0, 0), \
        f"{res}\nnginx's error log:\n{pg.nginx_errors(prefix)}"
    assert pg.nginx_statuses(prefix) == {200: 1000}


# ---- redis -------------------------------------------------------------------------------

def redis_info(port: int, via: Via) -> dict[str, str]:
    res = pg.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "INFO", "stats"], via,
                 timeout=30).ok()
    return dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)


@pytest.mark.parametrize(("client", "server", "tests"), [
    ("direct", "nk", None),
    ("nk", "direct", "ping,set,get,incr,lpush,rpop,sadd,hset,mset,lrange_100"),
])
def test_redis_benchmark_runs_without_errors(client: str, server: str, tests: str | None,
                                             nk_instance_name: str, tmp: Path) -> None:
    """PRE-2 (redis's epoll loop), PRE-4, PRE-5, PRE-7: ``redis-benchmark -n 20000 -q``
    (50 connections) against redis-server, one of them under NetKernel: every test
    reports a rate, nothing says error, and redis counted every command."""
    need("redis-server", "redis-benchmark", "redis-cli")
    cvia, svia = side(client, nk_instance_name), side(server, nk_instance_name)
    port = pg.free_port()
    only = ["-t", tests] if tests else []
    with pg.tcp_server(pg.redis_server(port), svia, port, tmp / "redis.log"), \
            Through(nk_instance_name, 20000 * 10):
        if svia.nk:
            assert_tenant(nk_instance_name, "redis-server")
        res = pg.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", "20000",
                      "-q", *only], cvia, timeout=200).ok()
        info = redis_info(port, DIRECT)
    rates = pg.redis_benchmark_report(res.stdout)
    assert "error" not in (res.stdout + res.stderr).lower(), str(res)
    expected = len(tests.split(",")) if tests else 15
    assert len(rates) >= expected and all(r > 0 for r in rates.values()), str(res)
    assert int(info["total_commands_processed"]) >= 20000 * len(rates), info


def test_redis_cli_sets_and_gets_values(nk_instance_name: str, tmp: Path) -> None:
    """PRE-4, PRE-6: redis-cli under NetKernel against redis-server under NetKernel: a
    short value and a 1 MB value set and read back identical, and a direct redis-cli
    sees the same values."""
    need("redis-server", "redis-cli")
    nk = pg.under(nk_instance_name)
    port = pg.free_port()
    cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
    big = random.Random(6).randbytes(512 << 10).hex()
    (tmp / "big.txt").write_text(big)
    with pg.tcp_server(pg.redis_server(port), nk, port, tmp / "redis.log"):
        assert pg.run([*cli, "SET", "greeting", "hello NetKernel"], nk).ok().stdout == "OK\n"
        assert pg.run([*cli, "-x", "SET", "big"], nk, stdin=tmp / "big.txt").ok().stdout \
            == "OK\n"
        for via in (nk, DIRECT):
            assert pg.run([*cli, "GET", "greeting"], via).ok().stdout == "hello NetKernel\n"
            assert pg.run([*cli, "GET", "big"], via).ok().stdout == big + "\n"
            assert pg.run([*cli, "STRLEN", "big"], via).ok().stdout == f"{len(big)}\n"


# ---- iperf3 ------------------------------------------------------------------------------

IPERF3_MODES = {"tcp": [], "udp": ["-u", "-b", "50M"], "tcp-reverse-16": ["-R", "-P", "16"]}


@pytest.mark.parametrize("how", list(IPERF3_MODES))
def test_iperf3_client_and_server_under_netkernel(how: str, nk_instance_name: str,
                                                  tmp: Path) -> None:
    """PRE-4 (TCP), PRE-8 (UDP: 32 KB datagrams at 50 Mbit/s; iperf3's server connects
    its UDP socket to the client), PRE-2, PRE-5, PRE-7: both ends of iperf3 under
    NetKernel; the JSON report shows the bytes sent arriving (all of them for TCP).
    NSM-18: with -R -P 16 the client leaves its 16 data streams unread at the end of the
    test and waits for the results on its control connection, which must still get a
    buffer of the slice the data streams fill."""
    need("iperf3")
    nk = pg.under(nk_instance_name)
    port = pg.free_port()
    mode = IPERF3_MODES[how]
    udp = "-u" in mode
    with pg.tcp_server(pg.iperf3_server(port), nk, port, tmp / "iperf3.log") as srv, \
            Through(nk_instance_name, 1 << 20) as moved:
        res = pg.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "2", "-J", *mode],
                     nk, timeout=60)
        doc = json.loads(res.stdout)
        assert res.returncode == 0 and "error" not in doc, f"{res}\nserver:\n{srv.output()}"
        report = pg.iperf3_report(doc)
        moved.at_least = int(report["bytes"])
    assert report["sent_bytes"] > 0 and report["bytes"] > 0, report
    if udp:
        assert report["packets"] > 0 and report["lost"] < report["packets"], report
    else:
        # iperf3's receiver stops counting at the end of the test: what is still in the
        # socket buffers then (a few MB at most per stream: Linux's send and receive
        # buffers, the slice) is sent but not counted as received.
        streams = int(mode[mode.index("-P") + 1]) if "-P" in mode else 1
        assert 0 <= report["sent_bytes"] - report["bytes"] <= streams * (64 << 20), report


# ---- memcached ---------------------------------------------------------------------------

@pytest.mark.parametrize("client", ["direct", "nk"])
def test_memcached_stores_and_returns_every_value(client: str, nk_instance_name: str,
                                                  tmp: Path) -> None:
    """PRE-4, PRE-8: memcached under NetKernel (TCP and UDP); a plain-socket client (under
    NetKernel or not) sets values of 1 B to 200 KB and gets each back identical, over
    TCP and over memcached's UDP framing."""
    need("memcached")
    cvia, nk = side(client, nk_instance_name), pg.under(nk_instance_name)
    port, udp_port = pg.free_port(), pg.free_port()
    def ready() -> bool:
        return pg.listening(port) and pg.listening(udp_port, "udp")

    with pg.Server(pg.memcached(port, udp_port), nk, ready=ready, log=tmp / "mc.log"), \
            Through(nk_instance_name, 1 << 20):
        assert_tenant(nk_instance_name, "memcached", sockets=2)
        tcp = json.loads(pg.run(pg.script("memc", "tcp", port, 60, 7), cvia).ok().stdout)
        udp = json.loads(pg.run(pg.script("memc", "udp", udp_port, 60, 8), cvia)
                         .ok().stdout)
        stats = json.loads(pg.run(pg.script("memc", "stats", port), DIRECT).ok().stdout)
    assert tcp["ok"] and tcp["set"] == 60 and udp["ok"] and udp["set"] == 60
    assert stats["cmd_set"] >= 120 and stats["get_hits"] >= 2 * 60 + 60, stats


def test_memcslap_load_on_memcached_under_netkernel(nk_instance_name: str, tmp: Path) -> None:
    """PRE-2, PRE-4: memcslap (4 threads, non-blocking connections) under NetKernel
    against memcached under NetKernel: sets, then gets that all hit."""
    need("memcached", "memcslap")
    nk = pg.under(nk_instance_name)
    port = pg.free_port()
    servers = f"--servers=127.0.0.1:{port}"
    with pg.tcp_server(pg.memcached(port), nk, port, tmp / "mc.log"):
        for test in ("set", "get"):
            pg.run(["memcslap", servers, "--concurrency=4", "--execute-number=2000",
                    "--non-blocking", f"--test={test}"], nk, timeout=120).ok()
        stats = json.loads(pg.run(pg.script("memc", "stats", port), DIRECT).ok().stdout)
    assert stats["cmd_set"] >= 4 * 2000 and stats["get_hits"] >= 4 * 2000, stats
    assert stats["get_misses"] == 0, stats


# ---- sockperf ----------------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("mode", ["ping-pong", "throughput"])
def test_sockperf_over_netkernel(mode: str, proto: str, nk_instance_name: str,
                                 tmp: Path) -> None:
    """PRE-4, PRE-5, PRE-7 (TCP), PRE-8 (UDP): sockperf ping-pong and throughput, server
    and client under NetKernel: ping-pong gets its messages answered (TCP: every one, in
    order, none duplicated) and a latency; throughput sends messages that the NSM moves."""
    need("sockperf")
    nk = pg.under(nk_instance_name)
    port = pg.free_port()
    size = 1400
    udp = proto == "udp"
    server = pg.Server(pg.sockperf_server(port, udp), nk, log=tmp / "sockperf.log",
                       ready=lambda: pg.listening(port, proto))
    with server, Through(nk_instance_name, 1000 * size) as moved:
        res = pg.run(["sockperf", mode, *([] if udp else ["--tcp"]), "-i", "127.0.0.1",
                      "-p", str(port), "-t", "2", "-m", str(size)], nk, timeout=60).ok()
        report = pg.sockperf_report(res.stdout + res.stderr)
        if mode == "ping-pong":
            assert report.get("latency_us", 0) > 0 and report["received"] > 0, str(res)
            assert report["received"] <= report["sent"], report
            assert (report["duplicated"], report["out_of_order"]) == (0, 0), report
            if not udp:  # a stream loses nothing; one message may be in flight at the end
                assert report["received"] >= report["sent"] - 1, report
                assert report["dropped"] == 0, report
        else:
            assert report.get("total_sent", 0) > 0 and report.get("msg_rate", 0) > 0, str(res)
            # Every message sent left the client through the NSM.
            moved.at_least = int(report["total_sent"]) * size


# ---- asyncio -----------------------------------------------------------------------------

def test_asyncio_echo_server_and_client_under_netkernel(nk_instance_name: str,
                                                        tmp: Path) -> None:
    """PRE-2 (asyncio's EpollSelector over app ends), PRE-4, PRE-6 (write_eof -> EOF at the
    server -> close -> EOF at the client): 8 concurrent connections each echo 2 MB back
    byte for byte."""
    nk = pg.under(nk_instance_name)
    port = pg.free_port()
    with pg.tcp_server(pg.script("aecho", "server", port), nk, port, tmp / "aecho.log"), \
            Through(nk_instance_name, 4 * 8 * (2 << 20)):
        res = pg.run(pg.script("aecho", "client", port, 8, 2 << 20, 11), nk, timeout=120).ok()
    out = json.loads(res.stdout)
    assert out["selector"] == "EpollSelector", out
    assert out["ok"] and out["matched"] == 8, out


# ---- checksummed bulk transfers ----------------------------------------------------------

@pytest.mark.parametrize(("sender", "receiver"), [("nk", "nk"), ("nk", "direct"),
                                                  ("direct", "nk")])
def test_bulk_transfer_arrives_with_same_sha256(sender: str, receiver: str,
                                                nk_instance_name: str, tmp: Path) -> None:
    """PRE-4 (flow control over 64 MB), PRE-6 (shutdown(SHUT_WR) -> EOF, then the answer
    the other way): 64 MB with both ends or one end under NetKernel; the receiver's
    sha256 and count equal the sender's and the test's own."""
    svia, rvia = side(sender, nk_instance_name), side(receiver, nk_instance_name)
    port = pg.free_port()
    seed = 64
    with pg.tcp_server(pg.script("bulk", "recv", port), rvia, port, tmp / "recv.log") as rcv, \
            through(nk_instance_name, BULK_SIZE, svia, rvia):
        res = pg.run(pg.script("bulk", "send", port, BULK_SIZE, seed), svia, timeout=180).ok()
        assert pg.until_gone(rcv.proc.pid if rcv.proc else 0, 30), rcv.output()
    sent = json.loads(res.stdout)
    received = pg.last_json(rcv.output())
    expected = pg.bulk_digest(BULK_SIZE, seed)
    assert sent["sha256"] == expected and sent["bytes"] == BULK_SIZE
    assert received == sent["peer"], (received, sent)
    assert received["sha256"] == expected and received["bytes"] == BULK_SIZE

