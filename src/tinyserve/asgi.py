"""The lean ASGI layer under the prediction routes: request view, body, multipart, response.

Prediction requests are small and many, so their path avoids a web framework's per-request
objects: ``Call`` is a thin view of the ASGI scope, the body is read once with a size limit,
multipart bodies (already in memory and bounded) are split with ``bytes.find`` rather than a
streaming parser, and responses go out as two ASGI messages with prebuilt headers. Everything
else in the server stays on Starlette (``app.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from tinyserve.errors import InvalidParameter, PayloadTooLarge

__all__ = [
    "Call",
    "ClientGone",
    "Part",
    "Receive",
    "Reply",
    "Scope",
    "Send",
    "log_access",
    "parse_multipart",
    "read_body",
    "json_reply",
    "send_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

access_log = logging.getLogger("tinyserve.access")


class ClientGone(Exception):
    """The client disconnected before its request body arrived; nobody is left to answer."""


class Call:
    """One HTTP request as the prediction routes need it: path, query, headers, client."""

    __slots__ = (
        "_headers", "_query", "method", "model", "path", "path_params", "receive", "scope",
    )  # fmt: skip

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.path_params: dict[str, str] = scope.get("path_params") or {}
        self._headers: dict[str, str] | None = None
        self._query: dict[str, str] | None = None
        self.model: str | None = None  # the model that answered, for the metrics

    @property
    def headers(self) -> dict[str, str]:
        """Request headers, lower-case names (a repeated header keeps its last value)."""
        if self._headers is None:
            raw = self.scope["headers"]
            self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
        return self._headers

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            raw = self.scope.get("query_string", b"")
            self._query = dict(parse_qsl(raw.decode("latin-1"))) if raw else {}
        return self._query

    @property
    def client_host(self) -> str | None:
        client = self.scope.get("client")
        return str(client[0]) if client else None


@dataclass(slots=True)
class Reply:
    """A complete response, as every handler returns it."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] | None = None
    content_type: bytes = b"application/json"
    # A body sent as it is produced (Server-Sent Events, MJPEG) instead of ``body``; it ends
    # when the iterator does or the client goes.
    stream: AsyncIterator[bytes] | None = None


def json_reply(data: Any, status: int = 200,
               headers: list[tuple[bytes, bytes]] | None = None) -> Reply:  # fmt: skip
    """``data`` as a JSON response (NumPy scalars and arrays included)."""
    return Reply(status, orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), headers)


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole request body, refusing (413) anything larger than ``limit`` bytes."""
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {int(declared):,} bytes; limit {limit:,}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit:,} bytes")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: one message, no copy
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    """A complete response: status, content type and length, any extra ``headers``, body."""
    head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        head += headers
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def send_stream(send: Send, receive: Receive, reply: Reply) -> None:
    """Send ``reply.stream`` chunk by chunk until it ends or the client disconnects."""
    import asyncio

    assert reply.stream is not None
    head = [(b"content-type", reply.content_type), (b"cache-control", b"no-store")]
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": head + (reply.headers or []),
        }
    )

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    chunks = reply.stream
    try:
        while not watcher.done():
            step = asyncio.ensure_future(anext(chunks))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                break
            try:
                chunk = step.result()
            except StopAsyncIteration:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if not watcher.done():
            await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def log_access(method: str, path: str, status: int, seconds: float, client: str | None) -> None:
    """One JSON line per request on the ``tinyserve.access`` logger."""
    line = {"method": method, "path": path, "status": status, "ms": round(seconds * 1000, 3),
            "client": client}  # fmt: skip
    access_log.info(orjson.dumps(line).decode())


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    data: bytes


_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^\s;,]{1,200}))', re.IGNORECASE)
_PARAM = re.compile(r'([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """Split a complete multipart/form-data body into its parts (RFC 7578).

    A part with a ``filename`` is a file; one without is a plain field. Bodies that are not
    well-formed, and more than ``max_parts`` parts, raise ``InvalidParameter``.
    """
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise InvalidParameter("malformed multipart body: the content type has no boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise InvalidParameter("malformed multipart body: the boundary never appears")
    parts: list[Part] = []
    separator = b"\r\n" + delimiter
    pos = start + len(delimiter)
    while not body.startswith(b"--", pos):
        if not body.startswith(b"\r\n", pos):
            raise InvalidParameter("malformed multipart body: no line break after a boundary")
        pos += 2
        if body.startswith(b"\r\n", pos):  # a part without headers
            head, content_start = b"", pos + 2
        else:
            head_end = body.find(b"\r\n\r\n", pos)
            if head_end < 0:
                raise InvalidParameter("malformed multipart body: a part's headers never end")
            head, content_start = body[pos:head_end], head_end + 4
        end = body.find(separator, content_start)
        if end < 0:
            raise InvalidParameter("malformed multipart body: the closing boundary is missing")
        if len(parts) == max_parts:
            raise InvalidParameter(f"too many parts in the multipart body (limit {max_parts})")
        parts.append(_part(head, body[content_start:end]))
        pos = end + len(separator)
    return parts


def _part(head: bytes, data: bytes) -> Part:
    disposition = ""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            disposition = value.decode("utf-8", "replace")
    kind, _, rest = disposition.partition(";")
    if kind.strip().lower() != "form-data":
        raise InvalidParameter(
            "malformed multipart body: every part needs 'Content-Disposition: form-data'"
        )
    params: dict[str, str] = {}
    for key, quoted, bare in _PARAM.findall(rest):
        value = quoted.replace('\\"', '"').replace("\\\\", "\\") if quoted else bare.strip()
        params[key.lower()] = value
    if "filename*" in params:  # RFC 5987: charset'language'percent-encoded
        charset, _, encoded = params["filename*"].partition("'")
        # Only the RFC's two charsets: a name from the client must not pick a Python codec.
        charset = "latin-1" if charset.strip().lower() == "iso-8859-1" else "utf-8"
        params["filename"] = unquote(encoded.partition("'")[2], charset, "replace")
    if "name" not in params:
        raise InvalidParameter("malformed multipart body: a part has no field name")
    return Part(params["name"], params.get("filename"), data)
