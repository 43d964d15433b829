"""The route table and the guard every route runs behind.

Routes are declared once, as ``Route`` values (path, method, handler, and what the OpenAPI
description says of them). Everything else is derived from the table: the app's fast
dispatch (``Dispatch``), the Starlette routes behind it, and the paths of ``/openapi.json``.

``Guard`` is the one wrapper between ASGI and a handler: admin check (the admin token, or an
API key with the ``admin`` scope), API key check of predictions (when keys are on), rate limit,
the handler, the one error map (``ServingContext.fail``), metrics and the access log. A handler
is a plain module-level coroutine ``handler(context, call) -> Reply``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tinyserve import tracing
from tinyserve.asgi import (
    Call,
    ClientGone,
    Receive,
    Reply,
    Scope,
    Send,
    log_access,
    send_response,
    send_stream,
)
from tinyserve.context import ServingContext
from tinyserve.http_errors import Shape

__all__ = ["Dispatch", "Guard", "Handler", "Route", "path_params"]

Handler = Callable[[ServingContext, Call], Awaitable[Reply]]
Schema = dict[str, Any]

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


@dataclass(frozen=True)
class Route:
    """One route: where it is, what answers it, and how it is documented and guarded."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    counted: bool = False  # a prediction: per-model request metrics and latency
    admin: bool = False  # needs 'Authorization: Bearer <admin token>'
    errors: Shape = "rest"  # the shape of its error bodies
    # What /openapi.json says: request body, parameters beyond the path's, 200 answer.
    body: Schema | None = None
    query: tuple[Schema, ...] = ()
    response: Schema = field(default_factory=lambda: {"type": "object"})
    response_type: str = "application/json"
    statuses: tuple[int, ...] = ()  # the error statuses it can answer
    documented: bool = True  # False only for catch-alls

    @property
    def params(self) -> list[str]:
        return path_params(self.path)


def path_params(path: str) -> list[str]:
    """The ``{name}`` parameters of a route path, in order."""
    return _PARAM.findall(path)


class Guard:
    """A route as a bare ASGI app: admission, handler, errors, metrics, access log."""

    __slots__ = ("context", "route")

    def __init__(self, context: ServingContext, route: Route) -> None:
        self.context = context
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        call = Call(scope, receive)
        context, route = self.context, self.route
        traced = tracing.tracer  # None unless --trace: the whole cost of tracing when off
        trace = None if traced is None else traced.request(route, call, started)
        try:
            if route.admin:
                context.check_admin(call.headers)
            elif context.keys is not None and route.counted:  # predictions need a key
                context.check_key(call.headers, "predict")
            context.check_rate(call.client_host)
            reply = await route.handler(context, call)
        except ClientGone:
            if trace is not None:
                trace.end(499)
            return
        except Exception as exc:  # the one error map; a bug answers 500 and is logged
            error = context.fail(exc, route.path, route.errors)
            reply = Reply(error.status, error.body, error.headers)
        if reply.stream is not None:
            await send_stream(send, receive, reply)
        else:
            await send_response(send, reply.status, reply.body, reply.headers, reply.content_type)
        if trace is not None:
            trace.end(reply.status)
        seconds = time.perf_counter() - started
        if route.counted:
            model = call.model or call.path_params.get("model")
            context.metrics.observe_request(route.path, reply.status, seconds, model)
        else:
            context.metrics.count_request(route.path, reply.status)
        if context.config.access_log:
            log_access(call.method, call.path, reply.status, seconds, call.client_host)


class Dispatch:
    """The fast lookup of a request's guard, derived from the table: exact paths, and the
    ``/v1/models/{model}/...`` family by what follows the model name. Anything else (other
    parameters, trailing slashes, unknown paths and methods) is left to the router."""

    PREFIX = "/v1/models/{model}"

    def __init__(self, guards: Mapping[tuple[str, str], Guard]) -> None:
        self._exact: dict[tuple[str, str], Guard] = {}
        self._per_model: dict[tuple[str, str], Guard] = {}
        for (method, path), guard in guards.items():
            params = path_params(path)
            if not params:
                self._exact[method, path] = guard
            elif params == ["model"] and path.startswith(self.PREFIX):
                self._per_model[method, path[len(self.PREFIX) :]] = guard

    def find(self, scope: Scope) -> Guard | None:
        method: str = scope["method"]
        path: str = scope["path"]
        guard = self._exact.get((method, path))
        if guard is None and path.startswith("/v1/models/"):
            name, slash, rest = path[len("/v1/models/") :].partition("/")
            if name:
                guard = self._per_model.get((method, slash + rest))
                if guard is not None:
                    scope["path_params"] = {"model": name}
        return guard
