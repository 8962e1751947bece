"""The paper's figures on this machine: direct kernel TCP, kernel NSM and shm NSM side by side.

    python -m bench                       # ~5 min: 3 figures, 3 alternated rounds of 2 s points
    python -m bench --quick               # ~30 s: 1 round of 1 s points, fewer sizes
    python -m bench --only rr --cases direct,shm --out /tmp/rr
    netkernel bench ...                   # the same

One ordinary socket program, ``bench/progs/nkperf.c`` (compiled here with ``cc -O2`` into
``OUT/bin/``), is the server and the client of every measurement. The three cases differ
only in how it runs:

- **direct**: plainly, kernel TCP on loopback;
- **kernel NSM**: both ends under ``python -m netkernel run --instance I`` with ``I``
  started by ``python -m netkernel up --instance I --nsm kernel`` (LD_PRELOAD GuestLib,
  nk-agent, CoreEngine, the kernel NSM's Linux sockets on loopback);
- **shm NSM**: the same with an instance ``--nsm shm`` (spec/shm.md: the two tenants'
  connection is paired in shared memory, no TCP).

Figures (``--only``): ``size``, throughput of one connection against the message size
(64 B .. 8 KB); ``rr``, 64 B request/response rate on one connection; ``conns``, the
throughput of 1, 2, 4, 8 connections together (8 KB messages). Each point of each case
runs ``--rounds`` times, the cases' order rotating from round to round, every point
measured next to its baseline; the median is plotted and each case is divided by direct.

Output (``--out``, default ``bench-out/``): ``results.csv`` (one row per measurement:
figure, case, x, value, unit, round), one PNG per figure, and ``ratios.txt`` (the ratio
table and the issue's goals, also printed). A case that cannot run (no shm NSM yet, say)
is reported as unavailable with the reason; the others go on. Nothing is asserted about
speed: this is never a CI gate (tests/test_bench_paper.py runs it tiny).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

PROG_SRC: Final = Path(__file__).resolve().parent / "progs" / "nkperf.c"
CASES: Final = ("direct", "kernel", "shm")
CASE_LABELS: Final = {"direct": "direct kernel TCP", "kernel": "kernel NSM", "shm": "shm NSM"}
COLORS: Final = {"direct": "#4c72b0", "kernel": "#dd8452", "shm": "#55a868"}
SIZES: Final = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_SIZES: Final = (64, 1024, 8192)
CONNS: Final = (1, 2, 4, 8)
RR_SIZE: Final = 64
CONNS_SIZE: Final = 8192
#: Seconds a server or client may take beyond its measured time (start-up, drain, exit).
SLACK: Final = 60.0


@dataclass(frozen=True)
class FigureSpec:
    key: str  # --only name
    name: str  # results.csv's figure column, the PNG's name
    title: str
    mode: str  # nkperf --mode
    xlabel: str
    unit: str


FIGURES: Final = {
    "size": FigureSpec("size", "throughput_vs_size", "Throughput vs message size (1 connection)",
                       "stream", "message size (bytes)", "MB/s"),
    "rr": FigureSpec("rr", "rr_rate", f"{RR_SIZE} B request/response rate (1 connection)",
                     "rr", "", "round trips/s"),
    "conns": FigureSpec("conns", "throughput_vs_conns",
                        f"Throughput vs concurrent connections ({CONNS_SIZE} B messages)",
                        "stream", "connections", "MB/s"),
}


@dataclass(frozen=True)
class Goal:
    """The issue's goals: ``case`` / direct >= ``ratio`` at point ``x`` of ``figure``."""

    figure: str
    x: int
    case: str
    ratio: float
    what: str


GOALS: Final = (
    Goal("throughput_vs_size", 8192, "shm", 3.0, "shm NSM >= 3x direct throughput at 8 KB"),
    Goal("rr_rate", RR_SIZE, "shm", 5.0, "shm NSM >= 5x direct 64 B request/response rate"),
)


class BenchError(RuntimeError):
    """A measurement or the set-up failed; the message says why."""


# -- the program under test ----------------------------------------------------------------------


def build_program(out: Path) -> Path:
    """``OUT/bin/nkperf``, compiled from bench/progs/nkperf.c unless already up to date."""
    binary = out / "bin" / "nkperf"
    if binary.exists() and binary.stat().st_mtime >= PROG_SRC.stat().st_mtime:
        return binary
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BenchError("no C compiler: nkperf.c is compiled at run time with cc (or $CC);"
                         " install one, e.g. `apt-get install gcc`")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"nkperf.{os.getpid()}.tmp")
    cmd = [*shlex.split(cc), "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(tmp),
           str(PROG_SRC)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} failed:\n{res.stdout}{res.stderr}")
    tmp.replace(binary)
    return binary


