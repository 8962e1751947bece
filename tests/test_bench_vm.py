"""bench/vm.py end to end, tiny (``--quick``): two real guests, the structure of the output.

Nothing about speed is asserted (house rule: speed is measured, never asserted); the test
checks that both cases ran both tests in guests, that every figure is there and finite,
and that the ratios and the accelerator are printed and written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netkernel.adapters.kvm import image, qemu

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def guest_image() -> image.Image:
    if shutil.which(qemu.QEMU) is None:
        pytest.skip("qemu-system-x86 is not installed (apt-get install qemu-system-x86)")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for bench/progs/nkperf.c")
    try:
        return image.build()
    except image.Unavailable as exc:
        pytest.skip(f"the guest image cannot be built on this machine: {exc}")


def test_the_vm_bench_runs_both_cases_in_guests_and_prints_ratios(
        guest_image: image.Image, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.vm", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    accel = re.search(r"^accel: (kvm|tcg) \(", out, re.M)
    assert accel, out
    # progress: one line per guest, the two cases of the round
    progress = re.findall(r"^\[(\d)/2 \d+ s\] round 1 (netkernel|virtio): rr [\d.]+ rt/s .*"
                          r"stream [\d.]+ MB/s .* booted in \d+\.\d+ s$", out, re.M)
    assert sorted(case for _n, case in progress) == ["netkernel", "virtio"], out
    for mode, size in (("rr", 64), ("stream", 8192)):
        assert re.search(rf"^ratio netkernel/virtio, {size} B {mode}: \d+\.\d\dx$", out,
                         re.M), out
    # the baseline guest said it has no NK device; the NetKernel guest was attached one
    assert "baseline guest (--nic user" in done.stderr
    assert re.search(r"bench\.vm netkernel: guest vm-\d+ on instance", done.stderr)

    doc = json.loads((tmp_path / "vm.json").read_text())
    assert doc["accel"] == accel.group(1) and doc["rounds"] == 1
    got = {(r["test"], r["case"]) for r in doc["results"]}
    assert got == {(m, c) for m in ("rr", "stream") for c in ("netkernel", "virtio")}
    for row in doc["results"]:
        for key in ("rate", "guest_cpu_us_per_op", "nkperf_cpu_us_per_op"):
            assert math.isfinite(row[key]) and row[key] >= 0, row
        assert row["rate"] > 0, row
    assert set(doc["ratios"]) == {"rr", "stream"}
    assert set(doc["boot_seconds"]) == {"netkernel", "virtio"}
