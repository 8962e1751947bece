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
from tests.live import own_instance, until

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
    assert "net lo" in lines  # no network device at all (-nic none)
    assert "preload /usr/lib/netkernel/libnkpreload.so" in lines
    assert any(line.startswith("curl ") for line in lines)
    assert "err" in done.stderr.splitlines()
    assert re.search(r"accel (kvm|tcg) \(", done.stderr), done.stderr
    assert re.search(r"booted in \d+\.\d+ s", done.stderr), done.stderr


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