# -- the cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    """How nkperf runs for one case: directly, or under ``netkernel run`` on ``instance``."""

    key: str
    instance: str | None = None
    unavailable: str | None = None  # why the case cannot run

    @property
    def label(self) -> str:
        return CASE_LABELS[self.key]

    def via(self) -> Any:
        from tests import programs as pg

        return pg.DIRECT if self.instance is None else pg.under(self.instance)


def _netkernel(*args: str) -> subprocess.CompletedProcess[str]:
    from tests import programs as pg

    return subprocess.run([sys.executable, "-m", "netkernel", *args], capture_output=True,
                          text=True, env=pg.env(), timeout=SLACK)


def start_case(key: str, tag: str) -> Case:
    """The case ``key``; for an NSM, its instance started with ``netkernel up --nsm KEY``
    (or the reason it cannot be, from that command's output)."""
    if key == "direct":
        return Case(key)
    name = f"nkbench-{tag}-{key}"
    try:
        res = _netkernel("up", "--instance", name, "--nsm", key)
    except subprocess.TimeoutExpired:
        return Case(key, unavailable=f"`netkernel up --nsm {key}` did not finish in {SLACK} s")
    if res.returncode != 0:
        # The error line, and the last line of the log tail it quotes (the cause).
        lines = [line.strip() for line in (res.stderr + res.stdout).splitlines()
                 if line.strip()]
        why = next((line for line in lines if "error" in line.lower()),
                   f"exit status {res.returncode}")
        if lines and lines[-1] != why:
            why += f" ... {lines[-1]}"
        return Case(key, unavailable=f"`netkernel up --nsm {key}`: {why[:400]}")
    return Case(key, instance=name)


def stop_case(case: Case) -> None:
    if case.instance is not None:
        from netkernel import instance as inst

        try:
            inst.down(case.instance)
        except inst.InstanceError as exc:
            print(f"bench: stopping {case.instance}: {exc}", file=sys.stderr)


def nsm_bytes(case: Case) -> int:
    """Bytes the case's NSMs moved so far (their Linux sockets); 0 for direct."""
    if case.instance is None:
        return 0
    from tests import programs as pg

    return pg.nsm_bytes(case.instance)


