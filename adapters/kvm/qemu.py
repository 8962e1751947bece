"""QEMU for a NetKernel guest: its command line, the boot, the console protocol, the probe.

A guest (:class:`Guest`) is ``qemu-system-x86_64`` with no network device (``-nic none``,
``-nodefaults``; or, for the benchmark's baseline, ``nic="user"``: a virtio-net NIC on
QEMU's user-mode network, :data:`NICS`), the image's kernel and initramfs plus the run's own archive
(:func:`netkernel.adapters.kvm.image.run_archive`), and the NK device as an
``ivshmem-plain`` PCI device over a ``memory-backend-file`` (``share=on``) on the device
file: the guest's BAR 2 is the file's pages, the same the CoreEngine maps. ivshmem wants a
power-of-two size; :func:`bar_size` is the smallest that holds the file, and the file is
grown to it before QEMU starts (spec/device.md DEV-13 allows a longer region).

Three serial ports, each a pipe to this process: ttyS0 the console (the kernel's, and the
markers of ``init.sh``), ttyS1 the command's stdout, ttyS2 its stderr.

The accelerator (:func:`choose_accel`): ``kvm`` or ``tcg`` as asked; ``auto`` boots the
image once under KVM with nothing to run and takes KVM if ``/init`` reports within
:data:`PROBE_TIMEOUT`, else TCG. On a nested VM whose KVM cannot run a stock kernel the
probe fails (QEMU aborts, or stops on a KVM emulation failure); the answer is cached per
host kernel, CPU, QEMU and guest kernel, so only the first run pays for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

from netkernel.adapters.kvm import image as img

QEMU: Final = "qemu-system-x86_64"
ACCELS: Final = ("auto", "kvm", "tcg")
DEFAULT_MEMORY: Final = "256M"
PROBE_TIMEOUT: Final = 20.0
#: The kernel's command line: the console on the first serial port, quiet, no reboot on a
#: panic (QEMU then exits, -no-reboot), no time spent on what a guest without disks,
#: keyboard or network does not need.
CMDLINE: Final = ("console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off nokaslr "
                  "i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable")
MARK_INIT: Final = "@@NK-INIT@@"
_MARK: Final = re.compile(r"@@NK-(INIT|AGENT|NIC|EXIT)(?: ([^@]*))?@@")
#: ``nic`` -> QEMU's ``-nic``: none (NetKernel's guest), or a virtio-net PCI NIC on QEMU's
#: user-mode network (the baseline: the guest is 10.0.2.15, the host's loopback 10.0.2.2;
#: QEMU's own network stack, nothing configured on the host).
NICS: Final = {"none": "none", "user": "user,model=virtio-net-pci"}
_KVM_FAILURES: Final = ("KVM internal error", "emulation failure", "kvm run failed",
                        "KVM_SET_MSRS", "failed to initialize kvm", "Could not access KVM")
_PR_SET_PDEATHSIG: Final = 1


class QemuError(RuntimeError):
    """QEMU cannot run the guest; the message says why."""


def qemu_binary() -> str:
    found = shutil.which(QEMU)
    if found is None:
        raise QemuError(f"{QEMU} is not installed: apt-get install qemu-system-x86")
    return found


def bar_size(size: int) -> int:
    """The smallest power of two holding ``size`` bytes: ivshmem's BAR 2 size."""
    return 1 << max(size - 1, 1).bit_length()


def grow_to_bar(device: Path) -> int:
    """Grow the device file to its BAR size (spec/device.md DEV-13: the bytes past
    ``total_size`` are not part of the device); the new size."""
    size = device.stat().st_size
    bar = bar_size(size)
    if bar != size:
        with open(device, "r+b") as f:
            os.ftruncate(f.fileno(), bar)
    return bar


