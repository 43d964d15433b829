"""The OpenAPI description at /openapi.json, derived from the route table.

The schemas of bodies and answers are declared here, once; each ``Route`` names the ones it
takes and gives, and ``describe(routes)`` builds the paths from the table itself, so a route
cannot be served without being documented, nor documented without being served.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tinyserve import __version__

if TYPE_CHECKING:
    from tinyserve.routes import Route

Schema = dict[str, Any]

__all__ = ["describe"]

_CONVERTER = re.compile(r"{(\w+):\w+}")
_STRING: Schema = {"type": "string"}
_INTEGER: Schema = {"type": "integer"}
_NUMBER: Schema = {"type": "number"}
_BINARY: Schema = {"type": "string", "format": "binary"}
_BASE64: Schema = {"type": "string", "format": "byte"}

ERROR_BODY: Schema = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": _STRING, "message": _STRING},
}
ERROR: Schema = {"type": "object", "required": ["error"], "properties": {"error": ERROR_BODY}}
V2_ERROR: Schema = {"type": "object", "required": ["error"], "properties": {"error": _STRING}}

PREDICTION: Schema = {
    "type": "object",
    "properties": {
        "label": _STRING,
        "class_id": _INTEGER,
        "class_name": _STRING,
        "confidence": _NUMBER,
    },
}
_PREDICTIONS: Schema = {"type": "array", "items": PREDICTION}
LATENCY: Schema = {
    "type": "object",
    "properties": {k: _NUMBER for k in ("decode", "queue", "inference", "total")},
}
PREDICT_RESPONSE: Schema = {
    "type": "object",
    "properties": {
        "model": _STRING,
        "version": _INTEGER,
        "label": _STRING,
        "class_id": _INTEGER,
        "confidence": _NUMBER,
        "predictions": _PREDICTIONS,
        "latency_ms": LATENCY,
        "inference_time_ms": _NUMBER,
        "image_shape": {"type": "array", "items": _INTEGER, "minItems": 3, "maxItems": 3},
    },
}
_RESULT: Schema = {
    "type": "object",
    "properties": {
        "index": _INTEGER,
        "filename": {"type": "string", "nullable": True},
        "predictions": {**_PREDICTIONS, "nullable": True},
        "error": {**ERROR_BODY, "nullable": True},
    },
}
BATCH_RESPONSE: Schema = {
    "type": "object",
    "properties": {
        "model": _STRING,
        "version": _INTEGER,
        "total": _INTEGER,
        "succeeded": _INTEGER,
        "failed": _INTEGER,
        "results": {"type": "array", "items": _RESULT},
        "latency_ms": LATENCY,
    },
}
SEED_001_BATCH_RESPONSE: Schema = {
    "type": "object",
    "properties": {
        **BATCH_RESPONSE["properties"],
        "batch_predictions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"image_index": _INTEGER, "predictions": _PREDICTIONS},
            },
        },
        "num_images": _INTEGER,
        "total_inference_time_ms": _NUMBER,
        "average_time_per_image_ms": _NUMBER,
    },
}
SEED_002_BATCH_RESPONSE: Schema = {
    "type": "object",
    "properties": {
        **BATCH_RESPONSE["properties"],
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {**_RESULT["properties"], "inference_time_ms": _NUMBER},
            },
        },
        "total_images": _INTEGER,
        "successful": _INTEGER,
        "total_time_ms": _NUMBER,
    },
}

IMAGE_BODY: Schema = {
    "required": True,
    "content": {
        "image/*": {"schema": _BINARY},
        "application/octet-stream": {"schema": _BINARY},
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "properties": {"file": _BINARY}}
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {"image": _BASE64, "top_k": {"type": "integer", "minimum": 1}},
            }
        },
    },
}
BATCH_BODY: Schema = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {"files": {"type": "array", "items": _BINARY}},
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {
                            "oneOf": [
                                _BASE64,
                                {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {"image": _BASE64, "filename": _STRING},
                                },
                            ]
                        },
                    },
                    "top_k": {"type": "integer", "minimum": 1},
                },
            }
        },
    },
}
JSON_BODY: Schema = {
    "required": False,
    "content": {"application/json": {"schema": {"type": "object"}}},
}
_V2_TENSOR: Schema = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": _STRING,
        "datatype": {"type": "string", "enum": ["UINT8", "BYTES", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 4},
        "data": {"type": "array", "items": {}},
        "parameters": {"type": "object"},
    },
}
V2_INFER_BODY: Schema = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": _STRING,
                    "inputs": {"type": "array", "items": _V2_TENSOR, "minItems": 1, "maxItems": 1},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": _STRING, "parameters": {"type": "object"}},
                        },
                    },
                    "parameters": {"type": "object"},
                },
            }
        },
        "application/octet-stream": {"schema": _BINARY},
    },
}
V2_INFER_RESPONSE: Schema = {
    "type": "object",
    "properties": {
        "model_name": _STRING,
        "model_version": _STRING,
        "id": _STRING,
        "outputs": {"type": "array", "items": _V2_TENSOR},
    },
}
_DEADLINE: Schema = {
    "name": "X-Request-Timeout",
    "in": "header",
    "description": "seconds (0.25) or milliseconds (250ms) the request may wait and run",
    "schema": _STRING,
}
V2_INFER_HEADERS: tuple[Schema, ...] = (
    {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "description": "binary tensor extension: the length of the JSON header",
        "schema": {"type": "integer", "minimum": 0},
    },
    {
        "name": "Content-Encoding",
        "in": "header",
        "schema": {"type": "string", "enum": ["identity", "gzip", "deflate"]},
    },
    _DEADLINE,
)
PREDICT_QUERY: tuple[Schema, ...] = (
    _DEADLINE,
    {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {
        "name": "version",
        "in": "query",
        "description": "a served version number, or 'latest'; the default version if absent",
        "schema": {"oneOf": [{"type": "integer", "minimum": 1}, {"enum": ["latest"]}]},
    },
)


def describe(routes: Iterable[Route]) -> Schema:
    """The OpenAPI 3.0 description of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if route.documented:
            # OpenAPI paths name parameters only: "{name:path}" (Starlette's) is "{name}".
            path = _CONVERTER.sub(r"{\1}", route.path)
            paths.setdefault(path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "tinyserve",
            "version": __version__,
            "description": "Image classification over HTTP with dynamic batching.",
        },
        "paths": paths,
    }