class Pairing:
    """How much of an NSM's payload went through shared memory (SHM-7's per-tenant
    counters), sampled while a measurement runs: the NSM publishes the counters of the
    tenants it maps (``nsm-<ID>.stats.json``, every 0.25 s) and drops a tenant's when it
    detaches, so the last values seen of each tenant are kept."""

    PERIOD: Final = 0.1

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.seen: dict[tuple[int, str], dict[str, int]] = {}
        self.base: dict[tuple[int, str], dict[str, int]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        from netkernel import instance as inst
        from netkernel.reference import shm

        directory = shm.instance_dir(self.instance)
        for f in directory.glob("nsm-*.stats.json"):
            doc = inst.nsm_stats(directory, int(f.name.split("-")[1].split(".")[0]))
            if doc is None:
                continue
            for vm, counters in doc.get("tenants", {}).items():
                self.seen[(int(doc["nsm"]), vm)] = counters

    def _loop(self) -> None:
        while not self._done.wait(self.PERIOD):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                self.sample()

    def __enter__(self) -> Pairing:
        # The NSM keeps the counters of tenants that left: those of earlier runs are
        # the baseline.
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            self.sample()
        self.base = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def share(self) -> float | None:
        """Bytes out through shared memory / all bytes out, or None if nothing was seen."""
        def grown(field: str) -> int:
            total = 0
            for key, c in self.seen.items():
                now, before = c.get(field, 0), self.base.get(key, {}).get(field, 0)
                total += now - before if now >= before else now  # a reused tenant ID
            return total

        shm_out, stack_out = grown("shm_bytes_out"), grown("stack_bytes_out")
        return shm_out / (shm_out + stack_out) if shm_out + stack_out else None


# -- one measurement -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    figure: FigureSpec
    x: int  # message size (size, rr) or connections (conns)

    @property
    def size(self) -> int:
        return CONNS_SIZE if self.figure.key == "conns" else self.x

    @property
    def conns(self) -> int:
        return self.x if self.figure.key == "conns" else 1

    def describe(self) -> str:
        if self.figure.key == "conns":
            return f"{self.x} conn x {CONNS_SIZE} B"
        return f"{self.x} B"


def measure(binary: Path, case: Case, point: Point, seconds: float) -> float:
    """One run of nkperf's server and client as ``case`` says; the figure in its unit."""
    from tests import programs as pg

    via = case.via()
    port = pg.free_port()
    common = ["--port", str(port), "--mode", point.figure.mode, "--size", str(point.size),
              "--conns", str(point.conns)]
    before = nsm_bytes(case)
    pairing = Pairing(case.instance) if case.key == "shm" and case.instance else None
    with pg.workdir("nkbench-") as tmp, pairing or contextlib.nullcontext():
        log = tmp / "server.log"
        server = pg.Server([str(binary), "server", *common], via, log=log,
                           ready=lambda: '"ready"' in _text(log), timeout=SLACK)
        try:
            with server:
                try:
                    res = pg.run([str(binary), "client", *common, "--seconds", f"{seconds:g}"],
                                 via, timeout=seconds + SLACK)
                except AssertionError as exc:  # pg.run's timeout
                    raise BenchError(str(exc).splitlines()[0]) from None
                if res.returncode != 0:
                    raise BenchError(f"client exited with {res.returncode}: "
                                     f"{_tail(res.stderr + res.stdout)}")
                assert server.proc is not None
                try:
                    server.proc.wait(SLACK)
                except subprocess.TimeoutExpired:
                    raise BenchError(f"server still running {SLACK:g} s after the client"
                                     f" ended: {_tail(server.output())}") from None
        except AssertionError as exc:  # pg.Server: exited or not ready
            raise BenchError(str(exc).splitlines()[0]) from None
        try:
            client = pg.last_json(res.stdout)
            srv = pg.last_json(server.output())
        except AssertionError as exc:  # no JSON line
            raise BenchError(str(exc).splitlines()[0]) from None
    if "error" in srv:
        raise BenchError(f"server: {srv['error']}")
    # Every byte sent arrived; in rr, every request was answered.
    if srv["bytes"] != client["bytes"] or (point.figure.mode == "rr"
                                           and srv["count"] != client["count"]):
        raise BenchError(f"client counted {client['bytes']} B / {client['count']},"
                         f" server {srv['bytes']} B / {srv['count']}")
    if case.key == "kernel" and nsm_bytes(case) - before < client["bytes"]:
        raise BenchError(f"the kernel NSM moved {nsm_bytes(case) - before} B of the"
                         f" {client['bytes']} B: the traffic did not go through NetKernel")
    # The shm NSM must have carried the connection in shared memory (SHM-2), not TCP.
    share = pairing.share() if pairing is not None else None
    if share is not None and share < 0.5:
        raise BenchError(f"only {100 * share:.0f}% of the bytes went through shared memory:"
                         " the connection was not paired (spec/shm.md SHM-2)")
    if point.figure.mode == "rr":
        return float(client["count"]) / float(client["seconds"])
    return float(client["bytes"]) / float(client["seconds"]) / 1e6


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:])[:400] or "(no output)"


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Results:
    """Every sample: ``samples[(figure name, case, x)]`` is the list over rounds."""

    samples: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[tuple[str, str, int], str] = field(default_factory=dict)

    def add(self, point: Point, case: str, rnd: int, value: float) -> None:
        self.samples.setdefault((point.figure.name, case, point.x), []).append(value)
        self.rows.append({"figure": point.figure.name, "case": case, "x": point.x,
                          "value": f"{value:.6g}", "unit": point.figure.unit,
                          "round": rnd + 1})

    def median(self, figure: str, case: str, x: int) -> float | None:
        got = self.samples.get((figure, case, x))
        return statistics.median(got) if got else None


@dataclass(frozen=True)
class Step:
    rnd: int
    point: Point
    case: Case


def plan(points: Sequence[Point], cases: Sequence[Case], rounds: int) -> list[Step]:
    """Every measurement in order: round by round, point by point, the cases of a point
    one after the other, their order rotating from round to round."""
    steps: list[Step] = []
    for rnd in range(rounds if cases else 0):
        k = rnd % len(cases)
        order = [*cases[k:], *cases[:k]]
        steps += [Step(rnd, p, c) for p in points for c in order]
    return steps


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60}:{s % 60:02d}"


