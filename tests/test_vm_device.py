"""The NK device across a VM boundary, tested on the host (spec/vm.md).

A guest reaches its device as an ivshmem PCI BAR that is the very file the CoreEngine
created (DEV-1); these tests use that file directly, exactly as a guest would through
``resource2``: the host attaches a tenant device *for* the guest with ``"guest": true``
and holds the connection (VM-1), nk-agent maps the device it is handed
(``NETKERNEL_DEVICE=<file>``, or ``pci`` over a sysfs-shaped directory, VM-3) without
attaching, and real preloaded programs (CPython, curl) fetch from a kernel
``http.server`` through it, checksummed. A handed device is POLLED (VM-2): the agent
rings the CoreEngine's bell word without FUTEX_WAKE and never futex-waits on its own,
so both directions work only because both sides bound their sleeps — as across a VM.

The hostile-guest tests scribble over the device file as a guest can over its BAR
(geometry, ring indices, garbage NQEs) and check that the CoreEngine survives, refuses
or detaches only that device (VM-5, RING-10, SEC-6), and that another tenant keeps
working throughout.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netkernel import run
from netkernel.conformance.runtime import HandedAgent, Port, handed
from netkernel.fastpath import preload
from netkernel.reference import coreengine as rce
from netkernel.reference import device as dev
from netkernel.reference import shm
from netkernel.reference.nqe import NQE, WIRE, Op, pack
from tests.live import own_instance, time_limit, until

TIMEOUT = 60
BLOB = 2 << 20
FETCH = ("import hashlib, sys, urllib.request\n"
         "body = urllib.request.urlopen(sys.argv[1], timeout=30).read()\n"
         "print(len(body), hashlib.sha256(body).hexdigest())\n")


# -- helpers --------------------------------------------------------------------------------


class Web:
    """A kernel http.server on 127.0.0.1 serving one random file (the host's side)."""

    def __init__(self, root: Path) -> None:
        self.body = random.Random(8).randbytes(BLOB)
        (root / "blob").write_bytes(self.body)
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/blob"
        self.expect = f"{len(self.body)} {hashlib.sha256(self.body).hexdigest()}"

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    with contextlib.closing(Web(tmp_path)) as w:
        yield w


@contextlib.contextmanager
def guest_device(name: str) -> Iterator[rce.Attachment]:
    """A tenant device attached for a guest (VM-1); the connection is held as a launcher
    holds it, and closing it is the guest's hot-unplug (RT-4)."""
    att = rce.attach("tenant", "guest", instance=name, guest=True)
    try:
        yield att
    finally:
        att.close()


class NeighbourTenant:
    """Another tenant on the same instance: an ordinary agent (attach, RT-3) and a
    preloaded fetch, to show that what one guest does leaves others unharmed."""

    def __init__(self, name: str) -> None:
        self.paths = preload.paths()
        self.agent = run.Agent(self.paths.agent, name, "neighbour")
        self.env = run.environment(dict(os.environ), name, self.agent, self.paths)

    def fetch(self, url: str) -> str:
        proc = subprocess.run([sys.executable, "-c", FETCH, url], env=self.env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def close(self) -> None:
        self.agent.stop()


def tenants(name: str) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in rce.request({"cmd": "status"}, name)["tenants"]}


def port_of(att: rce.Attachment) -> Port:
    """The host playing the guest's device side NQE by NQE, through the same file."""
    return Port(att.dmap, (dev.RingId.JOB, dev.RingId.SEND),
                (dev.RingId.COMPLETION, dev.RingId.RECEIVE), dev.Bell.ENGINE)


# -- VM-1: the attach for a guest ----------------------------------------------------------


def test_a_guest_device_is_a_power_of_two_file_with_polled_bells() -> None:
    """VM-1: "guest": true grows the file to a power of two (a PCI BAR), sets POLLED and
    answers the size; the header is checked against total_size (DEV-14), so the longer
    file maps like any device; a normal attach is unchanged."""
    with time_limit(60), own_instance() as name:
        with guest_device(name) as g, contextlib.closing(
                rce.attach("tenant", "plain", instance=name)) as plain:
            size = g.path.stat().st_size
            geo = g.dmap.geo
            assert size & (size - 1) == 0 and size >= geo.total_size > size // 2
            assert g.dmap.header("features") == dev.Feature.POLLED
            assert g.dmap.state is dev.State.READY
            assert len(g.dmap.buf) == size  # open_device mapped all of it and accepted it
            assert not any(g.dmap.buf[geo.total_size:])  # the tail is zero, nobody's
            assert plain.path.stat().st_size == plain.dmap.geo.total_size
            assert plain.dmap.header("features") == dev.Feature.FUTEX_BELLS
            listed = tenants(name)
            assert listed[g.id].get("guest") is True and "guest" not in listed[plain.id]
        with pytest.raises(rce.ControlError, match="guest"):
            conn = rce._connect(name, 5.0)
            try:
                reply = rce._exchange(conn, {"cmd": "attach", "kind": "tenant",
                                             "pid": os.getpid(), "guest": "yes"})
                raise rce.ControlError(str(reply.get("error")))
            finally:
                conn.close()


def fetch(agent: HandedAgent, url: str) -> str:
    """FETCH run preloaded on ``agent``: the body's sha256 and length."""
    return agent.run([sys.executable, "-c", FETCH, url], TIMEOUT).strip()


# -- VM-3, VM-2: a handed device carries a real program --------------------------------------


def test_a_preloaded_program_fetches_over_a_handed_device(tmp_path: Path, web: Web) -> None:
    """VM-3: the agent maps the file it is handed (no attach: the CoreEngine lists only the
    device the host attached, VM ID = dev_id); VM-2: the device is POLLED, so every NQE
    crosses by bounded sleeps, in both directions; the payload arrives intact."""
    with time_limit(100), own_instance() as name, guest_device(name) as g, \
            handed(preload.paths(), g.path, tmp_path, env={"NK_AGENT_DEBUG": "1"}) as agent:
        before = rce.request({"cmd": "status"}, name)["loop"]
        assert fetch(agent, web.url) == web.expect
        assert fetch(agent, web.url) == web.expect
        listed = tenants(name)
        assert list(listed) == [g.id], f"the agent attached a device of its own: {listed}"
        counters = listed[g.id]["counters"]
        assert counters["nqes_in"] > 0 and counters["bytes_out"] >= 2 * BLOB
        assert counters["rejected"] == 0
        after = rce.request({"cmd": "status"}, name)["loop"]
        # the CoreEngine's sleeps ended by their bound: nobody FUTEX_WAKEs it across a VM
        assert after.get("timeouts", 0) > before.get("timeouts", 0)
        assert f"vm {g.id} on {g.path} (handed, VM-3), polled (VM-2)" in agent.stderr()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_a_handed_device(tmp_path: Path, web: Web) -> None:
    """VM-3: curl (C, its own event loop) over a handed, polled device; checksum compared."""
    curl = shutil.which("curl")
    assert curl is not None
    with time_limit(100), own_instance() as name, guest_device(name) as g, \
            handed(preload.paths(), g.path, tmp_path) as agent:
        proc = subprocess.run([curl, "-sS", "--max-time", "30", web.url], capture_output=True,
                              env=agent.prog_env, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        assert hashlib.sha256(proc.stdout).hexdigest() == hashlib.sha256(web.body).hexdigest()
        assert tenants(name)[g.id]["counters"]["bytes_out"] >= BLOB


def fake_pci(root: Path, device: Path) -> Path:
    """A directory shaped like /sys/bus/pci/devices with a virtio-net NIC and an ivshmem
    device whose resource2 is the device file (what BAR 2 is to a guest)."""
    pci = root / "pci"
    for slot, vendor, product in (("0000:00:02.0", "0x1af4", "0x1000"),
                                  ("0000:00:04.0", "0x1af4", "0x1110"),
                                  ("0000:00:01.0", "0x8086", "0x7000")):
        d = pci / slot
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(product + "\n")
        (d / "resource2").write_bytes(b"")
    bar = pci / "0000:00:04.0" / "resource2"
    bar.unlink()
    bar.symlink_to(device)
    return pci


def test_the_pci_mapper_finds_ivshmem_bar2(tmp_path: Path, web: Web) -> None:
    """VM-3: NETKERNEL_DEVICE=pci takes BAR 2 of the device 1af4:1110 (not the virtio NIC of
    the same vendor), and with NETKERNEL_DEVICE unset the agent takes it by itself because
    its instance has no engine.sock."""
    with time_limit(100), own_instance() as name, guest_device(name) as g:
        pci = fake_pci(tmp_path, g.path)
        with handed(preload.paths(), "pci", tmp_path, env={"NETKERNEL_PCI_ROOT": str(pci),
                                          "NK_AGENT_DEBUG": "1"}) as agent:
            assert fetch(agent, web.url) == web.expect
            assert "0000:00:04.0/resource2 (handed, VM-3), polled (VM-2)" in agent.stderr()
        with handed(preload.paths(), "", tmp_path, env={"NETKERNEL_PCI_ROOT": str(pci)}) as agent:
            assert fetch(agent, web.url) == web.expect
        assert list(tenants(name)) == [g.id]


def test_no_device_exits_3(tmp_path: Path) -> None:
    """VM-3, PRE-1: no PCI device (or no file) is an exit 3 with one line on stderr."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for device, env in (("pci", {"NETKERNEL_PCI_ROOT": str(empty)}),
                        (str(tmp_path / "missing.nk"), {})):
        a = HandedAgent(preload.paths(), device, tmp_path, env=env)
        assert not a.ready
        assert a.proc.wait(10) == 3
        lines = a.stderr().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nk-agent: "), lines


def test_one_device_side_per_device(tmp_path: Path, web: Web) -> None:
    """VM-6: a second agent on a device another agent holds is refused (exit 3). The first
    leaves with a socket still open (SIGTERM): it closes it itself, since no detach
    follows, and the next agent on the device starts clean and works."""
    code = ("import socket, sys, time\n"
            "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "print('up', flush=True); time.sleep(60)\n")
    with time_limit(80), own_instance() as name, guest_device(name) as g, \
            socket_server() as srv:
        with handed(preload.paths(), g.path, tmp_path) as first:
            second = HandedAgent(preload.paths(), str(g.path), tmp_path)
            assert not second.ready and second.proc.wait(10) == 3
            assert "in use by another device side" in second.stderr()
            prog = subprocess.Popen([sys.executable, "-c", code, str(srv.getsockname()[1])],
                                    env=first.prog_env, stdout=subprocess.PIPE, text=True)
            peer, _ = srv.accept()
            assert prog.stdout is not None and prog.stdout.readline().strip() == "up"
            until("the socket in the table", lambda: tenants(name)[g.id]["sockets"] >= 1)
            assert first.close() == 0  # SIGTERM while the program holds the socket
            assert tenants(name)[g.id]["sockets"] == 0, "the agent left its socket behind"
            prog.kill()
            prog.wait()
            peer.close()
        with handed(preload.paths(), g.path, tmp_path) as again:
            assert fetch(again, web.url) == web.expect


def test_the_hosts_detach_resets_the_guests_sockets_within_1s(tmp_path: Path) -> None:
    """VM-4: with no control connection the agent learns of the detach from the header's
    DETACHED: a connected socket is reset within 1 s (GL-9) and the agent exits."""
    code = ("import socket, sys, time\n"
            "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "s.sendall(b'hi'); print('up', flush=True)\n"
            "t = time.monotonic()\n"
            "try:\n    got = s.recv(10)\nexcept ConnectionResetError:\n    got = b'reset'\n"
            "print(repr(got), time.monotonic() - t, flush=True)\n")
    with time_limit(50), own_instance() as name, socket_server() as srv, \
            guest_device(name) as g, \
            handed(preload.paths(), g.path, tmp_path, idle_ms=100) as agent:
        prog = subprocess.Popen([sys.executable, "-c", code, str(srv.getsockname()[1])],
                                env=agent.prog_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        peer, _ = srv.accept()
        assert prog.stdout is not None and prog.stdout.readline().strip() == "up"
        assert peer.recv(2) == b"hi"
        g.close()  # the launcher lets go: the CoreEngine detaches (RT-4)
        out, err = prog.communicate(timeout=10)
        got, waited = out.split()
        assert got in ("b''", "b'reset'"), (out, err)
        assert float(waited) < 1.0, f"reset after {waited} s"
        agent.release()
        assert agent.proc.wait(10) == 0
        peer.close()


@contextlib.contextmanager
def socket_server() -> Iterator[Any]:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(10)
        yield srv


# -- VM-5: a hostile guest -------------------------------------------------------------------

UNKNOWN_OP = 0x7E  # bit 7 clear, no such op: answered ENOSYS (SEC-6 row 1)


def unknown_op(sock: int, tag: int) -> bytes:
    """An NQE no sender may write (pack refuses it): what a guest can put in its ring."""
    return WIRE.pack(UNKNOWN_OP, 0, 0, sock, 0, 0, 0, tag, bytes(3))


@pytest.fixture
def neighbour_instance(web: Web) -> Iterator[tuple[str, NeighbourTenant]]:
    with own_instance() as name:
        n = NeighbourTenant(name)
        try:
            assert n.fetch(web.url) == web.expect
            yield name, n
        finally:
            n.close()


def test_a_rewritten_header_moves_nothing_of_the_coreengine(
        neighbour_instance: tuple[str, NeighbourTenant], web: Web) -> None:
    """VM-5: the guest rewrites its header (magic, geometry, offsets, sizes, features): the
    CoreEngine still reads and answers on the rings where it put them; the NSM refuses to
    map the tenant (TENANT_MAP fails, so its SOCKET fails) and stays up; the neighbour
    keeps fetching."""
    name, neighbour = neighbour_instance
    with time_limit(100), guest_device(name) as g:
        real = port_of(g)  # our views, laid out by the real geometry
        buf = g.dmap.buf
        buf[0:8] = b"EVILDEV!"
        for field, value in (("n_qsets", 255), ("ring_entries", 2), ("qset_offset", 64),
                             ("qset_stride", 1), ("data_offset", 0), ("data_size", 1 << 40),
                             ("send_size", 1 << 39), ("total_size", 1 << 41),
                             ("buf_size", 3), ("features", 0xFFFFFFFF), ("dev_id", 77)):
            g.dmap.set_header(field, value)
        real.push_raw(unknown_op(1, 9), dev.RingId.JOB)
        _, reply = real.wait_reply(1, 9)
        assert reply.op == 0xFF and reply.result == -38  # ENOSYS, on the real ring
        real.push_raw(pack(NQE(op=Op.SOCKET, sock_id=5, op_data=2 | 1 << 16, tag=10)),
                      dev.RingId.JOB)
        _, reply = real.wait_reply(5, 10)
        assert reply.result < 0, "the NSM mapped a tenant through a header it must refuse"
        assert neighbour.fetch(web.url) == web.expect
        st = rce.request({"cmd": "status"}, name)
        assert st["nsms"], "the NSM died of the guest's header"
        assert g.id in tenants(name)


def test_garbage_nqes_are_refused_and_counted(
        neighbour_instance: tuple[str, NeighbourTenant], web: Web) -> None:
    """VM-5, SEC-6: 2000 random 32-byte NQEs on JOB and SEND are each refused once (counted
    in the guest's `rejected`); the device stays attached and the neighbour keeps working."""
    name, neighbour = neighbour_instance
    rng = random.Random(5)
    n = 2000
    with time_limit(100), guest_device(name) as g:
        port = port_of(g)
        for i in range(n):
            raw = bytearray(rng.randbytes(32))
            raw[29:32] = b"\x01\x02\x03"  # reserved bytes set: no NQE of these is valid
            port.push_raw(bytes(raw), dev.RingId.JOB if i % 2 else dev.RingId.SEND)
            if i % 64 == 0:
                port.pump()

        def counted() -> bool:
            port.pump()
            return int(tenants(name)[g.id]["counters"]["rejected"]) == n
        until("every garbage NQE counted in rejected", counted, timeout=10)
        assert tenants(name)[g.id]["counters"]["nqes_in"] == n
        assert neighbour.fetch(web.url) == web.expect


@pytest.mark.parametrize("ring,index", [(dev.RingId.JOB, "tail"),
                                        (dev.RingId.COMPLETION, "head")])
def test_impossible_indices_detach_only_that_device(
        neighbour_instance: tuple[str, NeighbourTenant], web: Web, ring: dev.RingId,
        index: str) -> None:
    """VM-5, RING-10: the guest moves an index of its own past the ring: within 1 s the
    CoreEngine detaches that device (DETACHED, file removed, no longer listed) and nothing
    else; the neighbour keeps fetching."""
    name, neighbour = neighbour_instance
    with time_limit(100), guest_device(name) as g:
        geo = g.dmap.geo
        at = geo.ring_offset(0, ring) + (0 if index == "tail" else 64)
        other = geo.ring_offset(0, ring) + (64 if index == "tail" else 0)
        (theirs,) = struct.unpack_from("<I", g.dmap.buf, other)
        struct.pack_into("<I", g.dmap.buf, at, (theirs + geo.ring_entries + 7) % (1 << 32))
        if ring is dev.RingId.COMPLETION:  # the CoreEngine finds it when it answers
            port_of(g).push_raw(unknown_op(1, 1), dev.RingId.JOB)
        t0 = time.monotonic()
        until("the device detached", lambda: g.id not in tenants(name), timeout=5)
        assert time.monotonic() - t0 < 1.5
        assert g.dmap.state is dev.State.DETACHED
        assert not g.path.exists()
        assert neighbour.fetch(web.url) == web.expect
        assert rce.request({"cmd": "status"}, name)["nsms"]
        # the guest's device is gone; a new one for the same launcher works again
        with guest_device(name) as again:
            assert again.dmap.state is dev.State.READY


def test_bar_size() -> None:
    """VM-1: the file of a guest device is the smallest power of two holding it."""
    assert [shm.bar_size(n) for n in (1, 2, 3, 4096, 4097, 4231168)] == \
        [2, 2, 4, 4096, 8192, 8 << 20]


def ce_cpu_seconds(name: str) -> float:
    pid = int(rce.request({"cmd": "status"}, name)["pid"])
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FLIP_C = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
/* flip DEVICE OFFSET SECONDS: add 1 to the u32 at OFFSET as fast as a CPU can, as a
 * guest's vCPU can write its BAR */
int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	int fd = open(argv[1], O_RDWR);
	size_t off = strtoul(argv[2], NULL, 10);
	double secs = atof(argv[3]);
	char *m = fd < 0 ? MAP_FAILED : mmap(NULL, off + 4, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		return 1;
	volatile uint32_t *bell = (volatile uint32_t *)(m + off);
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (uint64_t i = 1;; i++) {
		*bell = *bell + 1;
		if ((i & 0xFFFF) == 0) {
			clock_gettime(CLOCK_MONOTONIC, &t);
			if ((double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9 > secs)
				return 0;
		}
	}
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_guest_flipping_its_bell_cannot_keep_the_coreengine_awake(tmp_path: Path) -> None:
    """VM-2, VM-5: the CoreEngine does not wait on a POLLED device's bell word, so a guest
    that changes it without end (here a C loop, a vCPU's speed) costs it no more than
    its bounded polling; were the word in its futex_waitv, every change between its read
    and the wait would end the sleep at once."""
    cc = shutil.which("cc")
    assert cc is not None
    (tmp_path / "flip.c").write_text(FLIP_C)
    subprocess.run([cc, "-O2", "-o", str(tmp_path / "flip"), str(tmp_path / "flip.c")],
                   check=True)
    with time_limit(60), own_instance() as name, guest_device(name) as g:
        off = g.dmap.geo.bell_offset(0, dev.Bell.ENGINE)
        flip = subprocess.Popen([str(tmp_path / "flip"), str(g.path), str(off), "3"])
        try:
            time.sleep(0.3)
            c0, t0 = ce_cpu_seconds(name), time.monotonic()
            loop0 = rce.request({"cmd": "status"}, name)["loop"]
            time.sleep(2.0)
            loop1 = rce.request({"cmd": "status"}, name)["loop"]
            share = (ce_cpu_seconds(name) - c0) / (time.monotonic() - t0)
        finally:
            assert flip.wait(10) == 0
        sleeps, woken = (loop1.get(k, 0) - loop0.get(k, 0) for k in ("sleeps", "wakeups"))
        print(f"while the guest flips its bell: {sleeps} sleeps, {woken} ended early,"
              f" the CoreEngine used {share:.1%} of a core")
        # its sleeps end by their bound; only our two status requests (the control word)
        # may end one early
        assert sleeps > 100 and woken <= 4, (sleeps, woken)
        port = port_of(g)  # and it still answers
        port.push_raw(unknown_op(2, 3), dev.RingId.JOB)
        assert port.wait_reply(2, 3)[1].result == -38
