"""The HTTP server: routes, request parsing, lifespan, and the one error -> HTTP mapping.

``create_app(ServerConfig(...))`` returns the ASGI app. Routes and response shapes are those
of docs/api.md; the seed-style aliases (``/predict``, ``/infer``...) act on the default model.
The prediction POSTs run straight on ASGI (``asgi.py``): ``App`` hands them to their handler
without a framework in between. Every other route, and the lifespan, is Starlette's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from tinyserve import __version__
from tinyserve.asgi import (
    Call,
    ClientGone,
    Receive,
    Scope,
    Send,
    log_access,
    parse_multipart,
    read_body,
)
from tinyserve.asgi import send_response as send_raw
from tinyserve.batcher import BatchConfig
from tinyserve.engine import EngineConfig, softmax, top_predictions
from tinyserve.errors import (
    ConfigError,
    InferenceTimeout,
    InputError,
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
from tinyserve.imaging import ImageLimits, Pixels, decode_base64, decode_image
from tinyserve.manifest import InputSpec
from tinyserve.metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from tinyserve.openapi import OPENAPI, SWAGGER_HTML
from tinyserve.registry import LoadedModel, ModelRegistry
from tinyserve.v2 import v2_routes

log = logging.getLogger("tinyserve")

# The one mapping from the exception tree to HTTP. Order matters: subclasses first.
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
    (ConfigError, 400),
    (ModelError, 500),
)


def status_for(exc: TinyServeError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server can be told; the CLI maps flags and TINYSERVE_* onto it."""

    repo: Path = Path("models")
    default_model: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch_images: int = 64
    default_top_k: int = 5
    decode_threads: int = 2
    inline_decode_bytes: int = 16 * 1024
    admin_token: str | None = None
    rate_limit: float = 0.0
    drain_timeout_s: float = 10.0
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_batch_images < 1:
            raise ValueError("max_body_bytes and max_batch_images must be positive")
        if self.default_top_k < 1:
            raise ValueError(f"default_top_k must be at least 1, got {self.default_top_k}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, got {self.decode_threads}")
        if self.rate_limit < 0 or self.drain_timeout_s < 0:
            raise ValueError("rate_limit and drain_timeout_s must be >= 0")
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise ValueError("the admin token must be at least 8 characters long")


@dataclass
class _Upload:
    filename: str | None
    data: bytes


@dataclass
class _Parsed:
    images: list[_Upload]
    top_k: int | None


