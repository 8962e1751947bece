"""Real programs with and without NetKernel, side by side (issue 5's closing figures).

    python -m bench.programs                  # every program, 3 rounds (~4 min)
    python -m bench.programs --quick          # 1 round, shorter runs (~1 min)
    python -m bench.programs --only nginx-wrk --rounds 5 --json

Each benchmark runs the same server and client twice per round: both *direct*
(plain kernel sockets on loopback) and both under ``python -m netkernel run
--instance NAME`` (*netkernel*: the preloaded GuestLib, nk-agent, CoreEngine, and the
NSM ``--nsm`` names: ``auto``, the default, pairs the two ends in shared memory;
``kernel`` uses the same loopback TCP). The order alternates from round to round; the median of the
rounds is printed with the ratio netkernel / direct. The figures are the programs'
own (wrk's requests/s, iperf3's bits/s, sockperf's latency ...). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests import programs as pg
from tests.live import own_instance
from tests.programs import DIRECT, Via

BIG: Final = 10 << 20


@dataclass(frozen=True)
class Options:
    seconds: int
    quick: bool


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Bench:
    name: str
    binaries: tuple[str, ...]
    figures: tuple[Figure, ...]
    measure: Callable[[Via, Path, Options], dict[str, float]]


def _site(tmp: Path) -> Path:
    root = tmp / "www"
    root.mkdir(exist_ok=True)
    (root / "index.html").write_bytes(b"<html><body>" + b"x" * 500 + b"</body></html>\n")
    big = root / "big.bin"
    if not big.exists():
        with open(big, "wb") as f:
            f.write(bytes(range(256)) * (BIG // 256))
    return root


def _curl_loop(url: str, count: int, via: Via) -> dict[str, float]:
    """One curl process fetching ``url`` ``count`` times over one keep-alive connection."""
    start = time.monotonic()
    res = pg.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{http_code}\\n",
                  f"{url}?[1-{count}]"], via, timeout=300).ok()
    seconds = time.monotonic() - start
    codes = res.stdout.split()
    assert codes == ["200"] * count, res
    return {"rps": count / seconds}


def http_server_curl(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    port = pg.free_port()
    with pg.tcp_server(pg.http_server(port, _site(tmp)), via, port, tmp / "http.log"):
        return _curl_loop(f"http://127.0.0.1:{port}/index.html", 200 if opt.quick else 1000,
                          via)


def _nginx(via: Via, tmp: Path) -> tuple[pg.Server, int]:
    prefix = tmp / f"nginx-{time.monotonic_ns()}"
    prefix.mkdir()
    port = pg.free_port()
    cmd = pg.nginx_conf(prefix, port, _site(tmp))
    return pg.tcp_server(cmd, via, port, prefix / "console.log"), port


def nginx_wrk(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    srv, port = _nginx(via, tmp)
    with srv:
        res = pg.run(["wrk", "-t2", "-c16", f"-d{opt.seconds}s",
                      f"http://127.0.0.1:{port}/index.html"], via, timeout=opt.seconds + 60)
    report = pg.wrk_report(res.ok().stdout)
    errors = sum(report[k] for k in ("non_2xx", "connect", "read", "write", "timeout"))
    return {"rps": report["rps"], "errors": errors}


def nginx_curl_10mb(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    srv, port = _nginx(via, tmp)
    total_bytes = total_seconds = 0.0
    with srv:
        for _ in range(2 if opt.quick else 5):
            res = pg.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w",
                          "%{size_download} %{time_total}", f"http://127.0.0.1:{port}/big.bin"],
                         via, timeout=120).ok()
            size, seconds = res.stdout.split()
            total_bytes += float(size)
            total_seconds += float(seconds)
    return {"gbps": total_bytes * 8 / total_seconds / 1e9}


def redis(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    port = pg.free_port()
    with pg.tcp_server(pg.redis_server(port), via, port, tmp / "redis.log"):
        res = pg.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-t",
                      "set,get", "-n", "20000" if opt.quick else "100000"], via,
                     timeout=300).ok()
    rates = pg.redis_benchmark_report(res.stdout)
    return {"set": rates.get("SET", 0.0), "get": rates.get("GET", 0.0)}


def _iperf3(via: Via, tmp: Path, opt: Options, mode: list[str]) -> dict[str, float]:
    port = pg.free_port()
    with pg.tcp_server(pg.iperf3_server(port), via, port, tmp / "iperf3.log"):
        res = pg.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(opt.seconds),
                      "-J", *mode], via, timeout=opt.seconds + 60).ok()
    report = pg.iperf3_report(json.loads(res.stdout))
    out = {"gbps": report["bps"] / 1e9}
    if "packets" in report:
        out["lost_pct"] = 100 * report["lost"] / max(report["packets"], 1)
    return out


def iperf3_tcp(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    return _iperf3(via, tmp, opt, [])


def iperf3_udp(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    """UDP at 1 Gbit/s offered, 1400-byte datagrams: what arrives, and the loss."""
    return _iperf3(via, tmp, opt, ["-u", "-b", "1G", "-l", "1400"])


def memcached(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    port = pg.free_port()
    count = 2000 if opt.quick else 10000
    out = {}
    with pg.tcp_server(pg.memcached(port), via, port, tmp / "mc.log"):
        for test in ("set", "get"):
            res = pg.run(["memcslap", f"--servers=127.0.0.1:{port}", "--concurrency=4",
                          f"--execute-number={count}", f"--test={test}"], via,
                         timeout=300).ok()
            m = re.search(rf"Time to {test}\s+(\d+) keys by\s+\d+ threads:\s+([\d.]+) seconds",
                          res.stdout)
            assert m, res
            out[test] = int(m.group(1)) / max(float(m.group(2)), 1e-9)
    return out


def _sockperf(via: Via, tmp: Path, opt: Options, mode: str,
              udp: bool = False) -> dict[str, float]:
    port = pg.free_port()
    server = pg.Server(pg.sockperf_server(port, udp), via, log=tmp / "sockperf.log",
                       ready=lambda: pg.listening(port, "udp" if udp else "tcp"))
    with server:
        res = pg.run(["sockperf", mode, *([] if udp else ["--tcp"]), "-i", "127.0.0.1",
                      "-p", str(port), "-t", str(opt.seconds),
                      "-m", "64" if mode == "ping-pong" else "1400"], via,
                     timeout=opt.seconds + 60).ok()
    return pg.sockperf_report(res.stdout + res.stderr)


def _pingpong(report: dict[str, float]) -> dict[str, float]:
    # sockperf's latency is half the round trip.
    return {"latency_us": report["latency_us"], "rtt_per_s": 1e6 / (2 * report["latency_us"])}


def _throughput(report: dict[str, float]) -> dict[str, float]:
    return {"msg_rate": report["msg_rate"], "gbps": report["mbps"] * 8 / 1000}


def sockperf_pingpong(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    return _pingpong(_sockperf(via, tmp, opt, "ping-pong"))


def sockperf_throughput(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    return _throughput(_sockperf(via, tmp, opt, "throughput"))


def sockperf_udp_pingpong(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    return _pingpong(_sockperf(via, tmp, opt, "ping-pong", udp=True))


def sockperf_udp_throughput(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    return _throughput(_sockperf(via, tmp, opt, "throughput", udp=True))


def bulk(via: Via, tmp: Path, opt: Options) -> dict[str, float]:
    """tests/programs/bulk.py: 64 MB (16 MB quick) sha256-checked, Python on both ends."""
    size = (16 if opt.quick else 64) << 20
    port = pg.free_port()
    with pg.tcp_server(pg.script("bulk", "recv", port), via, port, tmp / "bulk.log") as rcv:
        res = pg.run(pg.script("bulk", "send", port, size, 1), via, timeout=300).ok()
        pg.until_gone(rcv.proc.pid if rcv.proc else 0, 30)
    sent = json.loads(res.stdout)
    assert sent["peer"]["sha256"] == sent["sha256"], sent
    return {"gbps": size * 8 / sent["seconds"] / 1e9}


BENCHES: Final = (
    Bench("http.server+curl", ("curl",), (Figure("rps", "requests/s"),), http_server_curl),
    Bench("nginx+wrk", ("nginx", "wrk"),
          (Figure("rps", "requests/s"), Figure("errors", "errors (wrk)", False)), nginx_wrk),
    Bench("nginx+curl-10MB", ("nginx", "curl"), (Figure("gbps", "Gbit/s"),), nginx_curl_10mb),
    Bench("redis-benchmark", ("redis-server", "redis-benchmark"),
          (Figure("set", "SET requests/s"), Figure("get", "GET requests/s")), redis),
    Bench("iperf3-tcp", ("iperf3",), (Figure("gbps", "Gbit/s"),), iperf3_tcp),
    Bench("iperf3-udp", ("iperf3",), (Figure("gbps", "Gbit/s received"),
                                      Figure("lost_pct", "% lost", False)), iperf3_udp),
    Bench("memcached+memcslap", ("memcached", "memcslap"),
          (Figure("set", "set ops/s"), Figure("get", "get ops/s")), memcached),
    Bench("sockperf-pingpong", ("sockperf",),
          (Figure("latency_us", "latency us", False), Figure("rtt_per_s", "round trips/s")),
          sockperf_pingpong),
    Bench("sockperf-throughput", ("sockperf",),
          (Figure("msg_rate", "msgs/s"), Figure("gbps", "Gbit/s")), sockperf_throughput),
    Bench("sockperf-udp-pingpong", ("sockperf",),
          (Figure("latency_us", "latency us", False), Figure("rtt_per_s", "round trips/s")),
          sockperf_udp_pingpong),
    Bench("sockperf-udp-throughput", ("sockperf",),
          (Figure("msg_rate", "msgs/s sent"), Figure("gbps", "Gbit/s sent")),
          sockperf_udp_throughput),
    Bench("bulk-python", (), (Figure("gbps", "Gbit/s"),), bulk),
)


def measure(bench: Bench, instance: str, rounds: int, opt: Options,
            log: Callable[[str], None]) -> dict[str, Any]:
    """``rounds`` alternated runs of ``bench`` directly and under NetKernel; medians."""
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "netkernel": []}
    errors: dict[str, str] = {}
    vias = [("direct", DIRECT), ("netkernel", pg.under(instance))]
    for r in range(rounds):
        for label, via in vias if r % 2 == 0 else vias[::-1]:
            if label in errors:
                continue
            try:
                with pg.workdir() as tmp:
                    runs[label].append(bench.measure(via, tmp, opt))
            except Exception as exc:  # a benchmark that fails is reported, not fatal
                errors[label] = str(exc).splitlines()[0][:200] if str(exc) else repr(exc)
                log(f"  {bench.name} {label}: FAILED: {str(exc)[-1500:]}")
    out: dict[str, Any] = {"name": bench.name, "figures": {}, "errors": errors}
    for fig in bench.figures:
        direct = [x[fig.key] for x in runs["direct"] if fig.key in x]
        nk = [x[fig.key] for x in runs["netkernel"] if fig.key in x]
        d = statistics.median(direct) if direct else None
        n = statistics.median(nk) if nk else None
        out["figures"][fig.label] = {
            "direct": d, "netkernel": n,
            "ratio": n / d if d and n is not None else None,
            "higher_is_better": fig.higher_is_better}
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.programs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 2 s runs, smaller sizes")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only this benchmark (repeatable; a prefix is enough): "
                         + ", ".join(b.name for b in BENCHES))
    ap.add_argument("--rounds", type=int, help="alternated rounds (default 3, quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds of timed runs (default 5, quick 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON document at the end")
    ap.add_argument("--nsm", choices=["auto", "shm", "kernel"], default="auto",
                    help="the NSM of the instance (as `netkernel up --nsm`; default auto)")
    args = ap.parse_args(argv)
    opt = Options(seconds=args.seconds or (2 if args.quick else 5), quick=args.quick)
    rounds = args.rounds or (1 if args.quick else 3)
    chosen = [b for b in BENCHES
              if not args.only or any(b.name.startswith(o) for o in args.only)]
    if not chosen:
        ap.error(f"no benchmark matches {args.only}")

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    results = []
    with own_instance(nsm=args.nsm) as instance:
        log(f"instance {instance} (NSM {args.nsm}); {rounds} round(s), {opt.seconds} s runs;"
            f" netkernel = both ends under `python -m netkernel run --instance {instance}`")
        log(f"{'program':<25}{'figure':<18}{'direct':>14}{'netkernel':>14}{'ratio':>9}")
        for bench in chosen:
            if gone := pg.missing(*bench.binaries):
                log(f"{bench.name:<25}skipped: not installed: {', '.join(gone)}")
                continue
            res = measure(bench, instance, rounds, opt, log)
            results.append(res)
            for label, f in res["figures"].items():
                ratio = f"{f['ratio']:.2f}x" if f["ratio"] is not None else "-"
                log(f"{bench.name:<25}{label:<18}{_num(f['direct']):>14}"
                    f"{_num(f['netkernel']):>14}{ratio:>9}")
    if args.json:
        print(json.dumps({"rounds": rounds, "seconds": opt.seconds, "results": results},
                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
