"""A small client for a tinyserve server, with bounded retries.

    from tinyserve.client import Client

    with Client("http://127.0.0.1:8000", api_key="tsk_...") as client:
        answer = client.predict("samples/fashion/0000_ankle-boot.png")
        print(answer["label"], answer["confidence"])

``url`` is a server (its default model), a model (``http://host:port/v1/models/NAME``) or a
prediction endpoint itself (a URL ending in ``/predict``). The answer is the server's JSON
(docs/api.md); an error answer raises ``tinyserve.errors.RemoteError`` with its status and
error code.

A prediction has no side effect, so the client sends it again when the server could not
answer it: a 503 (a model still loading, a full queue) or a connection error (refused, reset,
closed before the answer). It waits between tries with exponential backoff and full jitter,
a uniform draw in ``[0, min(max_delay_s, base_delay_s * 2**n)]``, so that clients turned
away together do not come back together; a ``Retry-After`` the server sends is waited out
(up to ``max_delay_s``). The tries are bounded twice: ``attempts`` in all, and no wait that
would end past ``deadline_s`` after the first try began. Other answers (400, 401, 429,
500...) are not outages and come back at once: sending the same request again would get the
same answer, and a 429 says to slow down, not to retry sooner.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tinyserve import __version__
from tinyserve.errors import RemoteError

__all__ = ["RETRIED_ERRORS", "Client", "RetryPolicy"]

# The transport failures after which the request may simply be sent again (no timeouts of a
# slow answer: resending those would add load to a server that is already behind).
RETRIED_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try: ``attempts`` counts the first try."""

    attempts: int = 4
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0
    deadline_s: float = 10.0
    statuses: tuple[int, ...] = (503,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.deadline_s < 0:
            raise ValueError("retry delays and the deadline must be >= 0")

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (0 for the first)."""
        wait = rng.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**retry))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay_s))
        return wait


class Client:
    """Predictions from one tinyserve server (see the module docstring for ``url``).

    ``retries`` is how many times a failed try may be repeated, or a ``RetryPolicy``.
    ``attempts`` is how many tries the last call made.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        retries: int | RetryPolicy = 3,
        timeout: float = 30.0,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/predict") else f"{base}/predict"
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries + 1)
        self.attempts = 0
        self._sleep = sleep
        self._rng = rng or random.Random()
        headers = {"user-agent": f"tinyserve/{__version__}"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(timeout=timeout, headers=headers)

    def predict(
        self, image: bytes | str | os.PathLike[str], top_k: int | None = None
    ) -> dict[str, Any]:
        """Classify one image (its bytes, or a path): the server's JSON answer."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        response = self.request(
            "POST",
            self.endpoint,
            content=data,
            params={"top_k": top_k} if top_k is not None else None,
            headers={"content-type": "application/octet-stream"},
        )
        body = _json_or_none(response)
        if response.status_code == 200 and body is not None:
            return body
        error = (body or {}).get("error")
        if not isinstance(error, dict):
            error = {"message": error} if isinstance(error, str) else {}
        raise RemoteError(
            str(error.get("message") or response.text[:200] or response.reason_phrase),
            response.status_code,
            str(error.get("code") or f"http_{response.status_code}"),
        )

    def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        """One request, tried again under the retry policy; the last answer comes back."""
        policy = self.retry
        started = time.monotonic()
        failure: httpx.Response | httpx.TransportError
        for attempt in range(1, policy.attempts + 1):
            self.attempts = attempt
            retry_after = None
            try:
                response = self._http.request(method, url, **options)
            except RETRIED_ERRORS as exc:
                failure = exc
            else:
                if response.status_code not in policy.statuses:
                    return response
                failure, retry_after = response, _retry_after(response)
            if attempt == policy.attempts:
                break
            wait = policy.delay(attempt - 1, retry_after, self._rng)
            if time.monotonic() - started + wait > policy.deadline_s:
                break
            self._sleep(wait)
        if isinstance(failure, httpx.Response):
            return failure
        reason = str(failure) or type(failure).__name__
        raise RemoteError(
            f"cannot reach {url} after {self.attempts} attempt(s): {reason}",
            None,
            "unreachable",
        ) from failure

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None  # absent, or an HTTP date: the backoff decides


def _json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