class _Server:
    """The state behind the routes: registry, decode pool, metrics, limits."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.registry = ModelRegistry(
            config.repo, config.engine, config.batching, self.metrics, config.default_model
        )
        self.decode_pool: ThreadPoolExecutor | None = None
        self._buckets: dict[str, tuple[float, float]] = {}

    # -- request parsing ------------------------------------------------------------------

    async def read_body(self, receive: Receive, content_length: str | None) -> bytes:
        return await read_body(receive, content_length, self.config.max_body_bytes)

    async def parse(self, call: Call, batch: bool) -> _Parsed:
        """Images and top_k from a raw, multipart or JSON body."""
        headers = call.headers
        body = await self.read_body(call.receive, headers.get("content-length"))
        content_type = headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media == "multipart/form-data":
            return self._parse_multipart(body, content_type, batch)
        if media == "application/json" or media.endswith("+json"):
            return _parse_json(body, batch)
        # curl --data-binary sends application/x-www-form-urlencoded unless told otherwise.
        raw_types = ("application/octet-stream", "application/x-www-form-urlencoded", "")
        if media.startswith("image/") or media in raw_types:
            if batch:
                raise UnsupportedMediaType(
                    "a batch needs multipart/form-data (field 'files') or JSON {\"images\": [...]}"
                )
            return _Parsed([_Upload(None, body)], None)
        raise UnsupportedMediaType(
            f"content type {media!r} is not accepted; send image bytes (image/* or "
            "application/octet-stream), multipart/form-data or application/json"
        )

    def _parse_multipart(self, body: bytes, content_type: str, batch: bool) -> _Parsed:
        # One part more than a batch may hold lets the batch check name the real limit.
        parts = parse_multipart(body, content_type, self.config.max_batch_images + 2)
        files = [p for p in parts if p.filename is not None]
        names = ("files", "file", "images", "image") if batch else ("file", "image", "files")
        uploads = []
        for name in names:
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
        return _Parsed(
            [_Upload(p.filename, p.data) for p in uploads],
            _int_param("top_k", top_k.decode("utf-8", "replace")) if top_k is not None else None,
        )

    # -- prediction -----------------------------------------------------------------------

    async def decode(self, data: bytes, model: LoadedModel) -> Pixels:
        spec, limits = model.manifest.input, self.config.limits
        if len(data) <= self.config.inline_decode_bytes or self.decode_pool is None:
            # A small image decodes faster than a hop to a thread and back.
            return decode_image(data, spec, limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, decode_image, data, spec, limits)

    def top_k(self, call: Call, parsed: _Parsed, model: LoadedModel) -> int:
        raw = call.query.get("top_k")
        top_k = _int_param("top_k", raw) if raw is not None else parsed.top_k
        classes = model.manifest.num_classes
        if top_k is None:
            return min(self.config.default_top_k, classes)
        if not 1 <= top_k <= classes:
            raise InvalidParameter(f"top_k must be between 1 and {classes}, got {top_k}")
        return top_k

    def model_for(self, call: Call) -> LoadedModel:
        name = call.path_params.get("model")
        raw = call.query.get("version")
        version = _int_param("version", raw) if raw is not None else None
        model = self.registry.get(name, version)
        call.model = model.name
        return model

    def check_rate(self, client: str | None) -> None:
        rate = self.config.rate_limit
        if rate <= 0:
            return
        client = client or "-"
        now = time.monotonic()
        tokens, last = self._buckets.get(client, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)  # a bucket of one second's worth
        if tokens < 1:
            raise RateLimited(f"more than {rate:g} requests per second from {client}; slow down")
        self._buckets[client] = (tokens - 1, now)

    def check_admin(self, authorization: str | None) -> None:
        token = self.config.admin_token
        scheme, _, given = (authorization or "").partition(" ")
        if token is None or scheme.lower() != "bearer" or not hmac.compare_digest(given, token):
            raise Unauthorized("admin calls need 'Authorization: Bearer <admin token>'")


Reply = tuple[int, bytes, list[tuple[bytes, bytes]] | None]


class _RawRoute:
    """A prediction route as a bare ASGI app: rate limit, errors, metrics, access log."""

    def __init__(self, server: _Server, route: str, handler: Callable[[Call], Any]) -> None:
        self.server, self.route, self.handler = server, route, handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        call = Call(scope, receive)
        server = self.server
        try:
            server.check_rate(call.client_host)
            reply: Reply = await self.handler(call)
        except ClientGone:
            return
        except TinyServeError as exc:
            reply = error_reply(exc)
        except Exception as exc:  # a bug: answer 500, log it, keep serving
            log.exception("unhandled error on %s", self.route)
            reply = error_reply(ModelError(f"internal error: {type(exc).__name__}"))
        status, body, headers = reply
        await send_raw(send, status, body, headers)
        seconds = time.perf_counter() - started
        model = call.model or call.path_params.get("model")
        server.metrics.observe_request(self.route, status, seconds, model)
        if server.config.access_log:
            log_access(call.method, call.path, status, seconds, call.client_host)


class App:
    """The server's ASGI app: prediction POSTs go straight to their ``_RawRoute``; every
    other request, and the lifespan, to the Starlette app behind it (which has the same raw
    routes too, for the paths and methods this shortcut does not match)."""

    def __init__(self, router: Starlette, exact: dict[str, _RawRoute],
                 per_model: dict[str, _RawRoute]) -> None:  # fmt: skip
        self.router = router
        self.state = router.state
        self._exact = exact
        self._per_model = per_model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            route = self._exact.get(path)
            if route is None and path.startswith("/v1/models/"):
                name, _, rest = path[len("/v1/models/") :].partition("/")
                route = self._per_model.get(rest) if name else None
                if route is not None:
                    scope["path_params"] = {"model": name}
            if route is not None:
                await route(scope, receive, send)
                return
        await self.router(scope, receive, send)


def create_app(config: ServerConfig | None = None) -> App:
    """Build the ASGI app; models load in its lifespan."""
    config = config or ServerConfig()
    server = _Server(config)
    metrics, registry = server.metrics, server.registry

    def instrument(route: str, handler: Callable[[Request], Any], model_route: bool = True) -> Any:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            client = request.client.host if request.client else None
            try:
                server.check_rate(client)
                response: Response = await handler(request)
            except TinyServeError as exc:
                response = error_response(exc)
            except HTTPException as exc:
                response = _json({"error": {"code": "http_error", "message": exc.detail}},
                                 exc.status_code)  # fmt: skip
            except Exception as exc:  # a bug: answer 500, log it, keep serving
                log.exception("unhandled error on %s", route)
                response = error_response(ModelError(f"internal error: {type(exc).__name__}"))
            seconds = time.perf_counter() - started
            if model_route:
                model = request.path_params.get("model")
                metrics.observe_request(route, response.status_code, seconds, model)
            else:
                metrics.count_request(route, response.status_code)
            if config.access_log:
                log_access(request.method, request.url.path, response.status_code, seconds, client)
            return response

        return endpoint

    async def predict(call: Call) -> Reply:
        t0 = time.perf_counter()
        model = server.model_for(call)
        parsed = await server.parse(call, batch=False)
        if len(parsed.images) != 1:
            raise InvalidParameter("send exactly one image here; use /predict/batch for several")
        top_k = server.top_k(call, parsed, model)
        pixels = await server.decode(parsed.images[0].data, model)
        t1 = time.perf_counter()
        model = model.live()
        logits, timing = await model.infer_one(pixels)
        ranked = top_predictions(softmax(logits[None, :]), model.manifest.labels, top_k)[0]
        total = time.perf_counter() - t0
        decode = t1 - t0
        metrics.observe_stages(model.name, decode, timing.queue, timing.inference, total)
        best = ranked[0]
        predictions = [
            {"label": p.label, "class_id": p.class_id, "confidence": p.confidence} for p in ranked
        ]
        total_ms = round(total * 1000, 3)
        return _reply(
            {
                "model": model.name,
                "version": model.version,
                "label": best.label,
                "class_id": best.class_id,
                "confidence": best.confidence,
                "predictions": predictions,
                "latency_ms": {
                    "decode": round(decode * 1000, 3),
                    "queue": round(timing.queue * 1000, 3),
                    "inference": round(timing.inference * 1000, 3),
                    "total": total_ms,
                },
                "inference_time_ms": total_ms,
            }
        )

    async def predict_batch(call: Call) -> Reply:
        t0 = time.perf_counter()
        model = server.model_for(call)
        parsed = await server.parse(call, batch=True)
        if not parsed.images:
            raise InvalidParameter("the batch is empty")
        if len(parsed.images) > config.max_batch_images:
            raise PayloadTooLarge(
                f"{len(parsed.images)} images in one request; the limit is "
                f"{config.max_batch_images}"
            )
        top_k = server.top_k(call, parsed, model)
        decoded = await asyncio.gather(
            *(server.decode(u.data, model) for u in parsed.images), return_exceptions=True
        )
        t1 = time.perf_counter()
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        for d in decoded:
            if isinstance(d, BaseException) and not isinstance(d, InputError):
                raise d
        model = model.live()
        outputs = await model.infer_many([decoded[i] for i in good])  # type: ignore[misc]
        rows = np.stack([row for row, _ in outputs]) if outputs else np.empty((0, 1), np.float32)
        ranked = top_predictions(softmax(rows), model.manifest.labels, top_k) if outputs else []
        by_index = dict(zip(good, ranked, strict=True))
        results = []
        for i, upload in enumerate(parsed.images):
            item: dict[str, Any] = {"index": i, "filename": upload.filename}
            if i in by_index:
                item["predictions"] = [
                    {"label": p.label, "class_id": p.class_id, "confidence": p.confidence}
                    for p in by_index[i]
                ]
                item["error"] = None
            else:
                exc = decoded[i]
                assert isinstance(exc, TinyServeError)
                item["predictions"] = None
                item["error"] = {"code": exc.code, "message": exc.message}
            results.append(item)
        total = time.perf_counter() - t0
        queue = max((t.queue for _, t in outputs), default=0.0)
        inference = sum({t.batch_id: t.inference for _, t in outputs}.values())
        return _reply(
            {
                "model": model.name,
                "version": model.version,
                "total": len(results),
                "succeeded": len(good),
                "failed": len(results) - len(good),
                "results": results,
                "latency_ms": {
                    "decode": round((t1 - t0) * 1000, 3),
                    "queue": round(queue * 1000, 3),
                    "inference": round(inference * 1000, 3),
                    "total": round(total * 1000, 3),
                },
            }
        )

    async def list_models(request: Request) -> Response:
        models = []
        for name in registry.names:
            loaded = registry.versions(name)
            models.append(
                {
                    "name": name,
                    "default_version": registry.get(name).version,
                    "versions": [m.version for m in loaded],
                    "default": _is_default(registry, name),
                }
            )
        failed = [{"name": n, "error": e} for n, e in sorted(registry.errors.items())]
        return _json({"models": models, "failed": failed})

    async def model_info(request: Request) -> Response:
        name = request.path_params.get("model") or registry.default_name
        served = registry.versions(name)
        default = registry.get(name)
        info = default.describe()
        return _json(
            {
                "name": name,
                "default_version": default.version,
                "versions": [m.describe() for m in served],
                # the seed's /model/info field names
                "model_path": info["path"],
                "input_shape": info["input"]["shape"],
                "output_shape": [-1, info["num_classes"]],
                "num_classes": info["num_classes"],
                "class_names": info["labels"],
            }
        )

    async def health(request: Request) -> Response:
        loaded = bool(registry.names)
        status = "ok" if registry.ready and loaded and not registry.errors else "loading"
        if registry.ready and registry.errors:
            status = "degraded"
        return _json(
            {
                "status": status,
                "model_loaded": loaded,
                "models": registry.names,
                "failed": sorted(registry.errors),
                "version": __version__,
                "uptime_seconds": round(time.time() - metrics.started, 3),
            }
        )

    async def live(request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(request: Request) -> Response:
        if not registry.ready:
            return _json({"status": "loading"}, 503)
        if registry.errors or not registry.names:
            return _json({"status": "not ready", "failed": registry.errors}, 503)
        return _json({"status": "ready", "models": registry.names})

    async def prometheus(request: Request) -> Response:
        for name in registry.names:
            depth = sum(m.batcher.depth for m in registry.versions(name))
            metrics.queue_depth.labels(name).set(depth)
        return Response(metrics.exposition(), media_type=PROMETHEUS_CONTENT_TYPE)

    async def stats(request: Request) -> Response:
        return _json(metrics.stats())

    async def reload(request: Request) -> Response:
        server.check_admin(request.headers.get("authorization"))
        name = request.path_params.get("model") or registry.default_name
        if not (config.repo / name).is_dir():
            raise ModelNotFound(f"no model folder {name!r} in {config.repo}")
        try:
            loaded = await registry.load(name)
        except (ModelError, ConfigError) as exc:
            raise type(exc)(f"{exc.message}; the previous version keeps serving") from exc
        versions = [m.version for m in loaded]
        return _json(
            {
                "message": "Model reloaded successfully",
                "model": name,
                "versions": versions,
                "default_version": registry.get(name).version,
            }
        )

    async def openapi(request: Request) -> Response:
        return _json(OPENAPI)

    async def docs(request: Request) -> Response:
        return HTMLResponse(SWAGGER_HTML)

    def post(path: str, handler: Callable[[Request], Any], counted: bool = True) -> Route:
        return Route(path, instrument(path, handler, model_route=counted), methods=["POST"])

    def get(path: str, handler: Callable[[Request], Any], counted: bool = False) -> Route:
        return Route(path, instrument(path, handler, model_route=counted), methods=["GET"])

    raw = {
        path: _RawRoute(server, path, handler)
        for path, handler in [
            ("/v1/models/{model}/predict", predict),
            ("/v1/models/{model}/predict/batch", predict_batch),
            ("/predict", predict),
            ("/predict/batch", predict_batch),
            ("/infer", predict),
            ("/infer/batch", predict_batch),
        ]
    }
    routes = [Route(path, route, methods=["POST"]) for path, route in raw.items()]
    routes += [
        get("/v1/models", list_models),
        get("/v1/models/{model}", model_info),
        get("/model/info", model_info),
        get("/health", health),
        get("/health/live", live),
        get("/health/ready", ready),
        get("/metrics", prometheus),
        get("/stats", stats),
        get("/openapi.json", openapi),
        get("/docs", docs),
    ]
    routes += v2_routes(server)
    if config.admin_token is not None:
        routes += [
            post("/admin/models/{model}/reload", reload, counted=False),
            post("/admin/reload", reload, counted=False),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        server.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        loop = asyncio.get_running_loop()
        # Pillow's warm-up and the models' loading (mostly outside the GIL) overlap.
        await asyncio.gather(
            loop.run_in_executor(server.decode_pool, warm_decoders), registry.load_all()
        )
        hup = _install_sighup(loop, registry)
        log.info("ready: %s", ", ".join(registry.names) or "no models")
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await registry.close(config.drain_timeout_s)
            server.decode_pool.shutdown(wait=False, cancel_futures=True)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = getattr(exc, "detail", "not found")
        if status == 404:
            message = f"no route {request.method} {request.url.path}; see /docs"
        return _json({"error": {"code": "http_error", "message": message}}, status)

    router = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found},
    )
    router.state.server = server
    prefix = "/v1/models/{model}/"
    exact = {path: route for path, route in raw.items() if not path.startswith(prefix)}
    per_model = {p[len(prefix) :]: route for p, route in raw.items() if p.startswith(prefix)}
    return App(router, exact, per_model)


def warm_decoders() -> None:
    """Load the common formats' Pillow plugins and run the decoders once, before the first
    request rather than during it."""
    # Not Image.init(), which imports every plugin (~40). TIFF and MPO are left to the first
    # such upload (Pillow finds them then): the TIFF plugin pulls in fractions and decimal,
    # a tenth of a second of start-up on a slow core.
    from PIL import (  # noqa: F401
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        WebPImagePlugin,
    )

    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, fmt)
        decode_image(buffer.getvalue(), InputSpec(4, 4, 3, "RGB"))


def error_reply(exc: TinyServeError) -> Reply:
    """Status, JSON body and extra headers for an error, on every route of the REST API."""
    headers = None
    if isinstance(exc, Overloaded):
        retry = str(max(1, round(exc.retry_after))).encode()
        headers = [(b"retry-after", retry)]
    body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
    return status_for(exc), body, headers


def error_response(exc: TinyServeError) -> Response:
    status, body, headers = error_reply(exc)
    response = Response(body, status_code=status, media_type="application/json")
    for name, value in headers or ():
        response.headers[name.decode()] = value.decode()
    return response


def _reply(data: Any) -> Reply:
    return 200, orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), None


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _int_param(name: str, raw: object) -> int:
    if isinstance(raw, bool):
        raise InvalidParameter(f"{name} must be an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw))
    except ValueError:
        raise InvalidParameter(f"{name} must be an integer, got {raw!r}") from None


def _parse_json(body: bytes, batch: bool) -> _Parsed:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidParameter(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidParameter("the JSON body must be an object")
    top_k = _int_param("top_k", data["top_k"]) if data.get("top_k") is not None else None
    if not batch:
        if "image" not in data:
            raise InvalidParameter("the JSON body needs an 'image' field holding base64 bytes")
        return _Parsed([_Upload(None, decode_base64(data["image"], "'image'"))], top_k)
    items = data.get("images")
    if not isinstance(items, list):
        raise InvalidParameter("the JSON body needs an 'images' list")
    images: list[_Upload] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            images.append(
                _Upload(item.get("filename"), decode_base64(item.get("image"), f"images[{i}]"))
            )
        else:
            images.append(_Upload(None, decode_base64(item, f"images[{i}]")))
    return _Parsed(images, top_k)


def _is_default(registry: ModelRegistry, name: str) -> bool:
    try:
        return registry.default_name == name
    except TinyServeError:
        return False


def _install_sighup(loop: asyncio.AbstractEventLoop, registry: ModelRegistry) -> bool:
    """Reload every model on SIGHUP, where the platform and thread allow it."""

    def on_hup() -> None:
        log.info("SIGHUP: reloading models")
        task = loop.create_task(registry.reload_all())
        task.add_done_callback(_log_reload)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return False
    return True


def _log_reload(task: asyncio.Task[dict[str, str | None]]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("reload failed: %s", exc)
        return
    for name, error in task.result().items():
        if error:
            log.error("reload of %s failed, previous version kept: %s", name, error)
        else:
            log.info("reloaded %s", name)


__all__: Sequence[str] = ["App", "ServerConfig", "create_app", "status_for"]
