"""One stream's pipeline: decoded frames -> detector batcher -> ByteTrack -> classifier batcher.

Frames come from a ``Decoder`` thread. Each stream keeps up to ``window`` frames in the
detector's batcher at once, which all streams share, so a batch holds frames of several
streams (and, in file mode, several frames of one); results are taken back in frame order,
so tracking sees every stream's frames in order. Crops of the tracks that are due
(``TrackBook.to_classify``) go to the classifier's batcher without holding the stream up:
their answers join the track's vote when they come back.

The latency of a frame is measured from the moment its decoder produced it to the moment its
tracks and events are out (decode -> event). ``StreamStats`` keeps frames, drops, FPS over
the last second and the latest latencies for percentiles.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tinyserve.detection import Detections, from_output
from tinyserve.engine import softmax
from tinyserve.manifest import InputSpec
from tinyserve.tracking import TrackBook, TrackConfig, TrackState, crop_square, event
from tinyserve.video_sources import Decoder, Frame, Pixels

DetectFn = Callable[[Pixels], Awaitable[npt.NDArray[np.float32]]]
ClassifyFn = Callable[[list[Pixels]], Awaitable[npt.NDArray[np.float32]]]
EventSink = Callable[[dict[str, Any]], None]

# The first of these that the repository has classifies tracks by default:
# ``fashion-cnn-video`` is fashion-cnn trained with ``--camera-prob`` for video crops.
VIDEO_CLASSIFIERS = ("fashion-cnn-video", "fashion-cnn")
DEFAULT_CLASSIFIER = "auto"


def default_classifier(has: Callable[[str], bool]) -> str:
    """The classifier for tracks when none is named: the first of ``VIDEO_CLASSIFIERS`` held."""
    return next((name for name in VIDEO_CLASSIFIERS if has(name)), VIDEO_CLASSIFIERS[-1])


@dataclass(frozen=True)
class DetectorHandle:
    """One detector the pipeline can run: what it is, its input and its batched call."""

    name: str
    version: int
    spec: InputSpec
    detect: DetectFn
    accuracy: float = float("nan")  # mAP@0.5 recorded in its manifest
    precision: str = "fp32"

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def describe(self) -> str:
        return f"{self.key} ({self.precision}, {self.spec.width}x{self.spec.height})"


@dataclass(frozen=True)
class ClassifierHandle:
    name: str
    version: int
    spec: InputSpec
    labels: tuple[str, ...]
    classify: ClassifyFn


class DetectorSource(Protocol):
    """Which detector runs a frame (``selection.Selector`` decides)."""

    def current(self) -> DetectorHandle: ...

    def for_size(self, width: int, height: int) -> DetectorHandle: ...


@dataclass(frozen=True)
class PipelineConfig:
    min_score: float = 0.1  # detections below are not given to the tracker
    window: int = 4  # frames of this stream in the detector's batcher at once
    track: TrackConfig = field(default_factory=TrackConfig)
    latency_window: int = 4096

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")


@dataclass
class StreamStats:
    """What a stream has done so far."""

    frames: int = 0
    detections: int = 0
    crops: int = 0
    tracks: int = 0
    events: int = 0
    state: str = "starting"
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def frame_done(self, latency: float, now: float) -> None:
        self.frames += 1
        self.latencies.append(latency)
        self._recent.append(now)
        while self._recent and now - self._recent[0] > 1.0:
            self._recent.popleft()

    @property
    def fps(self) -> float:
        """Frames per second over the last second (or the whole run once finished)."""
        if self.finished is not None:
            return self.frames / max(self.finished - self.started, 1e-9)
        return float(len(self._recent))

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return round(float(np.percentile(np.fromiter(self.latencies, float), q)) * 1000, 3)


class StreamPipeline:
    """Runs one stream to its end (or until stopped); never raises for the stream's faults."""

    def __init__(
        self,
        name: str,
        decoder: Decoder,
        detectors: DetectorSource,
        classifier: ClassifierHandle | None,
        config: PipelineConfig | None = None,
        on_event: EventSink | None = None,
        on_frame: Callable[[Frame, Sequence[TrackState]], None] | None = None,
    ) -> None:
        self.name = name
        self.decoder = decoder
        self.detectors = detectors
        self.classifier = classifier
        self.config = config or PipelineConfig()
        self.on_event = on_event
        self.on_frame = on_frame
        self.stats = StreamStats(latencies=deque(maxlen=self.config.latency_window))
        self.book: TrackBook | None = None
        self._stopping = False
        self._crop_tasks: set[asyncio.Task[None]] = set()

    @property
    def dropped(self) -> int:
        return self.decoder.stats.dropped

    def stop(self) -> None:
        self._stopping = True
        self.decoder.stop()

    async def run(self) -> StreamStats:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def wake_up() -> None:  # from the decoder's thread
            loop.call_soon_threadsafe(wake.set)

        self.decoder.on_frame = wake_up
        self.book = TrackBook(self.config.track, self.decoder.fps or 30.0)
        in_flight: asyncio.Queue[tuple[Frame, DetectorHandle, asyncio.Task[Any]] | None]
        in_flight = asyncio.Queue(maxsize=self.config.window)
        self.decoder.start()
        self.stats.state = "running"
        consumer = asyncio.ensure_future(self._consume(in_flight))
        try:
            while not self._stopping:
                frame = self.decoder.get()
                if frame is None:
                    if self.decoder.stats.finished and not self.decoder.waiting:
                        break
                    wake.clear()
                    if self.decoder.waiting or self.decoder.stats.finished:
                        continue
                    await wake.wait()
                    continue
                h, w = frame.pixels.shape[:2]
                handle = self.detectors.for_size(w, h)
                task = asyncio.ensure_future(handle.detect(frame.pixels))
                await in_flight.put((frame, handle, task))
        except asyncio.CancelledError:  # the server is stopping: end the decoder too
            self.decoder.stop()
            consumer.cancel()
            raise
        finally:
            if not consumer.cancelled():
                await in_flight.put(None)
                await consumer
            self.decoder.stop()
            await loop.run_in_executor(None, self.decoder.join, 5.0)
            if self._crop_tasks:
                await asyncio.gather(*self._crop_tasks, return_exceptions=True)
            for track in self.book.close():
                self._emit(event("left", self.name, track.last_frame, track, self._labels))
        self.stats.finished = time.perf_counter()
        error = self.decoder.stats.error or self.stats.error
        if error:
            self.stats.state, self.stats.error = "failed", error
        else:
            self.stats.state = "stopped" if self._stopping else "finished"
        return self.stats

    @property
    def _labels(self) -> tuple[str, ...]:
        return self.classifier.labels if self.classifier else ()

    async def _consume(
        self, in_flight: asyncio.Queue[tuple[Frame, DetectorHandle, asyncio.Task[Any]] | None]
    ) -> None:
        assert self.book is not None
        while (item := await in_flight.get()) is not None:
            frame, handle, task = item
            try:
                rows = await task
            except Exception as exc:  # the detector failed: this stream stops, alone
                self.stats.error = f"detector {handle.key} failed: {exc}"
                self.stop()
                continue
            detections = from_output(
                np.asarray(rows, dtype=np.float32), frame.width, frame.height, self.config.min_score
            )
            self._track(frame, detections)

    def _track(self, frame: Frame, detections: Detections) -> None:
        assert self.book is not None
        seen, appeared, gone = self.book.update(frame.index, detections)
        self.stats.detections += len(detections)
        self.stats.tracks += len(appeared)
        for track in appeared:
            self._emit(event("appear", self.name, frame.index, track, self._labels))
        for track in gone:
            self._emit(event("left", self.name, frame.index, track, self._labels))
        if self.classifier is not None:
            due = self.book.to_classify(frame.index, seen, frame.width, frame.height)
            if due:
                self._classify(frame, due)
        if self.on_frame is not None:
            self.on_frame(frame, seen)
        now = time.perf_counter()
        self.stats.frame_done(now - frame.decoded_at, now)

    def _classify(self, frame: Frame, tracks: list[TrackState]) -> None:
        assert self.classifier is not None
        spec = self.classifier.spec
        crops = []
        for track in tracks:
            crop = crop_square(frame.luma, track.box, (spec.width, spec.height))
            crops.append(
                crop[:, :, None] if spec.channels == 1 else np.repeat(crop[:, :, None], 3, 2)
            )
        self.stats.crops += len(crops)
        task = asyncio.ensure_future(self._vote(frame.index, tracks, crops))
        self._crop_tasks.add(task)
        task.add_done_callback(self._crop_tasks.discard)

    async def _vote(self, index: int, tracks: list[TrackState], crops: list[Pixels]) -> None:
        assert self.classifier is not None
        try:
            logits = await self.classifier.classify(crops)
        except Exception:  # a crop that cannot be classified now is asked again later
            for track in tracks:
                track.in_flight = False
            return
        assert self.book is not None
        probabilities = softmax(np.asarray(logits, dtype=np.float32).copy())
        for track, row in zip(tracks, probabilities, strict=True):
            track.in_flight = False
            voted, changed = self.book.vote(track, row)
            if voted is not track:  # the tracker had moved this id onto another object
                self._emit(event("left", self.name, track.last_frame, track, self._labels))
                self._emit(event("appear", self.name, index, voted, self._labels))
                self.stats.tracks += 1
            if changed or voted.crops == 1:
                self._emit(event("classified", self.name, index, voted, self._labels))

    def _emit(self, record: dict[str, Any]) -> None:
        self.stats.events += 1
        if self.on_event is not None:
            self.on_event(record)

    def describe(self) -> dict[str, Any]:
        stats, dec = self.stats, self.decoder.stats
        return {
            "id": self.name,
            "source": self.decoder.source,
            "state": stats.state,
            "error": stats.error or dec.error,
            "realtime": self.decoder.realtime,
            "frames": stats.frames,
            "decoded": dec.decoded,
            "dropped": dec.dropped,
            "fps": round(stats.fps, 2),
            "latency_ms": {
                "p50": stats.percentile_ms(50),
                "p99": stats.percentile_ms(99),
            },
            "detections": stats.detections,
            "tracks": stats.tracks,
            "active_tracks": len(self.book.tracks) if self.book else 0,
            "crops_classified": stats.crops,
            "events": stats.events,
            "width": dec.width,
            "height": dec.height,
        }
