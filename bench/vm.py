"""Issue 8's benchmark: from inside a guest, NetKernel's NK device against a virtio-net NIC.

    python -m bench.vm                  # 3 alternated rounds of 2 s points (~2 min under TCG)
    python -m bench.vm --quick          # 1 round of 0.5 s points (~30 s)
    python -m bench.vm --accel tcg --rounds 5 --seconds 3 --out bench-out/vm

One ordinary socket program, ``bench/progs/nkperf.c`` (compiled on the host, dynamically
linked, handed to the guest in its run archive as ``/nk/bin/nkperf``), is the client in
the guest; its server runs on the host, directly on the host's loopback (kernel TCP, not
NetKernel). The same image under the same accelerator runs it two ways:

- **netkernel**: ``netkernel vm`` (``-nic none``): the guest has no NIC, only its NK
  device; nkperf runs with the GuestLib and connects to 127.0.0.1, which the instance's
  kernel NSM reaches on the host (the NSM's byte counters must grow by what was sent);
- **virtio**: ``netkernel vm --nic user``: the guest has a virtio-net NIC on QEMU's
  user-mode network and no NK device; nkperf runs on the guest's own kernel stack and
  connects to 10.0.2.2, QEMU's alias of the host's loopback (the paper's "current
  architecture" baseline).

Each guest runs, one after the other: 64 B request/response (``--mode rr``, one
connection) and 8 KB bulk (``--mode stream``, one connection), each for ``--seconds``,
reading the guest's ``/proc/stat`` around each, so that the guest CPU time per request
(per 8 KB message) is the guest's busy CPU over the run divided by the count: the agent's
polling in the netkernel case counts. nkperf's own process CPU is reported beside it.
The cases alternate from round to round; the medians and the netkernel/virtio ratios of
the one run are printed with the accelerator, and written to ``OUT/vm.json``. Nothing is
asserted about speed (tests/test_bench_vm.py runs ``--quick`` and checks the structure).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import paper

CASES: Final = ("netkernel", "virtio")
LABELS: Final = {"netkernel": "NetKernel (NK device, -nic none)",
                 "virtio": "virtio-net (-nic user)"}
HOSTS: Final = {"netkernel": "127.0.0.1", "virtio": "10.0.2.2"}
TESTS: Final = (("rr", 64), ("stream", 8192))
GUEST_PROG: Final = "/nk/bin/nkperf"
USER_HZ: Final = 100  # the guest kernel's /proc/stat unit (USER_HZ, 100 on x86-64)
STAT_MARK: Final = "@stat "


class BenchError(RuntimeError):
    """A measurement failed; the message says why."""


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Sample:
    case: str
    mode: str
    rate: float  # round trips/s (rr) or MB/s (stream)
    count: int  # round trips or messages
    guest_cpu_s: float  # the guest's busy CPU seconds over the run (/proc/stat)
    prog_cpu_s: float  # nkperf's own CPU seconds (getrusage in the guest)

    @property
    def cpu_per_op_us(self) -> float:
        return 1e6 * self.guest_cpu_s / self.count if self.count else float("nan")

    @property
    def prog_cpu_per_op_us(self) -> float:
        return 1e6 * self.prog_cpu_s / self.count if self.count else float("nan")


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    boots: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def of(self, case: str, mode: str) -> list[Sample]:
        return [s for s in self.samples if s.case == case and s.mode == mode]

    def median(self, case: str, mode: str, what: str) -> float | None:
        got = [float(getattr(s, what)) for s in self.of(case, mode)]
        return statistics.median(got) if got else None


@contextlib.contextmanager
def host_server(binary: Path, mode: str, size: int) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """nkperf's server on the host's loopback, directly (kernel TCP); its port."""
    proc = subprocess.Popen([str(binary), "server", "--port", "0", "--mode", mode, "--size",
                             str(size), "--conns", "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise BenchError(f"nkperf server did not start (exit {proc.poll()})")
        yield int(ready["port"]), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def guest_script(case: str, ports: dict[str, int], seconds: float) -> str:
    """The guest's command: each test between two snapshots of the CPU line of /proc/stat."""
    lines = [f"echo {STAT_MARK}$(head -n 1 /proc/stat)"]
    for mode, size in TESTS:
        lines.append(f"{GUEST_PROG} client --host {HOSTS[case]} --port {ports[mode]}"
                     f" --mode {mode} --size {size} --conns 1 --seconds {seconds:g} || exit $?")
        lines.append(f"echo {STAT_MARK}$(head -n 1 /proc/stat)")
    return "\n".join(lines)


