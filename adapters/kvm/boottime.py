"""Boot times of the guest image: ``python -m netkernel.adapters.kvm.boottime [-n N]``.

Boots the cached image N times with each kernel (the uncompressed ``vmlinux`` and the
``vmlinuz`` bzImage), running ``true``, no NK device, and prints per boot the wall time
from QEMU's start to init's first marker and the CPU seconds QEMU had used by then. Under
TCG a boot is bound by one CPU, so the CPU seconds are what the boot takes on an idle
machine; the wall time is what it took here, with the load average printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from netkernel.adapters.kvm import image as img
from netkernel.adapters.kvm import qemu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netkernel.adapters.kvm.boottime",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=5, help="boots per kernel (default 5)")
    parser.add_argument("--accel", default="tcg", choices=list(qemu.ACCELS))
    args = parser.parse_args(argv)
    image = img.build()
    accel, why = qemu.choose_accel(image, args.accel)
    print(f"accel {accel} ({why}); kernel {image.kernel.package} {image.kernel.version};"
          f" initramfs {image.initramfs.stat().st_size / 1e6:.1f} MB")
    for uncompressed in (True, False):
        name = "vmlinux" if uncompressed else "vmlinuz"
        walls: list[float] = []
        cpus: list[float] = []
        for _ in range(args.n):
            load = os.getloadavg()[0]
            result = qemu.run(image, ["true"], accel=accel, uncompressed=uncompressed,
                              timeout=300)
            if result.boot_seconds is None:
                print(f"{name}: no boot\n{result.console[-2000:]}\n{result.qemu_stderr}",
                      file=sys.stderr)
                return 1
            walls.append(result.boot_seconds)
            cpus.append(result.boot_cpu_seconds or float("nan"))
            print(f"{name}: booted in {result.boot_seconds:.2f} s wall,"
                  f" {result.boot_cpu_seconds:.2f} s QEMU CPU (load average {load:.1f})",
                  flush=True)
        print(f"{name}: median {statistics.median(walls):.2f} s wall,"
              f" {statistics.median(cpus):.2f} s QEMU CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
