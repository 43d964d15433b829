"""HTTP routes of detection and video streams.

``POST /v1/models/{model}/detect``: one image through a detector's batcher; boxes in the
image's own pixels. ``/v1/streams``: start (admin token), list, inspect, stop; each stream's
events as Server-Sent Events and its annotated live view as MJPEG. Without the ``video``
extra the stream routes answer 503 with what to install; detect needs nothing more.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any

import orjson

from tinyserve.asgi import Call, Reply, json_reply
from tinyserve.context import ServingContext
from tinyserve.detection import from_output
from tinyserve.errors import InvalidParameter, MalformedRequest, ModelNotReady
from tinyserve.openapi import IMAGE_BODY
from tinyserve.requests import parse_body
from tinyserve.routes import Route
from tinyserve.streams import StreamManager
from tinyserve.video_sources import VIDEO_EXTRA_HINT, SourcePolicy

_MANAGERS: weakref.WeakKeyDictionary[ServingContext, StreamManager] = weakref.WeakKeyDictionary()


def manager(context: ServingContext) -> StreamManager:
    """The streams of this server (made on first use)."""
    found = _MANAGERS.get(context)
    if found is None:
        try:
            import av  # noqa: F401
            import trackers  # noqa: F401
        except ImportError:
            raise ModelNotReady(f"video streams are not available: {VIDEO_EXTRA_HINT}") from None
        config = context.config
        policy = SourcePolicy(root=config.stream_dir, allow=tuple(config.stream_allow))
        found = StreamManager(context.registry, policy, config.max_streams)
        context.metrics.registry.register(_Collector(found))
        _MANAGERS[context] = found
    return found


class _Collector:
    """The streams' families in the server's /metrics (read on each scrape)."""

    def __init__(self, streams: StreamManager) -> None:
        self.streams = streams

    def collect(self) -> Iterator[Any]:
        return self.streams.collect()


async def detect(context: ServingContext, call: Call) -> Reply:
    """One image: the detector's boxes in the image's pixels, scores and classes."""
    started = time.perf_counter()
    model = context.model(call.path_params.get("model"), None, call)
    call.model = model.name
    if model.manifest.task != "detect":
        raise InvalidParameter(f"{model.name} is a {model.manifest.task} model, not a detector")
    min_score = float(call.query.get("min_score", "0.3"))
    if not 0.0 <= min_score <= 1.0:
        raise InvalidParameter(f"min_score must be in [0, 1], got {min_score}")
    model, ticket = await context.admit(model)
    try:
        body = await context.read_body(call)
        parsed = parse_body(body, call.headers.get("content-type", ""), False, 1)
        if len(parsed.uploads) != 1:
            raise InvalidParameter("send exactly one image")
        decoded = await context.decode(parsed.uploads[0].data, model.manifest.input)
        ticket.release()
        rows, timing = await model.live().infer_one(decoded.pixels)
    finally:
        ticket.release()
    height, width = decoded.source_shape[:2]
    found = from_output(rows, width, height, min_score)
    labels = model.manifest.labels
    detections = [
        {
            "box": [round(float(v), 2) for v in box],
            "score": round(float(score), 5),
            "class_id": int(cls),
            "label": labels[int(cls)] if 0 <= cls < len(labels) else str(int(cls)),
        }
        for box, score, cls in zip(found.boxes, found.scores, found.classes, strict=True)
    ]
    total = time.perf_counter() - started
    return json_reply({
        "model": model.name,
        "version": model.version,
        "width": width,
        "height": height,
        "detections": detections,
        "latency_ms": {"queue": round(timing.queue * 1000, 3),
                       "inference": round(timing.inference * 1000, 3),
                       "total": round(total * 1000, 3)},
    })  # fmt: skip


async def create_stream(context: ServingContext, call: Call) -> Reply:
    streams = manager(context)
    try:
        body: Any = orjson.loads(await context.read_body(call))
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(
            f"the body must be JSON {{source, detector, classifier, fps}}: {exc}"
        ) from None  # noqa: E501
    if not isinstance(body, dict) or not isinstance(body.get("source"), str):
        raise MalformedRequest('the body must be JSON with a "source" string')
    fps = body.get("fps")
    if fps is not None and not isinstance(fps, int | float):
        raise InvalidParameter("fps must be a number")
    stream = await streams.create(
        body["source"], _name(body, "detector"), _name(body, "classifier"), fps
    )
    context._tasks.add(stream.task)  # type: ignore[arg-type]  # cancelled when the server stops
    return json_reply(stream.describe(), 201)


def _name(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidParameter(f"{key} must be a model name")
    return value


async def list_streams(context: ServingContext, call: Call) -> Reply:
    return json_reply({"streams": manager(context).describe()})


async def get_stream(context: ServingContext, call: Call) -> Reply:
    return json_reply(manager(context).get(call.path_params["stream"]).describe())


async def delete_stream(context: ServingContext, call: Call) -> Reply:
    streams = manager(context)
    stream = streams.get(call.path_params["stream"])
    await streams.delete(stream.id)
    return json_reply({"deleted": stream.id, **stream.describe()})


async def stream_events(context: ServingContext, call: Call) -> Reply:
    streams = manager(context)
    streams.get(call.path_params["stream"])  # 404 before the answer starts
    events = streams.events(call.path_params["stream"])
    return Reply(200, b"", None, b"text/event-stream", stream=events)


async def stream_mjpeg(context: ServingContext, call: Call) -> Reply:
    streams = manager(context)
    streams.get(call.path_params["stream"])
    frames = streams.mjpeg(call.path_params["stream"])
    return Reply(200, b"", None, b"multipart/x-mixed-replace; boundary=frame", stream=frames)


_STREAM_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "source": {
                        "type": "string",
                        "description": "A file under --stream-dir, or an allowed URL or device",
                    },  # noqa: E501
                    "detector": {"type": "string"},
                    "classifier": {"type": "string"},
                    "fps": {"type": "number"},
                },
            }
        }
    },
}
_S = "streams"
VIDEO_ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/models/{model}/detect", detect, "Detect objects in one image", "detect",
          counted=True, body=IMAGE_BODY, statuses=(400, 404, 413, 415, 422, 503)),
    Route("POST", "/v1/streams", create_stream, "Start a video stream", _S, admin=True,
          body=_STREAM_BODY, statuses=(400, 401, 403, 404, 413, 422, 503)),
    Route("GET", "/v1/streams", list_streams, "The video streams and their stats", _S,
          statuses=(503,)),
    Route("GET", "/v1/streams/{stream}", get_stream, "One stream's stats", _S, statuses=(404, 503)),
    Route("DELETE", "/v1/streams/{stream}", delete_stream, "Stop a stream", _S, admin=True,
          statuses=(401, 404, 503)),
    Route("GET", "/v1/streams/{stream}/events", stream_events,
          "Track events (appear, classified, left) as Server-Sent Events", _S,
          response_type="text/event-stream", statuses=(404, 503)),
    Route("GET", "/v1/streams/{stream}/mjpeg", stream_mjpeg, "The annotated live view (MJPEG)",
          _S, response_type="multipart/x-mixed-replace", statuses=(404, 503)),
)  # fmt: skip
