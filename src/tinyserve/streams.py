"""The server's video streams: started by ``POST /v1/streams``, run on the served models.

Every stream runs the video pipeline on the registry's loaded versions, so its frames share
the detector's batcher with every other stream (and with REST detect requests), and its
crops the classifier's. Streams are live: they play at their pace and drop their oldest
frames when they fall behind. Each stream is bounded: a few frames waiting to be detected,
the latest annotated frame, and the last ``EVENTS_KEPT`` events; the number of streams is
bounded by ``max_streams``. A stream that cannot be opened or decoded ends in state
``failed`` with its error; the others and the server carry on.

Metrics (``/metrics``): per stream FPS, frames, drops and a decode -> event latency
histogram, and the chosen detector with the reason it was chosen.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from tinyserve.errors import InvalidParameter, ModelNotFound, Overloaded
from tinyserve.registry import LoadedModel, ModelRegistry
from tinyserve.selection import Candidate, Selector, accuracy_of, measure, precision_of
from tinyserve.tracking import TrackState
from tinyserve.video_pipeline import (
    DEFAULT_CLASSIFIER,
    ClassifierHandle,
    DetectorHandle,
    PipelineConfig,
    StreamPipeline,
    default_classifier,
)
from tinyserve.video_sources import Decoder, Frame, Pixels, SourcePolicy, require_video

log = logging.getLogger("tinyserve.video")
EVENTS_KEPT = 500
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


@dataclass
class Stream:
    id: str
    source: str
    detector: str
    classifier: str | None
    fps: float | None
    pipeline: StreamPipeline
    selector: Selector
    task: asyncio.Task[Any] | None = None
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    listeners: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)
    latest: tuple[Frame, list[TrackState]] | None = None
    frame_seq: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    created: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        base = f"/v1/streams/{self.id}"
        return {
            **self.pipeline.describe(),
            "name": self.id,
            "detector": self.selector.current().key,
            "detector_reason": self.selector.reason,
            "classifier": self.classifier,
            "requested_fps": self.fps,
            "created": self.created,
            "view_url": f"{base}/mjpeg",
            "events_url": f"{base}/events",
        }

    def publish(self, record: dict[str, Any]) -> None:
        self.events.append(record)
        for queue in list(self.listeners):
            if queue.full():  # a slow reader loses its oldest events, never the stream
                queue.get_nowait()
            queue.put_nowait(record)

    def on_frame(self, frame: Frame, tracks: Sequence[TrackState]) -> None:
        self.latest = (frame, list(tracks))
        self.frame_seq += 1
        latency = time.perf_counter() - frame.decoded_at
        self.latency_sum += latency
        index = next((i for i, b in enumerate(LATENCY_BUCKETS) if latency <= b), -1)
        self.buckets[index] += 1


class StreamManager:
    """Starts, lists, stops and observes the server's streams."""

    def __init__(
        self,
        registry: ModelRegistry,
        policy: SourcePolicy,
        max_streams: int = 16,
        default_detector: str = "scene-det",
        default_classifier: str | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.max_streams = max_streams
        self.default_detector = default_detector
        self.default_classifier = default_classifier
        self.streams: dict[str, Stream] = {}
        self._selectors: dict[tuple[str, float | None], Selector] = {}
        self._costs: dict[tuple[str, int], float] = {}
        self._watcher: asyncio.Task[None] | None = None

    def _running(self) -> list[Stream]:
        return [s for s in self.streams.values() if s.task is not None and not s.task.done()]

    async def create(
        self,
        source: str,
        detector: str | None = None,
        classifier: str | None = None,
        fps: float | None = None,
    ) -> Stream:
        require_video()
        if fps is not None and not 0 < fps <= 240:
            raise InvalidParameter(f"fps must be in (0, 240], got {fps}")
        if len(self._running()) >= self.max_streams:
            raise Overloaded(f"{self.max_streams} streams are running (--max-streams); stop one")
        detector = detector or self.default_detector
        classifier = classifier or self.default_classifier
        if classifier is None or classifier == DEFAULT_CLASSIFIER:
            classifier = default_classifier(lambda name: name in self.registry.names)
        if classifier == "none":
            classifier = None
        selector = await self._selector(detector, fps)
        handle = self._classifier(classifier) if classifier else None
        decoder = Decoder(source, selector.size, self.policy, realtime=True, fps=fps,
                          queue_size=4, keep_images=True)  # fmt: skip
        stream_id = uuid.uuid4().hex[:8]
        pipeline = StreamPipeline(
            stream_id, decoder, selector, handle, PipelineConfig(window=2),
            on_event=lambda record: stream.publish(record),
            on_frame=lambda frame, tracks: stream.on_frame(frame, tracks),
        )  # fmt: skip
        stream = Stream(stream_id, source, detector, classifier, fps, pipeline, selector)
        self.streams[stream_id] = stream
        stream.task = asyncio.ensure_future(self._run(stream))
        selector.resize(sum(1 for s in self._running() if s.selector is selector))
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())
        return stream

    async def _run(self, stream: Stream) -> None:
        stats = await stream.pipeline.run()
        if stats.state == "failed":
            log.warning("stream %s (%s) failed: %s", stream.id, stream.source, stats.error)
        for queue in list(stream.listeners):
            queue.put_nowait(None) if not queue.full() else None

    def get(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ModelNotFound(f"no stream {stream_id!r}")
        return stream

    async def delete(self, stream_id: str) -> None:
        stream = self.get(stream_id)
        stream.pipeline.stop()
        if stream.task is not None:
            await asyncio.wait({stream.task}, timeout=10)
        self.streams.pop(stream_id, None)

    async def close(self) -> None:
        for stream_id in list(self.streams):
            await self.delete(stream_id)
        if self._watcher is not None:
            self._watcher.cancel()

    async def _selector(self, detector: str, fps: float | None) -> Selector:
        key = (detector, fps)
        if key not in self._selectors:
            versions = self.registry.versions(detector)
            loop = asyncio.get_running_loop()
            candidates = []
            for model in versions:
                if model.manifest.task != "detect":
                    raise InvalidParameter(f"{detector} is not a detector")
                cost = self._costs.get((model.name, model.version))
                if cost is None and len(versions) > 1:
                    shape = model.manifest.input.shape
                    cost = await loop.run_in_executor(None, measure, model.engine.infer, shape)
                    self._costs[(model.name, model.version)] = cost
                candidates.append(Candidate(_detector_handle(model), cost or 0.0))
            self._selectors[key] = Selector(candidates, 1, fps or 30.0)
        return self._selectors[key]

    def _classifier(self, name: str) -> ClassifierHandle:
        model = self.registry.get(name)
        if model.manifest.task != "classify":
            raise InvalidParameter(f"{name} is not a classifier")

        async def classify(crops: list[Pixels]) -> npt.NDArray[np.float32]:
            answers = await model.live().infer_many(crops)
            return np.stack([logits for logits, _ in answers])

        m = model.manifest
        return ClassifierHandle(model.name, model.version, m.input, m.labels, classify)

    async def _watch(self) -> None:
        """Re-decide each detector when its streams drop frames (every 2 s)."""
        while True:
            await asyncio.sleep(2.0)
            for selector in set(self._selectors.values()):
                users = [s for s in self._running() if s.selector is selector]
                frames = sum(s.pipeline.stats.frames for s in users)
                dropped = sum(s.pipeline.dropped for s in users)
                if users and selector.observe(frames, dropped):
                    for s in users:
                        s.pipeline.decoder.size = selector.size

    async def events(self, stream_id: str) -> AsyncIterator[bytes]:
        """Server-Sent Events: the kept events, then new ones as they happen."""
        import orjson

        stream = self.get(stream_id)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=256)
        stream.listeners.add(queue)
        try:
            for kept in list(stream.events):
                yield b"data: " + orjson.dumps(kept) + b"\n\n"
            while stream.task is not None and not stream.task.done() or not queue.empty():
                try:
                    record: dict[str, Any] | None = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if record is None:
                    break
                yield b"data: " + orjson.dumps(record) + b"\n\n"
            yield b"event: end\ndata: {}\n\n"
        finally:
            stream.listeners.discard(queue)

    async def mjpeg(self, stream_id: str, max_fps: float = 10.0) -> AsyncIterator[bytes]:
        """The annotated live view as ``multipart/x-mixed-replace`` JPEG parts."""
        from tinyserve.video_output import annotate, jpeg

        stream = self.get(stream_id)
        labels = stream.pipeline.classifier.labels if stream.pipeline.classifier else ()
        loop = asyncio.get_running_loop()
        seen = -1
        while True:
            if stream.latest is not None and stream.frame_seq != seen:
                seen = stream.frame_seq
                frame, tracks = stream.latest

                def encode(frame: Frame = frame, tracks: list[TrackState] = tracks) -> bytes:
                    image = (
                        frame.image.to_ndarray(format="rgb24")
                        if frame.image is not None
                        else np.repeat(frame.luma[:, :, None], 3, 2)
                    )  # noqa: E501
                    return jpeg(annotate(image, tracks, labels))

                data = await loop.run_in_executor(None, encode)
                yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                       + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")  # fmt: skip
            elif stream.task is not None and stream.task.done():
                return
            await asyncio.sleep(1.0 / max_fps)

    def collect(self) -> Iterator[Any]:
        """Prometheus families of every stream (called on each scrape)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        fps = GaugeMetricFamily(
            "tinyserve_stream_fps", "Frames per second over the last second", labels=["stream"]
        )  # noqa: E501
        frames = CounterMetricFamily(
            "tinyserve_stream_frames", "Frames processed", labels=["stream"]
        )  # noqa: E501
        dropped = CounterMetricFamily(
            "tinyserve_stream_dropped_frames",
            "Frames dropped because the stream fell behind",
            labels=["stream"],
        )  # noqa: E501
        latency = HistogramMetricFamily(
            "tinyserve_stream_frame_latency_seconds",
            "Decode to event, per frame",
            labels=["stream"],
        )  # noqa: E501
        chosen = GaugeMetricFamily(
            "tinyserve_video_detector_selected",
            "The detector chosen for streams (1) and why",
            labels=["detector", "model", "precision", "input", "reason"],
        )  # noqa: E501
        for s in self.streams.values():
            fps.add_metric([s.id], s.pipeline.stats.fps)
            frames.add_metric([s.id], s.pipeline.stats.frames)
            dropped.add_metric([s.id], s.pipeline.dropped)
            cumulative, total = [], 0
            for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], s.buckets, strict=True):
                total += count
                cumulative.append((bound, total))
            latency.add_metric([s.id], cumulative, s.latency_sum)
        for (name, _), selector in self._selectors.items():
            h = selector.current()
            spec = f"{h.spec.width}x{h.spec.height}"
            chosen.add_metric([name, h.key, h.precision, spec, selector.reason], 1.0)
        yield from (fps, frames, dropped, latency, chosen)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.streams.values()]


def _detector_handle(model: LoadedModel) -> DetectorHandle:
    async def detect(pixels: Pixels) -> npt.NDArray[np.float32]:
        rows, _ = await model.live().infer_one(pixels)
        return rows

    m = model.manifest
    return DetectorHandle(
        model.name, model.version, m.input, detect, accuracy_of(m), precision_of(m)
    )
