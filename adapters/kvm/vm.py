"""``netkernel vm -- CMD``: run CMD in a guest whose only way out is its NK device.

The host side of a guest's life (docs/kvm.md):

1. the image (:func:`netkernel.adapters.kvm.image.build`, cached) and the accelerator
   (:func:`netkernel.adapters.kvm.qemu.choose_accel`; which one ran is always said);
2. the instance: the one named, else the running one, else an embedded one for the
   guest's lifetime (``netkernel run``'s, :func:`netkernel.run._instance`);
3. a tenant device attached for the guest (RT-3, kind ``tenant``, ``"guest": true``:
   a power-of-two file with polled bells, spec/vm.md VM-1; this process's pid; name
   ``vm:<program>``); the guest's ID is the device's. This process holds the control
   connection for the guest's lifetime and closes it when QEMU has ended: that is the
   device's hot-unplug (RT-4), after which the CoreEngine closes whatever the guest left
   open (CE-18). Should the connection end first (the CoreEngine died), this process
   writes DETACHED into the header for it (VM-4), so that the guest's sockets fail;
4. the guest (:class:`netkernel.adapters.kvm.qemu.Guest`): the device file as its
   ivshmem BAR, CMD run by ``/init`` with the GuestLib, CMD's stdout and stderr relayed
   here as they come, the boot time (QEMU's start to init's first marker) said on stderr;
5. the exit status is CMD's in the guest.

With ``nic="user"`` (``--nic user``, the benchmark's baseline, bench/vm.py) steps 2 and 3
are skipped: the same image boots with a virtio-net NIC on QEMU's user-mode network
instead of an NK device, and CMD runs on the guest's own kernel stack.
"""

from __future__ import annotations

import contextlib
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

from netkernel import instance as inst
from netkernel import run as host_run
from netkernel.adapters.kvm import image as img
from netkernel.adapters.kvm import qemu
from netkernel.reference import coreengine
from netkernel.reference import device as dev

EXIT_CANNOT_RUN: Final = 126
EXIT_TIMEOUT: Final = 124
_FORWARDED: Final = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)


class VMError(RuntimeError):
    """The guest cannot be run; the message says why."""


