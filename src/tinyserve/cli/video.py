"""Video commands: ``tinyserve video`` (detect, track, classify), ``tinyserve data scenes`` (the
synthetic tracking dataset) and ``tinyserve bench video`` (accuracy and speed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tinyserve.cli.options import DataDirOption, build_config

data_app = typer.Typer(name="data", help="Generate datasets.", no_args_is_help=True)


def video(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Files, rtsp:// or http(s):// URLs, image folders or /dev/video*."),
    ],
    detector: Annotated[
        str,
        typer.Option(help="Detector: repository name (every version a candidate) or NAME:VERSION."),
    ] = "scene-det",
    classifier: Annotated[
        str,
        typer.Option(
            help="Classifier for the tracks: a repository name or NAME:VERSION; 'auto' = "
            "fashion-cnn-video if the repository has it, else fashion-cnn; 'none' = boxes "
            "and tracks only."
        ),
    ] = "auto",
    repo: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    fps: Annotated[
        float | None, typer.Option(help="Frames per second to process \\[default: the source's].")
    ] = None,
    realtime: Annotated[
        bool,
        typer.Option(help="Play inputs at their pace; a stream that falls behind drops frames."),
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Annotated video (H.264).")] = None,
    mot: Annotated[Path | None, typer.Option(help="Tracks in MOTChallenge format.")] = None,
    json_events: Annotated[
        Path | None, typer.Option("--json", help="Events (appear, classified, left) as JSON lines.")
    ] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads; 0 = all cores given.")] = 1,
    max_frames: Annotated[int | None, typer.Option(help="Stop each stream after N frames.")] = None,
    progress: Annotated[bool, typer.Option(help="Show live progress per stream.")] = True,
) -> None:
    """Detect, track and classify objects in videos; live FPS, p99 latency and drops per stream."""
    from tinyserve.video_run import VideoConfig, run_video, summary_line

    config = build_config(
        VideoConfig,
        inputs=tuple(inputs),
        repo=repo,
        detector=detector,
        classifier=None if classifier == "none" else classifier,
        fps=fps,
        realtime=realtime,
        out=out,
        mot=mot,
        events=json_events,
        threads=threads,
        max_frames=max_frames,
    )
    show = _live() if progress else None
    try:
        result = asyncio.run(run_video(config, show))
    finally:
        if show is not None:
            show.stop()
    typer.echo(f"detector {result['detector']['chosen']['model']}: {result['detector']['reason']}")
    typer.echo(f"classifier of tracks: {result['classifier'] or 'none'}")
    for stream in result["streams"]:
        typer.echo(summary_line(stream))
    if any(s["state"] == "failed" for s in result["streams"]):
        raise typer.Exit(1)


class _live:
    """A rich table per update: one row per stream."""

    def __init__(self) -> None:
        from rich.live import Live

        self._live = Live(refresh_per_second=4, transient=True)
        self._live.start()

    def __call__(self, streams: list[dict[str, Any]]) -> None:
        from rich.table import Table

        table = Table("stream", "state", "frames", "FPS", "p99 ms", "dropped", "tracks")
        for s in streams:
            p99 = s["latency_ms"]["p99"]
            table.add_row(
                s["id"], s["state"], str(s["frames"]), f"{s['fps']:.1f}",
                "-" if p99 is None else f"{p99:.1f}", str(s["dropped"]), str(s["tracks"]),
            )  # fmt: skip
        self._live.update(table)

    def stop(self) -> None:
        self._live.stop()


@data_app.command("scenes")
def scenes(
    out: Annotated[Path, typer.Option(help="Output folder (train/ and test/).")],
    train_sequences: Annotated[int, typer.Option(help="Scenes sampled for training frames.")] = 300,
    frames_per_sequence: Annotated[int, typer.Option(help="Training frames per scene.")] = 10,
    stride: Annotated[int, typer.Option(help="Steps between training frames.")] = 3,
    test_sequences: Annotated[int, typer.Option(help="Held-out test videos.")] = 5,
    test_frames: Annotated[int, typer.Option(help="Frames per test video.")] = 300,
    width: int = 640,
    height: int = 480,
    fps: int = 30,
    photos: Annotated[
        Path | None, typer.Option(help="Photos for some backgrounds \\[default: samples/photos].")
    ] = Path("samples/photos"),
    seed: int = 0,
    data_dir: DataDirOption = None,
) -> None:
    """Generate a multi-object tracking dataset from Fashion-MNIST items (nothing downloaded)."""
    from rich.progress import Progress

    from tinyserve.scenes import GenerateConfig, SceneConfig, generate

    config = build_config(
        GenerateConfig,
        out=out,
        scene=build_config(SceneConfig, width=width, height=height, fps=fps, photos=photos),
        train_sequences=train_sequences,
        train_frames_per_sequence=frames_per_sequence,
        train_stride=stride,
        test_sequences=test_sequences,
        test_frames=test_frames,
        seed=seed,
        data_dir=data_dir,
    )
    with Progress(transient=True) as bar:
        tasks: dict[str, Any] = {}

        def step(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"{what} scenes", total=total)
            bar.update(tasks[what], completed=done)

        report = generate(config, step)
    typer.echo(
        f"wrote {report['train_frames']} training frames ({report['train_boxes']} boxes) and "
        f"{report['test_sequences']} test videos ({report['test_frames']} frames) to {out}"
    )


def bench_video(
    scenes_dir: Annotated[
        Path, typer.Option("--scenes", help="'tinyserve data scenes' folder.")
    ] = Path("runs/scenes"),
    repo: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    detector: str = "scene-det",
    classifier: Annotated[
        str, typer.Option(help="Track classifier ('auto': as for 'tinyserve video').")
    ] = "auto",
    max_streams: Annotated[int, typer.Option(help="Most concurrent 30-FPS streams tried.")] = 16,
    duration: Annotated[float, typer.Option(help="Seconds per real-time trial.")] = 6.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    only: Annotated[
        str, typer.Option(help="Comma-separated parts: accuracy,speed,capacity,naive.")
    ] = "accuracy,speed,capacity,naive",
) -> None:
    """Accuracy (mAP, MOTA, IDF1, track classes) and speed (FPS, p99, streams) of the pipeline."""
    from tinyserve.bench.video import BenchVideoConfig, run_bench

    config = BenchVideoConfig(
        scenes=scenes_dir,
        repo=repo,
        detector=detector,
        classifier=classifier,
        max_streams=max_streams,
        duration=duration,
        parts=tuple(p.strip() for p in only.split(",") if p.strip()),
    )
    result = run_bench(config, typer.echo)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
