"""A memcached client over plain sockets, checking every answer (text protocol).

    memc.py tcp PORT KEYS SEED     set KEYS keys (values of 1 B .. 200 KB), get each back,
                                   one multi-get of all, incr/decr, delete; every answer checked
    memc.py udp PORT KEYS SEED     the same get/set over memcached's UDP framing (8-byte frame
                                   header; values small enough for one datagram)
    memc.py load PORT SECONDS      set/get pairs of 100-byte values for SECONDS (ops/s)
    memc.py stats PORT             the server's ``stats`` counters

Prints one JSON line: counts, ``ok`` (every answer as expected), ops/s. A wrong answer
makes it exit 1 with the mismatch on stderr.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time


class Mismatch(Exception):
    pass


class Tcp:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise Mismatch("connection closed by the server")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise Mismatch("connection closed by the server")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def cmd(self, line: bytes, data: bytes | None = None) -> bytes:
        self.sock.sendall(line + b"\r\n" + (data + b"\r\n" if data is not None else b""))
        return self._line()

    def set(self, key: bytes, value: bytes) -> None:
        got = self.cmd(b"set %s 0 0 %d" % (key, len(value)), value)
        if got != b"STORED":
            raise Mismatch(f"set {key!r}: {got!r}")

    def get(self, *keys: bytes) -> dict[bytes, bytes]:
        self.sock.sendall(b"get " + b" ".join(keys) + b"\r\n")
        found = {}
        while (line := self._line()) != b"END":
            parts = line.split()
            if parts[0] != b"VALUE":
                raise Mismatch(f"get: {line!r}")
            found[parts[1]] = self._exact(int(parts[3]) + 2)[:-2]
        return found


def values(keys: int, seed: int) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    sizes = [1, 100, 1000, 4096, 65536, 200_000]
    return {b"k%d" % k: rng.randbytes(sizes[k % len(sizes)] if k < len(sizes)
                                      else rng.randint(1, 20_000)) for k in range(keys)}


def tcp(port: int, keys: int, seed: int) -> dict[str, object]:
    c = Tcp(port)
    want = values(keys, seed)
    start = time.monotonic()
    for k, v in want.items():
        c.set(k, v)
    for k, v in want.items():
        got = c.get(k)
        if got != {k: v}:
            raise Mismatch(f"get {k!r}: {len(got.get(k, b''))} bytes, wanted {len(v)}")
    if c.get(*want) != want:
        raise Mismatch("multi-get differs")
    counts = [c.cmd(b"set n 0 0 2", b"40"), c.cmd(b"incr n 2"), c.cmd(b"decr n 1")]
    if counts != [b"STORED", b"42", b"41"]:
        raise Mismatch(f"set/incr/decr: {counts!r}")
    if c.cmd(b"delete k0") != b"DELETED" or c.get(b"k0") != {}:
        raise Mismatch("delete")
    seconds = time.monotonic() - start
    c.sock.close()
    return {"proto": "tcp", "set": len(want), "get": 2 * len(want), "ok": True,
            "bytes": sum(map(len, want.values())), "seconds": seconds}


def udp(port: int, keys: int, seed: int) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    rng = random.Random(seed)
    want = {b"u%d" % k: rng.randbytes(rng.randint(1, 1000)) for k in range(keys)}
    req_id = 0

    def ask(payload: bytes) -> bytes:
        nonlocal req_id
        req_id = (req_id + 1) & 0xFFFF
        sock.sendto(struct.pack("!HHHH", req_id, 0, 1, 0) + payload, ("127.0.0.1", port))
        parts: dict[int, bytes] = {}
        total = None
        while total is None or len(parts) < total:
            data, _ = sock.recvfrom(65536)
            rid, seq, total, _ = struct.unpack("!HHHH", data[:8])
            if rid == req_id:
                parts[seq] = data[8:]
        return b"".join(parts[i] for i in range(total))

    start = time.monotonic()
    for k, v in want.items():
        if (got := ask(b"set %s 0 0 %d\r\n%s\r\n" % (k, len(v), v))) != b"STORED\r\n":
            raise Mismatch(f"udp set {k!r}: {got!r}")
    for k, v in want.items():
        expected = b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (k, len(v), v)
        if (got := ask(b"get %s\r\n" % k)) != expected:
            raise Mismatch(f"udp get {k!r}: {got[:60]!r}")
    seconds = time.monotonic() - start
    sock.close()
    return {"proto": "udp", "set": len(want), "get": len(want), "ok": True, "seconds": seconds}


def load(port: int, seconds: float) -> dict[str, object]:
    c = Tcp(port)
    value = bytes(range(100))
    ops = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        for k in range(100):
            key = b"load%d" % k
            c.set(key, value)
            if c.get(key) != {key: value}:
                raise Mismatch(f"load get {key!r}")
        ops += 200
    c.sock.close()
    return {"proto": "tcp", "ops": ops, "seconds": elapsed, "ops_per_s": ops / elapsed,
            "ok": True}


def stats(port: int) -> dict[str, object]:
    c = Tcp(port)
    c.sock.sendall(b"stats\r\n")
    out: dict[str, object] = {}
    while (line := c._line()) != b"END":
        _, key, value = line.decode().split(" ", 2)
        out[key] = int(value) if value.isdigit() else value
    c.sock.close()
    return out


def main(argv: list[str]) -> None:
    try:
        if argv[:1] == ["tcp"] and len(argv) == 4:
            out = tcp(int(argv[1]), int(argv[2]), int(argv[3]))
        elif argv[:1] == ["udp"] and len(argv) == 4:
            out = udp(int(argv[1]), int(argv[2]), int(argv[3]))
        elif argv[:1] == ["stats"] and len(argv) == 2:
            out = stats(int(argv[1]))
        elif argv[:1] == ["load"] and len(argv) == 3:
            out = load(int(argv[1]), float(argv[2]))
        else:
            sys.exit(__doc__)
    except Mismatch as exc:
        sys.exit(f"memc.py: {exc}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
