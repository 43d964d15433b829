"""The Open Inference Protocol (KServe V2, as Triton speaks it) over the same models.

``v2_routes(server)`` returns the ``/v2`` routes; they share the registry, batchers, decoder
and metrics of the REST API, so a V2 request joins the same batches as a REST one. Pixels
arrive either as a UINT8 tensor in the model's own ``[N, H, W, C]`` shape or as a BYTES
tensor ``[N]`` of encoded images (decoded exactly like the REST API); ``v2_tensors`` reads
and writes the tensors. Errors answer ``{"error": "<message>"}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tinyserve import __version__
from tinyserve.asgi import log_access
from tinyserve.engine import Logits
from tinyserve.errors import InvalidParameter, ModelNotFound, TinyServeError
from tinyserve.imaging import Pixels
from tinyserve.registry import LoadedModel
from tinyserve.repository import discover
from tinyserve.v2_tensors import (
    BYTES_INPUT,
    PROBABILITIES,
    InferRequest,
    decompress,
    encode_response,
    json_object,
    split_body,
)

if TYPE_CHECKING:
    from tinyserve.app import _Server

log = logging.getLogger("tinyserve")

PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "inference-header-content-length"

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def v2_routes(server: _Server) -> list[Route]:
    """The V2 routes over ``server``'s models."""
    return _V2(server).routes()


