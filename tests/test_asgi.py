"""The lean ASGI layer: multipart splitting and body limits (the routes: test_app.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tinyserve.asgi import ClientGone, Part, parse_multipart, read_body
from tinyserve.errors import InvalidParameter, PayloadTooLarge


def encode(
    files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]
) -> tuple[bytes, str]:
    """A multipart body as httpx (the client most tests use) writes it."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_splits_what_httpx_writes() -> None:
    body, content_type = encode(
        [
            ("files", ("a.png", b"\r\n--not-a-boundary\r\n", "image/png")),
            ("files", ("b", b"", "x/y")),
        ],
        {"top_k": "3"},
    )
    parts = parse_multipart(body, content_type, 10)
    assert Part("top_k", None, b"3") in parts
    assert [p for p in parts if p.filename] == [
        Part("files", "a.png", b"\r\n--not-a-boundary\r\n"),
        Part("files", "b", b""),
    ]


def test_quoted_boundary_rfc5987_filename_and_a_preamble() -> None:
    body = (
        b"preamble\r\n--b-1\r\n"
        b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%C3%A9t%C3%A9.png\r\n"
        b"Content-Type: image/png\r\n\r\nPIXELS\r\n"
        b'--b-1\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b-1--\r\n'
    )
    parts = parse_multipart(body, 'multipart/form-data; boundary="b-1"', 10)
    assert parts == [Part("file", "été.png", b"PIXELS"), Part("note", None, b"hi")]


MALFORMED = [
    ("no-boundary-parameter", b"--x\r\n", "multipart/form-data", "no boundary"),
    ("boundary-never-appears", b"hello", "multipart/form-data; boundary=x", "never appears"),
    ("not-terminated", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nabc",
     "multipart/form-data; boundary=x", "closing boundary"),
    ("headers-never-end", b"--x\r\nContent-Disposition: form-data",
     "multipart/form-data; boundary=x", "headers never end"),
    ("not-form-data", b"--x\r\nContent-Type: a/b\r\n\r\nabc\r\n--x--",
     "multipart/form-data; boundary=x", "form-data"),
    ("no-field-name", b"--x\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--x--",
     "multipart/form-data; boundary=x", "no field name"),
    ("garbage-after-boundary", b"--xJUNK", "multipart/form-data; boundary=x", "line break"),
]  # fmt: skip


@pytest.mark.parametrize(
    "body,content_type,words", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_bodies_are_refused_with_the_reason(
    body: bytes, content_type: str, words: str
) -> None:
    with pytest.raises(InvalidParameter, match=words):
        parse_multipart(body, content_type, 10)


def test_part_count_is_bounded() -> None:
    body, content_type = encode([("files", (f"{i}.png", b"x", "image/png")) for i in range(5)], {})
    assert len(parse_multipart(body, content_type, 5)) == 5
    with pytest.raises(InvalidParameter, match="limit 4"):
        parse_multipart(body, content_type, 4)


def _receiver(*messages: dict[str, object]) -> Callable[[], object]:
    queue = list(messages)

    async def receive() -> dict[str, object]:
        return queue.pop(0)  # type: ignore[return-value]

    return receive


def test_read_body_joins_chunks_and_enforces_the_limit() -> None:
    chunks = _receiver(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert asyncio.run(read_body(chunks, None, 10)) == b"abcd"  # type: ignore[arg-type]
    with pytest.raises(PayloadTooLarge, match="20 bytes"):
        asyncio.run(read_body(_receiver(), "20", 10))  # type: ignore[arg-type]
    big = _receiver({"type": "http.request", "body": b"x" * 11, "more_body": False})
    with pytest.raises(PayloadTooLarge, match="exceeds"):
        asyncio.run(read_body(big, None, 10))  # type: ignore[arg-type]
    with pytest.raises(ClientGone):
        asyncio.run(read_body(_receiver({"type": "http.disconnect"}), None, 10))  # type: ignore[arg-type]
