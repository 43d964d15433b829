"""The Open Inference Protocol (KServe V2, as Triton speaks it) over the same models.

``V2_ROUTES`` are served beside the REST API and share its context: the registry, batchers,
decoder and metrics, so a V2 request joins the same batches as a REST one. Pixels arrive
either as a UINT8 tensor in the model's own ``[N, H, W, C]`` shape or as a BYTES tensor
``[N]`` of encoded images, which go through the same ``classify`` as a REST upload;
``v2_tensors`` reads and writes the tensors. Errors answer ``{"error": "<message>"}``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tinyserve import __version__
from tinyserve import openapi as schemas
from tinyserve.asgi import Call, Reply, json_reply
from tinyserve.batcher import Ticket
from tinyserve.classify import Results
from tinyserve.context import ServedRunner, ServingContext
from tinyserve.engine import Logits
from tinyserve.errors import InvalidParameter, ModelNotFound, TinyServeError
from tinyserve.production import classify_request
from tinyserve.registry import LoadedModel
from tinyserve.requests import Upload
from tinyserve.routes import Route
from tinyserve.v2_tensors import (
    BYTES_INPUT,
    PROBABILITIES,
    InferRequest,
    decompress,
    encode_response,
    json_object,
    split_body,
)

__all__ = ["V2_ROUTES"]

PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "inference-header-content-length"
_EMPTY_OK = Reply(200, b"", None, b"text/plain")
_EMPTY_BAD = Reply(400, b"", None, b"text/plain")  # V2's "not ready"


def _model(context: ServingContext, call: Call, routed: bool = False) -> LoadedModel:
    """The version a path names; without one, the default, or (``routed``: inference) the
    one the model's rollout chooses."""
    name = call.path_params["model"]
    raw = call.path_params.get("version")
    if raw is not None and not (raw.isascii() and raw.isdigit()):  # int() refuses "²"
        raise InvalidParameter(f"model version must be a whole number, got {raw!r}")
    if raw is None and routed:
        return context.model(name, None, call)
    return context.registry.get(name, int(raw) if raw is not None else None)


# -- health and metadata ------------------------------------------------------------------


async def no_route(context: ServingContext, call: Call) -> Reply:
    message = f"no route {call.method} {call.path}; see docs/api.md (V2)"
    return json_reply({"error": message}, 404)


async def live(context: ServingContext, call: Call) -> Reply:
    return _EMPTY_OK


async def ready(context: ServingContext, call: Call) -> Reply:
    registry = context.registry
    ok = registry.ready and bool(registry.names) and not registry.errors
    return _EMPTY_OK if ok else _EMPTY_BAD


async def model_ready(context: ServingContext, call: Call) -> Reply:
    try:
        _model(context, call)
    except TinyServeError:
        return _EMPTY_BAD
    return _EMPTY_OK


async def server_metadata(context: ServingContext, call: Call) -> Reply:
    extensions = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
    if context.config.admin_token is not None:
        extensions.append("model_repository")
    return json_reply({"name": "tinyserve", "version": __version__, "extensions": extensions})


