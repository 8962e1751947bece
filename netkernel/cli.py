"""The ``netkernel`` command line.

Command groups register themselves in :func:`build_parser`; every command is a
function taking the parsed arguments and returning the exit status. Bad input
is a :class:`CLIError`: one line on stderr, exit status 2, never a traceback.

``netkernel nqe`` reads and writes single NQEs, for debugging (spec/nqe.md):

- ``decode HEX``: every field with its offset, size, value and meaning;
- ``encode FIELD=VALUE ...``: the 32 bytes, in hex;
- ``ops``: the op table.

Everything is delegated to the reference codec (:mod:`netkernel.reference.nqe`)
and to :mod:`netkernel.explain`, which the documentation site renders too.

``netkernel up``, ``status`` and ``down`` run an instance (a CoreEngine and its
NSMs) on this host; the orchestration is :mod:`netkernel.instance`. Each takes
``--instance NAME`` (default ``$NETKERNEL_INSTANCE``, else ``default``); a
failure prints one line and exits with status 1.

``netkernel demo`` runs an HTTP server and an HTTP client as two tenants over
an instance (started embedded when none runs) and prints the NQEs that
crossed the CoreEngine (:mod:`netkernel.demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from netkernel import explain
from netkernel.reference import nqe as ref

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2  # malformed input, as argparse uses for bad arguments
EXIT_BROKEN_PIPE: Final = 1

Command = Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """Input the command cannot act on; the message is printed as one line."""


# -- nqe decode ---------------------------------------------------------------

_HEX_NOISE: Final = re.compile(r"[\s:._-]+")


def parse_hex(words: Sequence[str]) -> bytes:
    """Bytes from hex text; spaces, colons, dots, dashes and a ``0x`` prefix are ignored."""
    text = _HEX_NOISE.sub("", "".join(words))
    text = text.removeprefix("0x").removeprefix("0X")
    if not text:
        raise CLIError("no hex digits given")
    bad = re.search(r"[^0-9a-fA-F]", text)
    if bad:
        raise CLIError(f"not a hex digit: {bad.group()!r}")
    if len(text) % 2:
        raise CLIError(f"odd number of hex digits ({len(text)}): bytes are two digits each")
    return bytes.fromhex(text)


def decode(raw: bytes) -> ref.NQE:
    """The NQE in ``raw``; the codec's own message when it is malformed (NQE-10, NQE-11)."""
    try:
        return ref.unpack(raw)
    except ref.NQEError as exc:
        raise CLIError(str(exc)) from None


def format_decoded(n: ref.NQE) -> str:
    """The text ``netkernel nqe decode`` prints: a summary, then one block per field."""
    raw = ref.pack(n)
    lines = [
        explain.op_summary(n.op),
        "bytes " + "  ".join(raw[i:i + 8].hex(" ") for i in range(0, len(raw), 8)),
        "",
        f"{'field':<9} {'offset':>6} {'size':>4}  {'value':<20}  {'hex':<18}  reads as",
    ]
    for row in explain.explain(n):
        value = row.value.hex() if isinstance(row.value, bytes) else str(row.value)
        lines.append(
            f"{row.name:<9} {row.offset:>6} {row.size:>4}  {value:<20}  {row.hex:<18}"
            f"  {row.reads_as}".rstrip()
        )
        lines.append(f"    {row.meaning}")
        if row.op_says:
            lines.append(f"    {ref.op_name(n.op)}: {row.op_says}")
    return "\n".join(lines)


def decoded_json(n: ref.NQE) -> dict[str, Any]:
    """The document ``netkernel nqe decode --json`` prints."""
    signed = n.is_reply or any(r.name == "op_data" and r.reads_as for r in explain.explain(n))
    return {
        "hex": ref.pack(n).hex(),
        "op_name": ref.op_name(n.op),
        "summary": explain.op_summary(n.op),
        "is_reply": n.is_reply,
        "result": n.result if signed else None,
        "errno": explain.errno_name(-n.result) if signed and n.result < 0 else None,
        "fields": [
            {
                "name": r.name, "offset": r.offset, "size": r.size,
                "value": r.value.hex() if isinstance(r.value, bytes) else r.value,
                "hex": r.hex, "reads_as": r.reads_as, "meaning": r.meaning,
                "op_says": r.op_says,
            }
            for r in explain.explain(n)
        ],
    }


def cmd_nqe_decode(args: argparse.Namespace) -> int:
    n = decode(parse_hex(args.hex))
    print(json.dumps(decoded_json(n), indent=2) if args.json else format_decoded(n))
    return EXIT_OK


# -- nqe encode ---------------------------------------------------------------

