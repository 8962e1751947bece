"""``python -m bench`` end to end at a tiny size: CSV rows, PNGs, the ratio table.

It runs nkperf (bench/progs/nkperf.c, compiled by the run) directly and under
``netkernel run`` on instances it starts itself. No speed is asserted: the
benchmark is never a CI gate; only that every figure was measured, written and
divided as the report says.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from netkernel.reference import shm

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.programs  # a real program under `netkernel run`, ~15 s


def test_bench_quick_writes_csv_pngs_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "size",
                          "--only", "rr", "--sizes", "64,8192", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    shm_missing = "shm NSM: UNAVAILABLE" in run.stderr
    cases = ["direct", "kernel"] + ([] if shm_missing else ["shm"])

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["figure", "case", "x", "value", "unit", "round"]
    got = {(r["figure"], r["case"], int(r["x"])): r for r in rows}
    want = {(fig, case, x) for fig, x in (("throughput_vs_size", 64),
                                          ("throughput_vs_size", 8192), ("rr_rate", 64))
            for case in cases}
    assert set(got) == want, (sorted(got), run.stderr)  # no conns figure, nothing twice
    assert len(rows) == len(want)
    for r in rows:
        assert float(r["value"]) > 0, r
        assert r["round"] == "1"
        assert r["unit"] == ("round trips/s" if r["figure"] == "rr_rate" else "MB/s")

    for name in ("throughput_vs_size", "rr_rate"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "throughput_vs_conns.png").exists()
    assert (out / "bin" / "nkperf").exists()

    # The ratio printed for each case is its value over direct's, from the same run.
    line = next(x for x in run.stdout.splitlines() if x.startswith("rr_rate"))
    ratios = [float(v) for v in re.findall(r"([\d.]+)x", line)]
    direct = float(got[("rr_rate", "direct", 64)]["value"])
    for case, ratio in zip(cases[1:], ratios, strict=False):
        expect = float(got[("rr_rate", case, 64)]["value"]) / direct
        assert abs(ratio - expect) <= 0.005 + 0.01 * expect, (case, line)
    assert len(ratios) == len(cases) - 1, line
    assert (out / "ratios.txt").read_text().strip() in run.stdout
    goals = [x for x in run.stdout.splitlines() if x.startswith("goal: ")]
    assert len(goals) == 2, run.stdout
    if shm_missing:
        assert all("unavailable" in g for g in goals), goals
    else:
        assert all(g.endswith(("met", "MISSED")) for g in goals), goals

    # Its instances are gone.
    names = re.findall(r"instance (nkbench-\w+-\w+)", run.stderr)
    assert names, run.stderr
    for name in names:
        assert not shm.instance_dir(name).exists(), name