class _V2:
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.registry = server.registry
        self.metrics = server.metrics
        self.config = server.config

    def routes(self) -> list[Route]:
        get, post = self._get, self._post
        model = "/v2/models/{model}"
        version = "/v2/models/{model}/versions/{version}"
        return [
            get("/v2", self.server_metadata),
            get("/v2/health/live", self.live),
            get("/v2/health/ready", self.ready),
            get(f"{model}/ready", self.model_ready),
            get(f"{version}/ready", self.model_ready),
            get("/v2/models/stats", self.stats),
            get(f"{model}/stats", self.stats),
            get(f"{version}/stats", self.stats),
            get(f"{model}/config", self.model_config),
            get(f"{version}/config", self.model_config),
            get(model, self.model_metadata),
            get(version, self.model_metadata),
            post(f"{model}/infer", self.infer, counted=True),
            post(f"{version}/infer", self.infer, counted=True),
            post("/v2/repository/index", self.repository_index),
            post("/v2/repository/models/{model}/load", self.load),
            post("/v2/repository/models/{model}/unload", self.unload),
            Route("/v2/{path:path}", self.no_route, methods=["GET", "POST"]),
        ]

    # -- plumbing -------------------------------------------------------------------------

    def _get(self, path: str, handler: Handler) -> Route:
        return Route(path, self._endpoint(path, handler, False), methods=["GET"])

    def _post(self, path: str, handler: Handler, counted: bool = False) -> Route:
        return Route(path, self._endpoint(path, handler, counted), methods=["POST"])

    def _endpoint(self, route: str, handler: Handler, counted: bool) -> Handler:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                self.server.check_rate(request.client.host if request.client else None)
                response = await handler(request)
            except TinyServeError as exc:
                response = error_response(exc)
            except Exception as exc:  # a bug: answer 500, log it, keep serving
                log.exception("unhandled error on %s", route)
                response = _json({"error": f"internal error: {type(exc).__name__}"}, 500)
            seconds = time.perf_counter() - started
            if counted:
                model = request.path_params.get("model")
                self.metrics.observe_request(route, response.status_code, seconds, model)
            else:
                self.metrics.count_request(route, response.status_code)
            if self.config.access_log:
                client = request.client.host if request.client else None
                log_access(request.method, request.url.path, response.status_code, seconds, client)
            return response

        return endpoint

    def _model(self, request: Request) -> LoadedModel:
        name = request.path_params["model"]
        raw = request.path_params.get("version")
        if raw is not None and not raw.isdigit():
            raise InvalidParameter(f"model version must be a whole number, got {raw!r}")
        return self.registry.get(name, int(raw) if raw is not None else None)

    # -- health and metadata --------------------------------------------------------------

    async def no_route(self, request: Request) -> Response:
        message = f"no route {request.method} {request.url.path}; see docs/api.md (V2)"
        return _json({"error": message}, 404)

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        registry = self.registry
        ok = registry.ready and bool(registry.names) and not registry.errors
        return Response(status_code=200 if ok else 400)

    async def model_ready(self, request: Request) -> Response:
        try:
            self._model(request)
        except TinyServeError:
            return Response(status_code=400)
        return Response(status_code=200)

    async def server_metadata(self, request: Request) -> Response:
        extensions = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
        if self.config.admin_token is not None:
            extensions.append("model_repository")
        return _json({"name": "tinyserve", "version": __version__, "extensions": extensions})

    async def model_metadata(self, request: Request) -> Response:
        model = self._model(request)
        if "version" in request.path_params:
            versions = [str(model.version)]
        else:
            versions = [str(m.version) for m in self.registry.versions(model.name)]
        h, w, c = model.manifest.input.shape
        classes = model.manifest.num_classes
        return _json(
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

    async def model_config(self, request: Request) -> Response:
        model = self._model(request)
        batching = model.batcher.config
        served = [m.version for m in self.registry.versions(model.name)]
        classes = model.manifest.num_classes
        outputs = [
            {"name": name, "data_type": "TYPE_FP32", "dims": [classes], "label_filename": ""}
            for name in (model.engine.output_name, PROBABILITIES)
        ]
        return _json(
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

    async def stats(self, request: Request) -> Response:
        name = request.path_params.get("model")
        if name is None:
            models = [m for n in self.registry.names for m in self.registry.versions(n)]
        elif "version" in request.path_params:
            models = [self._model(request)]
        else:
            models = self.registry.versions(name)
        return _json({"model_stats": [self._model_stats(m) for m in models]})

    def _model_stats(self, model: LoadedModel) -> dict[str, Any]:
        metrics = self.metrics
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

    # -- inference ------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        t0 = time.perf_counter()
        model = self._model(request)
        body = decompress(
            await self.server.read_body(request.receive, request.headers.get("content-length")),
            request.headers.get("content-encoding", ""),
            self.config.max_body_bytes,
        )
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        spec = InferRequest.parse(header, binary, model, self.config.max_batch_images)
        if spec.encoded is not None:
            rows = await self._decode_all(spec.encoded, model)
        else:
            assert spec.pixels is not None
            rows = list(spec.pixels)
        t1 = time.perf_counter()
        model = model.live()
        results = await model.infer_many(rows)
        t2 = time.perf_counter()
        logits: Logits = np.stack([row for row, _ in results]).astype(np.float32, copy=False)
        tensors = spec.outputs(logits, model)
        content, header_length = encode_response(model, spec, tensors)
        if header_length is None:
            response = Response(content, media_type="application/json")
        else:
            response = Response(
                content,
                media_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(header_length)},
            )
        t3 = time.perf_counter()
        self.metrics.observe_output(model.name, model.version, t3 - t2)
        if len(rows) == 1:  # per-image stages, as the REST API records them
            _, timing = results[0]
            self.metrics.observe_stages(
                model.name, t1 - t0, timing.queue, timing.inference, t3 - t0
            )
        return response

    async def _decode_all(self, images: list[bytes], model: LoadedModel) -> list[Pixels]:
        decoded = await asyncio.gather(
            *(self.server.decode(data, model) for data in images), return_exceptions=True
        )
        rows: list[Pixels] = []
        for i, result in enumerate(decoded):
            if isinstance(result, TinyServeError):
                raise type(result)(f"BYTES element {i}: {result.message}")
            if isinstance(result, BaseException):
                raise result
            rows.append(result)
        return rows

    # -- repository -----------------------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        self.server.check_admin(request.headers.get("authorization"))
        ready_only = False
        body = await self.server.read_body(request.receive, request.headers.get("content-length"))
        if body.strip():
            options = json_object(body, "the repository index request")
            ready_only = options.get("ready") is True
        index: list[dict[str, Any]] = []
        for name in discover(self.config.repo):
            if name in self.registry.names:
                for m in self.registry.versions(name):
                    index.append({"name": name, "version": str(m.version), "state": "READY"})
            elif not ready_only:
                reason = self.registry.errors.get(name, "not loaded")
                index.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return _json(index)

    async def load(self, request: Request) -> Response:
        self.server.check_admin(request.headers.get("authorization"))
        name = request.path_params["model"]
        if not (self.config.repo / name).is_dir():
            raise ModelNotFound(f"no model folder {name!r} in {self.config.repo}")
        await self.registry.load(name)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        self.server.check_admin(request.headers.get("authorization"))
        await self.registry.unload(request.path_params["model"])
        return Response(status_code=200)


def error_response(exc: TinyServeError) -> Response:
    """``{"error": message}`` with the REST status, except that every bad input is a 400."""
    from tinyserve.app import status_for  # app imports this module; look it up when called

    status = status_for(exc)
    if status in (415, 422):
        status = 400
    return _json({"error": exc.message}, status)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _duration(count: int, ns: float) -> dict[str, int]:
    return {"count": int(count), "ns": round(ns)}


__all__ = ["v2_routes"]