def run_steps(steps: Sequence[Step], binary: Path, seconds: float, rounds: int,
              say: Callable[[str], None]) -> Results:
    """Measure every step; a progress line each (step counter, elapsed, ETA)."""
    results = Results()
    started = time.monotonic()
    width = len(str(len(steps)))
    for i, step in enumerate(steps, 1):
        p, c = step.point, step.case
        key = (p.figure.name, c.key, p.x)
        what = (f"{p.figure.name:<19} {c.label:<17} {p.describe():<16}"
                f" round {step.rnd + 1}/{rounds}")
        if key in results.errors:
            outcome = "skipped (failed before)"
        else:
            try:
                value = measure(binary, c, p, seconds)
            except BenchError as exc:
                results.errors[key] = str(exc)
                outcome = f"FAILED: {exc}"
            else:
                results.add(p, c.key, step.rnd, value)
                outcome = f"{value:>12,.1f} {p.figure.unit}"
        elapsed = time.monotonic() - started
        eta = elapsed / i * (len(steps) - i)
        say(f"[{i:>{width}}/{len(steps)} {_clock(elapsed)} ETA {_clock(eta)}] {what}  {outcome}")
    return results


# -- the report ----------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def ratio_table(results: Results, points: Sequence[Point], cases: Sequence[Case]) -> list[str]:
    """Medians of every point and each case / direct, from the same run."""
    others = [c for c in cases if c.key != "direct"]
    head = (f"{'figure':<19} {'point':<16} {'unit':<14}"
            + "".join(f"{c.label:>19}" for c in cases)
            + "".join(f"{c.label + '/direct':>20}" for c in others))
    lines = [head]
    for p in points:
        d = results.median(p.figure.name, "direct", p.x)
        row = f"{p.figure.name:<19} {p.describe():<16} {p.figure.unit:<14}"
        for c in cases:
            row += f"{_fmt(results.median(p.figure.name, c.key, p.x)):>19}"
        for c in others:
            v = results.median(p.figure.name, c.key, p.x)
            row += f"{(f'{v / d:.2f}x' if v is not None and d else '-'):>20}"
        lines.append(row)
    return lines


def goal_lines(results: Results, cases: Sequence[Case]) -> list[str]:
    by_key = {c.key: c for c in cases}
    lines = []
    for g in GOALS:
        d = results.median(g.figure, "direct", g.x)
        v = results.median(g.figure, g.case, g.x)
        case = by_key.get(g.case)
        if case is not None and case.unavailable:
            verdict = f"not measured: {case.label} unavailable (the reason is above)"
        elif v is None or not d:
            err = results.errors.get((g.figure, g.case, g.x)) or results.errors.get(
                (g.figure, "direct", g.x))
            verdict = f"not measured{': ' + err if err else ' (not in this run)'}"
        else:
            verdict = f"{v / d:.2f}x: {'met' if v / d >= g.ratio else 'MISSED'}"
        lines.append(f"goal: {g.what}: {verdict}")
    return lines


def write_csv(path: Path, results: Results) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["figure", "case", "x", "value", "unit", "round"])
        w.writeheader()
        w.writerows(results.rows)


def plot(out: Path, results: Results, points: Sequence[Point], cases: Sequence[Case],
         subtitle: str) -> list[Path]:
    """One PNG per figure measured: medians, with the rounds' spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for spec in FIGURES.values():
        xs = [p.x for p in points if p.figure is spec]
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        missing = []
        for n, c in enumerate(cases):
            if c.unavailable:
                missing.append(f"{c.label}: unavailable ({c.unavailable[:100]})")
                if spec.key == "rr":
                    ax.annotate("unavailable", (n, 0), ha="center", va="bottom",
                                xytext=(0, 6), textcoords="offset points", color="#a00")
                continue
            got = [(x, s) for x in xs if (s := results.samples.get((spec.name, c.key, x)))]
            if not got:
                missing.append(f"{c.label}: no result")
                continue
            med = [statistics.median(s) for _, s in got]
            err = [[m - min(s) for m, (_, s) in zip(med, got, strict=True)],
                   [max(s) - m for m, (_, s) in zip(med, got, strict=True)]]
            if spec.key == "rr":
                ax.bar([n], med, yerr=err, color=COLORS[c.key], label=c.label, capsize=4)
                ax.annotate(f"{med[0]:,.0f}", (n, med[0]), ha="center", va="bottom",
                            xytext=(0, 6), textcoords="offset points")
            else:
                ax.errorbar([x for x, _ in got], med, yerr=err, marker="o", capsize=3,
                            color=COLORS[c.key], label=c.label)
        if spec.key == "rr":
            ax.set_xticks(range(len(cases)), [c.label for c in cases])
            ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the values above the bars
        else:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x // 1024}K" if x >= 1024 else str(x) for x in xs]
                          if spec.key == "size" else [str(x) for x in xs])
            ax.set_xlabel(spec.xlabel)
            ax.set_ylim(bottom=0)
        ax.set_ylabel(spec.unit)
        ax.set_title(f"{spec.title}\n{subtitle}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9)
        if missing:
            fig.text(0.01, 0.01, "; ".join(missing), fontsize=7, color="#a00")
        fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
        path = out / f"{spec.name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# -- the command line ----------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of positive integers")
    return values


def _cases(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in CASES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(CASES)}")
    return [c for c in CASES if c in values]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench`` and ``netkernel bench`` (netkernel/cli.py)."""
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="output folder: results.csv, *.png, ratios.txt, bin/nkperf"
                        " (default bench-out/)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 1 s points, 1 round, sizes 64, 1K, 8K")
    p.add_argument("--only", action="append", choices=list(FIGURES), metavar="FIGURE",
                   help="measure only this figure (repeatable): size, rr, conns")
    p.add_argument("--cases", type=_cases, default=list(CASES),
                   help="comma-separated cases among direct,kernel,shm (default all three)")
    p.add_argument("--seconds", type=float, help="seconds per point (default 2, quick 1)")
    p.add_argument("--rounds", type=int,
                   help="rounds, the cases' order rotating; medians (default 3, quick 1)")
    p.add_argument("--sizes", type=_ints, help="message sizes of the size figure, bytes"
                   " (default 64,128,...,8192)")
    p.add_argument("--conns", type=_ints, help="connection counts of the conns figure"
                   " (default 1,2,4,8)")


