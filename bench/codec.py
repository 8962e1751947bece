"""The NQE codec: the reference against the C fast path, measured side by side in one run.

``python -m bench.codec`` (or ``python bench/codec.py``) builds ``--count``
random valid NQEs (every op, random fields; 1 M by default) and measures, in
NQEs per second, each path on the same NQEs:

- **reference**: ``netkernel.reference.nqe.unpack`` / ``pack``, one call per NQE
  (on the first ``--per-call`` NQEs: the Python paths are slow);
- **fastpath per call**: ``netkernel.fastpath.nqe.unpack`` / ``pack``, one call
  per NQE from Python (the checks run in C; building the Python ``NQE`` and
  crossing cffi dominate);
- **fastpath many**: ``unpack_many`` / ``pack_many``: one C call for all the
  NQEs, but still a Python ``NQE`` object per NQE;
- **fastpath C batch**: ``nk_nqe_decode_batch`` / ``nk_nqe_encode_batch``, one C
  call over the whole buffer into C structs and a status array: what the
  CoreEngine runs.

Decode is "32 bytes in, fields out, every check of NQE-1, NQE-10, NQE-11 made";
encode is "fields in, every check of NQE-4, NQE-5, NQE-11 made, 32 bytes out".
Each figure is the median of ``--rounds`` rounds, the paths alternating within
a round. It prints the figures and the ratios to the reference (issue 4 asks
for >= 100x for the batch codec). Not a CI gate: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

PATHS: Final = ("reference", "per call", "many", "C batch")


@dataclass
class Figure:
    name: str
    samples: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})

    def value(self, path: str) -> float:
        return statistics.median(self.samples[path])

    def ratio(self, path: str) -> float:
        return self.value(path) / self.value("reference")


def make_nqes(count: int, seed: int = 4) -> tuple[list[Any], bytes]:
    """``count`` random valid NQEs (every accepted op) and their bytes, back to back."""
    from netkernel.reference import nqe

    rnd = random.Random(seed)
    ops = [op for op in range(256) if nqe.is_known_op(op)]
    distinct = [nqe.NQE(op=rnd.choice(ops), qset=rnd.randrange(256), vm_id=rnd.randrange(256),
                        sock_id=rnd.randrange(1 << 32), op_data=rnd.randrange(1 << 64),
                        data_ptr=rnd.randrange(1 << 64), size=rnd.randrange(1 << 32),
                        tag=rnd.randrange(1 << 16)) for _ in range(min(count, 4096))]
    nqes = [distinct[i % len(distinct)] for i in range(count)]
    wire = b"".join(nqe.pack(n) for n in distinct)
    return nqes, (wire * (count // len(distinct) + 1))[:count * nqe.NQE_SIZE]


def _rate(n: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def measure(count: int, per_call: int, rounds: int,
            say: Callable[[str], None] = print) -> list[Figure]:
    from netkernel.fastpath import nqe as fast
    from netkernel.fastpath._lib import ffi, lib
    from netkernel.reference import nqe as ref

    nqes, wire = make_nqes(count)
    chunks = [wire[i * 32:(i + 1) * 32] for i in range(per_call)]
    some = nqes[:per_call]
    many_wire = wire[:per_call * 32]
    structs = ffi.new("struct nk_nqe[]", count)
    status = ffi.new("int32_t[]", count)
    out = ffi.new("uint8_t[]", count * 32)
    view = ffi.from_buffer(wire)

    def c_decode() -> None:
        if lib.nk_nqe_decode_batch(view, count, structs, status) != count:
            raise RuntimeError("the C batch decoder rejected a valid NQE")

    def c_encode() -> None:
        if lib.nk_nqe_encode_batch(structs, count, out, status) != count:
            raise RuntimeError("the C batch encoder refused a valid NQE")

    c_decode()  # structs hold the NQEs the encoder reads
    if bytes(ffi.buffer(structs)) != wire or fast.unpack_many(many_wire) != some:
        raise RuntimeError("the fast path does not decode what the reference encoded")
    decode, encode = Figure("decode + check"), Figure("check + encode")
    for rnd in range(rounds):
        for fig, runs in (
            (decode, {"reference": (per_call, lambda: [ref.unpack(c) for c in chunks]),
                      "per call": (per_call, lambda: [fast.unpack(c) for c in chunks]),
                      "many": (per_call, lambda: fast.unpack_many(many_wire)),
                      "C batch": (count, c_decode)}),
            (encode, {"reference": (per_call, lambda: [ref.pack(n) for n in some]),
                      "per call": (per_call, lambda: [fast.pack(n) for n in some]),
                      "many": (per_call, lambda: fast.pack_many(some)),
                      "C batch": (count, c_encode)}),
        ):
            for path, (n, fn) in runs.items():
                fig.samples[path].append(_rate(n, fn))
            say(f"  round {rnd + 1}/{rounds}  {fig.name:<16}"
                + "".join(f"  {p} {fig.samples[p][-1] / 1e6:,.3f}" for p in PATHS) + " M/s")
    if bytes(ffi.buffer(out)) != wire:
        raise RuntimeError("the C batch encoder did not write the reference's bytes")
    return [decode, encode]


def format_table(figures: list[Figure]) -> str:
    lines = [f"{'benchmark':<16}" + "".join(f" {p:>12}" for p in PATHS)
             + f"  {'unit':<8} per-call/ref  many/ref  C-batch/ref"]
    for f in figures:
        lines.append(f"{f.name:<16}" + "".join(f" {f.value(p) / 1e6:>12,.3f}" for p in PATHS)
                     + f"  {'M NQE/s':<8} {f.ratio('per call'):>11.2f}x"
                     f" {f.ratio('many'):>8.2f}x {f.ratio('C batch'):>11.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.codec",
        description="NQE decode/encode rate: reference codec vs the C fast path"
                    " (per call from Python, many per call, and one C batch call).")
    p.add_argument("--count", type=int, default=1_000_000,
                   help="NQEs in the C batch buffer (default 1000000)")
    p.add_argument("--per-call", type=int, default=100_000,
                   help="NQEs for the paths that make a Python call or object per NQE"
                        " (default 100000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (3)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.count < 1 or args.per_call < 1 or args.rounds < 1:
        p.error("--count, --per-call and --rounds must be positive")
    args.per_call = min(args.per_call, args.count)
    started = time.monotonic()
    print(f"bench.codec: {args.count:,} NQEs (C batch), {args.per_call:,} per Python path,"
          f" {args.rounds} round(s)", flush=True)
    figures = measure(args.count, args.per_call, args.rounds,
                      say=lambda s: print(s, flush=True))
    print(format_table(figures))
    print(f"({time.monotonic() - started:.1f} s; Python {sys.version.split()[0]},"
          f" {os.cpu_count()} CPUs; goal: C batch >= 100x the reference)")
    if args.json:
        print(json.dumps({f.name: {"unit": "NQE/s", **{p: f.samples[p] for p in PATHS},
                                   **{f"{p}/reference": f.ratio(p) for p in PATHS[1:]}}
                          for f in figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
