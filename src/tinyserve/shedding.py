"""Refusing a prediction for a saturated model from its request line, before the app runs.

While a model's queue and its waiting room are full (``Batcher.room`` is 0), the app
refuses every further request for it with 503. Refused in the app, each costs about 100 µs of CPU
(a task, the dispatch, the guard, the error body); under a flood of several times the
server's capacity those refusals take the cores that the batches need, and the good answers
collapse. ``Shedder.refusal(method, target)`` is asked by the HTTP protocol
(``cli.protocol``) once a request's headers are in: it returns the complete 503 answer the
app would have given (same status, body, ``Retry-After``; counted in the same metrics), or
None to hand the request to the app as usual. A refusal then costs about a tenth as much.

It answers only what it can answer exactly, and passes on everything else: prediction
routes (``Route.counted``) by POST, a model served without a rollout (a rollout's split,
fallback and breaker choose per request), the version named in the path or ``?version=``
or else the default one. It stays out of the way entirely while CORS, the access log or
tracing is on, since those see every request in the app.

    shedder = Shedder(context, ROUTES)
    shedder.refusal(b"POST", b"/v1/models/fashion-cnn/predict")  # None, or b"HTTP/1.1 503 ..."
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
from collections.abc import Iterable
from typing import NamedTuple

from tinyserve import tracing
from tinyserve.batcher import Batcher
from tinyserve.context import ServingContext
from tinyserve.errors import TinyServeError
from tinyserve.http_errors import error_reply
from tinyserve.registry import LoadedModel
from tinyserve.routes import Route

__all__ = ["Shedder"]

_MAX_KNOWN = 1024  # request paths remembered (a flood of random paths resets the memory)
_STATUS_LINE = b"HTTP/1.1 503 Service Unavailable\r\n"


class _Target(NamedTuple):
    route: Route
    model: str | None  # None: the default model
    version: int | None


class Shedder:
    """The early 503 of predictions for saturated models (see the module)."""

    def __init__(self, context: ServingContext, routes: Iterable[Route]) -> None:
        self._context = context
        self._patterns = [
            (_pattern(route.path), route)
            for route in routes
            if route.counted and route.method == "POST"
        ]
        self._known: dict[bytes, _Target | None] = {}
        self._answers: dict[tuple[str, str], bytes] = {}
        self._passed: dict[Batcher, int] = {}  # let through since the event loop's last turn
        config = context.config
        self.enabled = not (config.cors_origins or config.access_log or config.trace)

    def refusal(self, method: bytes, target: bytes) -> bytes | None:
        """The whole HTTP answer refusing this request now, or None to serve it as usual."""
        if method != b"POST" or not self.enabled or tracing.tracer is not None:
            return None
        started = time.perf_counter()
        path, _, query = target.partition(b"?")
        found = self._known.get(path, _Target)  # the class itself: not looked up yet
        if found is _Target:
            found = self._remember(path)
        if found is None:
            return None
        assert isinstance(found, _Target)
        version = found.version
        if query and found.route.errors == "rest":
            version = _version_query(query)
            if version == -1:
                return None
        model = self._model(found, version)
        if model is None or self._passes(model.batcher):
            return None
        answer = self._answer(found.route, model)
        metrics = self._context.metrics
        metrics.count_error(found.route.path, "overloaded")
        metrics.observe_request(found.route.path, 503, time.perf_counter() - started, model.name)
        return answer

    def _passes(self, batcher: Batcher) -> bool:
        """Whether the app would admit (or let wait) one more request for ``batcher``.

        The requests whose headers arrive together are all looked at before the app runs
        for any of them, so the batcher's room alone would let through a burst that the
        app then refuses one by one. Each one let through takes a place here until the
        event loop's next turn, when the app has admitted them (it does so first thing).
        """
        passed = self._passed.get(batcher, 0)
        if passed >= batcher.room:
            return False
        if not self._passed:
            asyncio.get_running_loop().call_soon(self._passed.clear)
        self._passed[batcher] = passed + 1
        return True

    def _model(self, target: _Target, version: int | None) -> LoadedModel | None:
        registry = self._context.registry
        try:
            model = registry.get(target.model, version)
        except TinyServeError:
            return None  # the app's own answer (404, not ready...) is not ours to give
        if registry.with_rollouts and registry.rollout(model.name) is not None:
            return None
        if target.route.errors == "rest":  # REST refuses the other task with 400 first
            task = "detect" if target.route.path.endswith("/detect") else "classify"
            if model.manifest.task != task:
                return None
        return model

    def _answer(self, route: Route, model: LoadedModel) -> bytes:
        batcher = model.batcher
        key = (route.errors, batcher.name)
        answer = self._answers.get(key)
        if answer is None:
            error = error_reply(batcher.refusal(), route.errors)
            head = [b"content-type: application/json", b"content-length: %d" % len(error.body)]
            head += [name + b": " + value for name, value in error.headers]
            answer = _STATUS_LINE + b"\r\n".join(head) + b"\r\n\r\n" + error.body
            self._answers[key] = answer
        return answer

    def _remember(self, path: bytes) -> _Target | None:
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()
        found = self._match(path)
        self._known[path] = found
        return found

    def _match(self, raw: bytes) -> _Target | None:
        if b"%" in raw or not raw.isascii():
            return None  # the app decodes those; nothing common is spelled so
        path = raw.decode("ascii")
        for pattern, route in self._patterns:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            params = match.groupdict()
            raw_version = params.get("version")
            if raw_version is not None and not (raw_version.isascii() and raw_version.isdigit()):
                return None
            version = int(raw_version) if raw_version is not None else None
            return _Target(route, params.get("model"), version)
        return None


def _pattern(path: str) -> re.Pattern[str]:
    """A route path as a regular expression: each ``{name}`` one path segment."""
    parts = re.split(r"{(\w+)}", path)
    pieces = [
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
    ]
    return re.compile("".join(pieces))


def _version_query(query: bytes) -> int | None:
    """``?version=N`` of a REST prediction: N, None without one, -1 for anything unusual."""
    try:
        values = urllib.parse.parse_qs(query.decode("ascii"), strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        return -1
    raw = values.get("version")
    if raw is None:
        return None
    if len(raw) != 1 or not (raw[0].isascii() and raw[0].isdigit()):
        return -1
    return int(raw[0])
