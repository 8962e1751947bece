"""Tenants in virtual machines (spec/vm.md): the device across a VM boundary.

A guest's BAR 2 is the device file itself (DEV-1), so the suite plays the guest through
the file: it attaches a device with ``"guest": true`` and holds the connection as a
launcher does (VM-1), writes into the device as a guest can — rings, bell words and the
header — and, for the preload role, hands the file to the target's agent
(``NETKERNEL_DEVICE``, VM-3) and runs a preloaded program on it. Across a VM a FUTEX_WAKE
reaches nobody, so the suite never issues one on a guest device: it only changes the
bell word, as a guest's wake-up arrives at the host (VM-2).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from netkernel.conformance.runtime import (
    Control,
    HandedAgent,
    Instance,
    Port,
    Runtime,
    handed,
    wait_until,
)
from netkernel.reference import device as dev
from netkernel.reference import shm
from netkernel.reference.nqe import NQE, WIRE, Op, pack

UNKNOWN_OP = 0x7E  # bit 7 clear, no such op: answered -ENOSYS (SEC-6 row 1)
ENOSYS = 38
TIMEOUT = 60


class Guest:
    """A tenant device attached for a guest, its connection held (VM-1), and the suite as
    the guest's device side through the file: pushes bump the ENGINE bell word and never
    FUTEX_WAKE (VM-2)."""

    def __init__(self, inst: Instance) -> None:
        self.ctl = Control(inst.dir)
        try:
            self.reply = self.ctl.request({"cmd": "attach", "kind": "tenant",
                                           "pid": os.getpid(), "name": "guest", "guest": True})
            assert self.reply.get("ok"), self.reply
            self.id = int(self.reply["id"])
            self.path = Path(self.reply["path"])
            self.dmap = shm.open_device(self.path)
        except BaseException:
            self.ctl.close()
            raise
        self.port = Port(self.dmap, (dev.RingId.JOB, dev.RingId.SEND),
                         (dev.RingId.COMPLETION, dev.RingId.RECEIVE), dev.Bell.ENGINE)

    def push(self, raw: bytes, ring: dev.RingId = dev.RingId.JOB) -> None:
        r = self.port.out[(0, ring)]
        deadline = time.monotonic() + 5
        while not r.push(raw):
            assert time.monotonic() < deadline, f"{ring.name} stayed full"
            self.port.pump()
            time.sleep(0.001)
        if r.consumer_sleeping():  # RING-6, then only the word changes: no wake crosses
            off = self.dmap.geo.bell_offset(0, dev.Bell.ENGINE)
            (v,) = struct.unpack_from("<I", self.dmap.buf, off)
            struct.pack_into("<I", self.dmap.buf, off, (v + 1) & 0xFFFFFFFF)

    def close(self) -> None:
        self.ctl.close()
        self.dmap.close()


def guest(inst: Instance) -> contextlib.closing[Guest]:
    return contextlib.closing(Guest(inst))


def unknown_op(sock: int, tag: int) -> bytes:
    """An NQE no conforming sender writes (pack refuses it); a guest can."""
    return WIRE.pack(UNKNOWN_OP, 0, 0, sock, 0, 0, 0, tag, bytes(3))


def listed(inst: Instance) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in inst.status()["tenants"]}


# -- the coreengine role -----------------------------------------------------------------


@pytest.mark.req("VM-1")
def test_a_guest_attach_gives_a_power_of_two_file_with_polled_bells(
        engine: Any, nk_runtime: Runtime) -> None:
    inst = nk_runtime.shared()
    with guest(inst) as g:
        geo = g.dmap.geo
        size = g.path.stat().st_size
        assert g.reply["size"] == size, "the reply gives the file's size"
        assert size & (size - 1) == 0 and geo.total_size <= size < 2 * geo.total_size
        features = g.dmap.header("features")
        assert features & dev.Feature.POLLED and not features & dev.Feature.FUTEX_BELLS
        assert g.dmap.state is dev.State.READY
        assert not any(g.dmap.buf[geo.total_size:]), "the tail past total_size is not zero"
    ctl = Control(inst.dir)
    try:
        bad = ctl.request({"cmd": "attach", "kind": "tenant", "pid": os.getpid(),
                           "guest": "yes"})
        assert bad["ok"] is False and isinstance(bad["error"], str)
        plain = ctl.request({"cmd": "attach", "kind": "tenant", "pid": os.getpid()})
        assert plain["ok"] is True
        path = Path(plain["path"])
        with shm.open_device(path) as m:
            assert path.stat().st_size == m.geo.total_size  # RT-3 unchanged without guest
            assert not m.header("features") & dev.Feature.POLLED
    finally:
        ctl.close()


@pytest.mark.req("VM-2")
def test_the_coreengine_polls_a_guest_device_nobody_wakes(
        engine: Any, nk_runtime: Runtime) -> None:
    """The guest's requests arrive while the CoreEngine sleeps, with the bell word changed
    but no FUTEX_WAKE: each is answered within the polled bound, not after a full sleep."""
    inst = nk_runtime.shared()
    with guest(inst) as g:
        waits = []
        for tag in range(1, 22):
            time.sleep(0.02)  # the CoreEngine has gone to sleep by now
            t0 = time.monotonic()
            g.push(unknown_op(1, tag))
            _, reply = g.port.wait_reply(1, tag)
            waits.append(time.monotonic() - t0)
            assert reply.result == -ENOSYS
        waits.sort()
        median = waits[len(waits) // 2]
        assert median < 0.010, f"median answer after {median * 1e3:.1f} ms: not polled (VM-2)"


@pytest.mark.req("VM-5")
def test_a_rewritten_header_moves_nothing_of_the_coreengine(
        engine: Any, nk_runtime: Runtime) -> None:
    inst = nk_runtime.shared()
    with guest(inst) as g:
        g.dmap.buf[0:8] = b"EVILDEV!"
        for field, value in (("n_qsets", 255), ("ring_entries", 2), ("qset_offset", 64),
                             ("qset_stride", 1), ("data_offset", 0), ("data_size", 1 << 40),
                             ("send_size", 1 << 39), ("total_size", 1 << 41),
                             ("buf_size", 3), ("features", 0xFFFFFFFF), ("dev_id", 77),
                             ("state", 0)):
            g.dmap.set_header(field, value)
        g.push(unknown_op(1, 9))
        _, reply = g.port.wait_reply(1, 9)
        assert reply.op == 0xFF and reply.result == -ENOSYS, "not answered on the real ring"
        g.push(pack(NQE(op=Op.SOCKET, sock_id=5, op_data=socket.AF_INET | 1 << 16, tag=10)))
        _, reply = g.port.wait_reply(5, 10)
        assert reply.result < 0, "a socket of a tenant whose header no reader may accept"
        assert g.id in listed(inst) and inst.status()["nsms"], "a device or the NSM is gone"


@pytest.mark.req("VM-5")
def test_garbage_from_a_guest_is_refused_and_counted(engine: Any, nk_runtime: Runtime) -> None:
    inst = nk_runtime.shared()
    rng = __import__("random").Random(11)
    n = 600
    with guest(inst) as g:
        for i in range(n):
            raw = bytearray(rng.randbytes(32))
            raw[29:32] = b"\x01\x02\x03"  # reserved bytes set: none of these is valid
            g.push(bytes(raw), dev.RingId.SEND if i % 2 else dev.RingId.JOB)
            if i % 32 == 0:
                g.port.pump()

        def counted() -> bool:
            g.port.pump()
            return int(listed(inst)[g.id]["counters"]["rejected"]) == n
        wait_until("every garbage NQE in rejected", counted, 10)


@pytest.mark.req("VM-5")
@pytest.mark.req("VM-4")
def test_impossible_indices_detach_the_guest_device_alone(
        engine: Any, nk_runtime: Runtime) -> None:
    inst = nk_runtime.shared()
    with guest(inst) as bystander, guest(inst) as g:
        geo = g.dmap.geo
        job = geo.ring_offset(0, dev.RingId.JOB)
        (head,) = struct.unpack_from("<I", g.dmap.buf, job + 64)
        struct.pack_into("<I", g.dmap.buf, job, (head + geo.ring_entries + 3) & 0xFFFFFFFF)
        wait_until("the guest device detached (RING-10)", lambda: g.id not in listed(inst), 2)
        assert g.dmap.state is dev.State.DETACHED, "VM-4: the header says DETACHED"
        assert not g.path.exists()
        bystander.push(unknown_op(3, 4))
        assert bystander.port.wait_reply(3, 4)[1].result == -ENOSYS
        assert bystander.id in listed(inst)


# -- the preload role: the guest's agent --------------------------------------------------


@pytest.mark.req("VM-3")
@pytest.mark.req("VM-2")
def test_a_handed_device_carries_a_program_without_an_attach(
        preload: Any, nk_runtime: Runtime, tmp_path: Path) -> None:
    """The agent maps the file it is handed (and, with NETKERNEL_DEVICE=pci, BAR 2 of the
    ivshmem device in a sysfs-shaped directory); a preloaded program moves 1 MiB both ways
    through the polled device; the CoreEngine lists no device but the guest's."""
    inst = nk_runtime.shared()
    payload = os.urandom(1 << 20)
    code = """
        import hashlib, socket, sys
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        n = int(sys.argv[2]); got = b""
        while len(got) < n:
            chunk = s.recv(1 << 16)
            assert chunk, "EOF early"
            got += chunk
        s.sendall(got); s.shutdown(socket.SHUT_WR); assert s.recv(1) == b""
        print(hashlib.sha256(got).hexdigest())
    """
    with guest(inst) as g:
        pci = tmp_path / "pci" / "0000:00:04.0"
        pci.mkdir(parents=True)
        (pci / "vendor").write_text("0x1af4\n")
        (pci / "device").write_text("0x1110\n")
        (pci / "resource2").symlink_to(g.path)
        for device, env in ((str(g.path), {}),
                            ("pci", {"NETKERNEL_PCI_ROOT": str(tmp_path / "pci")})):
            before = set(listed(inst))
            with socket.create_server(("127.0.0.1", 0)) as srv, \
                    handed(preload.paths(), device, tmp_path, env=env) as agent:
                srv.settimeout(TIMEOUT)
                prog = agent.popen(code, str(srv.getsockname()[1]), str(len(payload)))
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    prog.kill()
                    raise AssertionError(f"{device}: no connection: {prog.communicate()}"
                                         f"\n{agent.err.read_text(errors='replace')}") from None
                with conn:
                    conn.settimeout(TIMEOUT)
                    conn.sendall(payload)
                    back = b""
                    while chunk := conn.recv(1 << 16):
                        back += chunk
                out, err = prog.communicate(timeout=TIMEOUT)
                assert prog.returncode == 0, err
                assert out.strip() == hashlib.sha256(payload).hexdigest() and back == payload
                assert set(listed(inst)) == before, "the agent attached a device of its own"
        assert listed(inst)[g.id]["counters"]["bytes_in"] >= 2 * len(payload)