def busy_ticks(line: str) -> int:
    """Busy USER_HZ ticks of a ``cpu`` line of /proc/stat: all but idle and iowait."""
    fields = [int(x) for x in line.split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]


def parse_guest(case: str, out: str) -> list[tuple[dict[str, Any], float]]:
    """Per test: nkperf's JSON report and the guest's busy CPU seconds over it."""
    stats = [busy_ticks(line[len(STAT_MARK):]) for line in out.splitlines()
             if line.startswith(STAT_MARK)]
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if len(reports) != len(TESTS) or len(stats) != len(TESTS) + 1:
        raise BenchError(f"{case}: the guest's output is incomplete: {out[-400:]!r}")
    return [(r, (stats[i + 1] - stats[i]) / USER_HZ) for i, r in enumerate(reports)]


def nsm_bytes(instance: str) -> int:
    from tests import programs as pg

    return pg.nsm_bytes(instance)


def run_guest(case: str, binary: Path, seconds: float, accel: str, instance: str,
              results: Results) -> list[Sample]:
    """One guest of ``case`` running both tests against fresh host servers."""
    from netkernel.adapters.kvm import qemu
    from netkernel.adapters.kvm import vm as kvm_vm

    with contextlib.ExitStack() as stack:
        servers = {mode: stack.enter_context(host_server(binary, mode, size))
                   for mode, size in TESTS}
        ports = {mode: port for mode, (port, _) in servers.items()}
        before = nsm_bytes(instance)
        out, err = io.BytesIO(), io.BytesIO()
        got: list[qemu.Result] = []
        try:
            status = kvm_vm.run(
                ["sh", "-c", guest_script(case, ports, seconds)], instance=instance,
                accel=accel, timeout=seconds * len(TESTS) + paper.SLACK * 3,
                nic="user" if case == "virtio" else "none",
                files={GUEST_PROG: binary.read_bytes()}, stdout=out, stderr=err,
                prog=f"bench.vm {case}", on_result=got.append)
        except kvm_vm.VMError as exc:
            raise BenchError(f"{case}: {exc}") from None
        text = out.getvalue().decode(errors="replace")
        if status != 0:
            raise BenchError(f"{case}: the guest's command exited {status}:"
                             f" {(text + err.getvalue().decode(errors='replace'))[-600:]}")
        if got and got[0].boot_seconds is not None:
            results.boots.setdefault(case, []).append(got[0].boot_seconds)
        reports = parse_guest(case, text)
        samples = []
        sent = 0
        for (mode, _size), (client, cpu) in zip(TESTS, reports, strict=True):
            proc = servers[mode][1]
            assert proc.stdout is not None
            try:
                server = json.loads(proc.stdout.read().strip().splitlines()[-1])
                proc.wait(paper.SLACK)
            except (ValueError, IndexError, subprocess.TimeoutExpired):
                raise BenchError(f"{case} {mode}: the host server gave no report") from None
            if server.get("bytes") != client["bytes"] or (
                    mode == "rr" and server.get("count") != client["count"]):
                raise BenchError(f"{case} {mode}: client counted {client['bytes']} B /"
                                 f" {client['count']}, server {server}")
            sent += int(client["bytes"])
            rate = (client["count"] / client["seconds"] if mode == "rr"
                    else client["bytes"] / client["seconds"] / 1e6)
            samples.append(Sample(case, mode, rate, int(client["count"]), cpu,
                                  float(client["cpu_user"]) + float(client["cpu_sys"])))
        if case == "netkernel" and nsm_bytes(instance) - before < sent:
            raise BenchError(f"the NSM moved {nsm_bytes(instance) - before} B of the {sent} B"
                             " the guest sent: the traffic did not go through NetKernel")
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vm", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per test")
    ap.add_argument("--quick", action="store_true", help="1 round of 0.5 s tests")
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--out", type=Path, default=Path("bench-out") / "vm")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 0.5

    from netkernel import instance as inst
    from netkernel.adapters.kvm import image as img
    from netkernel.adapters.kvm import qemu

    binary = paper.build_program(args.out)
    try:
        image = img.build()
        accel, why = qemu.choose_accel(image, args.accel)
    except (img.ImageError, qemu.QemuError) as exc:
        print(f"bench.vm: error: {exc}", file=sys.stderr)
        return 2
    say(f"accel: {accel} ({why})")
    say(f"image: {image.key} ({image.kernel.package} {image.kernel.version})")
    name = f"nkvmbench-{uuid.uuid4().hex[:6]}"
    inst.up(name, nsm="kernel")
    results = Results()
    steps = [(rnd, CASES[(i + rnd) % len(CASES)]) for rnd in range(args.rounds)
             for i in range(len(CASES))]
    started = time.monotonic()
    try:
        for n, (rnd, case) in enumerate(steps, 1):
            t0 = time.monotonic()
            try:
                samples = run_guest(case, binary, args.seconds, accel, name, results)
            except BenchError as exc:  # said, kept, and the other runs go on
                results.failures.append(f"round {rnd + 1} {case}: {exc}")
                say(f"[{n}/{len(steps)} {time.monotonic() - started:.0f} s] round {rnd + 1}"
                    f" {case}: FAILED: {exc}")
                continue
            results.samples += samples
            figures = ", ".join(
                f"{s.mode} {s.rate:.1f} {'rt/s' if s.mode == 'rr' else 'MB/s'}"
                f" ({s.cpu_per_op_us:.0f} us guest CPU/op)" for s in samples)
            say(f"[{n}/{len(steps)} {time.monotonic() - started:.0f} s] round {rnd + 1}"
                f" {case}: {figures}; guest {time.monotonic() - t0:.1f} s, booted in"
                f" {results.boots.get(case, [float('nan')])[-1]:.2f} s")
    finally:
        with contextlib.suppress(inst.InstanceError):
            inst.down(name)
    report(results, accel, args)
    if results.failures:
        say(f"{len(results.failures)} of {len(steps)} guest runs failed:")
        for failure in results.failures:
            say(f"  {failure}")
        return 1
    return 0


