"""The Open Inference Protocol (KServe V2, as Triton speaks it) over the same models.

``v2_routes(server)`` returns the ``/v2`` routes; they share the registry, batchers, decoder
and metrics of the REST API, so a V2 request joins the same batches as a REST one. Pixels
arrive either as a UINT8 tensor in the model's own ``[N, H, W, C]`` shape or as a BYTES
tensor ``[N]`` of encoded images (decoded exactly like the REST API). Tensors come as JSON or
with the binary tensor extension. Errors answer ``{"error": "<message>"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tinyserve import __version__
from tinyserve.engine import Logits, softmax
from tinyserve.errors import (
    ImageDecodeError,
    InvalidParameter,
    ModelNotFound,
    PayloadTooLarge,
    TinyServeError,
    UnsupportedMediaType,
)
from tinyserve.imaging import Pixels
from tinyserve.registry import LoadedModel
from tinyserve.repository import discover

if TYPE_CHECKING:
    from tinyserve.app import _Server

log = logging.getLogger("tinyserve")

BYTES_INPUT = "image"  # the BYTES input of encoded images
PROBABILITIES = "probabilities"
PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "inference-header-content-length"
_LENGTH = struct.Struct("<I")

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def v2_routes(server: _Server) -> list[Route]:
    """The V2 routes over ``server``'s models."""
    return _V2(server).routes()


@dataclass
class _Tensor:
    """One output tensor before it is written as JSON or binary."""

    name: str
    datatype: str  # FP32 (a float32 array) or BYTES (an object array of bytes)
    values: np.ndarray[Any, Any]
    binary: bool

    @property
    def shape(self) -> list[int]:
        return list(self.values.shape)

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return b"".join(_LENGTH.pack(len(v)) + v for v in self.values.reshape(-1))
        return np.ascontiguousarray(self.values, dtype="<f4").tobytes()

    def json_data(self) -> list[Any]:
        if self.datatype == "BYTES":
            return [v.decode() for v in self.values.reshape(-1)]
        data: list[Any] = self.values.reshape(-1).tolist()
        return data


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
                self.server.check_rate(request)
                response = await handler(request)
            except TinyServeError as exc:
                response = error_response(exc)
            except Exception as exc:  # a bug: answer 500, log it, keep serving
                log.exception("unhandled error on %s", route)
                response = _json({"error": f"internal error: {type(exc).__name__}"}, 500)
            if counted:
                model = request.path_params.get("model")
                seconds = time.perf_counter() - started
                self.metrics.observe_request(route, response.status_code, seconds, model)
            else:
                self.metrics.count_request(route, response.status_code)
            return response

        return endpoint

    def _model(self, request: Request) -> LoadedModel:
        name = request.path_params["model"]
        raw = request.path_params.get("version")
        if raw is not None and not raw.isdigit():
            raise InvalidParameter(f"model version must be a whole number, got {raw!r}")
        return self.registry.get(name, int(raw) if raw is not None else None)

    # -- health and metadata --------------------------------------------------------------

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
        body = _decompress(
            await self.server.read_body(request),
            request.headers.get("content-encoding", ""),
            self.config.max_body_bytes,
        )
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        spec = _InferRequest.parse(header, binary, model, self.config.max_batch_images)
        if spec.encoded is not None:
            rows = await self._decode_all(spec.encoded, model)
        else:
            assert spec.pixels is not None
            rows = list(spec.pixels)
        t1 = time.perf_counter()
        results = await model.infer_many(rows)
        t2 = time.perf_counter()
        logits: Logits = np.stack([row for row, _ in results]).astype(np.float32, copy=False)
        tensors = spec.outputs(logits, model)
        response = _encode_response(model, spec, tensors)
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
        self.server.check_admin(request)
        ready_only = False
        body = await self.server.read_body(request)
        if body.strip():
            options = _object(body, "the repository index request")
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
        self.server.check_admin(request)
        name = request.path_params["model"]
        if not (self.config.repo / name).is_dir():
            raise ModelNotFound(f"no model folder {name!r} in {self.config.repo}")
        await self.registry.load(name)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        self.server.check_admin(request)
        await self.registry.unload(request.path_params["model"])
        return Response(status_code=200)


