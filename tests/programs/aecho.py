"""An asyncio echo server and a client checking every byte (the epoll path of PRE-2).

    aecho.py server PORT                       echo on 127.0.0.1:PORT until killed
    aecho.py client PORT CONNS BYTES SEED      CONNS concurrent connections, each writing
                                               BYTES pseudo-random bytes in random-sized
                                               pieces while reading the echo back

The client prints one JSON line: the event loop's selector (EpollSelector on Linux),
the connections and bytes checked, and whether every echo matched.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def server(port: int) -> None:
    srv = await asyncio.start_server(_echo, "127.0.0.1", port)
    async with srv:
        await srv.serve_forever()


async def _one(port: int, size: int, seed: int) -> bool:
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def write() -> None:
        pos = 0
        while pos < size:
            n = rng.randint(1, 65536)
            writer.write(payload[pos:pos + n])
            await writer.drain()
            pos += n
        writer.write_eof()

    writing = asyncio.create_task(write())
    got = bytearray()
    while data := await reader.read(65536):
        got += data
    await writing
    writer.close()
    await writer.wait_closed()
    return bytes(got) == payload


async def client(port: int, conns: int, size: int, seed: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    selector = type(getattr(loop, "_selector", None)).__name__
    start = time.monotonic()
    results = await asyncio.gather(*(_one(port, size, seed + k) for k in range(conns)))
    return {"selector": selector, "conns": conns, "bytes": conns * size,
            "matched": sum(results), "ok": all(results),
            "seconds": time.monotonic() - start}


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"] and len(argv) == 2:
        asyncio.run(server(int(argv[1])))
    elif argv[:1] == ["client"] and len(argv) == 5:
        print(json.dumps(asyncio.run(client(*map(int, argv[1:])))), flush=True)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
