"""Write the seed corpus of fuzz_nqe (fuzz/corpus/nqe/) from the reference codec.

``python fastpath/csrc/fuzz/make_corpus.py`` rewrites the seeds: one valid NQE
per accepted op byte (every request, event, control op, reply and 0xFF), the
malformed kinds of spec/nqe.md section 5 (unknown ops, non-zero reserved
bytes, wrong lengths), batches, addresses and address text. The fuzzer's own
finds go to a scratch corpus (run.sh), not here.
"""

from __future__ import annotations

from pathlib import Path

from netkernel.reference import nqe

OUT = Path(__file__).resolve().parent / "corpus" / "nqe"


def sample(op: int, **kw: int) -> bytes:
    fields = {"qset": 1, "vm_id": 2, "sock_id": 0x01020304, "op_data": 0x1122334455667788,
              "data_ptr": 0x1000, "size": 64, "tag": 0xBEEF, **kw}
    return nqe.WIRE.pack(op, *(fields[n] for n in nqe.FIELDS[1:-1]), b"\0\0\0")


def seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for op in range(256):
        if nqe.is_known_op(op):
            out[f"op-{op:02x}-{nqe.op_name(op).replace('|', '-').lower()}"] = sample(op)
    for op in (0x00, 0x0D, 0x3F, 0x44, 0x65, 0x7F, 0x80, 0xC0, 0xFE):
        out[f"unknown-{op:02x}"] = sample(op)
    good = sample(nqe.Op.SEND)
    for i, r in enumerate((b"\1\0\0", b"\0\1\0", b"\0\0\1", b"\xff\xff\xff")):
        out[f"reserved-{i}"] = good[:29] + r
    out["reserved-event"] = sample(nqe.Op.EV_DATA)[:29] + b"\0\0\x80"
    out["reserved-reply"] = sample(nqe.Op.SEND | nqe.REPLY_BIT)[:29] + b"\x01\0\0"
    out["unknown-and-reserved"] = sample(0x7F)[:29] + b"\x01\x02\x03"
    for n in (0, 1, 31, 33, 63):
        out[f"len-{n}"] = (good * 2)[:n]
    out["batch-2"] = good + sample(nqe.Op.CLOSE)
    out["batch-3-mixed"] = good + sample(0x7F) + out["reserved-2"]
    out["batch-4-tail"] = good * 4 + b"\x06"
    v4 = nqe.pack_sockaddr(nqe.Sockaddr(nqe.AF_INET, "127.0.0.1", 8080))
    v6 = nqe.pack_sockaddr(nqe.Sockaddr(nqe.AF_INET6, "fe80::1:0:0:0", 443, 7, 2))
    out["sockaddr-in"] = v4
    out["sockaddr-in6"] = v6
    out["sockaddr-in6-mapped"] = nqe.pack_sockaddr(nqe.Sockaddr(nqe.AF_INET6, "::ffff:1.2.3.4", 1))
    out["sockaddr-bad-family"] = b"\x03\x00" + v4[2:]
    for text in ("192.168.0.1", "::1", "1:0:0:2::3", "::ffff:1.2.3.4", "1:2:3:4:5:6:7::"):
        out[f"text-{text.replace(':', '_')}"] = text.encode()
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    for name, data in seeds().items():
        (OUT / name).write_bytes(data)
    print(f"{len(seeds())} seeds in {OUT}")


if __name__ == "__main__":
    main()
