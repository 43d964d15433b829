"""The OpenAPI description served at /openapi.json and the Swagger UI page at /docs."""

from __future__ import annotations

from typing import Any

from tinyserve import __version__

_ERROR_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
}
_ERROR: dict[str, Any] = {"type": "object", "properties": {"error": _ERROR_BODY}}
_PREDICTION = {
    "type": "object",
    "properties": {
        "label": {"type": "string"},
        "class_id": {"type": "integer"},
        "confidence": {"type": "number"},
    },
}
_LATENCY = {
    "type": "object",
    "properties": {k: {"type": "number"} for k in ("decode", "queue", "inference", "total")},
}
_PREDICT_RESPONSE = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "label": {"type": "string"},
        "class_id": {"type": "integer"},
        "confidence": {"type": "number"},
        "predictions": {"type": "array", "items": _PREDICTION},
        "latency_ms": _LATENCY,
    },
}
_BATCH_RESPONSE = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "total": {"type": "integer"},
        "succeeded": {"type": "integer"},
        "failed": {"type": "integer"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer"},
                    "filename": {"type": "string", "nullable": True},
                    "predictions": {"type": "array", "items": _PREDICTION, "nullable": True},
                    "error": {"nullable": True, **_ERROR_BODY},
                },
            },
        },
        "latency_ms": _LATENCY,
    },
}
_IMAGE_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "byte"},
                    "top_k": {"type": "integer"},
                },
            }
        },
    },
}
_BATCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
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
                                {"type": "string", "format": "byte"},
                                {
                                    "type": "object",
                                    "properties": {"image": {"type": "string", "format": "byte"}},
                                },
                            ]
                        },
                    },
                    "top_k": {"type": "integer"},
                },
            }
        },
    },
}
_QUERY = [
    {"name": "top_k", "in": "query", "schema": {"type": "integer", "default": 5}},
    {"name": "version", "in": "query", "schema": {"type": "integer"}},
]
_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(c): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
        for c in codes
    }


def _op(summary: str, body: dict[str, Any] | None, schema: dict[str, Any],
        params: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
            **_errors(400, 404, 413, 415, 422, 429, 503),
        },
    }
    if body is not None:
        op["requestBody"] = body
    return op


_OBJECT: dict[str, Any] = {"type": "object"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "tinyserve",
        "version": __version__,
        "description": "Image classification over HTTP with dynamic batching.",
    },
    "paths": {
        "/v1/models/{model}/predict": {
            "post": _op("Classify one image", _IMAGE_BODY, _PREDICT_RESPONSE, [_MODEL, *_QUERY])
        },
        "/v1/models/{model}/predict/batch": {
            "post": _op("Classify several images", _BATCH_BODY, _BATCH_RESPONSE, [_MODEL, *_QUERY])
        },
        "/v1/models": {"get": _op("List served models", None, _OBJECT, [])},
        "/v1/models/{model}": {"get": _op("Describe a model", None, _OBJECT, [_MODEL])},
        "/predict": {
            "post": _op(
                "Classify one image (default model)", _IMAGE_BODY, _PREDICT_RESPONSE, _QUERY
            )
        },  # fmt: skip
        "/predict/batch": {
            "post": _op(
                "Classify several images (default model)", _BATCH_BODY, _BATCH_RESPONSE, _QUERY
            )
        },  # fmt: skip
        "/infer": {"post": _op("Alias of /predict", _IMAGE_BODY, _PREDICT_RESPONSE, _QUERY)},
        "/infer/batch": {
            "post": _op("Alias of /predict/batch", _BATCH_BODY, _BATCH_RESPONSE, _QUERY)
        },  # fmt: skip
        "/model/info": {"get": _op("Describe the default model", None, _OBJECT, [])},
        "/health": {"get": _op("Service health", None, _OBJECT, [])},
        "/health/live": {"get": _op("Liveness", None, _OBJECT, [])},
        "/health/ready": {
            "get": _op("Readiness: 503 until every model is loaded", None, _OBJECT, [])
        },  # fmt: skip
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/stats": {"get": _op("Request statistics", None, _OBJECT, [])},
        "/admin/models/{model}/reload": {
            "post": _op("Hot-reload a model (admin token)", None, _OBJECT, [_MODEL])
        },
        "/admin/reload": {
            "post": _op("Hot-reload the default model (admin token)", None, _OBJECT, [])
        },  # fmt: skip
    },
}

SWAGGER_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>tinyserve API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""
