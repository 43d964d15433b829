"""Request bodies to uploads and options: raw image bytes, multipart forms, base64 JSON.

Every front door that takes encoded images (REST, the Lambda handler) reads them here, so a
body means the same thing wherever it is sent. The Open Inference Protocol's tensors are
read by ``v2_tensors``. Nothing here knows about HTTP status codes; bad bodies raise the
errors of ``tinyserve.errors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from tinyserve.asgi import parse_multipart
from tinyserve.errors import InvalidParameter, MalformedRequest, UnsupportedMediaType
from tinyserve.imaging import decode_base64

__all__ = [
    "Parsed",
    "Upload",
    "Version",
    "int_param",
    "parse_body",
    "parse_json_object",
    "top_k_param",
    "version_param",
]

# curl --data-binary sends application/x-www-form-urlencoded unless told otherwise.
_RAW_TYPES = frozenset({"application/octet-stream", "application/x-www-form-urlencoded", ""})
_SINGLE_FIELDS = ("file", "image", "files")
_BATCH_FIELDS = ("files", "file", "images", "image")


@dataclass(slots=True)
class Upload:
    """One encoded image as it arrived, with the file name a form gave it."""

    filename: str | None
    data: bytes


@dataclass(slots=True)
class Parsed:
    """The images of a request and the ``top_k`` its body asked for (None: not given)."""

    uploads: list[Upload]
    top_k: int | None = None


def parse_body(body: bytes, content_type: str, batch: bool, max_images: int) -> Parsed:
    """Uploads and options from a raw, multipart or JSON body."""
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return _parse_multipart(body, content_type, batch, max_images)
    if media == "application/json" or media.endswith("+json"):
        return parse_json_object(_json(body), batch)
    if media.startswith("image/") or media in _RAW_TYPES:
        if batch:
            raise UnsupportedMediaType(
                "a batch needs multipart/form-data (field 'files') or JSON {\"images\": [...]}"
            )
        return Parsed([Upload(None, body)])
    raise UnsupportedMediaType(
        f"content type {media!r} is not accepted; send image bytes (image/* or "
        "application/octet-stream), multipart/form-data or application/json"
    )


def parse_json_object(data: Mapping[str, Any], batch: bool) -> Parsed:
    """Uploads from ``{"image": b64, "top_k": k}``, or for a batch
    ``{"images": [b64 | {"image": b64, "filename": name}], "top_k": k}``."""
    raw_top_k = data.get("top_k")
    top_k = int_param("top_k", raw_top_k) if raw_top_k is not None else None
    if not batch:
        if "image" not in data:
            raise MalformedRequest("the JSON body needs an 'image' field holding base64 bytes")
        return Parsed([Upload(None, decode_base64(data["image"], "'image'"))], top_k)
    items = data.get("images")
    if not isinstance(items, list):
        raise MalformedRequest("the JSON body needs an 'images' list")
    uploads: list[Upload] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            name = item.get("filename")
            data_b64 = item.get("image")
            uploads.append(Upload(name if isinstance(name, str) else None,
                                  decode_base64(data_b64, f"images[{i}]")))  # fmt: skip
        else:
            uploads.append(Upload(None, decode_base64(item, f"images[{i}]")))
    return Parsed(uploads, top_k)


def int_param(name: str, raw: object) -> int:
    """An integer parameter from a query string, a form field or JSON."""
    if isinstance(raw, bool):
        raise InvalidParameter(f"{name} must be an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw))
    except ValueError:
        raise InvalidParameter(f"{name} must be an integer, got {raw!r}") from None


def top_k_param(query: object, body: int | None, default: int, num_classes: int) -> int:
    """``top_k`` from the query string, else the body, else ``default`` (at most the classes)."""
    top_k = int_param("top_k", query) if query is not None else body
    if top_k is None:
        return min(default, num_classes)
    if not 1 <= top_k <= num_classes:
        raise InvalidParameter(f"top_k must be between 1 and {num_classes}, got {top_k}")
    return top_k


Version = int | Literal["latest"] | None


def version_param(raw: str | None) -> Version:
    """A ``version`` parameter: a number, ``latest`` (the highest served), or None (the
    model's default version, which a config.toml may pin lower than the latest)."""
    if raw is None or raw == "":
        return None
    if raw.lower() == "latest":
        return "latest"
    return int_param("version", raw)


def _json(body: bytes) -> Mapping[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the JSON body must be an object")
    return data


def _parse_multipart(body: bytes, content_type: str, batch: bool, max_images: int) -> Parsed:
    # One part more than a batch may hold lets the batch check name the real limit.
    parts = parse_multipart(body, content_type, max_images + 2)
    files = [p for p in parts if p.filename is not None]
    uploads = []
    for name in _BATCH_FIELDS if batch else _SINGLE_FIELDS:
        uploads = [p for p in files if p.name == name]
        if uploads:
            break
    if not uploads:
        uploads = files
    if not uploads:
        expected = "'files'" if batch else "'file'"
        raise InvalidParameter(f"the multipart body has no file field (expected {expected})")
    fields = {p.name: p.data for p in parts if p.filename is None}
    top_k = fields.get("top_k")
    return Parsed(
        [Upload(p.filename, p.data) for p in uploads],
        int_param("top_k", top_k.decode("utf-8", "replace")) if top_k is not None else None,
    )
