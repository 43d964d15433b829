"""The HTTP server's composition root: the route table, the fast dispatch, the lifespan.

``create_app(ServerConfig(...))`` returns the ASGI app. It assembles what the other modules
define: the REST routes (``rest``), the Open Inference Protocol routes (``v2``) and the API
docs, each behind its ``Guard`` (``routes``), over one ``ServingContext``. Requests whose
route the table names exactly (``Dispatch``) go straight to their guard; everything else, and
the lifespan, goes to a Starlette router built from the same table, which answers the
trailing slashes, other methods and unknown paths. The request path is drawn in
docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp

from tinyserve import apidocs
from tinyserve.asgi import Call, Receive, Reply, Scope, Send, json_reply
from tinyserve.context import ServingContext
from tinyserve.openapi import describe
from tinyserve.peers import Peers
from tinyserve.rest import REST_ROUTES
from tinyserve.routes import Dispatch, Guard, Route
from tinyserve.settings import ServerConfig
from tinyserve.shedding import Shedder
from tinyserve.v2 import V2_ROUTES
from tinyserve.video_routes import VIDEO_ROUTES
from tinyserve.webpage import WEB_ROUTES

__all__ = ["ROUTES", "App", "ServerConfig", "create_app"]

_ASSETS = "/docs/assets"


# -- the API docs: served from the package, so machines without internet see them too -----


async def openapi_json(context: ServingContext, call: Call) -> Reply:
    return Reply(200, _openapi())


async def swagger_page(context: ServingContext, call: Call) -> Reply:
    return Reply(200, apidocs.swagger_html("/openapi.json", _ASSETS).encode(), None, _HTML)


async def redoc_page(context: ServingContext, call: Call) -> Reply:
    return Reply(200, apidocs.redoc_html("/openapi.json", _ASSETS).encode(), None, _HTML)


async def docs_asset(context: ServingContext, call: Call) -> Reply:
    name = call.path_params["name"]
    found = apidocs.asset(name)
    if found is None:
        message = f"no documentation asset {name!r}"
        return json_reply({"error": {"code": "not_found", "message": message}}, 404)
    body, kind = found
    return Reply(200, body, [(b"cache-control", b"public, max-age=86400")], kind.encode())


_HTML = b"text/html; charset=utf-8"
_DOCS: dict[str, Any] = {"tag": "docs", "response_type": "text/html"}

ROUTES: tuple[Route, ...] = (
    *REST_ROUTES,
    *V2_ROUTES,
    *VIDEO_ROUTES,
    Route("GET", "/openapi.json", openapi_json, "This description", "docs"),
    Route("GET", "/docs", swagger_page, "Swagger UI", **_DOCS),
    Route("GET", "/redoc", redoc_page, "ReDoc", **_DOCS),
    Route(
        "GET",
        f"{_ASSETS}/{{name}}",
        docs_asset,
        "A file of the docs pages",
        "docs",
        response_type="application/octet-stream",
        statuses=(404,),
    ),  # fmt: skip
    *WEB_ROUTES,
)


@functools.cache
def _openapi() -> bytes:
    return orjson.dumps(describe(ROUTES))


# -- the app ------------------------------------------------------------------------------


class App:
    """The server's ASGI app: table routes straight to their guard, the rest to Starlette.

    ``refusal`` is for the HTTP protocol: the early 503 of a saturated model's predictions
    (``tinyserve.shedding``).
    """

    def __init__(self, context: ServingContext, router: Starlette, dispatch: Dispatch) -> None:
        self.context = context
        self.router = router
        self.state = router.state
        self._dispatch = dispatch
        self.refusal = Shedder(context, ROUTES).refusal
        self._cors: ASGIApp | None = None
        if context.config.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            self._cors = CORSMiddleware(
                self._route,
                allow_origins=list(context.config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["Retry-After", "Inference-Header-Content-Length"],
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._cors is not None:
            await self._cors(scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            guard = self._dispatch.find(scope)
            if guard is not None:
                await guard(scope, receive, send)
                return
        await self.router(scope, receive, send)


def _queue_depths(context: ServingContext) -> dict[str, int]:
    registry = context.registry
    return {name: sum(m.batcher.depth for m in registry.versions(name)) for name in registry.names}


def create_app(config: ServerConfig | None = None, peers: Peers | None = None) -> App:
    """Build the ASGI app; models load in its lifespan. ``peers``: the other workers of a
    ``--workers N`` server, which reloads and ``/stats`` reach too."""
    context = ServingContext(config or ServerConfig(), peers)
    context.metrics.queue_probe = functools.partial(_queue_depths, context)
    guards = {(r.method, r.path): Guard(context, r) for r in ROUTES}

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await context.start()
        try:
            yield
        finally:
            await context.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = getattr(exc, "detail", "not found")
        if status == 404:
            message = f"no route {request.method} {request.url.path}; see /docs"
        body = orjson.dumps({"error": {"code": "http_error", "message": message}})
        return Response(body, status, media_type="application/json")

    router = Starlette(
        routes=[
            StarletteRoute(path, guard, methods=[method])
            for (method, path), guard in guards.items()
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found},
    )
    router.state.context = context
    return App(context, router, Dispatch(guards))