@dataclasses.dataclass
class Result:
    """What one boot gave: the command's status (None if the guest never reported it),
    the seconds from QEMU's start to init's first marker and the CPU seconds QEMU had used
    by then (the boot time of an idle machine: TCG is bound by one CPU), whether the agent
    started, the console (kernel and init) as text, and QEMU's own messages."""

    status: int | None
    boot_seconds: float | None
    boot_cpu_seconds: float | None
    agent_ok: bool | None
    console: str
    qemu_stderr: str
    accel: str
    seconds: float
    nic_ok: bool | None = None  # nic="user": eth0 configured in the guest


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """QEMU ends when the process that started it ends (prctl PR_SET_PDEATHSIG): a killed
    ``netkernel vm`` leaves no guest behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


class Guest:
    """One QEMU guest running one command; :meth:`wait` for its :class:`Result`.

    ``stdout``/``stderr`` receive the command's output as it comes; ``on_console`` each
    console line after init has started that is not a marker (the agent's messages, the
    kernel's warnings); ``on_boot`` the boot time (wall and QEMU's CPU seconds) once init
    has started."""

    def __init__(self, image: img.Image, cmd: Sequence[str], *, accel: str,
                 device: Path | None = None, memory: str = DEFAULT_MEMORY,
                 name: str = "guest", uncompressed: bool = True,
                 stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
                 on_console: Callable[[str], None] | None = None,
                 on_boot: Callable[[float, float | None], None] | None = None,
                 extra_args: Sequence[str] = (), nic: str = "none",
                 files: Mapping[str, bytes] | None = None) -> None:
        if accel not in ("kvm", "tcg"):
            raise ValueError(f"accel must be kvm or tcg, got {accel!r}")
        if nic not in NICS:
            raise ValueError(f"nic must be one of {tuple(NICS)}, got {nic!r}")
        self.accel = accel
        self._sinks = (stdout, stderr)
        self._on_console = on_console
        self._on_boot = on_boot
        self._console: list[str] = []
        self._qemu_err = b""
        self.status: int | None = None
        self.agent_ok: bool | None = None
        self.nic_ok: bool | None = None
        self.boot_seconds: float | None = None
        self.boot_cpu_seconds: float | None = None
        self._booted = threading.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="netkernel-vm-")
        initrd = Path(self._tmp.name) / "initrd.cpio"
        with open(initrd, "wb") as out, open(image.initramfs, "rb") as base:
            shutil.copyfileobj(base, out, 1 << 20)
            out.write(img.run_archive(cmd, name, nic=nic, files=files))
        pipes = [os.pipe() for _ in range(3)]
        argv = [qemu_binary(), "-name", name, "-nodefaults", "-no-user-config",
                "-display", "none", "-monitor", "none", "-no-reboot",
                "-machine", "pc", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
                "-m", memory, "-smp", "1", "-nic", NICS[nic],
                "-kernel", str(image.kernel_file(uncompressed)), "-initrd", str(initrd),
                "-append", CMDLINE]
        for i, (_r, w) in enumerate(pipes):
            argv += ["-chardev", f"file,id=s{i},path=/dev/fd/{w}", "-serial", f"chardev:s{i}"]
        if device is not None:
            size = grow_to_bar(device)
            argv += ["-object", f"memory-backend-file,id=nk,share=on,mem-path={device},"
                                f"size={size}",
                     "-device", "ivshmem-plain,memdev=nk"]
        argv += list(extra_args)
        self.argv = argv
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         pass_fds=[w for _r, w in pipes],
                                         preexec_fn=_die_with_parent)
        finally:
            for _r, w in pipes:
                os.close(w)
        self._threads = [
            threading.Thread(target=self._read_console, args=(pipes[0][0],), daemon=True),
            threading.Thread(target=self._copy, args=(pipes[1][0], stdout), daemon=True),
            threading.Thread(target=self._copy, args=(pipes[2][0], stderr), daemon=True),
            threading.Thread(target=self._read_qemu_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- the pipes ---------------------------------------------------------------------

    def _read_console(self, fd: int) -> None:
        pending = b""
        with open(fd, "rb", buffering=0) as f:
            while chunk := f.read(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._console_line(raw.decode(errors="replace").rstrip("\r"))
        if pending:
            self._console_line(pending.decode(errors="replace"))

    def _console_line(self, line: str) -> None:
        self._console.append(line)
        m = _MARK.search(line)
        if m is None:
            if self._booted.is_set() and self.status is None and self._on_console:
                self._on_console(line)
            return
        what, arg = m.group(1), m.group(2)
        if what == "INIT" and self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self.started
            self.boot_cpu_seconds = cpu_seconds(self.proc.pid)
            self._booted.set()
            if self._on_boot is not None:
                self._on_boot(self.boot_seconds, self.boot_cpu_seconds)
        elif what == "AGENT":
            self.agent_ok = arg == "ok"
        elif what == "NIC":
            self.nic_ok = arg == "ok"
        elif what == "EXIT" and arg is not None and arg.strip().isdigit():
            self.status = int(arg)

    @staticmethod
    def _copy(fd: int, sink: BinaryIO | None) -> None:
        with open(fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                if sink is not None:
                    with contextlib.suppress(OSError, ValueError):
                        sink.write(chunk)
                        sink.flush()

    def _read_qemu_err(self) -> None:
        assert self.proc.stderr is not None
        while chunk := os.read(self.proc.stderr.fileno(), 4096):
            self._qemu_err += chunk
            if self.accel == "kvm" and any(s.encode() in self._qemu_err for s in _KVM_FAILURES):
                # A KVM emulation failure stops the guest but not QEMU: end it.
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()

    # -- the guest ---------------------------------------------------------------------

    def wait_booted(self, timeout: float) -> bool:
        """True once init has started; False after ``timeout`` s or when QEMU ended."""
        deadline = time.monotonic() + timeout
        while not self._booted.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return self._booted.is_set()
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def wait(self, timeout: float | None = None) -> Result:
        """Wait for QEMU to end (killing it after ``timeout`` s) and for its pipes."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)
        self._tmp.cleanup()
        return Result(status=self.status, boot_seconds=self.boot_seconds,
                      boot_cpu_seconds=self.boot_cpu_seconds,
                      agent_ok=self.agent_ok, console="\n".join(self._console),
                      qemu_stderr=self._qemu_err.decode(errors="replace"), accel=self.accel,
                      seconds=time.monotonic() - self.started, nic_ok=self.nic_ok)


