"""uvicorn's httptools protocol with bounds on what one client may hold.

uvicorn (with httptools) limits neither the size of a request's headers nor the time a
client takes to send them or its body, so one connection can hold a megabyte of headers, or
a request task, for as long as it likes (slowloris). ``BoundedHttpToolsProtocol`` answers:

- headers over ``MAX_HEADER_BYTES`` (request line included): 431, counted as the bytes
  arrive, so no more than that plus one read is ever buffered;
- headers not complete ``HEADER_TIMEOUT_S`` after the connection opened (or after the
  previous request began): 408;
- a body that sends nothing for ``BODY_IDLE_TIMEOUT_S`` (while the server is reading it):
  408; the handler waiting for it sees the client disconnect.

Each answer closes the connection. A request only moves a deadline; one timer per
connection checks it. ``bounded_protocol(seconds, shed)`` is the class with both timeouts
set (``tinyserve serve --client-timeout``) and, with ``shed`` (``Shedder.refusal`` of
``tinyserve.shedding``), the early refusal of a saturated model's predictions: once a
request's headers are in, ``shed(method, target)`` may return the whole 503 answer, which is
written at once; the body is then read and dropped, and the connection stays open for the
next request. The app never sees such a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = [
    "BODY_IDLE_TIMEOUT_S",
    "HEADER_TIMEOUT_S",
    "MAX_HEADER_BYTES",
    "BoundedHttpToolsProtocol",
    "bounded_protocol",
]

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT_S = 10.0
BODY_IDLE_TIMEOUT_S = 10.0

Shed = Callable[[bytes, bytes], bytes | None]

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` refusing oversized headers and slow clients (431, 408).

    Each step of a request only moves a deadline (a float); one timer per connection looks
    at it now and then, so a request pays for no timer of its own.
    """

    header_timeout_s = HEADER_TIMEOUT_S
    body_idle_timeout_s = BODY_IDLE_TIMEOUT_S
    shed: Shed | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = 0
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # when what is awaited must have arrived
        self._awaiting = "the request headers"
        self._dropping = False  # answered already (shed): the body is read and dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect(self.header_timeout_s, "the request headers")
        self._timer = self.loop.call_later(self.header_timeout_s, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        counting = self._in_headers
        super().data_received(data)
        if counting and self._in_headers:  # still no end of headers after this read
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                message = f"the request headers exceed {MAX_HEADER_BYTES:,} bytes"
                self._refuse(431, "headers_too_large", message)

    def on_message_begin(self) -> None:
        # A request pipelined behind a shed one begins in the same read, after that one's
        # keep-alive timer was armed: it is no longer idle.
        self._unset_keepalive_if_required()
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        self._expect(self.header_timeout_s, "the request headers")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._expect(self.body_idle_timeout_s, "the request body")  # cleared if there is none
        if self.shed is not None and self._shed():
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._deadline = self.loop.time() + self.body_idle_timeout_s
        if not self._dropping:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._deadline = None  # the request is in; the answer is the app's business
        if self._dropping:
            self._dropping = False
            self.on_response_complete()  # as after any answer: keep-alive timer, next request
            return
        super().on_message_complete()

    def _shed(self) -> bool:
        """Answer the request whose headers just arrived with ``shed``'s refusal, if it has
        one; only when no earlier request on this connection is still being answered (an
        answer must not overtake another) and the client keeps the connection open."""
        assert self.shed is not None
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        parser = self.parser
        if not parser.should_keep_alive() or parser.should_upgrade():
            return False
        answer = self.shed(parser.get_method(), self.url)
        if answer is None:
            return False
        status, _, rest = answer.partition(b"\r\n")
        defaults = b"".join(n + b": " + v + b"\r\n" for n, v in self.server_state.default_headers)
        self.transport.write(status + b"\r\n" + defaults + rest)
        self._dropping = True
        return True

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal has answered and closed already
            super().send_400_response(msg)

    def _expect(self, seconds: float, what: str) -> None:
        self._deadline = self.loop.time() + seconds
        self._awaiting = what

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        now = self.loop.time()
        deadline = self._deadline
        if deadline is not None and now >= deadline:
            if self.flow is not None and self.flow.read_paused:  # the server is not reading
                self._deadline = deadline = now + self.body_idle_timeout_s
            else:
                self._refuse(408, "request_timeout", f"{self._awaiting} did not arrive in time")
                return
        wait = self.header_timeout_s if deadline is None else max(0.05, deadline - now)
        self._timer = self.loop.call_later(wait, self._check)

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._refused = True
        self._disarm()
        if self.transport.is_closing():
            return
        if not self._dropping and (self.cycle is None or not self.cycle.response_started):
            body = orjson.dumps({"error": {"code": code, "message": message}})
            head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (
                status,
                _REASONS[status],
            )
            length = b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            self.transport.write(head + length + body)
        self.transport.close()


def bounded_protocol(timeout_s: float, shed: Shed | None = None) -> type[BoundedHttpToolsProtocol]:
    """``BoundedHttpToolsProtocol`` allowing a client ``timeout_s`` for its headers, and
    ``timeout_s`` between two reads of its body; ``shed`` answers early refusals."""
    if timeout_s <= 0:
        raise ValueError(f"the client timeout must be positive, got {timeout_s}")
    attributes: dict[str, Any] = {"header_timeout_s": timeout_s, "body_idle_timeout_s": timeout_s}
    if shed is not None:
        attributes["shed"] = staticmethod(shed)
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), attributes)
