"""The REST API: prediction, model metadata, health, metrics and admin routes.

Each handler is a module-level coroutine ``handler(context, call) -> Reply``; ``REST_ROUTES``
declares where each one is served and how it is documented. The seed-style aliases act on
the default model and answer with a superset of their seed's fields: ``/predict`` and
``/predict/batch`` those of seed 001's C++ server (``class_name``, ``image_shape``,
``batch_predictions``...), ``/infer`` and ``/infer/batch`` those of seed 002's FastAPI service
(``total_images``, ``successful``, ``results[].inference_time_ms``...). Shapes and routes are
in docs/api.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from tinyserve import __version__
from tinyserve import openapi as schemas
from tinyserve.asgi import Call, Reply, json_reply
from tinyserve.batcher import Ticket
from tinyserve.classify import Item, Results, prediction_dicts
from tinyserve.context import ServingContext
from tinyserve.errors import (
    ConfigError,
    InvalidParameter,
    ModelError,
    ModelNotFound,
    PayloadTooLarge,
    TinyServeError,
)
from tinyserve.http_errors import error_body
from tinyserve.metrics import PROMETHEUS_CONTENT_TYPE, merge_stats, summarize
from tinyserve.production import classify_request, served_fields, served_headers
from tinyserve.registry import LoadedModel
from tinyserve.requests import Parsed, parse_body, version_param
from tinyserve.routes import Route

__all__ = ["REST_ROUTES", "SERVICE"]

log = logging.getLogger("tinyserve")

SERVICE = "tinyserve"
BatchShape = Callable[[Results, float], dict[str, Any]]


# -- prediction ---------------------------------------------------------------------------


async def _read(
    context: ServingContext, call: Call, batch: bool
) -> tuple[LoadedModel, Parsed, bool, Ticket]:
    """The model asked for, a place in its queue (taken before the body is read, so that a
    refusal costs no more than the headers), and the parsed body."""
    version = version_param(call.query.get("version"))
    model = context.model(call.path_params.get("model"), version, call)
    call.model = model.name
    if model.manifest.task != "classify":
        raise InvalidParameter(
            f"{model.name} is a {model.manifest.task} model; use /v1/models/{model.name}/detect"
        )
    model, ticket = await context.admit(model)
    try:
        body = await context.read_body(call)
        content_type = call.headers.get("content-type", "")
        parsed = parse_body(body, content_type, batch, context.config.max_batch_images)
    except BaseException:
        ticket.release()
        raise
    return model, parsed, version is None, ticket


async def predict(context: ServingContext, call: Call) -> Reply:
    """One image: its top-k classes and where the time went."""
    started = time.perf_counter()
    model, parsed, routed, ticket = await _read(context, call, batch=False)
    try:
        if len(parsed.uploads) != 1:
            raise InvalidParameter("send exactly one image here; use /predict/batch for several")
        top_k = context.top_k(call.query.get("top_k"), parsed.top_k, model.manifest.num_classes)
        results = await classify_request(
            context, call, model, parsed.uploads, top_k, routed, ticket
        )
    finally:
        ticket.release()
    item = results.items[0]
    if item.error is not None:
        raise item.error
    assert item.predictions is not None
    total = time.perf_counter() - started
    decode = total - item.queue_s - item.inference_s
    context.metrics.observe_stages(results.model, decode, item.queue_s, item.inference_s, total)
    best = item.predictions[0]
    stages = (("decode", decode), ("queue", item.queue_s), ("inference", item.inference_s),
              ("total", total))  # fmt: skip
    latency = {stage: round(seconds * 1000, 3) for stage, seconds in stages}
    headers = served_headers(context, results)
    body: dict[str, Any] = {
        "model": results.model,
        "version": results.version,
        "label": best.label,
        "class_id": best.class_id,
        "confidence": best.confidence,
        "predictions": prediction_dicts(item.predictions),
        "latency_ms": latency,
        "inference_time_ms": latency["total"],  # seeds 001 and 002
        "image_shape": item.image_shape,  # seed 001: [rows, cols, channels] as uploaded
    }
    if headers is not None:
        body.update(served_fields(context, results))
    return json_reply(body, headers=headers)


async def predict_batch(context: ServingContext, call: Call, shape: BatchShape) -> Reply:
    """Several images in one request, batched together; a bad image fails only its item."""
    started = time.perf_counter()
    model, parsed, routed, ticket = await _read(context, call, batch=True)
    try:
        count, limit = len(parsed.uploads), context.config.max_batch_images
        if not count:
            raise InvalidParameter("the batch is empty")
        if count > limit:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {limit}")
        top_k = context.top_k(call.query.get("top_k"), parsed.top_k, model.manifest.num_classes)
        results = await classify_request(
            context, call, model, parsed.uploads, top_k, routed, ticket
        )
    finally:
        ticket.release()
    body = shape(results, time.perf_counter() - started)
    headers = served_headers(context, results)
    if headers is not None:
        body.update(served_fields(context, results))
        body["cached_images"] = results.cached
    return json_reply(body, headers=headers)


def batch_body(results: Results, total_s: float) -> dict[str, Any]:
    """The canonical batch answer of ``/v1/models/{model}/predict/batch``."""
    return {
        "model": results.model,
        "version": results.version,
        "total": len(results.items),
        "succeeded": results.succeeded,
        "failed": len(results.items) - results.succeeded,
        "results": [_item(item) for item in results.items],
        "latency_ms": {
            "decode": _ms(results.decode_s),
            "queue": _ms(results.queue_s),
            "inference": _ms(results.inference_s),
            "total": _ms(total_s),
        },
    }


def seed_001_batch(results: Results, total_s: float) -> dict[str, Any]:
    """``batch_body`` plus seed 001's fields, which list the classified images only."""
    body = batch_body(results, total_s)
    total_ms = body["latency_ms"]["total"]
    body["batch_predictions"] = [  # the same prediction lists as "results", not a copy
        {"image_index": r["index"], "predictions": r["predictions"]}
        for r in body["results"]
        if r["predictions"] is not None
    ]
    body["num_images"] = done = len(body["batch_predictions"])
    body["total_inference_time_ms"] = total_ms
    body["average_time_per_image_ms"] = round(total_ms / max(1, done), 3)
    return body