def _say(prog: str, text: str) -> None:
    print(f"{prog}: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stop_on_signals(guest_box: list[qemu.Guest], told: list[int]) -> Iterator[None]:
    """SIGTERM, SIGHUP, SIGQUIT and SIGINT end the guest (QEMU), not this process: the
    device is then detached and an embedded instance stopped as after any run."""

    def stop(signum: int, _frame: object) -> None:
        told.append(signum)
        for guest in guest_box:
            guest.kill()

    previous = {sig: signal.signal(sig, stop) for sig in _FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch_engine(device: coreengine.Attachment, done: threading.Event,
                  prog: str) -> None:
    """VM-4: the guest holds no control connection; if ours ends while the guest runs (the
    CoreEngine died without writing DETACHED), write DETACHED into the header for it."""
    while not done.is_set():
        try:
            ready, _, _ = select.select([device.conn], [], [], 0.2)
            if not ready or device.conn.recv(4096):  # no request is pending: nothing to read
                continue
        except (OSError, ValueError):
            return  # closed by us: the guest has ended
        if done.is_set():
            return
        with contextlib.suppress(OSError, ValueError):
            device.dmap.set_header("state", dev.State.DETACHED)
        _say(prog, f"the CoreEngine let go of vm-{device.id}: marked DETACHED for the guest")
        return


def run(cmd: Sequence[str], *, instance: str | None = None, nsm: str = inst.DEFAULT_NSM,
        impl: str = inst.DEFAULT_IMPL, memory: str = qemu.DEFAULT_MEMORY,
        accel: str = "auto", timeout: float | None = None, uncompressed: bool = True,
        prog: str = "netkernel vm", nic: str = "none",
        files: Mapping[str, bytes] | None = None, stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        on_result: Callable[[qemu.Result], None] | None = None) -> int:
    """Run ``cmd`` in a guest over NetKernel; its exit status. VMError when it cannot.

    ``nic="user"``: the baseline guest (no instance, no device, a virtio-net NIC);
    ``files``: guest path -> bytes added for this run (a program under test);
    ``stdout``/``stderr``: where CMD's output goes (default this process's);
    ``on_result``: called with QEMU's :class:`~netkernel.adapters.kvm.qemu.Result`."""
    if nic not in qemu.NICS:
        raise VMError(f"--nic must be one of {', '.join(qemu.NICS)}, got {nic!r}")
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    if not cmd:
        raise VMError("no command given (usage: netkernel vm [options] -- CMD [ARGS...])")
    try:
        started = time.monotonic()
        image = img.build()
        if image.built:
            _say(prog, f"built the guest image {image.key} ({image.kernel.package}"
                       f" {image.kernel.version}) in {time.monotonic() - started:.1f} s:"
                       f" {image.initramfs}")
        chosen, why = qemu.choose_accel(image, accel)
    except (img.ImageError, qemu.QemuError) as exc:
        raise VMError(str(exc)) from None
    label = f"vm:{Path(cmd[0]).name}"[:64]
    told: list[int] = []
    guests: list[qemu.Guest] = []
    if nic != "none":
        return _run_baseline(cmd, image, chosen, why, memory=memory, timeout=timeout,
                             uncompressed=uncompressed, prog=prog, nic=nic, files=files,
                             stdout=out, stderr=err, on_result=on_result)
    with _stop_on_signals(guests, told), host_run._instance(instance, nsm, impl) as (name, _):
        try:
            device = coreengine.attach("tenant", label, name, guest=True)
        except (OSError, coreengine.ControlError) as exc:
            raise VMError(f"cannot attach a device for the guest: {exc}") from None
        with device:
            _say(prog, f"guest vm-{device.id} on instance {name}, accel {chosen} ({why})")

            def booted(seconds: float, cpu: float | None) -> None:
                kernel = "vmlinux" if uncompressed else "vmlinuz"
                used = f", {cpu:.2f} s of QEMU CPU" if cpu is not None else ""
                _say(prog, f"guest vm-{device.id} booted in {seconds:.2f} s"
                           f" ({chosen}, {kernel}{used})")

            def console(line: str) -> None:
                _say(prog, f"[guest vm-{device.id}] {line}")

            if told:
                return 128 + told[0]
            guest = qemu.Guest(image, cmd, accel=chosen, device=device.path, memory=memory,
                               name=f"netkernel-vm-{device.id}", uncompressed=uncompressed,
                               stdout=out, stderr=err, on_console=console, on_boot=booted,
                               files=files)
            guests.append(guest)
            ended = threading.Event()
            watcher = threading.Thread(target=_watch_engine, args=(device, ended, prog),
                                       daemon=True)
            watcher.start()
            try:
                result = guest.wait(timeout)
            finally:
                ended.set()
                watcher.join()
        # the device is detached here (RT-4): its control connection is closed
    if on_result is not None:
        on_result(result)
    return _status(result, told, timeout, prog)


def _status(result: qemu.Result, told: list[int], timeout: float | None, prog: str) -> int:
    if result.agent_ok is False:
        _say(prog, "warning: nk-agent did not start in the guest; the command's sockets"
                   " failed (ENETDOWN)")
    if result.status is not None:
        return result.status
    if told:
        return 128 + told[0]
    tail = "\n".join("    " + line for line in result.console.splitlines()[-15:])
    err = result.qemu_stderr.strip()
    if timeout is not None and result.seconds >= timeout:
        _say(prog, f"the guest did not finish within {timeout:g} s; console:\n{tail}")
        return EXIT_TIMEOUT
    raise VMError(f"the guest ended without the command's exit status"
                  f"{': ' + err if err else ''}; console:\n{tail}")


def _run_baseline(cmd: Sequence[str], image: img.Image, chosen: str, why: str, *,
                  memory: str, timeout: float | None, uncompressed: bool, prog: str,
                  nic: str, files: Mapping[str, bytes] | None, stdout: BinaryIO,
                  stderr: BinaryIO, on_result: Callable[[qemu.Result], None] | None) -> int:
    """``--nic user``: the same image with a NIC and without the NK device."""
    told: list[int] = []
    guests: list[qemu.Guest] = []
    with _stop_on_signals(guests, told):
        _say(prog, f"baseline guest (--nic {nic}: virtio-net, no NK device, no GuestLib),"
                   f" accel {chosen} ({why})")
        if told:
            return 128 + told[0]

        def booted(seconds: float, cpu: float | None) -> None:
            used = f", {cpu:.2f} s of QEMU CPU" if cpu is not None else ""
            _say(prog, f"baseline guest booted in {seconds:.2f} s ({chosen}{used})")

        guest = qemu.Guest(image, cmd, accel=chosen, memory=memory, name="netkernel-vm-nic",
                           uncompressed=uncompressed, stdout=stdout, stderr=stderr,
                           on_console=lambda line: _say(prog, f"[guest] {line}"),
                           on_boot=booted, nic=nic, files=files)
        guests.append(guest)
        result = guest.wait(timeout)
    if result.nic_ok is False:
        _say(prog, "warning: the guest could not configure its NIC (eth0)")
    if on_result is not None:
        on_result(result)
    return _status(result, told, timeout, prog)


def cli_main(argv_cmd: Sequence[str], *, instance: str | None, nsm: str, impl: str,
             memory: str, accel: str, timeout: float | None, compressed: bool,
             nic: str = "none", prog: str = "netkernel vm") -> int:
    cmd = list(argv_cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        return run(cmd, instance=instance, nsm=nsm, impl=impl, memory=memory, accel=accel,
                   timeout=timeout, uncompressed=not compressed, prog=prog, nic=nic)
    except (VMError, qemu.QemuError, host_run.RunError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