@pytest.mark.req("VM-4")
def test_a_detached_header_resets_the_guests_sockets_within_1s(
        preload: Any, nk_runtime: Runtime, tmp_path: Path) -> None:
    inst = nk_runtime.shared()
    code = """
        import socket, sys, time
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        s.sendall(b"hi"); print("up", flush=True)
        sys.stdin.readline(); t = time.monotonic()
        try:
            got = s.recv(10)
        except ConnectionResetError:
            got = b"reset"
        print(repr(got), time.monotonic() - t, flush=True)
    """
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(TIMEOUT)
        g = Guest(inst)
        try:
            with handed(preload.paths(), g.path, tmp_path) as agent:
                prog = subprocess.Popen(
                    [sys.executable, "-c", textwrap.dedent(code), str(srv.getsockname()[1])],
                    env=agent.prog_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
                conn, _ = srv.accept()
                assert prog.stdout is not None and prog.stdin is not None
                assert prog.stdout.readline().strip() == "up"
                g.close()  # the launcher's connection ends: the CoreEngine detaches (RT-4)
                prog.stdin.write("go\n")
                prog.stdin.flush()
                out, err = prog.communicate(timeout=TIMEOUT)
                got, waited = out.split()
                assert got in ("b''", "b'reset'"), err
                assert float(waited) < 1.0, f"the socket was reset after {waited} s (GL-9)"
                conn.close()
                agent.release()
                assert agent.proc.wait(10) == 0
        finally:
            g.close()


@pytest.mark.req("VM-6")
def test_a_second_device_side_is_refused(
        preload: Any, nk_runtime: Runtime, tmp_path: Path) -> None:
    inst = nk_runtime.shared()
    with guest(inst) as g:
        with handed(preload.paths(), g.path, tmp_path):
            second = HandedAgent(preload.paths(), str(g.path), tmp_path)
            try:
                assert not second.ready and second.proc.wait(10) == 3
            finally:
                second.close()
        with handed(preload.paths(), g.path, tmp_path) as again:
            assert again.proc.poll() is None
