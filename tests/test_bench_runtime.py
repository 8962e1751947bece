"""Smoke test of ``bench/runtime.py`` at a tiny size: it runs and prints its table.

No speed is asserted: the benchmark is never a CI gate.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "runtime.py"


def test_bench_runtime_runs_and_prints_ratios() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--seconds", "0.3"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    name = re.search(r"embedded instance '([\w.-]+)'", run.stdout)
    assert name, run.stdout
    for row in ("bulk 8192 B, sendall()", "bulk 8192 B, send()", "request/response 64 B"):
        line = next(line for line in run.stdout.splitlines() if line.startswith(row))
        direct, nk, ratio = (float(x.replace(",", "")) for x in
                             re.findall(r"[\d,]+\.\d+", line)[:3])
        assert direct > 0 and nk > 0, line
        assert abs(ratio - nk / direct) <= 0.0005 + 0.05 * ratio, line  # the printed ratio
    from netkernel.reference import shm

    assert not shm.instance_dir(name.group(1)).exists()  # the embedded instance is gone