def run(args: argparse.Namespace, prog: str = "python -m bench") -> int:
    """Measure, then write results.csv, the PNGs and ratios.txt into ``args.out``."""
    seconds = args.seconds or (1.0 if args.quick else 2.0)
    rounds = args.rounds or (1 if args.quick else 3)
    if seconds <= 0 or rounds < 1:
        print(f"{prog}: error: --seconds and --rounds must be positive", file=sys.stderr)
        return 2
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    conns = args.conns or CONNS
    chosen = args.only or list(FIGURES)
    points = [Point(FIGURES[k], x) for k in FIGURES if k in chosen
              for x in {"size": sizes, "rr": [RR_SIZE], "conns": conns}[k]]
    if "direct" not in args.cases:
        print(f"{prog}: note: without the direct case there are no ratios", file=sys.stderr)
    out: Path = args.out

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        import matplotlib  # noqa: F401  (checked before minutes of measuring)
    except ImportError:
        print(f"{prog}: error: matplotlib is needed for the plots:"
              " pip install -e '.[bench]' (or pip install matplotlib)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    try:
        binary = build_program(out)
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    tag = uuid.uuid4().hex[:8]
    cases: list[Case] = []
    started = time.monotonic()
    try:
        for key in args.cases:
            case = start_case(key, tag)
            cases.append(case)
            say(f"{prog}: {case.label}: " + (f"UNAVAILABLE: {case.unavailable}"
                                              if case.unavailable else
                                              f"instance {case.instance}" if case.instance
                                              else "plain kernel sockets"))
        live = [c for c in cases if not c.unavailable]
        steps = plan(points, live, rounds)
        say(f"{prog}: {len(steps)} measurements ({len(points)} points x {len(live)} cases x"
            f" {rounds} round(s)) of {seconds:g} s, ~{_clock(len(steps) * (seconds + 0.8))};"
            f" program {binary}")
        results = run_steps(steps, binary, seconds, rounds, say)
    except KeyboardInterrupt:
        say(f"{prog}: interrupted")
        return 130
    finally:
        for case in cases:
            stop_case(case)
    subtitle = (f"{platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')};"
                f" median of {rounds} round(s) of {seconds:g} s")
    write_csv(out / "results.csv", results)
    pngs = plot(out, results, points, cases, subtitle)
    # The command as typed: `python -m bench ARGS` or `netkernel bench ARGS`.
    argv = sys.argv[1:] if prog.startswith("python") else sys.argv[2:]
    report = [f"# {prog} {shlex.join(argv)}".rstrip(), f"# {subtitle}",
              *(f"# {c.label}: unavailable: {c.unavailable}" for c in cases if c.unavailable),
              *ratio_table(results, points, cases), "", *goal_lines(results, cases)]
    if results.errors:
        report += ["", "failed:"] + [f"  {f} {c} {x}: {e}" for (f, c, x), e in
                                     results.errors.items()]
    (out / "ratios.txt").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"({_clock(time.monotonic() - started)}; wrote {out / 'results.csv'}, "
          + ", ".join(str(p) for p in pngs) + f", {out / 'ratios.txt'})")
    return 1 if results.errors and not results.rows else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
