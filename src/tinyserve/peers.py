"""The other workers of a ``tinyserve serve --workers N`` server, and how to ask them.

With several workers on one port the kernel hands each connection to one of them, so a call
that must reach the whole server (a reload, ``/stats``) reaches one worker only. That worker
forwards it to its siblings: each worker also listens on its own Unix socket in the server's
private folder (mode 0700, made by the supervisor), and a forwarded request carries the
server's secret in ``x-tinyserve-peer``, which tells the sibling to answer for itself alone
instead of forwarding again.

    peers = Peers(Path("/tmp/tinyserve-x"), index=0, count=2, secret="...")
    answers = await peers.forward("POST", "/admin/reload", {"authorization": "Bearer ..."})
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tinyserve.bench.client import ProtocolError, read_response

__all__ = ["PEER_HEADER", "Answer", "Peers"]

PEER_HEADER = "x-tinyserve-peer"
# A sibling answers a forwarded reload after loading and warming the model: seconds, not ms.
FORWARD_TIMEOUT_S = 120.0
# Headers a forwarded call keeps: who is asking (the admin token or an API key) and what.
_KEPT = ("authorization", "x-api-key", "content-type", "accept")


@dataclass(frozen=True)
class Answer:
    """One sibling's answer: its index, status and body (status 0: it did not answer).

    ``running`` is False when no process listens on its socket: it died and the supervisor
    is replacing it, and the replacement loads everything afresh when it starts.
    """

    worker: int
    status: int
    body: bytes
    running: bool = True


@dataclass(frozen=True)
class Peers:
    """Where this worker's siblings listen, and the secret that marks their calls."""

    directory: Path
    index: int
    count: int
    secret: str

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker index {self.index} is outside 0..{self.count - 1}")
        if len(self.secret) < 16:
            raise ValueError("the workers' secret must be at least 16 characters long")

    def socket_path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"

    @property
    def siblings(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.count) if i != self.index)

    def is_forwarded(self, headers: Mapping[str, str]) -> bool:
        """Whether this call came from a sibling (so it must not be forwarded again)."""
        given = headers.get(PEER_HEADER)
        return given is not None and hmac.compare_digest(given.encode(), self.secret.encode())

    async def forward(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        timeout_s: float = FORWARD_TIMEOUT_S,
    ) -> list[Answer]:
        """Send one call to every sibling at once; their answers, in worker order."""
        kept = {name: headers[name] for name in _KEPT if name in headers}
        return list(
            await asyncio.gather(
                *(self._ask(i, method, target, kept, body, timeout_s) for i in self.siblings)
            )
        )

    async def _ask(
        self,
        index: int,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
    ) -> Answer:
        lines = [f"{method} {target} HTTP/1.1", "host: tinyserve-worker", "connection: close",
                 f"content-length: {len(body)}", f"{PEER_HEADER}: {self.secret}",
                 *(f"{name}: {value}" for name, value in headers.items())]  # fmt: skip
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(self.socket_path(index))
                try:
                    writer.write(request)
                    status, answer, _ = await read_response(reader)
                finally:
                    writer.close()
        except (ConnectionRefusedError, FileNotFoundError):
            return Answer(index, 0, f"worker {index} is not running".encode(), running=False)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError) as exc:
            message = f"worker {index} did not answer: {exc or type(exc).__name__}"
            return Answer(index, 0, message.encode())
        return Answer(index, status, answer)
