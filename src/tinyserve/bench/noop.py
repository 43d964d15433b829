"""A trivial HTTP/1.1 server that answers every request with ``200 {}``.

It does almost nothing per request (an asyncio protocol on uvloop, no framework), so loading it
measures how many requests per second the load generator itself can drive:
``tinyserve bench http noop --image IMG``, or run it alone with
``python -m tinyserve.bench.noop --port 8099``. ``GET /metrics`` answers 404.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from tinyserve.errors import ConfigError

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class NoopProtocol(asyncio.Protocol):
    """Reads pipelined requests (headers and ``Content-Length`` body) and answers each."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # TCP servers hand out Transports

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(buffer[:end]).lower()
            start = head.find(b"\r\ncontent-length:")
            length = int(head[start + 17 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(buffer) < end + 4 + length:
                return
            del buffer[: end + 4 + length]
            if self.transport is not None:
                self.transport.write(_NOT_FOUND if head.startswith(b"get /metrics") else _OK)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(NoopProtocol, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()
    print(f"http://{bound[0]}:{bound[1]}/", flush=True)
    async with server:
        await server.serve_forever()


@contextmanager
def noop_server(host: str = "127.0.0.1") -> Iterator[str]:
    """Run the noop server in a child process (its own core); yield its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tinyserve.bench.noop", "--host", host, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip() if process.stdout else ""
        if not url.startswith("http://"):
            raise ConfigError("the noop server did not start; run python -m tinyserve.bench.noop")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        try:
            runner.run(serve(args.host, args.port))
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