def run(image: img.Image, cmd: Sequence[str], *, accel: str = "tcg",
        timeout: float | None = None, **kwargs: object) -> Result:
    """Boot, run ``cmd``, power off: the result (output goes to the given sinks)."""
    guest = Guest(image, cmd, accel=accel, **kwargs)  # type: ignore[arg-type]
    return guest.wait(timeout)


# -- the accelerator ----------------------------------------------------------------------


def _probe_key(image: img.Image) -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags")), "")
    qemu_version = subprocess.run([qemu_binary(), "--version"], capture_output=True,
                                  text=True, check=False).stdout.split("\n")[0]
    text = f"{os.uname().release}\n{cpu}\n{qemu_version}\n{image.kernel.version}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def probe_kvm(image: img.Image, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the image under KVM with nothing to run: (works, why not)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    guest = Guest(image, ["true"], accel="kvm", name="nk-kvm-probe")
    booted = guest.wait_booted(timeout)
    result = guest.wait(timeout=timeout if booted else 0)
    if booted and result.status == 0:
        return True, f"booted in {result.boot_seconds:.2f} s"
    why = result.qemu_stderr.strip().splitlines()
    reason = next((line for line in why if any(s in line for s in _KVM_FAILURES)),
                  why[0] if why else f"no init within {timeout:.0f} s")
    return False, reason.strip()


def choose_accel(image: img.Image, asked: str = "auto") -> tuple[str, str]:
    """The accelerator to run under and why: (``kvm``|``tcg``, reason)."""
    if asked not in ACCELS:
        raise ValueError(f"accel must be one of {ACCELS}, got {asked!r}")
    if asked != "auto":
        return asked, "asked for"
    cache = img.cache_dir() / "accel.json"
    key = _probe_key(image)
    with contextlib.suppress(OSError, ValueError, KeyError):
        doc = json.loads(cache.read_text())
        if doc["key"] == key:
            said = doc["why"] if doc["kvm"] else f"KVM probe failed: {doc['why']}"
            return ("kvm" if doc["kvm"] else "tcg"), f"{said}; probed before"
    works, why = probe_kvm(image)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "kvm": works, "why": why}))
    os.replace(tmp, cache)
    return ("kvm" if works else "tcg"), (why if works else f"KVM probe failed: {why}")
