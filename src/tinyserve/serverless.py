"""An AWS Lambda handler on the engine: ``tinyserve.serverless.handler``.

It answers API Gateway REST (v1 proxy) and HTTP API (v2) events, Lambda function URLs, and
direct invocations whose event is the JSON body itself. The body is image bytes (raw or
base64 with ``isBase64Encoded``) or JSON ``{"image": "<base64>", "top_k": 5}``; ``top_k``
may also come from the query string. The model is fetched and loaded once per container, on
the first call; later calls reuse it. Configuration comes from the environment:

    TINYSERVE_MODEL_URI     s3://bucket/prefix/<name> or a local model folder (required)
    TINYSERVE_MODEL_VERSION version to serve [default: pinned in config.toml, else highest]
    TINYSERVE_CACHE_DIR     where S3 objects are cached [default: <tmp>/tinyserve-cache]
    TINYSERVE_TOP_K         predictions returned by default [5]
    TINYSERVE_THREADS       ONNX Runtime intra-op threads [0 = every available core]
    TINYSERVE_MAX_IMAGE_MB, TINYSERVE_MAX_PIXELS   image limits, as for ``tinyserve serve``

The model comes only from this configuration: nothing in an event can make it fetch a URL.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tinyserve.classify import EngineRunner, classify_sync, prediction_dicts
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ConfigError, ImageDecodeError, ModelError, TinyServeError
from tinyserve.http_errors import error_reply
from tinyserve.imaging import ImageLimits, decode_base64
from tinyserve.repository import ModelRef, resolve
from tinyserve.requests import Parsed, parse_body, parse_json_object, top_k_param
from tinyserve.settings import ServerConfig, build, from_env
from tinyserve.sources import default_cache_dir, forget, is_remote, materialize

log = logging.getLogger("tinyserve")

Event = Mapping[str, Any]
Response = dict[str, Any]


@dataclass(frozen=True)
class HandlerConfig:
    """What the handler serves and how; ``from_env`` reads it from TINYSERVE_* variables.

    Top-k, threads, the runtime and provider, the cache and the image limits are server
    settings: ``from_env`` reads
    them from the table in ``tinyserve.settings``, with the names, aliases (``TOP_K``,
    ``NUM_THREADS``) and defaults of ``tinyserve serve``.
    """

    model_uri: str
    version: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    default_top_k: int = ServerConfig.default_top_k
    threads: int = EngineConfig.intra_op_threads
    limits: ImageLimits = field(default_factory=ImageLimits)
    runtime: str = EngineConfig.runtime
    provider: str = EngineConfig.provider
    # The server settings read by from_env, by their name in tinyserve.settings.SETTINGS.
    SHARED: ClassVar[tuple[str, ...]] = (
        "cache_dir",
        "top_k",
        "threads",
        "runtime",
        "provider",
        "max_image_mb",
        "max_pixels",
    )

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise ValueError("TINYSERVE_MODEL_URI must name an s3:// prefix or a model folder")
        if self.version is not None and self.version < 1:
            raise ValueError(f"the version must be a positive integer, got {self.version}")
        if self.default_top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.default_top_k}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> HandlerConfig:
        shared = from_env(environ, names=cls.SHARED)
        raw_version = environ.get("TINYSERVE_MODEL_VERSION", "").strip()
        if raw_version and not raw_version.isdigit():
            raise ConfigError(f"TINYSERVE_MODEL_VERSION must be a number, got {raw_version!r}")
        try:
            limits = build(ImageLimits, shared, "limits")
            return cls(
                model_uri=environ.get("TINYSERVE_MODEL_URI", ""),
                version=int(raw_version or 0) or None,
                cache_dir=shared.get("cache_dir") or default_cache_dir(),
                default_top_k=shared.get("top_k", cls.default_top_k),
                threads=shared.get("threads", cls.threads),
                limits=limits,
                runtime=shared.get("runtime", cls.runtime),
                provider=shared.get("provider", cls.provider),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class _Model:
    ref: ModelRef
    engine: Engine
    load_seconds: float
    config: HandlerConfig
    runner: EngineRunner


_model: _Model | None = None  # one per container, built by the first call


def reset() -> None:
    """Forget the loaded model, so the next call starts cold (tests, benchmarks)."""
    global _model
    _model = None


def load(config: HandlerConfig) -> _Model:
    """Fetch the model (S3 into the cache, or a local folder) and build its engine."""
    started = time.perf_counter()
    folder = materialize(config.model_uri, config.cache_dir)
    ref = resolve(folder, config.version)
    try:
        engine = Engine(
            ref.path,
            EngineConfig(
                intra_op_threads=config.threads,
                warmup_runs=1,
                runtime=config.runtime,
                provider=config.provider,
            ),
        )
    except ValueError as exc:  # an unknown runtime or provider
        raise ConfigError(str(exc)) from None
    except ModelError:
        if is_remote(config.model_uri):
            forget(ref.path)  # an unusable download must not be reused by the next start
        raise
    runner = EngineRunner(engine, ref.name, ref.version, config.limits)
    return _Model(ref, engine, time.perf_counter() - started, config, runner)


def handler(event: Event, context: object = None) -> Response:
    """The Lambda entry point: one image in, the same prediction fields as the HTTP API out."""
    global _model
    started = time.perf_counter()
    try:
        cold = _model is None
        if _model is None:
            _model = load(HandlerConfig.from_env())
        model = _model
        if _method(event) == "GET":
            return _response(200, _describe(model, cold))
        parsed = _parse(event)
        classes = model.engine.manifest.num_classes
        query = (event.get("queryStringParameters") or {}).get("top_k")
        top_k = top_k_param(query, parsed.top_k, model.config.default_top_k, classes)
        results = classify_sync(model.runner, parsed.uploads, top_k)
        item = results.items[0]
        if item.error is not None:
            raise item.error
        assert item.predictions is not None
    except Exception as exc:  # the one error map; a bug answers 500 rather than crash
        if not isinstance(exc, TinyServeError):
            log.exception("unhandled error in the serverless handler")
        error = error_reply(exc)
        return _response(error.status, json.loads(error.body))
    best = item.predictions[0]
    body = {
        "model": model.ref.name,
        "version": results.version,
        "label": best.label,
        "class_id": best.class_id,
        "pred_index": best.class_id,  # seed 003
        "confidence": best.confidence,
        "predictions": prediction_dicts(item.predictions),
        "timings": {
            "model_load_s": round(model.load_seconds if cold else 0.0, 6),
            "preprocess_s": round(results.decode_s, 6),
            "inference_s": round(results.inference_s, 6),
            "total_s": round(time.perf_counter() - started, 6),
        },
        "cold_start": cold,
    }
    return _response(200, body)


def _describe(model: _Model, cold: bool) -> dict[str, Any]:
    return {
        "status": "ok",
        "model": model.ref.name,
        "version": model.ref.version,
        "labels": list(model.engine.labels),
        "timings": {"model_load_s": round(model.load_seconds if cold else 0.0, 6)},
        "cold_start": cold,
    }


def _method(event: Event) -> str:
    http = event.get("requestContext", {}).get("http", {})  # HTTP API v2, function URLs
    method = event.get("httpMethod") or (http.get("method") if isinstance(http, dict) else None)
    return str(method or "POST").upper()


def _parse(event: Event) -> Parsed:
    """The image and options of an API Gateway / function URL event or a direct invocation."""
    if "body" not in event and "image" in event:  # direct invocation: the event is the JSON
        return parse_json_object(event, batch=False)
    raw = _body(event)
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    content_type = headers.get("content-type", "")
    if raw[:1] == b"{" and not content_type.lower().startswith("multipart/"):
        content_type = "application/json"  # a console test event, sent without a type
    return parse_body(raw, content_type, batch=False, max_images=1)


def _body(event: Event) -> bytes:
    body = event.get("body")
    if body is None or body == "":
        raise ImageDecodeError("the request has no body; send image bytes or JSON with 'image'")
    if event.get("isBase64Encoded"):
        return decode_base64(body, "the base64-encoded body")
    return body.encode() if isinstance(body, str) else bytes(body)


def _response(status: int, body: dict[str, Any]) -> Response:
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json"},
        "isBase64Encoded": False,
        "body": json.dumps(body),
    }