@dataclass
class _Output:
    name: str
    binary: bool
    classification: int


@dataclass
class _InferRequest:
    """A validated inference request: its pixels or encoded images, and what to answer."""

    id: str | None
    pixels: Pixels | None
    encoded: list[bytes] | None
    requested: list[_Output]

    @classmethod
    def parse(
        cls, header: bytes, binary: bytes, model: LoadedModel, max_images: int
    ) -> _InferRequest:
        data = _object(header, "the inference request")
        inputs = data.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise InvalidParameter(
                f"'inputs' must list exactly one tensor: {model.engine.input_name!r} (UINT8 "
                f"pixels) or {BYTES_INPUT!r} (BYTES encoded images)"
            )
        tensor: dict[str, Any] = inputs[0]
        name, datatype = tensor.get("name"), tensor.get("datatype")
        shape = _shape(tensor.get("shape"))
        raw = _binary_input(tensor, binary)
        pixels, encoded = None, None
        if name == model.engine.input_name:
            if datatype != "UINT8":
                raise InvalidParameter(f"input {name!r} must be UINT8, got datatype {datatype!r}")
            pixels = _pixels(tensor, shape, raw, model)
            count = len(pixels)
        elif name == BYTES_INPUT:
            if datatype != "BYTES":
                raise InvalidParameter(f"input {name!r} must be BYTES, got datatype {datatype!r}")
            encoded = _encoded(tensor, shape, raw)
            count = len(encoded)
        else:
            raise InvalidParameter(
                f"unknown input {name!r}; this model takes {model.engine.input_name!r} (UINT8) "
                f"or {BYTES_INPUT!r} (BYTES)"
            )
        if count > max_images:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {max_images}")
        binary_default = _parameters(data).get("binary_data_output") is True
        request_id = data.get("id")
        return cls(
            str(request_id) if request_id is not None else None,
            pixels,
            encoded,
            _requested(data.get("outputs"), model, binary_default),
        )

    def outputs(self, logits: Logits, model: LoadedModel) -> list[_Tensor]:
        probabilities = softmax(logits.copy())
        by_name = {model.engine.output_name: logits, PROBABILITIES: probabilities}
        tensors = []
        for out in self.requested:
            values = by_name[out.name]
            if out.classification:
                labels = _classify(values, out.classification, model.manifest.labels)
                tensors.append(_Tensor(out.name, "BYTES", labels, out.binary))
            else:
                tensors.append(_Tensor(out.name, "FP32", values, out.binary))
        return tensors


def _requested(raw: object, model: LoadedModel, binary_default: bool) -> list[_Output]:
    names = (model.engine.output_name, PROBABILITIES)
    if raw is None:
        return [_Output(n, binary_default, 0) for n in names]
    if not isinstance(raw, list) or not raw:
        raise InvalidParameter("'outputs' must be a non-empty list of {\"name\": ...} objects")
    requested = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise InvalidParameter(
                f"unknown output {name!r}; this model has {', '.join(map(repr, names))}"
            )
        params = _parameters(item)
        binary = params.get("binary_data", binary_default)
        k = params.get("classification", 0)
        classes = model.manifest.num_classes
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= classes:
            raise InvalidParameter(f"classification must be between 1 and {classes}, got {k!r}")
        requested.append(_Output(name, binary is True, k))
    return requested


