"""The one mapping from tinyserve's exception tree to HTTP: status, headers and body.

Every front door answers errors through ``error_reply``: the REST routes and the Lambda
handler with ``{"error": {"code", "message"}}``, the Open Inference Protocol routes with
``{"error": "<message>"}`` (the shape KServe and Triton clients read). An exception from
outside the tree is a bug: ``as_error`` turns it into ``InternalError`` (500, code
``internal``), whose message names the exception's type but none of its details; the caller
logs the traceback. Standard library only, so the Lambda handler can use it without the
HTTP server's dependencies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from tinyserve.errors import (
    ConfigError,
    Forbidden,
    InferenceTimeout,
    InputError,
    InternalError,
    InvalidParameter,
    ModelError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    TinyServeError,
    Unauthorized,
    UnsupportedMediaType,
)

__all__ = [
    "STATUS_BY_ERROR",
    "ErrorReply",
    "Shape",
    "as_error",
    "error_body",
    "error_reply",
    "status_for",
]

Shape = Literal["rest", "v2"]
Headers = list[tuple[bytes, bytes]]

# Order matters: subclasses before their parents.
STATUS_BY_ERROR: tuple[tuple[type[TinyServeError], int], ...] = (
    (ModelNotFound, 404),
    (ModelNotReady, 503),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (InvalidParameter, 422),
    (InputError, 400),
    (Overloaded, 503),
    (RateLimited, 429),
    (InferenceTimeout, 504),
    (Unauthorized, 401),
    (Forbidden, 403),
    (ConfigError, 400),
    (ModelError, 500),
    (InternalError, 500),
)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: bytes
    headers: Headers


def as_error(exc: BaseException) -> TinyServeError:
    """``exc`` itself when it is one of tinyserve's errors, else an ``InternalError``."""
    if isinstance(exc, TinyServeError):
        return exc
    return InternalError(f"internal error ({type(exc).__name__}); the server log has details")


def status_for(exc: BaseException) -> int:
    error = as_error(exc)
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500


def error_reply(exc: BaseException, shape: Shape = "rest") -> ErrorReply:
    """Status, body and extra headers answering ``exc`` in a front door's ``shape``."""
    error = as_error(exc)
    headers: Headers = []
    if isinstance(error, Overloaded | RateLimited):
        headers.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
    if isinstance(error, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    status = status_for(error)
    if shape == "v2":
        # The protocol has one status for every bad request.
        status = 400 if status in (415, 422) else status
        body: dict[str, object] = {"error": error.message}
    else:
        body = {"error": error_body(error)}
    return ErrorReply(status, json.dumps(body, separators=(",", ":")).encode(), headers)


def error_body(error: TinyServeError) -> dict[str, str]:
    """``{"code", "message"}``: how REST bodies and per-item batch results carry an error."""
    return {"code": error.code, "message": error.message}
