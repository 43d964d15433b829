"""A minimal HTTP/1.1 client on raw asyncio streams, for load generation.

A general client (httpx) spends tens of microseconds per request building and parsing
objects; here each request is one prebuilt ``bytes`` written to a keep-alive connection, and
each response is a status line, a ``Content-Length`` or chunked body, and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import mimetypes
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from tinyserve.errors import ConfigError

BODY_KINDS = ("raw", "multipart", "json", "v2")
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Target:
    """Where requests go: ``http://host:port/path?query``."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, allow_remote: bool = False) -> Target:
        """Parse ``url``; refuse hosts outside loopback unless ``allow_remote``."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ConfigError(
                f"target URL {url!r} must start with http:// (https is not supported)"
            )
        if not parts.hostname:
            raise ConfigError(f"target URL {url!r} has no host")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ConfigError(f"target URL {url!r} has an invalid port") from exc
        if not allow_remote and not is_loopback(parts.hostname):
            raise ConfigError(
                f"refusing to load {parts.hostname}: only loopback targets (127.0.0.0/8, "
                "localhost, ::1) are allowed; pass --allow-remote to load a server you operate"
            )
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, path)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.netloc}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def with_path(self, path: str) -> Target:
        return Target(self.host, self.port, path)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def encode_body(image: bytes, filename: str, kind: str) -> tuple[bytes, str]:
    """The request body and its content type for one image sent as ``kind``.

    ``raw``: the image bytes with their ``image/*`` type; ``multipart``: form field ``file``;
    ``json``: ``{"image": "<base64>"}``; ``v2``: an Open Inference Protocol request with the
    image as a one-element BYTES tensor (binary tensor extension) asking for the top 5.
    """
    if kind == "raw":
        return image, mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if kind == "multipart":
        boundary = "tinyserve-bench-" + secrets.token_hex(12)
        part_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        name = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {part_type}\r\n\r\n"
        ).encode()
        body = head + image + f"\r\n--{boundary}--\r\n".encode()
        return body, f"multipart/form-data; boundary={boundary}"
    if kind == "json":
        return orjson.dumps({"image": base64.b64encode(image).decode()}), "application/json"
    if kind == "v2":
        element = struct.pack("<I", len(image)) + image
        return v2_header(len(element)) + element, "application/octet-stream"
    raise ConfigError(f"body kind must be one of {', '.join(BODY_KINDS)}, got {kind!r}")


def v2_header(binary_size: int) -> bytes:
    """The JSON header of a ``v2`` body whose BYTES tensor takes ``binary_size`` bytes."""
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES"}
    output = {"name": "probabilities", "parameters": {"classification": 5}}
    return orjson.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": binary_size}}],
            "outputs": [output],
        }
    )


def build_request(
    target: Target,
    method: str = "GET",
    body: bytes = b"",
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """One complete HTTP/1.1 keep-alive request, ready to write as is."""
    lines = [
        f"{method} {target.path} HTTP/1.1",
        f"Host: {target.netloc}",
        "User-Agent: tinyserve-bench",
        "Accept: */*",
    ]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def image_request(
    target: Target, image_path: Path, kind: str, extra: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A POST of the image at ``image_path`` to ``target`` as a ``kind`` body, with the
    ``extra`` headers (an API key, say)."""
    try:
        image = image_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read image {image_path}: {exc.strerror or exc}") from exc
    body, content_type = encode_body(image, image_path.name, kind)
    headers = dict(extra)
    if kind == "v2":  # the binary tensor extension: where the JSON header ends
        headers["Inference-Header-Content-Length"] = str(len(v2_header(len(image) + 4)))
    return build_request(target, "POST", body, content_type, headers)


class ProtocolError(Exception):
    """The server's response is not HTTP/1.x as this client understands it."""


class Connection:
    """One keep-alive connection, opened on first use and reopened after a failure."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one prebuilt request; return the status code and body.

        A kept-alive connection the server has closed meanwhile (its idle timeout) is
        replaced and the request sent again, once, if nothing of the answer arrived. Any
        other failure closes the connection (the next request opens a new one) and propagates.
        """
        if self._stream is not None and self._stream[0].at_eof():
            self.abort()
        reused = self._stream is not None
        try:
            return await self._exchange(data)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            return await self._exchange(data)

    async def _exchange(self, data: bytes) -> tuple[int, bytes]:
        try:
            if self._stream is None:
                self._stream = await asyncio.open_connection(
                    self.target.host, self.target.port, limit=_MAX_HEAD
                )
            reader, writer = self._stream
            writer.write(data)
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()
            status, body, keep_alive = await read_response(reader)
        except asyncio.LimitOverrunError as exc:
            self.abort()
            raise ProtocolError("a response line is longer than 64 KiB") from exc
        except BaseException:
            self.abort()
            raise
        if not keep_alive:
            await self.close()
        return status, body

    def abort(self) -> None:
        """Drop the connection at once (after an error or a cancellation)."""
        if self._stream is not None:
            self._stream[1].transport.abort()
            self._stream = None

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream[1].close()
            try:
                await stream[1].wait_closed()
            except OSError:
                pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    status_line = head.split(b"\r\n", 1)[0]
    try:
        status = int(head[9:12])
    except ValueError as exc:
        raise ProtocolError(f"bad status line {status_line!r}") from exc
    lower = head.lower()
    keep_alive = head[7:8] == b"1" and b"\r\nconnection: close" not in lower
    length = _header(lower, b"content-length")
    if length is not None:
        if not length.isdigit():
            raise ProtocolError(f"bad Content-Length {length!r}")
        body = await reader.readexactly(int(length)) if length != b"0" else b""
    elif b"chunked" in (_header(lower, b"transfer-encoding") or b""):
        body = await _read_chunked(reader)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:  # the body runs until the server closes the connection
        body, keep_alive = await reader.read(), False
    return status, body, keep_alive


def _header(lower_head: bytes, name: bytes) -> bytes | None:
    start = lower_head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return lower_head[start : lower_head.index(b"\r\n", start)].strip()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError as exc:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}") from exc
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        chunks.append((await reader.readexactly(size + 2))[:-2])