def _operation(route: Route) -> Schema:
    params = [
        {"name": name, "in": "path", "required": True, "schema": _STRING} for name in route.params
    ]
    if route.admin:
        params.append(
            {
                "name": "Authorization",
                "in": "header",
                "required": False,
                "schema": _STRING,
                "description": "Bearer <admin token>",
            }  # fmt: skip
        )
    error = V2_ERROR if route.errors == "v2" else ERROR
    if route.response_type == "application/json":
        ok: Schema = {
            "description": "OK",
            "content": {"application/json": {"schema": route.response}},
        }
    elif route.response_type:
        ok = {"description": "OK", "content": {route.response_type: {"schema": _STRING}}}
    else:
        ok = {"description": "OK (no body)"}
    responses: Schema = {"200": ok}
    for status in sorted({*route.statuses, 429, 500}):
        responses[str(status)] = {
            "description": "error",
            "content": {"application/json": {"schema": error}},
        }
    if not route.response_type and route.errors == "v2" and 400 in route.statuses:
        responses["400"] = {"description": "not ready (no body)"}  # V2's readiness answer
    operation: Schema = {
        "summary": route.summary,
        "tags": [route.tag],
        "operationId": _operation_id(route),
        "parameters": params + list(route.query),
        "responses": responses,
    }
    if route.body is not None:
        operation["requestBody"] = route.body
    return operation


def _operation_id(route: Route) -> str:
    words = [w.strip("{}") for w in route.path.split("/") if w]
    return "_".join([route.method.lower(), *words]) or route.method.lower()
