"""The KVM adapter (adapters/kvm, docs/kvm.md, spec/vm.md): real QEMU guests.

Each guest test boots the Debian kernel with the project's initramfs in QEMU (TCG where
KVM cannot run it, as on a nested VM) and runs its command through ``netkernel vm``, a
separate process, as a user would. They are skipped only when QEMU, busybox-static or
the kernel package cannot be had on this machine (``.ci/run`` installs them).
The unit tests at the top need none of that.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from netkernel.adapters.kvm import cpio, image, qemu

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
