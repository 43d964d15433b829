"""``tinyserve video``: run the pipeline over local inputs with the repository's models.

The detector and the classifier are repository models, each run behind its own ``Batcher``
(the detector's shared by every input). The detector's candidates are its versions (FP32,
INT8, each input size); unless one is pinned (``--detector NAME:VERSION``), each is timed
here and ``selection.Selector`` picks the one to run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tinyserve.batcher import BatchConfig, Batcher
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ConfigError
from tinyserve.repository import model_files
from tinyserve.selection import (
    DETECTOR_SHARE,
    Candidate,
    Selector,
    accuracy_of,
    measure,
    precision_of,
)
from tinyserve.tracking import TrackConfig, TrackState
from tinyserve.video_output import EventWriter, MotWriter, VideoWriter, annotate
from tinyserve.video_pipeline import (
    DEFAULT_CLASSIFIER,
    ClassifierHandle,
    DetectorHandle,
    PipelineConfig,
    StreamPipeline,
    default_classifier,
)
from tinyserve.video_sources import Decoder, Frame, Pixels, SourcePolicy, require_video

DEFAULT_DETECTOR = "scene-det"


@dataclass(frozen=True)
class VideoConfig:
    inputs: tuple[str, ...]
    repo: Path = Path("models")
    detector: str = DEFAULT_DETECTOR
    classifier: str | None = DEFAULT_CLASSIFIER
    fps: float | None = None
    realtime: bool = False
    out: Path | None = None
    mot: Path | None = None
    events: Path | None = None
    # One thread per inference and small batches: this detector's activations outgrow the
    # cache beyond a few frames (batch 8 costs 4.1 ms a frame against 2.7 at batch 2), and
    # the decoders need the other cores.
    threads: int = 1
    max_batch_size: int = 4
    window: int = 4
    min_score: float = 0.1
    headroom: float = DETECTOR_SHARE
    max_frames: int | None = None
    track: TrackConfig = field(default_factory=TrackConfig)
    decode_threads: int = 1  # FFmpeg threads per decoder (video_sources.Decoder.threads)
    deblock: bool = False  # run FFmpeg's deblocking filter (video_sources.Decoder.deblock)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one input")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"--fps must be positive, got {self.fps}")


def model_versions(repo: Path, target: str) -> dict[int, Path]:
    """The model files of ``target``: a repository name, a folder, ``NAME:VERSION`` or a file."""
    name, _, pinned = target.partition(":")
    if not pinned.isdigit():
        name, pinned = target, ""
    folder = repo / name if (repo / name).exists() else Path(name)
    if not folder.exists():
        raise ConfigError(f"model {target!r} not found in {repo} (nor as a path)")
    _, files = model_files(folder)
    if pinned:
        if int(pinned) not in files:
            raise ConfigError(f"{name} has no version {pinned} (has {sorted(files)})")
        return {int(pinned): files[int(pinned)]}
    if not files:
        raise ConfigError(f"{folder} holds no model versions")
    return files


def load_detectors(
    repo: Path, target: str, engine_config: EngineConfig
) -> list[tuple[str, int, Engine]]:
    name = Path(target.partition(":")[0]).name
    engines = []
    for version, path in sorted(model_versions(repo, target).items()):
        engine = Engine(path, engine_config)
        if engine.manifest.task != "detect":
            raise ConfigError(f"{path} is a {engine.manifest.task} model, not a detector")
        engines.append((name, version, engine))
    return engines


def load_classifier(
    repo: Path, target: str, engine_config: EngineConfig
) -> tuple[str, int, Engine]:
    if target == DEFAULT_CLASSIFIER:  # the first of VIDEO_CLASSIFIERS the repository has
        target = default_classifier(lambda name: (repo / name).is_dir())
    versions = model_versions(repo, target)
    name = Path(target.partition(":")[0]).name
    folder = repo / name if (repo / name).exists() else Path(name)
    config, _ = model_files(folder) if folder.is_dir() else (None, {})
    version = (config.version if config and config.version in versions else None) or max(versions)
    engine = Engine(versions[version], engine_config)
    if engine.manifest.task != "classify":
        raise ConfigError(
            f"{versions[version]} is a {engine.manifest.task} model, not a classifier"
        )
    return name, version, engine


def _suffixed(path: Path | None, index: int, count: int) -> Path | None:
    if path is None or count == 1:
        return path
    return path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


async def run_video(
    config: VideoConfig, progress: Callable[[list[dict[str, Any]]], None] | None = None
) -> dict[str, Any]:
    """Process every input to its end; a summary per stream and the detector decision."""
    require_video()
    engine_config = EngineConfig(intra_op_threads=config.threads, warmup_batch_sizes=(1, 8))
    detectors = load_detectors(config.repo, config.detector, engine_config)
    batch = BatchConfig(max_batch_size=config.max_batch_size, max_queue=4096, inline_ms=0.0)
    batchers: list[Batcher] = []
    candidates = []
    for name, version, engine in detectors:
        batcher = Batcher(engine.infer, batch, f"{name}:{version}")
        batcher.start()
        batchers.append(batcher)
        handle = DetectorHandle(
            name,
            version,
            engine.manifest.input,
            _detect_fn(batcher),
            accuracy_of(engine.manifest),
            precision_of(engine.manifest),
        )
        cost = measure(engine.infer, engine.manifest.input.shape) if len(detectors) > 1 else 0.0
        candidates.append(Candidate(handle, cost))
    selector = Selector(
        candidates, len(config.inputs), config.fps if config.realtime else None, config.headroom
    )
    classifier = None
    if config.classifier:
        cname, cversion, cengine = load_classifier(config.repo, config.classifier, engine_config)
        cbatcher = Batcher(cengine.infer, batch, f"{cname}:{cversion}")
        cbatcher.start()
        batchers.append(cbatcher)
        classifier = ClassifierHandle(
            cname, cversion, cengine.manifest.input, cengine.labels, _classify_fn(cbatcher)
        )
    policy = SourcePolicy(confined=False)
    events = EventWriter(config.events) if config.events else None
    pipelines, closers = [], []
    count = len(config.inputs)
    for index, source in enumerate(config.inputs):
        decoder = Decoder(
            source,
            selector.size,
            policy,
            realtime=config.realtime,
            fps=config.fps,
            queue_size=4 if config.realtime else 16,
            keep_images=config.out is not None,
            max_frames=config.max_frames,
            threads=config.decode_threads,
            deblock=config.deblock,
        )
        mot = _suffixed(config.mot, index, count)
        out = _suffixed(config.out, index, count)
        sink = _FrameSink(
            MotWriter(mot) if mot else None,
            out,
            config.fps,
            classifier.labels if classifier else (),
        )
        closers.append(sink.close)
        pipeline = StreamPipeline(
            f"{index + 1}",
            decoder,
            selector,
            classifier,
            PipelineConfig(min_score=config.min_score, window=config.window, track=config.track),
            on_event=events.write if events else None,
            on_frame=sink,
        )
        pipelines.append(pipeline)
    started = time.perf_counter()
    watcher = asyncio.ensure_future(_watch(pipelines, selector, progress))
    try:
        await asyncio.gather(*(p.run() for p in pipelines))
    finally:
        watcher.cancel()
        for close in closers:
            close()
        if events:
            events.close()
        for b in batchers:
            await b.close()
    seconds = time.perf_counter() - started
    streams = [p.describe() for p in pipelines]
    if progress:
        progress(streams)
    return {
        "seconds": round(seconds, 3),
        "frames": sum(s["frames"] for s in streams),
        "streams": streams,
        "detector": selector.describe(),
        "classifier": None if classifier is None else f"{classifier.name}:{classifier.version}",
    }


def _detect_fn(batcher: Batcher) -> Any:
    async def detect(pixels: Pixels) -> npt.NDArray[np.float32]:
        rows, _ = await batcher.submit(pixels)
        return rows

    return detect


def _classify_fn(batcher: Batcher) -> Any:
    async def classify(crops: list[Pixels]) -> npt.NDArray[np.float32]:
        answers = await batcher.submit_many(crops)
        return np.stack([logits for logits, _ in answers])

    return classify


async def _watch(
    pipelines: Sequence[StreamPipeline],
    selector: Selector,
    progress: Callable[[list[dict[str, Any]]], None] | None,
) -> None:
    while True:
        await asyncio.sleep(0.5)
        frames = sum(p.stats.frames for p in pipelines)
        dropped = sum(p.dropped for p in pipelines)
        if selector.observe(frames, dropped):
            for p in pipelines:
                p.decoder.size = selector.size
        if progress:
            progress([p.describe() for p in pipelines])


class _FrameSink:
    """Per-frame outputs of one stream: MOT lines and the annotated video."""

    def __init__(
        self, mot: MotWriter | None, out: Path | None, fps: float | None, labels: Sequence[str]
    ) -> None:
        self.mot, self.out, self.fps, self.labels = mot, out, fps, labels
        self.video: VideoWriter | None = None

    def __call__(self, frame: Frame, tracks: Sequence[TrackState]) -> None:
        if self.mot is not None:
            self.mot.write(frame.index, tracks)
        if self.out is not None and frame.image is not None:
            image = frame.image.to_ndarray(format="rgb24")
            if self.video is None:
                fps = self.fps or 30.0
                self.video = VideoWriter(self.out, fps, image.shape[1], image.shape[0])
            self.video.write(annotate(image, tracks, self.labels))

    def close(self) -> None:
        if self.mot is not None:
            self.mot.close()
        if self.video is not None:
            self.video.close()


def summary_line(stream: dict[str, Any]) -> str:
    p99 = stream["latency_ms"]["p99"]
    return (
        f"stream {stream['id']} {stream['state']}: {stream['frames']} frames, "
        f"{stream['fps']:.1f} FPS, p99 {'-' if p99 is None else f'{p99:.1f} ms'}, "
        f"{stream['dropped']} dropped, {stream['tracks']} tracks"
        + (f" ({stream['error']})" if stream.get("error") else "")
    )
