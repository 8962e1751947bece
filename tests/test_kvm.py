"""The KVM adapter (adapters/kvm, docs/kvm.md, spec/vm.md): real QEMU guests.

Each guest test boots the Debian kernel with the project's initramfs in QEMU (TCG where
KVM cannot run it, as on a nested VM) and runs its command through ``netkernel vm``, a
separate process, as a user would. They are skipped only when QEMU, busybox-static or
the kernel package cannot be had on this machine (``.ci/run`` installs them).
The unit tests at the top need none of that.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import lzma
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netkernel import instance
from netkernel.adapters.kvm import cpio, image, qemu
from tests.live import own_instance, status, until

BOOT_BUDGET = 240  # s for one guest's whole run: boot under TCG on a loaded 2-core machine


# -- without QEMU --------------------------------------------------------------------------


def test_the_cpio_writer_round_trips_files_links_and_directories() -> None:
    out = io.BytesIO()
    w = cpio.Writer(out)
    w.directory("etc")
    w.file("etc/x", b"abc", 0o600)
    w.symlink("bin", "usr/bin")
    w.file("odd", b"12345")
    w.close()
    data = out.getvalue()
    assert len(data) % 4 == 0
    got = cpio.unpack(data + data[:0])
    assert got["etc/x"] == (0o100600, b"abc")
    assert got["bin"] == (0o120777, b"usr/bin")
    assert got["odd"][1] == b"12345"
    assert got["etc"][0] == 0o40755
    # two archives end to end: the later entry wins, as when the kernel unpacks them
    second = io.BytesIO()
    w2 = cpio.Writer(second)
    w2.file("odd", b"new")
    w2.close()
    assert cpio.unpack(data + second.getvalue())["odd"][1] == b"new"


@pytest.mark.skipif(not Path(image.BUSYBOX).is_file(), reason="busybox-static not installed")
def test_the_run_archive_hands_the_command_to_the_guest_shell_word_for_word(
        tmp_path: Path) -> None:
    argv = ["printf", "%s|", "two words", "it's", '"q"', "$HOME", "`x`", "a\nb", ""]
    files = cpio.unpack(image.run_archive(argv, "vm:printf"))
    (tmp_path / "cmd.sh").write_bytes(files["nk/cmd.sh"][1])
    out = subprocess.run([str(image.BUSYBOX), "sh", "-c", '. ./cmd.sh; "$@"; echo "$NK_NAME"'],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out == "|".join(argv[2:]) + "|vm:printf\n"


def _bzimage(payload: bytes, setup_sects: int = 3, offset: int = 0x100) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, offset, len(payload))
    return bytes(head) + b"\0" * offset + payload + b"\0" * 4


def test_vmlinux_is_taken_out_of_a_bzimage_by_its_boot_header() -> None:
    elf = b"\x7fELF" + os.urandom(5000)
    assert image.extract_vmlinux(_bzimage(lzma.compress(elf, lzma.FORMAT_XZ))) == elf
    with pytest.raises(image.ImageError, match="unknown method"):
        image.extract_vmlinux(_bzimage(b"BZh9" + os.urandom(100)))
    with pytest.raises(image.ImageError, match="not a bzImage"):
        image.extract_vmlinux(b"\0" * 4096)


def test_the_bar_is_the_smallest_power_of_two_that_holds_the_device(tmp_path: Path) -> None:
    assert [qemu.bar_size(n) for n in (1, 4096, 4097, 3 << 20)] == [2, 4096, 8192, 4 << 20]
    f = tmp_path / "vm-1.nk"
    f.write_bytes(b"x" * 5000)
    assert qemu.grow_to_bar(f) == 8192
    assert f.stat().st_size == 8192 and f.read_bytes()[:5000] == b"x" * 5000


# -- guests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_image() -> image.Image:
    if shutil.which(qemu.QEMU) is None:
        pytest.skip("qemu-system-x86 is not installed (apt-get install qemu-system-x86)")
    try:
        return image.build()
    except image.Unavailable as exc:
        pytest.skip(f"the guest image cannot be built on this machine: {exc}")


def vm(*args: str, env: dict[str, str] | None = None,
       timeout: float = BOOT_BUDGET) -> subprocess.CompletedProcess[str]:
    """``netkernel vm ARGS`` as a user runs it; its output as text."""
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "netkernel", "vm", *args],
                          capture_output=True, text=True, timeout=timeout, env=full)


def test_a_guest_runs_the_command_with_the_guestlib_and_has_no_nic_only_the_nk_device(
        guest_image: image.Image) -> None:
    # no instance running under this name: `vm` starts an embedded one for the guest
    script = (
        "echo out; echo err >&2;"
        "for d in /sys/bus/pci/devices/*; do echo pci $(cat $d/vendor):$(cat $d/device); done;"
        "echo net $(ls /sys/class/net);"
        "python3 -c 'import os, http.server, urllib.request, hashlib;"
        " print(\"preload\", os.environ[\"LD_PRELOAD\"])';"
        "curl --version | head -n 1; exit 7"
    )
    done = vm("--", "sh", "-c", script,
              env={"NETKERNEL_INSTANCE": f"kvm-{uuid.uuid4().hex[:8]}"})
    assert done.returncode == 7, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "out"
    assert "pci 0x1af4:0x1110" in lines  # the NK device: ivshmem, BAR 2 the device file
    assert "pci 0x1af4:0x1000" not in lines  # no virtio-net device
    assert "net lo" in lines  # no network device at all (-nic none)
    assert "preload /usr/lib/netkernel/libnkpreload.so" in lines
    assert any(line.startswith("curl ") for line in lines)
    assert "err" in done.stderr.splitlines()
    assert re.search(r"accel (kvm|tcg) \(", done.stderr), done.stderr
    assert re.search(r"booted in \d+\.\d+ s", done.stderr), done.stderr


def test_the_nic_user_baseline_guest_has_a_virtio_net_nic_and_no_nk_device(
        guest_image: image.Image, tmp_path: Path) -> None:
    """``--nic user`` (bench/vm.py's baseline): the same image with a virtio-net NIC on
    QEMU's user-mode network, configured as 10.0.2.15/24; no NK device and no GuestLib;
    a host server on 127.0.0.1 is reached as 10.0.2.2 through the guest's own stack."""
    blob = os.urandom(200_000)
    (tmp_path / "blob").write_bytes(blob)
    script = (
        "for d in /sys/bus/pci/devices/*; do echo pci $(cat $d/vendor):$(cat $d/device); done;"
        "echo net $(ls /sys/class/net); ip -4 addr show eth0 | grep -o 'inet [0-9./]*';"
        "echo preload \"$LD_PRELOAD\";"
        "python3 -c 'import hashlib, sys, urllib.request;"
        " print(hashlib.sha256(urllib.request.urlopen(sys.argv[1]).read()).hexdigest())' \"$1\""
    )
    with http_server(tmp_path) as port:
        done = vm("--nic", "user", "--", "sh", "-c", script, "sh",
                  f"http://10.0.2.2:{port}/blob")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "pci 0x1af4:0x1000" in lines  # virtio-net (legacy/transitional PCI ID)
    assert "pci 0x1af4:0x1110" not in lines  # no NK device
    assert "net eth0 lo" in lines
    assert "inet 10.0.2.15/24" in lines
    assert "preload " in lines  # the command runs without the GuestLib
    assert hashlib.sha256(blob).hexdigest() in lines
    assert "baseline guest (--nic user" in done.stderr


# -- guests on NetKernel (spec/vm.md; the guest's agent maps the PCI device, VM-3) ----------


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[int]:
    """A plain host http.server (Linux sockets, not a tenant) on 127.0.0.1; its port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class Guest:
    """``netkernel vm ARGS`` in the background, its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "netkernel", "vm", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def saw(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]

    def qemu_pid(self) -> int:
        """The QEMU process of this guest (a child of `netkernel vm`)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        for pid in children.split():
            with contextlib.suppress(OSError):
                if "qemu" in Path(f"/proc/{pid}/comm").read_text():
                    return int(pid)
        raise AssertionError(f"no QEMU under netkernel vm ({self.err})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __repr__(self) -> str:
        return f"Guest(stdout={self.lines[-5:]}, stderr={self.err[-10:]})"


def _vm_tenants(name: str) -> list[dict[str, Any]]:
    return [t for t in instance.status(name)["tenants"] if t["name"].startswith("vm:")]


def _only(name: str, guest: str) -> bool:
    """Only ``guest`` is left of the guests, and every entry of the connection table
    belongs to a tenant still attached (none left of a dead one)."""
    doc = instance.status(name)
    guests = [t["name"] for t in doc["tenants"] if t["name"].startswith("vm:")]
    return guests == [guest] and doc["sockets"] == sum(t["sockets"] for t in doc["tenants"])


def test_a_guest_with_no_nic_fetches_a_host_file_through_netkernel(
        guest_image: image.Image, tmp_path: Path) -> None:
    """VM-1 (attached for the guest), VM-3 (the agent maps BAR 2), VM-2 (polled bells)."""
    blob = os.urandom(1 << 20)
    (tmp_path / "blob").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    with own_instance() as name, http_server(tmp_path) as port:
        url = f"http://127.0.0.1:{port}/blob"
        done = vm("--instance", name, "--", "sh", "-c",
                  f"curl -sS {url} | sha256sum; python3 -c 'import hashlib, urllib.request;"
                  f" print(hashlib.sha256(urllib.request.urlopen(\"{url}\").read()).hexdigest())'")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [want, "-", want], done.stderr
        # the guest's device was attached for it, with its traffic, and is gone (RT-4)
        assert _vm_tenants(name) == []
        assert "nk-agent did not start" not in done.stderr


def test_a_guest_socket_half_closed_by_its_app_still_reads_the_reply(
        guest_image: image.Image) -> None:
    """PRE-6 in a guest: the app shuts its write side (SHUT_WR) and reads on. nk-agent
    tells an app end still open from a closed one with sock_diag; the guest loads
    ``unix_diag`` for it (without it the kernel answers ENOENT, which reads as "closed":
    the agent closed such a socket under the app, whose shutdown() then failed ENOENT,
    found by bench/vm.py's bulk test). Repeated, since it was a race."""
    rounds = 15
    with own_instance() as name, socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def serve() -> None:
            for _ in range(rounds):
                conn, _ = server.accept()
                with conn:
                    h = hashlib.sha256()
                    while data := conn.recv(65536):
                        h.update(data)
                    conn.sendall(h.hexdigest().encode())

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = ("import hashlib, os, socket\n"
                  f"for i in range({rounds}):\n"
                  "    data = os.urandom(300000)\n"
                  f"    c = socket.create_connection(('127.0.0.1', {port}))\n"
                  "    c.sendall(data)\n"
                  "    c.shutdown(socket.SHUT_WR)\n"
                  "    got = b''\n"
                  "    while chunk := c.recv(100):\n"
                  "        got += chunk\n"
                  "    c.close()\n"
                  "    print(got.decode() == hashlib.sha256(data).hexdigest(), flush=True)\n")
        done = vm("--instance", name, "--", "sh", "-c",
                  "grep -o '^unix_diag' /proc/modules; exec python3 -c \"$1\"", "sh", client)
        thread.join(timeout=10)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["unix_diag"] + ["True"] * rounds, done.stderr


def test_a_server_in_a_guest_is_reached_by_a_host_client_under_netkernel_run(
        guest_image: image.Image, tmp_path: Path) -> None:
    port = _free_port()
    serve_one = ("import hashlib, http.server as h, os;"
                 "data = os.urandom(300000); open('/root/f', 'wb').write(data);"
                 "print('sha', hashlib.sha256(data).hexdigest(), flush=True);"
                 f"s = h.HTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler);"
                 "print('listening', flush=True); s.handle_request()")
    with own_instance() as name:
        guest = Guest("--instance", name, "--", "python3", "-c", serve_one)
        try:
            until("the guest's server", lambda: guest.saw("listening") or guest.proc.poll(),
                  timeout=BOOT_BUDGET, interval=0.2)
            assert guest.saw("listening"), guest
            got = subprocess.run(
                [sys.executable, "-m", "netkernel", "run", "--instance", name, "--",
                 "curl", "-sS", "--retry", "5", "--retry-connrefused", "-o", str(tmp_path / "f"),
                 f"http://127.0.0.1:{port}/f"], capture_output=True, text=True, timeout=120)
            assert got.returncode == 0, got.stderr
            assert guest.proc.wait(timeout=120) == 0, guest
        finally:
            guest.stop()
        sha = guest.saw("sha ")[0].split()[1]
        assert hashlib.sha256((tmp_path / "f").read_bytes()).hexdigest() == sha


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_guests_at_once_and_a_killed_one_frees_its_sockets_within_1s(
        guest_image: image.Image, tmp_path: Path) -> None:
    """RT-4 and CE-18 for a guest: its end is the end of `vm`'s control connection."""
    (tmp_path / "blob").write_bytes(os.urandom(64 << 10))
    with own_instance() as name, http_server(tmp_path) as port:
        base = f"http://127.0.0.1:{port}"
        # A fetches until the host says stop; B holds 4 connections open until killed
        fetcher = Guest("--instance", name, "--", "sh", "-c",
                        f"while :; do curl -sSf -o /dev/null {base}/blob || exit 1; echo ok;"
                        f" curl -sf -o /dev/null {base}/stop && exit 0; done")
        holder = Guest("--instance", name, "--", "python3", "-c",
                       "import socket, time\n"
                       f"c = [socket.create_connection(('127.0.0.1', {port})) for _ in range(4)]\n"
                       "print('held', flush=True)\ntime.sleep(600)")
        try:
            until("both guests at work", lambda: (fetcher.saw("ok") and holder.saw("held"))
                  or fetcher.proc.poll() is not None or holder.proc.poll() is not None,
                  timeout=BOOT_BUDGET, interval=0.2)
            assert fetcher.saw("ok") and holder.saw("held"), (fetcher, holder)
            tenants = {t["name"]: t for t in _vm_tenants(name)}
            assert set(tenants) == {"vm:sh", "vm:python3"}
            assert tenants["vm:python3"]["sockets"] >= 4
            # the guest dies (its QEMU killed): its device and sockets go within 1 s (RT-4)
            os.kill(holder.qemu_pid(), signal.SIGKILL)
            killed = time.monotonic()
            until("the dead guest's device and sockets freed", lambda: _only(name, "vm:sh"),
                  timeout=1.0)
            freed = time.monotonic() - killed
            doc = json.loads(subprocess.run(
                [sys.executable, "-m", "netkernel", "status", "--instance", name, "--json"],
                capture_output=True, text=True, check=True).stdout)
            assert [t["name"] for t in doc["tenants"] if t["name"].startswith("vm:")] == ["vm:sh"]
            # the other guest goes on
            before = len(fetcher.saw("ok"))
            until("the other guest fetching on", lambda: len(fetcher.saw("ok")) >= before + 3
                  or fetcher.proc.poll() is not None, timeout=60, interval=0.1)
            assert len(fetcher.saw("ok")) >= before + 3, fetcher
            (tmp_path / "stop").write_bytes(b"")
            assert fetcher.proc.wait(timeout=120) == 0, fetcher
            assert holder.proc.wait(timeout=30) != 0
        finally:
            fetcher.stop()
            holder.stop()
        print(f"dead guest's device and sockets freed {freed:.3f} s after its QEMU was killed")


def test_vm_without_a_command_says_how_to_use_it() -> None:
    done = vm("--accel", "tcg", timeout=60)
    assert done.returncode == 126
    assert "no command given" in done.stderr


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in "ZX"
    except OSError:
        return True


def test_sigterm_stops_the_guest_and_detaches_its_device(guest_image: image.Image) -> None:
    with own_instance() as name:
        guest = Guest("--instance", name, "--", "sleep", "600")
        try:
            until("the guest's boot", lambda: any("booted in" in e for e in guest.err)
                  or guest.proc.poll() is not None, timeout=BOOT_BUDGET, interval=0.2)
            qemu_pid = guest.qemu_pid()
            assert [t["name"] for t in _vm_tenants(name)] == ["vm:sleep"]
            guest.proc.send_signal(signal.SIGTERM)
            assert guest.proc.wait(timeout=30) == 128 + signal.SIGTERM, guest
            until("QEMU gone", lambda: _gone(qemu_pid))
            assert _vm_tenants(name) == []
        finally:
            guest.stop()


def test_when_the_coreengine_dies_vm_marks_the_device_detached_and_the_guest_sockets_fail(
        guest_image: image.Image) -> None:
    """VM-4: the guest holds no control connection; `vm` holds it, and writes DETACHED into
    the header when it ends first, so the guest's sockets fail instead of hanging."""
    with own_instance() as name, socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        guest = Guest("--instance", name, "--", "python3", "-c",
                      "import socket\n"
                      f"c = socket.create_connection(('127.0.0.1', {port}))\n"
                      "print('connected', flush=True)\n"
                      "try:\n"
                      "    print('eof' if not c.recv(100) else 'data', flush=True)\n"
                      "except OSError as e:\n"
                      "    print('error', e.errno, flush=True)\n")
        try:
            until("the guest connected", lambda: guest.saw("connected")
                  or guest.proc.poll() is not None, timeout=BOOT_BUDGET, interval=0.2)
            assert guest.saw("connected"), guest
            os.kill(instance.status(name)["pid"], signal.SIGKILL)
            assert guest.proc.wait(timeout=60) == 0, guest
        finally:
            guest.stop()
        assert guest.saw("error") or guest.saw("eof"), guest
        assert any("marked DETACHED" in line for line in guest.err), guest


#: Run in a guest: map the NK device's BAR as nk-agent does, then write what a hostile
#: guest may: a header with another geometry, random bytes over every bell, ring index and
#: NQE slot of every queue set (indices out of range, garbage NQEs).
HOSTILE = """
import glob, mmap, os, struct, time
dev = next(d for d in glob.glob('/sys/bus/pci/devices/*')
           if open(d + '/vendor').read().strip() == '0x1af4'
           and open(d + '/device').read().strip() == '0x1110')
with open(dev + '/resource2', 'r+b') as f:
    m = mmap.mmap(f.fileno(), 0)
assert m[:8] == b'NKDEVICE', m[:8]
data_offset, = struct.unpack_from('<Q', m, 48)
struct.pack_into('<HIQQQQ', m, 26, 0xFFFF, 3, 1 << 40, 7, 1 << 50, 1 << 62)
print('header rewritten', flush=True)
m[256:data_offset] = os.urandom(data_offset - 256)
print('queue sets scribbled', data_offset - 256, flush=True)
time.sleep(3)
"""


def test_a_hostile_guest_harms_neither_the_host_nor_another_tenant(
        guest_image: image.Image, tmp_path: Path) -> None:
    """VM-5 (the geometry is the CoreEngine's copy), RING-10 (impossible indices detach the
    device), SEC-1 (another tenant unharmed), from inside a real guest."""
    blob = os.urandom(256 << 10)
    (tmp_path / "blob").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    client = ("import hashlib, sys, urllib.request\n"
              "for line in sys.stdin:\n"
              "    data = urllib.request.urlopen(line.strip()).read()\n"
              "    print(hashlib.sha256(data).hexdigest(), flush=True)\n")
    with own_instance() as name, http_server(tmp_path) as port:
        url = f"http://127.0.0.1:{port}/blob\n"
        engine = instance.status(name)["pid"]
        # another tenant, attached before the guest and fetching before and after it
        other = subprocess.Popen(
            [sys.executable, "-m", "netkernel", "run", "--instance", name, "--",
             sys.executable, "-c", client], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        try:
            assert other.stdin is not None and other.stdout is not None
            other.stdin.write(url)
            other.stdin.flush()
            assert other.stdout.readline().strip() == want
            guest = Guest("--instance", name, "--", "python3", "-c", HOSTILE)
            try:
                until("the guest's scribbling", lambda: guest.saw("queue sets scribbled")
                      or guest.proc.poll() is not None, timeout=BOOT_BUDGET, interval=0.1)
                assert guest.saw("queue sets scribbled"), guest
                # the CoreEngine detaches the device (RING-10) while the guest still runs
                until("the hostile device detached", lambda: _vm_tenants(name) == [],
                      timeout=2.0)
                assert guest.proc.poll() is None, guest
                assert guest.proc.wait(timeout=60) == 0, guest
            finally:
                guest.stop()
            assert instance.status(name)["pid"] == engine  # the CoreEngine lives on
            other.stdin.write(url)
            other.stdin.flush()
            assert other.stdout.readline().strip() == want
            other.stdin.close()
            assert other.wait(timeout=60) == 0
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()


# -- two guests: neither can name the other's sockets (issue 8; SEC-1, SEC-2, SEC-6) -------

#: Guest B: a listener, a client and the accepted end in one python3 (the shape of
#: tests/test_isolation.py's tenant B), echoing random messages as fast as it can; a
#: progress line every 0.2 s. Its agent gives each new socket the lowest free ID
#: (fastpath/csrc/agent/sock.c), so B's sockets are 1 (listener), 2 (client), 3 (accepted).
GUEST_B = r"""
import json, random, socket, threading, time
lst = socket.create_server(('127.0.0.1', 0))
c = socket.create_connection(lst.getsockname(), timeout=10)
s, _ = lst.accept()
stats = {'rounds': 0, 'errors': []}
def serve():
    try:
        while data := s.recv(65536):
            s.sendall(data)
    except OSError as exc:
        stats['errors'].append('server: ' + repr(exc))
def drive():
    rng = random.Random(7)
    try:
        while True:
            msg = rng.randbytes(rng.randrange(1, 3000))
            c.sendall(msg)
            got = b''
            while len(got) < len(msg):
                chunk = c.recv(65536)
                if not chunk:
                    raise EOFError('EOF on the echo connection')
                got += chunk
            if got != msg:
                raise ValueError('echo mismatch')
            stats['rounds'] += 1
    except Exception as exc:
        stats['errors'].append('client: ' + repr(exc))
threading.Thread(target=serve, daemon=True).start()
threading.Thread(target=drive, daemon=True).start()
while True:
    print('stats', json.dumps(stats), flush=True)
    time.sleep(0.2)
"""

#: Guest A: stops its own nk-agent (it has no socket) and becomes the device side of its
#: NK device itself (VM-6: it takes the flock the agent held), then writes raw NQEs into
#: queue set 0 of its BAR 2 as tests/test_isolation.py's tenant A does on a host: its own
#: socket OWN, bound; then each forgery (argv[1], JSON: hex NQE and ring), each followed
#: by a GETSOCKNAME of OWN as a sentinel; every answer before the sentinel's is printed.
GUEST_A = r"""
import fcntl, glob, json, mmap, os, signal, struct, sys, time
spec = json.loads(sys.argv[1])
agents = [int(p) for p in os.listdir('/proc') if p.isdigit()
          and open(f'/proc/{p}/comm').read().strip() == 'nk-agent']
for pid in agents:
    os.kill(pid, signal.SIGTERM)
def gone(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[0] in 'ZX'
    except OSError:
        return True
while not all(gone(p) for p in agents):
    time.sleep(0.05)
dev = next(d for d in glob.glob('/sys/bus/pci/devices/*')
           if open(d + '/vendor').read().strip() == '0x1af4'
           and open(d + '/device').read().strip() == '0x1110')
f = open(dev + '/resource2', 'r+b')
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
m = mmap.mmap(f.fileno(), 0)
entries, = struct.unpack_from('<I', m, 28)
q0, = struct.unpack_from('<Q', m, 32)
data, data_size, send_size = struct.unpack_from('<QQQ', m, 48)
my_id, = struct.unpack_from('<I', m, 80)
assert (data_size, send_size) == (spec['data_size'], spec['send_size'])
R = 192 + 32 * entries
ring = {'JOB': q0 + 128, 'COMPLETION': q0 + 128 + R, 'SEND': q0 + 128 + 2 * R,
        'RECEIVE': q0 + 128 + 3 * R}
# Indices and bells are stored whole, 4 bytes at once, as reference/ring.py does:
# struct.pack_into zero-fills the field before it writes it, and a CoreEngine reading the
# zero sees impossible indices and detaches the device (RING-10).
words = memoryview(m).cast('I')
u32 = lambda off: words[off // 4]
def put(off, value):
    words[off // 4] = value % 2**32
def push(name, nqe):
    r = ring[name]
    tail, head = u32(r), u32(r + 64)
    assert (tail - head) % 2**32 < entries, 'ring full'
    slot = r + 192 + 32 * (tail % entries)
    m[slot:slot + 32] = nqe
    put(r, tail + 1)
    if u32(r + 128) & 1:  # NEED_WAKEUP: ring the ENGINE bell (polled anyway, VM-2)
        put(q0 + 64, u32(q0 + 64) + 1)
def take(timeout=30.0):
    r = ring['COMPLETION']
    deadline = time.monotonic() + timeout
    while u32(r + 64) == u32(r):
        assert time.monotonic() < deadline, ('no reply', m[25], {
            k: (u32(v), u32(v + 64), u32(v + 128)) for k, v in ring.items()})
        time.sleep(0.0005)
    head = u32(r + 64)
    slot = r + 192 + 32 * (head % entries)
    got = bytes(m[slot:slot + 32])
    put(r + 64, head + 1)
    return got
def fields(nqe):  # op, qset, vm_id, sock_id, op_data, data_ptr, size, tag (NQE-1)
    return struct.unpack('<BBBIqQIH', nqe[:29])
print('device', my_id, flush=True)
for name, nqe, blob in spec['setup']:
    if blob:
        m[data:data + len(blob) // 2] = bytes.fromhex(blob)
    push(name, bytes.fromhex(nqe))
    print('setup', json.dumps(fields(take())), flush=True)
for what, name, nqe in spec['forgeries']:
    push(name, bytes.fromhex(nqe))
    push('JOB', bytes.fromhex(spec['sentinel']))
    got = [take()]
    while fields(got[-1])[7] != spec['sentinel_tag'] or fields(got[-1])[0] != spec['sentinel_op']:
        got.append(take())
    print('forgery', json.dumps({'what': what, 'answers': [g.hex() for g in got[:-1]],
                                 'sentinel': fields(got[-1])[4]}), flush=True)
print('forged all', flush=True)
time.sleep(600)
"""


def test_two_guests_neither_can_name_the_other_s_sockets(guest_image: image.Image) -> None:
    """Issue 8, "two guests at once ... neither can name the other's sockets": guest A,
    from inside its VM, writes into its BAR the forgeries of tests/test_isolation.py
    (guest B's socket IDs, B's VM ID on the wire, buffers outside A's data area, injected
    events, forged replies, TENANT_MAP); each gets exactly SEC-6's answer, stamped with
    A's own VM ID, and is counted in A's ``rejected`` (CE-23); B's echo never fails and
    its sockets and counters do not move."""
    from netkernel.reference import device as dev
    from netkernel.reference import nqe as nq
    from netkernel.reference.nqe import REPLY_BIT, Op
    from tests import test_isolation as iso

    with own_instance() as name:
        b = Guest("--instance", name, "--", "python3", "-c", GUEST_B)
        a: Guest | None = None
        try:
            def b_rounds() -> int:
                got = b.saw("stats ")
                doc = json.loads(got[-1].split(" ", 1)[1]) if got else {"rounds": 0}
                assert doc.get("errors", []) == [], doc
                return int(doc["rounds"])

            until("B's echo to run", lambda: b_rounds() > 10 or b.proc.poll() is not None,
                  timeout=BOOT_BUDGET, interval=0.2)
            b_entry = iso.tenant_entry(name, b.proc.pid)
            assert b_entry is not None and b_entry["sockets"] == 3, b_entry
            b_vm = int(b_entry["id"])
            geo = dev.read_header(memoryview(Path(b_entry["path"]).read_bytes()))
            # a_vm=0: only TENANT_MAP's vm_id takes it, and the CoreEngine stamps it anyway
            forged = iso.forgeries(b_vm, [1, 2, 3], geo, 0)
            spec = {
                "data_size": geo.data_size, "send_size": geo.send_size,
                "setup": [
                    ["JOB", iso.raw(Op.SOCKET, iso.OWN, tag=1,
                                    op_data=socket.AF_INET | socket.SOCK_STREAM << 16).hex(),
                     ""],
                    ["JOB", iso.raw(Op.BIND, iso.OWN, data_ptr=0, size=16, tag=2).hex(),
                     nq.pack_sockaddr(nq.Sockaddr(socket.AF_INET, "127.0.0.1", 0)).hex()]],
                "forgeries": [[f.what, f.ring.name, f.nqe.hex()] for f in forged],
                "sentinel": iso.raw(Op.GETSOCKNAME, iso.OWN, data_ptr=2 * iso.GRANULE,
                                    size=28, tag=iso.SENTINEL_TAG).hex(),
                "sentinel_tag": iso.SENTINEL_TAG, "sentinel_op": Op.GETSOCKNAME | REPLY_BIT,
            }
            rounds_before = b_rounds()
            a = Guest("--instance", name, "--", "python3", "-c", GUEST_A, json.dumps(spec))
            until("A's forgeries", lambda: a.saw("forged all") or a.proc.poll() is not None,
                  timeout=BOOT_BUDGET, interval=0.2)
            assert a.saw("forged all"), (a.lines[-1:], a.err[-3:], [
                f.read_text()[-3000:] for f in Path(status(name)["dir"]).glob("*.log")])
            a_entry = iso.tenant_entry(name, a.proc.pid)
            assert a_entry is not None, a
            a_vm = int(a_entry["id"])
            assert a_vm != b_vm and a.saw("device")[0].split()[1] == str(a_vm)
            # A's own socket and bind worked: A is a working device side of its own device
            assert [json.loads(line.split(" ", 1)[1])[4] for line in a.saw("setup ")] == [0, 0]
            results = [json.loads(line.split(" ", 1)[1]) for line in a.saw("forgery ")]
            assert [r["what"] for r in results] == [f.what for f in forged]
            for f, r in zip(forged, results, strict=True):
                assert r["sentinel"] == 16, f.what  # A's own socket still works (SEC-8)
                answers = [nq.unpack_unchecked(bytes.fromhex(h)) for h in r["answers"]]
                sent = nq.unpack_unchecked(f.nqe)
                if f.reply_op is None:
                    assert answers == [], f.what
                    continue
                (got,) = answers
                assert (got.op, got.result) == (f.reply_op, -f.errno), f.what
                assert (got.sock_id, got.tag, got.data_ptr, got.size) == (
                    sent.sock_id, sent.tag, sent.data_ptr, sent.size), f.what
                assert (got.vm_id, got.qset, got.reserved) == (a_vm, 0, b"\0\0\0"), f.what
            assert a_entry["counters"]["rejected"] == len(forged)  # each counted once
            # B went on the whole time and goes on: no error, its sockets untouched
            until("B's echo to go on", lambda: b_rounds() > rounds_before + 10)
            b_after = iso.tenant_entry(name, b.proc.pid)
            assert b_after is not None and b_after["sockets"] == 3
            assert b_after["counters"]["rejected"] == 0
            assert b.proc.poll() is None and a.proc.poll() is None
        finally:
            if a is not None:
                a.stop()
            b.stop()
