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

Each answer closes the connection. The timers cost one ``call_later`` per request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = [
    "BODY_IDLE_TIMEOUT_S",
    "HEADER_TIMEOUT_S",
    "MAX_HEADER_BYTES",
    "BoundedHttpToolsProtocol",
]

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT_S = 10.0
BODY_IDLE_TIMEOUT_S = 10.0

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` refusing oversized headers and slow clients (431, 408)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = 0
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEADER_TIMEOUT_S, "the request headers")

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
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        self._arm(HEADER_TIMEOUT_S, "the request headers")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(BODY_IDLE_TIMEOUT_S, "the request body")  # cancelled if there is none
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm(BODY_IDLE_TIMEOUT_S, "the request body")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a refusal has answered and closed already
            super().send_400_response(msg)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str) -> None:
        self._timer = None
        if self.flow is not None and self.flow.read_paused:  # the server is not reading
            self._arm(BODY_IDLE_TIMEOUT_S, what)
            return
        self._refuse(408, "request_timeout", f"{what} did not arrive in time")

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._refused = True
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            body = orjson.dumps({"error": {"code": code, "message": message}})
            head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (
                status,
                _REASONS[status],
            )
            length = b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            self.transport.write(head + length + body)
        self.transport.close()