async def model_metadata(context: ServingContext, call: Call) -> Reply:
    model = _model(context, call)
    if "version" in call.path_params:
        versions = [str(model.version)]
    else:
        versions = [str(m.version) for m in context.registry.versions(model.name)]
    h, w, c = model.manifest.input.shape
    classes = model.manifest.num_classes
    return json_reply(
        {
            "name": model.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [
                {"name": model.engine.input_name, "datatype": "UINT8", "shape": [-1, h, w, c]},
                {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": model.engine.output_name, "datatype": "FP32", "shape": [-1, classes]},
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
            ],
        }
    )


async def model_config(context: ServingContext, call: Call) -> Reply:
    model = _model(context, call)
    batching = model.batcher.config
    served = [m.version for m in context.registry.versions(model.name)]
    classes = model.manifest.num_classes
    outputs = [
        {"name": name, "data_type": "TYPE_FP32", "dims": [classes], "label_filename": ""}
        for name in (model.engine.output_name, PROBABILITIES)
    ]
    return json_reply(
        {
            "name": model.name,
            "platform": PLATFORM,
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": served}},
            "max_batch_size": batching.max_batch_size,
            "input": [
                {
                    "name": model.engine.input_name,
                    "data_type": "TYPE_UINT8",
                    "format": "FORMAT_NHWC",
                    "dims": list(model.manifest.input.shape),
                    "optional": True,
                },
                {
                    "name": BYTES_INPUT,
                    "data_type": "TYPE_STRING",
                    "format": "FORMAT_NONE",
                    "dims": [1],
                    "reshape": {"shape": []},
                    "optional": True,
                },
            ],
            "output": outputs,
            "dynamic_batching": {
                "max_queue_delay_microseconds": round(batching.max_delay_ms * 1000),
                "default_queue_policy": {
                    "timeout_action": "REJECT",
                    "default_timeout_microseconds": round(batching.timeout_s * 1e6),
                    "max_queue_size": batching.max_queue,
                },
            },
            "instance_group": [{"name": model.name, "kind": "KIND_CPU", "count": 1}],
            "parameters": {"labels": {"string_value": ",".join(model.manifest.labels)}},
        }
    )


async def stats(context: ServingContext, call: Call) -> Reply:
    name = call.path_params.get("model")
    if name is None:
        models = [m for n in context.registry.names for m in context.registry.versions(n)]
    elif "version" in call.path_params:
        models = [_model(context, call)]
    else:
        models = context.registry.versions(name)
    return json_reply({"model_stats": [_model_stats(context, m) for m in models]})


def _model_stats(context: ServingContext, model: LoadedModel) -> dict[str, Any]:
    metrics = context.metrics
    counts = metrics.inference_stats(model.name, model.version)
    total, failed, ok_seconds, failed_seconds = metrics.request_totals(model.name)
    decodes, decode_seconds = metrics.stage_totals(model.name, "decode")
    images = counts.inference_count
    return {
        "name": model.name,
        "version": str(model.version),
        "last_inference": counts.last_inference_ms,
        "inference_count": images,
        "execution_count": counts.execution_count,
        "inference_stats": {
            "success": _duration(total - failed, ok_seconds * 1e9),
            "fail": _duration(failed, failed_seconds * 1e9),
            "queue": _duration(images, counts.queue_ns),
            "compute_input": _duration(decodes, decode_seconds * 1e9),
            "compute_infer": _duration(images, counts.compute_infer_ns),
            "compute_output": _duration(counts.compute_output_count, counts.compute_output_ns),
        },
        "batch_stats": [
            {"batch_size": size, "compute_infer": _duration(n, ns)}
            for size, (n, ns) in sorted(counts.batches.items())
        ],
    }


# -- inference ----------------------------------------------------------------------------


async def infer(context: ServingContext, call: Call) -> Reply:
    started = time.perf_counter()
    # A place in the queue first, before the body is read (see Batcher.admit).
    model, ticket = await context.admit(_model(context, call, routed=True))
    try:
        return await _infer(context, call, model, ticket, started)
    finally:
        ticket.release()


async def _infer(
    context: ServingContext, call: Call, model: LoadedModel, ticket: Ticket, started: float
) -> Reply:
    headers = call.headers
    body = decompress(
        await context.read_body(call),
        headers.get("content-encoding", ""),
        context.config.max_body_bytes,
    )
    header, binary = split_body(body, headers.get(HEADER_LENGTH))
    request = InferRequest.parse(header, binary, model, context.config.max_batch_images)
    runner = ServedRunner(context, model, ticket=ticket)
    if request.encoded is not None:
        uploads = [Upload(None, data) for data in request.encoded]
        routed = "version" not in call.path_params
        results = await classify_request(context, call, model, uploads, 1, routed, ticket)
        for item in results.items:
            if item.error is not None:
                raise type(item.error)(f"BYTES element {item.index}: {item.error.message}")
        assert results.logits is not None
        logits: Logits = results.logits
        queue, inference = results.queue_s, results.inference_s
        ran = _answered(context, results, model)
    else:
        assert request.pixels is not None
        inferred = await runner.infer(list(request.pixels))
        logits = inferred.logits
        queue, inference = max(inferred.queue_s), inferred.batches_s
        ran = runner.model  # the version that ran, should a reload have replaced the first
    outputs_started = time.perf_counter()
    tensors = request.outputs(logits.astype(np.float32, copy=False), ran)
    content, header_length = encode_response(ran, request, tensors)
    if header_length is None:
        reply = Reply(200, content)
    else:
        length = [(b"inference-header-content-length", str(header_length).encode())]
        reply = Reply(200, content, length, b"application/octet-stream")
    finished = time.perf_counter()
    context.metrics.observe_output(ran.name, ran.version, finished - outputs_started)
    if len(logits) == 1:  # per-image stages, as the REST API records them
        total = finished - started
        decode = outputs_started - started - queue - inference
        context.metrics.observe_stages(ran.name, decode, queue, inference, total)
    return reply


def _answered(context: ServingContext, results: Results, asked: LoadedModel) -> LoadedModel:
    """The version that answered (a fallback, the stable version behind a failed canary, or
    a reload's successor), as the registry serves it now."""
    if (results.model, results.version) == (asked.name, asked.version):
        return asked.live() if asked.batcher.closing else asked
    try:
        return context.registry.get(results.model, results.version)
    except TinyServeError:
        return asked


# -- repository ---------------------------------------------------------------------------


async def repository_index(context: ServingContext, call: Call) -> Reply:
    ready_only = False
    body = await context.read_body(call)
    if body.strip():
        options = json_object(body, "the repository index request")
        ready_only = options.get("ready") is True
    registry = context.registry
    index: list[dict[str, Any]] = []
    for name in registry.on_disk():
        if name in registry.names:
            for m in registry.versions(name):
                index.append({"name": name, "version": str(m.version), "state": "READY"})
        elif not ready_only:
            reason = registry.errors.get(name, "not loaded")
            index.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
    return json_reply(index)


async def load(context: ServingContext, call: Call) -> Reply:
    name = call.path_params["model"]
    if name not in context.registry.on_disk():
        raise ModelNotFound(f"no model {name!r} on disk in {context.config.repo}")
    await context.registry.load(name)
    return _EMPTY_OK


async def unload(context: ServingContext, call: Call) -> Reply:
    await context.registry.unload(call.path_params["model"])
    return _EMPTY_OK


def _duration(count: int, ns: float) -> dict[str, int]:
    return {"count": int(count), "ns": round(ns)}


# -- the table ----------------------------------------------------------------------------

_M = "/v2/models/{model}"
_V = "/v2/models/{model}/versions/{version}"
_V2: dict[str, Any] = {"tag": "v2", "errors": "v2"}
_EMPTY: dict[str, Any] = {**_V2, "response_type": ""}
_READY: dict[str, Any] = {**_EMPTY, "statuses": (400,)}  # V2's "not ready"
_READ: dict[str, Any] = {**_V2, "statuses": (400, 404, 503)}
_INFER: dict[str, Any] = {**_V2, "counted": True, "body": schemas.V2_INFER_BODY,
                          "query": schemas.V2_INFER_HEADERS,
                          "response": schemas.V2_INFER_RESPONSE,
                          "statuses": (400, 404, 413, 503, 504)}  # fmt: skip
_REPO: dict[str, Any] = {**_V2, "admin": True, "statuses": (400, 401, 404, 500)}

V2_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2", server_metadata, "Server metadata", **_V2),
    Route("GET", "/v2/health/live", live, "Liveness", **_EMPTY),
    Route("GET", "/v2/health/ready", ready, "Readiness (400 until every model is loaded)",
          **_READY),
    Route("GET", f"{_M}/ready", model_ready, "Model readiness (400 if not ready)", **_READY),
    Route("GET", f"{_V}/ready", model_ready, "Model version readiness", **_READY),
    Route("GET", "/v2/models/stats", stats, "Statistics of every model", **_READ),
    Route("GET", f"{_M}/stats", stats, "Model statistics", **_READ),
    Route("GET", f"{_V}/stats", stats, "Model version statistics", **_READ),
    Route("GET", f"{_M}/config", model_config, "Model configuration (Triton's)", **_READ),
    Route("GET", f"{_V}/config", model_config, "Model version configuration", **_READ),
    Route("GET", _M, model_metadata, "Model metadata", **_READ),
    Route("GET", _V, model_metadata, "Model version metadata", **_READ),
    Route("POST", f"{_M}/infer", infer, "Inference", **_INFER),
    Route("POST", f"{_V}/infer", infer, "Inference on a model version", **_INFER),
    Route("POST", "/v2/repository/index", repository_index, "Repository index (admin token)",
          body=schemas.JSON_BODY, response={"type": "array"}, **_REPO),
    Route("POST", "/v2/repository/models/{model}/load", load, "Load a model (admin token)",
          response_type="", **_REPO),
    Route("POST", "/v2/repository/models/{model}/unload", unload, "Unload a model (admin token)",
          response_type="", **_REPO),
    Route("GET", "/v2/{path:path}", no_route, "Unknown V2 route", documented=False, **_V2),
    Route("POST", "/v2/{path:path}", no_route, "Unknown V2 route", documented=False, **_V2),
)  # fmt: skip