def _classify(values: Logits, k: int, labels: tuple[str, ...]) -> np.ndarray[Any, Any]:
    """Triton's classification strings ``value:index:label``, best first, ``[N, k]``."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    rows = [
        [f"{values[i, c]:f}:{c}:{labels[c]}".encode() for c in map(int, order[i])]
        for i in range(len(values))
    ]
    array = np.empty((len(rows), k), dtype=object)
    array[:] = rows
    return array


def _pixels(
    tensor: dict[str, Any], shape: list[int], raw: bytes | None, model: LoadedModel
) -> Pixels:
    expected = model.manifest.input.shape
    if len(shape) != 4 or tuple(shape[1:]) != expected or shape[0] < 1:
        dims = ", ".join(map(str, expected))
        raise InvalidParameter(f"a UINT8 input must be shaped [N, {dims}] with N >= 1, got {shape}")
    size = math.prod(shape)
    if raw is not None:
        if len(raw) != size:
            raise InvalidParameter(
                f"shape {shape} needs {size} bytes of UINT8 data, the binary data has {len(raw)}"
            )
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InvalidParameter("the input 'data' must be a list (flat or nested)")
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InvalidParameter("UINT8 'data' must be a flat or evenly nested list") from None
    if values.size != size:
        raise InvalidParameter(f"shape {shape} needs {size} values, 'data' holds {values.size}")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise InvalidParameter("UINT8 'data' must hold whole numbers from 0 to 255")
    return values.astype(np.uint8).reshape(shape)


def _encoded(tensor: dict[str, Any], shape: list[int], raw: bytes | None) -> list[bytes]:
    if len(shape) not in (1, 2) or shape[0] < 1 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidParameter(f"a BYTES input must be shaped [N] (or [N, 1]), got {shape}")
    count = shape[0]
    if raw is not None:
        items: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InvalidParameter("the BYTES binary data ends inside a length prefix")
            (length,) = _LENGTH.unpack_from(raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise InvalidParameter(
                    f"BYTES element {len(items)} declares {length} bytes past the binary data"
                )
            items.append(raw[offset : offset + length])
            offset += length
    else:
        items = [_b64(v, f"BYTES element {i}") for i, v in enumerate(_flatten(tensor.get("data")))]
    if len(items) != count:
        raise InvalidParameter(f"shape {shape} needs {count} BYTES elements, got {len(items)}")
    return items


def _binary_input(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    """The input's binary data, or None when it comes as JSON ``data``."""
    size = _parameters(tensor).get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise InvalidParameter("the input has neither 'data' nor a binary_data_size parameter")
        if binary:
            raise InvalidParameter(
                f"{len(binary)} bytes follow the JSON header but no input has binary_data_size"
            )
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidParameter(f"binary_data_size must be a whole number, got {size!r}")
    if size != len(binary):
        raise InvalidParameter(
            f"binary_data_size is {size} but {len(binary)} bytes follow the JSON header"
        )
    return binary


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit():
        raise InvalidParameter(
            f"Inference-Header-Content-Length must be a number: {header_length!r}"
        )
    n = int(header_length)
    if n > len(body):
        raise InvalidParameter(
            f"Inference-Header-Content-Length is {n} but the body holds only {len(body)} bytes"
        )
    return body[:n], body[n:]


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted; use gzip or deflate"
        )
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidParameter(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit:,} bytes")
    if not inflater.eof:
        raise InvalidParameter(f"the {encoding} body is truncated")
    return out


def _encode_response(model: LoadedModel, spec: _InferRequest, tensors: list[_Tensor]) -> Response:
    outputs, chunks = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.binary:
            raw = t.raw()
            chunks.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            entry["data"] = t.json_data()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if spec.id is not None:
        answer["id"] = spec.id
    answer["outputs"] = outputs
    header = orjson.dumps(answer)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# -- small helpers --------------------------------------------------------------------------


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


def _object(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidParameter(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidParameter(f"{what} must be a JSON object")
    return data


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    params = item.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidParameter("'parameters' must be a JSON object")
    return params


def _shape(raw: object) -> list[int]:
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise InvalidParameter(f"'shape' must be a list of whole numbers, got {raw!r}")
    return raw


def _flatten(data: object) -> list[Any]:
    """Tensor data given flat or nested (row-major), as one flat list."""
    if not isinstance(data, list):
        raise InvalidParameter("the input 'data' must be a list (flat or nested)")
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidParameter(f"{where} must be a base64 string in JSON")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{where} is not valid base64") from None


__all__ = ["v2_routes"]
