"""A checksummed bulk transfer over one TCP connection (tests/test_programs.py, bench/programs.py).

    bulk.py recv PORT              accept one connection on 127.0.0.1:PORT, read to EOF,
                                   answer with the count and sha256 of what arrived, print them
    bulk.py send PORT SIZE SEED    connect, send SIZE bytes of the stream SEED names, shut the
                                   write side, print the count, sha256 and the receiver's answer

Both print one JSON line. The stream is :func:`stream` (deterministic, not compressible),
so the test can compute the expected digest itself.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import time
from collections.abc import Iterator

CHUNK = 1 << 20


def stream(size: int, seed: int) -> Iterator[bytes]:
    """``size`` pseudo-random bytes from ``seed``, in chunks of at most 1 MiB."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def digest(size: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in stream(size, seed):
        h.update(chunk)
    return h.hexdigest()


def recv(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", port))
        lst.listen(1)
        conn, _ = lst.accept()
        with conn:
            h = hashlib.sha256()
            count = 0
            start = time.monotonic()
            while data := conn.recv(1 << 18):
                h.update(data)
                count += len(data)
            seconds = time.monotonic() - start
            answer = {"bytes": count, "sha256": h.hexdigest(), "seconds": seconds}
            conn.sendall(json.dumps(answer).encode() + b"\n")
    print(json.dumps(answer), flush=True)


def send(port: int, size: int, seed: int) -> None:
    h = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        start = time.monotonic()
        for chunk in stream(size, seed):
            conn.sendall(chunk)
            h.update(chunk)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while data := conn.recv(4096):
            reply += data
        seconds = time.monotonic() - start
    print(json.dumps({"bytes": size, "sha256": h.hexdigest(), "seconds": seconds,
                      "peer": json.loads(reply) if reply else None}), flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["recv"] and len(argv) == 2:
        recv(int(argv[1]))
    elif argv[:1] == ["send"] and len(argv) == 4:
        send(int(argv[1]), int(argv[2]), int(argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
