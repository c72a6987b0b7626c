"""A delaying TCP relay for one network-namespace host (this kernel has no ``netem``).

Run inside a host's namespace by :meth:`elasticep.testing.hosts.HostNet.delay`, which also adds
nftables ``redirect`` rules there: every new TCP connection the host opens to its subnet, and
every one it accepts on its link, is redirected to this relay, which reads the connection's
original destination (``SO_ORIGINAL_DST``), connects there itself (its own sockets carry a
firewall mark the rules let through) and relays the bytes both ways, each chunk held
``delay_ms`` before it is written on. Order is kept; throughput is not limited.

    python -m elasticep.testing.delay --port 15001 --delay-ms 50 --mark 42
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80


def _original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + delay_s, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        writer.close()


async def _serve(port: int, delay_s: float, mark: int) -> None:
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            host, dport = _original_dst(sock)
            out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            out.setblocking(False)
            await loop.sock_connect(out, (host, dport))
            up_reader, up_writer = await asyncio.open_connection(sock=out)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer, delay_s), _pump(up_reader, writer, delay_s),
                             return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elasticep.testing.delay", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--mark", type=int, required=True, help="firewall mark on the relay's own connections")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.delay_ms / 1e3, args.mark))
    return 0


if __name__ == "__main__":
    sys.exit(main())