#: Fields ``encode`` sets directly: every NQE field but the reserved bytes.
_INT_FIELDS: Final = tuple(name for name, _, _ in ref.field_layout() if name != "reserved")
#: Conveniences that set op_data: a signed result, or -errno by name.
_RESULT_KEYS: Final = ("result", "errno")


def parse_op(text: str) -> int:
    """An op byte from a number (``6``, ``0x86``) or a name (``SEND``, ``send|reply``)."""
    text = text.strip()
    try:
        return int(text, 0)
    except ValueError:
        pass
    name, *flags = (part.strip().upper() for part in text.split("|"))
    if name == "UNKNOWN_REPLY" and not flags:
        return ref.OP_UNKNOWN_REPLY
    if name not in ref.Op.__members__:
        raise CLIError(f"unknown op {text!r} (`netkernel nqe ops` lists them)")
    if any(flag != "REPLY" for flag in flags):
        raise CLIError(f"op {text!r}: the only flag is REPLY, as in SEND|REPLY")
    return int(ref.Op[name]) | (ref.REPLY_BIT if flags else 0)


def _int(name: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise CLIError(f"{name}={text!r}: not an integer (decimal, or hex as 0x...)") from None


def parse_assignments(items: Sequence[str]) -> ref.NQE:
    """An NQE from ``FIELD=VALUE`` words; unknown, repeated or clashing fields are errors."""
    given: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            raise CLIError(f"expected FIELD=VALUE, got {item!r}")
        if key == "reserved":
            raise CLIError("reserved bytes 29-31 are always zero in NQE v1 and cannot be set")
        if key not in _INT_FIELDS and key not in _RESULT_KEYS:
            known = ", ".join((*_INT_FIELDS, *_RESULT_KEYS))
            raise CLIError(f"unknown field {key!r} (fields: {known})")
        if key in given:
            raise CLIError(f"field {key!r} given twice")
        given[key] = value
    if "op" not in given:
        raise CLIError("op=... is required (a name such as SEND or CONNECT|REPLY, or a number)")
    clash = [k for k in ("op_data", *_RESULT_KEYS) if k in given]
    if len(clash) > 1:
        raise CLIError(f"{' and '.join(clash)} all set op_data: give only one")

    # Any: the codec, not the type checker, decides what fits (pack raises NQEError).
    fields: dict[str, Any] = {
        k: _int(k, v) for k, v in given.items() if k in _INT_FIELDS and k != "op"
    }
    fields["op"] = parse_op(given["op"])
    if "errno" in given:
        try:
            number = explain.errno_number(given["errno"].strip())
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        if number <= 0:
            raise CLIError(f"errno={given['errno']!r}: an errno is a positive number")
        given["result"] = str(-number)
    if "result" in given:
        try:
            fields["op_data"] = ref.encode_result(_int("result", given["result"]))
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    return ref.NQE(**fields)


def encode(n: ref.NQE) -> bytes:
    """The 32 bytes of ``n``; the codec's own message when a field does not fit."""
    try:
        return ref.pack(n)
    except ref.NQEError as exc:
        raise CLIError(str(exc)) from None


def cmd_nqe_encode(args: argparse.Namespace) -> int:
    print(encode(parse_assignments(args.fields)).hex())
    return EXIT_OK


# -- nqe ops ------------------------------------------------------------------


def _reply_code(op: ref.Op) -> int | None:
    code = int(op) | ref.REPLY_BIT
    return code if ref.is_known_op(code) else None


def ops_json() -> list[dict[str, Any]]:
    """The op table as ``netkernel nqe ops --json`` prints it."""
    return [
        {
            "code": int(op), "name": op.name, "reply_code": _reply_code(op),
            "direction": info.direction.value, "ring": info.ring, "replied": info.replied,
            "op_data": info.op_data, "data": info.data, "reply": info.reply,
        }
        for op, info in ref.OPS.items()
    ]


def format_ops() -> str:
    """The op table as text: one block per op, then the reply rules."""
    lines = [f"{'code':<5} {'reply':<5} {'name':<14} {'kind':<8} {'ring':<8} replied"]
    for entry in ops_json():
        reply = f"{entry['reply_code']:#04x}" if entry["reply_code"] is not None else "-"
        lines.append(
            f"{entry['code']:#04x}  {reply:<5} {entry['name']:<14} {entry['direction']:<8}"
            f" {entry['ring']:<8} {'yes' if entry['replied'] else 'no'}"
        )
        lines.extend(f"      {key:<8} {entry[key]}" for key in ("op_data", "data", "reply"))
    lines += [
        "",
        f"A reply's op is its request's op | {ref.REPLY_BIT:#04x}; its op_data is the signed"
        " result (>= 0) or -errno.",
        f"{ref.OP_UNKNOWN_REPLY:#04x}  UNKNOWN_REPLY: the reply to a request whose op is unknown"
        " (op_data -ENOSYS).",
    ]
    return "\n".join(lines)


def cmd_nqe_ops(args: argparse.Namespace) -> int:
    print(json.dumps(ops_json(), indent=2) if args.json else format_ops())
    return EXIT_OK


# -- up / status / down ---------------------------------------------------------

EXIT_FAIL: Final = 1  # the instance could not be started, reached or stopped


def format_status(doc: dict[str, Any]) -> str:
    """The text ``netkernel status`` prints: the instance, then one line per device."""
    lines = [
        f"instance {doc['instance']}: CoreEngine pid {doc['pid']}, up {doc['uptime']:.1f} s,"
        f" {doc['sockets']} open socket(s), runtime dir {doc['dir']}",
    ]
    for title, key in (("tenants", "tenants"), ("NSMs", "nsms")):
        lines.append(f"{title}: {len(doc[key])}")
        for d in doc[key]:
            counts = " ".join(f"{k}={v}" for k, v in sorted(d.get("counters", {}).items())
                              if not isinstance(v, dict))
            place = f" placement={d['placement']}" if d.get("placement") else ""
            lines.append(f"  {d['id']:>3}  pid {d['pid']:<7} {d['name'] or '-':<12}"
                         f" sockets={d.get('sockets', 0)}{place} {counts}")
            for vm, c in sorted(d.get("served", {}).items(), key=lambda kv: int(kv[0])):
                lines.append(f"       tenant {vm:>3}: " + " ".join(
                    f"{k}={v}" for k, v in c.items()))
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    from netkernel import instance

    try:
        doc = instance.up(args.instance, nsm=args.nsm, netns=args.netns, timeout=args.timeout,
                          impl=args.impl)
    except (instance.InstanceError, ValueError) as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    nsms = ", ".join(f"{d['name']} (NSM {d['id']}, pid {d['pid']})" for d in doc["nsms"])
    print(f"instance {doc['instance']} is up: CoreEngine pid {doc['pid']}"
          f"{'; ' + nsms if nsms else ''}; export NETKERNEL_INSTANCE={doc['instance']}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from netkernel import instance

    try:
        doc = instance.status(args.instance)
    except (instance.InstanceError, ValueError) as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from netkernel import instance

    try:
        pids = instance.down(args.instance, timeout=args.timeout)
    except (instance.InstanceError, ValueError) as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    stopped = ", ".join(map(str, pids)) or "none running"
    print(f"instance {args.instance or os.environ.get('NETKERNEL_INSTANCE') or 'default'}"
          f" is down (stopped: {stopped})")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from netkernel import demo

    return demo.cli_main(args)


def cmd_run(args: argparse.Namespace) -> int:
    from netkernel import run

    return run.cli_main(args.cmd, instance=args.instance, nsm=args.nsm, impl=args.impl,
                        prog=args.prog)


def cmd_vm(args: argparse.Namespace) -> int:
    from netkernel.adapters.kvm import vm

    return vm.cli_main(args.cmd, instance=args.instance, nsm=args.nsm, impl=args.impl,
                       memory=args.memory, accel=args.accel, timeout=args.timeout,
                       compressed=args.vmlinuz, nic=args.nic, prog=args.prog)


def _bench_module() -> Any:
    """``bench.paper`` of the source checkout this package runs from, or None (installed
    without one: the benchmarks and their C program live beside ``netkernel/``)."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "paper.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("bench.paper")


def cmd_bench(args: argparse.Namespace) -> int:
    paper = _bench_module()
    if paper is None:
        print(f"{args.prog}: error: needs a source checkout (bench/ beside netkernel/)",
              file=sys.stderr)
        return EXIT_FAIL
    status: int = paper.run(args, prog=args.prog)
    return status


def _add_instance_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def impl_arg(p: argparse.ArgumentParser) -> None:
        from netkernel.instance import DEFAULT_IMPL, IMPLS

        p.add_argument("--impl", default=DEFAULT_IMPL, choices=list(IMPLS),
                       help="which implementation runs the CoreEngine and the NSM: 'fastpath'"
                            " (C, the default) or 'reference' (pure Python, the model)")

    def instance_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--instance", metavar="NAME", default=None,
                       help="instance name (default: $NETKERNEL_INSTANCE, else 'default')")

    p = _add_command(commands, "up", cmd_up,
                     "start a CoreEngine and an NSM in the background; return once ready")
    instance_arg(p)
    p.add_argument("--nsm", default="auto", choices=["auto", "kernel", "shm", "none"],
                   help="the NSM to start (spec/shm.md SHM-1): 'auto' (default: connections"
                        " between tenants in shared memory when possible, the rest over Linux"
                        " TCP), 'shm' (always shared memory between tenants), 'kernel' (Linux"
                        " TCP only) or 'none'")
    p.add_argument("--netns", metavar="NAME", default=None,
                   help="run the NSM inside this network namespace (ip netns exec)")
    impl_arg(p)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for readiness")

    p = _add_command(commands, "status", cmd_status,
                     "show tenants, NSMs, open sockets and counters of a running instance")
    instance_arg(p)
    p.add_argument("--json", action="store_true", help="print the JSON document instead")

    p = _add_command(commands, "demo", cmd_demo,
                     "HTTP server and client as two tenants over NetKernel; print the NQEs")
    instance_arg(p)
    impl_arg(p)
    p.add_argument("--size", type=int, default=1 << 20, metavar="BYTES",
                   help="bytes the server serves (default 1 MiB of random bytes)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for each step (start, transfer)")

    p = _add_command(commands, "run", cmd_run,
                     "run an unmodified program with its sockets over NetKernel (LD_PRELOAD)",
                     epilog="example: netkernel run -- curl -s http://127.0.0.1:8080/")
    instance_arg(p)
    p.add_argument("--nsm", default="auto", choices=["auto", "kernel", "shm"],
                   help="the NSM of the embedded instance started when none is running"
                        " (as `up --nsm`)")
    impl_arg(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                   help="the program and its arguments")

    p = _add_command(commands, "vm", cmd_vm,
                     "run a program in a QEMU/KVM guest whose only network is its NK device",
                     epilog="example: netkernel vm -- curl -s http://127.0.0.1:8080/")
    instance_arg(p)
    p.add_argument("--nsm", default="auto", choices=["auto", "kernel", "shm"],
                   help="the NSM of the embedded instance started when none is running")
    impl_arg(p)
    p.add_argument("--memory", default="256M", metavar="M", help="guest memory (QEMU -m)")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"],
                   help="'auto' (default) probes KVM once and falls back to TCG")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="end the guest after S seconds (exit status 124)")
    p.add_argument("--vmlinuz", action="store_true",
                   help="boot the compressed kernel (default: the uncompressed vmlinux)")
    p.add_argument("--nic", default="none", choices=["none", "user"],
                   help="'none' (default): no NIC, the NK device only; 'user': the baseline,"
                        " a virtio-net NIC on QEMU's user-mode network (the host is"
                        " 10.0.2.2), no NK device, no GuestLib")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                   help="the program and its arguments, run in the guest")

    p = _add_command(commands, "bench", cmd_bench,
                     "the paper's figures: direct TCP, kernel NSM, shm NSM (PNG + CSV)")
    if (paper := _bench_module()) is not None:
        paper.add_arguments(p)

    p = _add_command(commands, "down", cmd_down,
                     "stop the instance and remove its runtime directory")
    instance_arg(p)
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait before SIGKILL")


# -- the parser ---------------------------------------------------------------


def _add_command(
    group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Command,
    help_text: str, **kwargs: Any,
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text, description=help_text, **kwargs)
    parser.set_defaults(func=func, prog=parser.prog)
    return parser


def _add_nqe(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nqe = commands.add_parser("nqe", help="decode, encode and list NQEs (spec/nqe.md)",
                              description="Decode, encode and list NQE v1 elements.")
    sub = nqe.add_subparsers(dest="nqe_command", required=True, metavar="COMMAND")

    p = _add_command(sub, "decode", cmd_nqe_decode, "explain a 32-byte NQE field by field",
                     epilog="example: netkernel nqe decode 06:00:00:07:00:00:00:00:...")
    p.add_argument("hex", nargs="+", metavar="HEX",
                   help="the 32 bytes in hex; spaces and colons between digits are ignored")
    p.add_argument("--json", action="store_true", help="print a JSON document instead")

    p = _add_command(
        sub, "encode", cmd_nqe_encode, "build an NQE and print its 32 bytes in hex",
        epilog="example: netkernel nqe encode op='CONNECT|REPLY' sock_id=3 errno=ECONNREFUSED",
    )
    p.add_argument(
        "fields", nargs="+", metavar="FIELD=VALUE",
        help=f"fields {', '.join(_INT_FIELDS)} (integers, decimal or 0x hex; op also by name"
        " such as SEND or SEND|REPLY), or result=-111 / errno=ECONNREFUSED to set op_data",
    )

    p = _add_command(sub, "ops", cmd_nqe_ops, "list the op table")
    p.add_argument("--json", action="store_true", help="print a JSON document instead")


def build_parser() -> argparse.ArgumentParser:
    """The ``netkernel`` parser with every command group."""
    parser = argparse.ArgumentParser(
        prog="netkernel",
        description="NetKernel: the network stack as part of the virtualized infrastructure.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_nqe(commands)
    _add_instance_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except CLIError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`netkernel nqe ops | head`): stop quietly, as the
        # Python documentation recommends, so the interpreter's final flush is silent too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return status