def report(results: Results, accel: str, args: argparse.Namespace) -> None:
    rows = []
    say("")
    say(f"medians of {args.rounds} round(s), {args.seconds:g} s per test, accel {accel}:")
    say(f"{'test':<22}{'case':<34}{'rate':>14}{'(min-max)':>16}{'guest CPU/op':>15}"
        f"{'nkperf CPU/op':>15}")
    doc: dict[str, Any] = {"accel": accel, "rounds": args.rounds, "seconds": args.seconds,
                           "results": rows, "ratios": {}, "boot_seconds": {},
                           "failures": results.failures}
    for mode, size in TESTS:
        test = f"{size} B {'request/response' if mode == 'rr' else 'bulk'}"
        unit = "rt/s" if mode == "rr" else "MB/s"
        for case in CASES:
            rate = results.median(case, mode, "rate")
            cpu = results.median(case, mode, "cpu_per_op_us")
            prog = results.median(case, mode, "prog_cpu_per_op_us")
            if rate is None or cpu is None or prog is None:
                continue
            rates = [x.rate for x in results.of(case, mode)]
            rows.append({"test": mode, "size": size, "case": case, "rate": rate, "unit": unit,
                         "rates": rates, "guest_cpu_us_per_op": cpu,
                         "nkperf_cpu_us_per_op": prog})
            spread = f"({min(rates):.1f}-{max(rates):.1f})"
            say(f"{test:<22}{LABELS[case]:<34}{rate:>9.1f} {unit:<4}{spread:>16}{cpu:>12.1f} us"
                f"{prog:>12.1f} us")
        nk, base = results.median("netkernel", mode, "rate"), results.median("virtio", mode,
                                                                             "rate")
        if nk and base:
            doc["ratios"][mode] = nk / base
    say("")
    for mode, size in TESTS:
        if mode in doc["ratios"]:
            say(f"ratio netkernel/virtio, {size} B {mode}: {doc['ratios'][mode]:.2f}x")
    for case in CASES:
        boots = results.boots.get(case, [])
        if boots:
            doc["boot_seconds"][case] = statistics.median(boots)
            say(f"boot ({case}): median {statistics.median(boots):.2f} s of {len(boots)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vm.json").write_text(json.dumps(doc, indent=1) + "\n")
    say(f"written: {args.out / 'vm.json'}")


if __name__ == "__main__":
    sys.exit(main())