def seed_002_batch(results: Results, total_s: float) -> dict[str, Any]:
    """``batch_body`` plus seed 002's fields; each result also tells its own time."""
    body = batch_body(results, total_s)
    body["total_images"] = body["total"]
    body["successful"] = body["succeeded"]
    body["total_time_ms"] = body["latency_ms"]["total"]
    for result, item in zip(body["results"], results.items, strict=True):
        result["inference_time_ms"] = _ms(item.queue_s + item.inference_s)
    return body


def _item(item: Item) -> dict[str, Any]:
    return {
        "index": item.index,
        "filename": item.filename,
        "predictions": prediction_dicts(item.predictions) if item.predictions is not None else None,
        "error": error_body(item.error) if item.error is not None else None,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- models -------------------------------------------------------------------------------


async def list_models(context: ServingContext, call: Call) -> Reply:
    registry = context.registry
    models = [
        {
            "name": name,
            "default_version": registry.get(name).version,
            "versions": [m.version for m in registry.versions(name)],
            "default": _is_default(context, name),
        }
        for name in registry.names
    ]
    failed = [{"name": n, "error": e} for n, e in sorted(registry.errors.items())]
    return json_reply({"models": models, "failed": failed})


async def model_info(context: ServingContext, call: Call) -> Reply:
    registry = context.registry
    name = call.path_params.get("model") or registry.default_name
    default = registry.get(name)
    info = default.describe()
    rollout = context.rollout(name)
    extra: dict[str, Any] = {}
    if rollout is not None:
        extra["rollout"] = rollout.describe()
        if rollout.config.shadow is not None:
            extra["rollout"]["shadow_results"] = dict(context.shadow_counts.get(name, {}))
    if context.cache is not None:
        extra["cache"] = context.cache.describe()
    return json_reply(
        {
            **extra,
            "name": name,
            "default_version": default.version,
            "versions": [m.describe() for m in registry.versions(name)],
            # seed 001's /model/info fields
            "model_path": info["path"],
            "input_shape": info["input"]["shape"],
            "output_shape": [-1, info["num_classes"]],
            "num_classes": info["num_classes"],
            "class_names": info["labels"],
        }
    )


def _is_default(context: ServingContext, name: str) -> bool:
    try:
        return context.registry.default_name == name
    except TinyServeError:
        return False


# -- health and metrics -------------------------------------------------------------------


async def health(context: ServingContext, call: Call) -> Reply:
    registry = context.registry
    loaded = bool(registry.names)
    status = "ok" if registry.ready and loaded and not registry.errors else "loading"
    if registry.ready and registry.errors:
        status = "degraded"
    return json_reply(
        {
            "status": status,
            "model_loaded": loaded,
            "models": registry.names,
            "failed": sorted(registry.errors),
            "service": SERVICE,
            "version": __version__,
            "timestamp": int(time.time()),
            "uptime_seconds": round(time.time() - context.metrics.started, 3),
        }
    )


async def live(context: ServingContext, call: Call) -> Reply:
    return json_reply({"status": "ok"})


async def ready(context: ServingContext, call: Call) -> Reply:
    registry = context.registry
    if not registry.ready:
        return json_reply({"status": "loading"}, 503)
    if registry.errors or not registry.names:
        return json_reply({"status": "not ready", "failed": registry.errors}, 503)
    return json_reply({"status": "ready", "models": registry.names})


async def metrics(context: ServingContext, call: Call) -> Reply:
    """Prometheus text; seed 002's JSON summary for a client that accepts only JSON."""
    if _wants_json(call.headers.get("accept", "")):
        return await stats(context, call)
    context.publish_queue_depths()
    return Reply(200, context.metrics.exposition(), None, PROMETHEUS_CONTENT_TYPE.encode())


def _wants_json(accept: str) -> bool:
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "application/json" in types and not any(t.startswith("text/") for t in types)


async def stats(context: ServingContext, call: Call) -> Reply:
    """The server's request statistics; with several workers, all of theirs added up."""
    if context.peers is None:
        return json_reply(context.metrics.stats())
    snapshot = context.metrics.snapshot()
    snapshot["worker"] = context.peers.index
    if context.peers.is_forwarded(call.headers):
        return json_reply(snapshot)  # a sibling adds it to its own
    parts = [snapshot]
    for answer in await context.on_siblings(call):
        if answer.status == 200:
            parts.append(orjson.loads(answer.body))
        else:  # a worker being replaced: the others' figures still answer
            log.warning("/stats without worker %d: %s", answer.worker, answer.body[:200])
    return json_reply(summarize(merge_stats(parts)))


# -- admin --------------------------------------------------------------------------------


async def reload(context: ServingContext, call: Call) -> Reply:
    registry = context.registry
    name = call.path_params.get("model") or registry.default_name
    if name not in registry.on_disk():
        kept = "; the previous version keeps serving" if name in registry.names else ""
        raise ModelNotFound(f"no model {name!r} on disk in {context.config.repo}{kept}")
    try:
        loaded = await registry.load(name)
    except TinyServeError as exc:
        raise type(exc)(f"{exc.message}; the previous version keeps serving") from exc
    await _everywhere(context, call, ModelError)
    return json_reply(
        {
            "message": "Model reloaded successfully",  # seed 002
            "model": name,
            "versions": [m.version for m in loaded],
            "default_version": registry.get(name).version,
        }
    )


async def reload_keys(context: ServingContext, call: Call) -> Reply:
    """Re-read the API key file: a revoked key stops working with this answer."""
    keys = context.reload_keys()
    await _everywhere(context, call, ConfigError)
    return json_reply({"message": "API keys reloaded", "keys": keys})


async def _everywhere(context: ServingContext, call: Call, error: type[TinyServeError]) -> None:
    """Repeat an admin call that this worker has done on the other workers, if any; raises
    ``error`` with the first failure's message, since the server now disagrees with itself."""
    for answer in await context.on_siblings(call):
        if not answer.running:  # being replaced: its successor reads everything afresh
            log.info("worker %d is restarting; it loads the current files", answer.worker)
        elif answer.status != 200:
            try:
                message = orjson.loads(answer.body)["error"]["message"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                message = answer.body.decode("utf-8", "replace")[:500]
            raise error(
                f"this worker succeeded, but worker {answer.worker} answered "
                f"{answer.status or 'nothing'}: {message}; repeat the call"
            )


# -- the table ----------------------------------------------------------------------------

_PREDICT: dict[str, Any] = {"tag": "predict", "counted": True, "query": schemas.PREDICT_QUERY,
            "statuses": (400, 404, 413, 415, 422, 429, 503, 504)}  # fmt: skip
_BATCH: dict[str, Any] = {**_PREDICT, "body": schemas.BATCH_BODY}
_SINGLE: dict[str, Any] = {
    **_PREDICT,
    "body": schemas.IMAGE_BODY,
    "response": schemas.PREDICT_RESPONSE,
}
_ADMIN: dict[str, Any] = {"tag": "admin", "admin": True, "statuses": (401, 404, 500)}

REST_ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/models/{model}/predict", predict, "Classify one image", **_SINGLE),
    Route("POST", "/v1/models/{model}/predict/batch", partial(predict_batch, shape=batch_body),
          "Classify several images", response=schemas.BATCH_RESPONSE, **_BATCH),
    Route("POST", "/predict", predict, "Classify one image (default model; seed 001 fields)",
          **_SINGLE),
    Route("POST", "/predict/batch", partial(predict_batch, shape=seed_001_batch),
          "Classify several images (default model; seed 001 fields)",
          response=schemas.SEED_001_BATCH_RESPONSE, **_BATCH),
    Route("POST", "/infer", predict, "Classify one image (default model; seed 002 fields)",
          **_SINGLE),
    Route("POST", "/infer/batch", partial(predict_batch, shape=seed_002_batch),
          "Classify several images (default model; seed 002 fields)",
          response=schemas.SEED_002_BATCH_RESPONSE, **_BATCH),
    Route("GET", "/v1/models", list_models, "List the served models", "models"),
    Route("GET", "/v1/models/{model}", model_info, "Describe a model", "models",
          statuses=(404, 503)),
    Route("GET", "/model/info", model_info, "Describe the default model", "models",
          statuses=(404, 503)),
    Route("GET", "/health", health, "Service health", "health"),
    Route("GET", "/health/live", live, "Liveness", "health"),
    Route("GET", "/health/ready", ready, "Readiness: 503 until every model is loaded", "health",
          statuses=(503,)),
    Route("GET", "/metrics", metrics, "Prometheus metrics (seed 002's JSON with Accept: "
          "application/json)", "health", response_type="text/plain"),
    Route("GET", "/stats", stats, "Request statistics", "health"),
    Route("POST", "/admin/models/{model}/reload", reload, "Hot-reload a model (admin token)",
          **_ADMIN),
    Route("POST", "/admin/reload", reload, "Hot-reload the default model (admin token)",
          **_ADMIN),
    Route("POST", "/admin/keys/reload", reload_keys, "Re-read the API key file (admin token "
          "or key)", "admin", admin=True, statuses=(400, 401, 403)),
)  # fmt: skip
