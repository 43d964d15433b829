"""Compare every version of a model, on every runtime that reads it: size, accuracy,
agreement, latency, throughput and memory.

Each row is a version on a runtime, measured the way it will be served: accuracy and top-1
agreement with the reference row (the lowest version on its own runtime, normally the FP32
export on ONNX Runtime) on the test set, batch-1 latency percentiles, throughput at larger
batches for each thread count asked for, and peak memory: the peak RSS (VmHWM) of a fresh
Python process that loads only that row and runs 32-image batches on it (in one process, a
row's figure would depend on what earlier rows left allocated). ``runtimes`` picks the rows:
``auto`` (each version on its own format's runtime), a runtime name, or ``all`` (every
runtime that can read the version's files). Callers may add rows of their own
(``Candidate``): ``tinyserve evaluate --compare --torch`` adds PyTorch eager and TorchScript.
All rows are measured in one run, so they compare. The result is written as Markdown, JSON
and an accuracy-versus-latency PNG.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve.bench.model import peak_rss_bytes
from tinyserve.datasets import ImageDataset
from tinyserve.engine import (
    READS,
    RUNTIMES,
    Engine,
    EngineConfig,
    Runnable,
    available_cores,
    select_file,
)
from tinyserve.errors import ModelError, ModelNotFound
from tinyserve.evaluate import batch1_latency, evaluation_set, predict_classes
from tinyserve.imaging import Pixels
from tinyserve.manifest import Manifest, read_manifest
from tinyserve.repository import list_versions, model_bytes, sibling, version_path

OUTPUT_NAMES = ("compare.md", "compare.json", "compare.png")


@dataclass(frozen=True)
class CompareConfig:
    """What to measure. ``max_samples`` limits the test set (quick looks and tests)."""

    model_dir: Path
    data: str = "fashion-mnist"
    data_dir: Path | None = None
    threads: tuple[int, ...] = (1, 2)
    batch_sizes: tuple[int, ...] = (32, 256)
    latency_runs: int = 300
    throughput_images: int = 8192
    max_samples: int | None = None
    runtimes: tuple[str, ...] = ("auto",)  # engine.RUNTIMES, or "all"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.runtimes) - {*RUNTIMES, "all"})
        if not self.runtimes or unknown:
            raise ValueError(
                f"runtimes must be among {', '.join((*RUNTIMES, 'all'))}, got {unknown or '()'}"
            )
        if not self.threads or any(t < 1 for t in self.threads):
            raise ValueError(f"thread counts must be at least 1, got {self.threads}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be at least 1, got {self.batch_sizes}")
        if self.latency_runs < 1 or self.throughput_images < 1:
            raise ValueError("latency_runs and throughput_images must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples}")


@dataclass(frozen=True)
class Speed:
    """One version at one thread count."""

    threads: int
    latency_ms: dict[str, float]
    throughput_ips: dict[int, float]


@dataclass(frozen=True)
class Candidate:
    """One row to measure: ``load(threads)`` gives the model ready to run."""

    version: int
    runtime: str
    method: str
    bytes: int
    load: Callable[[int], Runnable]
    # Python code that loads this row alone and calls ``memory_probe(model, shape)``.
    probe: str | None = None


@dataclass(frozen=True)
class VersionRow:
    version: int
    method: str
    bytes: int
    accuracy: float
    agreement: float
    speeds: list[Speed] = field(default_factory=list)
    runtime: str = "onnxruntime"
    peak_rss_mb: float | None = None  # a fresh process running only this row


@dataclass(frozen=True)
class Comparison:
    model: str
    dataset: str
    samples: int
    reference_version: int
    cores: int
    rows: list[VersionRow]
    measured_at: str
    cpu: str = ""
    skipped: list[str] = field(default_factory=list)  # rows whose runtime cannot run them

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def compare(
    config: CompareConfig, progress: bool = False, extra: Sequence[Candidate] = ()
) -> Comparison:
    """Measure every version of ``config.model_dir`` on its runtimes, then ``extra``."""
    versions = list_versions(config.model_dir)
    if not versions:
        raise ModelNotFound(f"{config.model_dir} has no versions (<version>/model.onnx)")
    reference = versions[0]
    manifest = read_manifest(version_path(config.model_dir, reference))
    test = evaluation_set(manifest, config.data, config.data_dir)
    if config.max_samples is not None and config.max_samples < len(test):
        test = test.subset(np.arange(config.max_samples))
    candidates = [
        candidate(version_path(config.model_dir, v), v, runtime)
        for v in versions
        for runtime in runtimes_for(version_path(config.model_dir, v), config.runtimes)
    ]
    candidates += extra
    steps = len(candidates) * (1 + len(config.threads))
    rows: list[VersionRow] = []
    skipped: list[str] = []
    with _Steps(progress, steps) as bar:
        reference_predictions: np.ndarray | None = None
        for item in candidates:
            label = f"v{item.version} {item.runtime}"
            bar.describe(f"{label}: accuracy")
            try:
                model = item.load(max(config.threads))
            except ModelError as exc:  # e.g. an op this runtime does not implement
                skipped.append(f"v{item.version} on {item.runtime}: {exc.message}")
                bar.advance(1 + len(config.threads))
                continue
            predicted = predict_classes(model, test)
            del model
            if reference_predictions is None:
                reference_predictions = predicted
            bar.advance()
            speeds = []
            for threads in config.threads:
                bar.describe(f"{label}: speed, {threads} thread(s)")
                speeds.append(_speed(item.load(threads), threads, test, config))
                bar.advance()
            rows.append(
                VersionRow(
                    version=item.version,
                    method=item.method,
                    bytes=item.bytes,
                    accuracy=round(float((predicted == test.labels).mean()), 6),
                    agreement=round(float((predicted == reference_predictions).mean()), 6),
                    speeds=speeds,
                    runtime=item.runtime,
                    peak_rss_mb=measure_memory(item.probe) if item.probe else None,
                )
            )
    return Comparison(
        model=config.model_dir.name,
        dataset=test.name,
        samples=len(test),
        reference_version=reference,
        cores=available_cores(),
        rows=rows,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        cpu=cpu_name(),
        skipped=skipped,
    )


def runtimes_for(path: Path, wanted: tuple[str, ...]) -> list[str]:
    """The runtimes to measure the version at ``path`` on: ``auto`` is the runtime of its
    own format, ``all`` every runtime that reads one of its files."""
    found: list[str] = []
    for choice in wanted:
        names = [r for r in RUNTIMES if r != "auto"] if choice == "all" else [choice]
        for name in names:
            if name == "auto":
                name = select_file(path, "auto")[0]
            readable = any(sibling(path, fmt) is not None for fmt in READS[name])
            if readable and name not in found:
                found.append(name)
    return found


def candidate(path: Path, version: int, runtime: str) -> Candidate:
    """A row for the version at ``path`` run by ``runtime``."""
    _, file = select_file(path, runtime)

    def load(threads: int) -> Engine:
        return Engine(file, EngineConfig(intra_op_threads=threads, spin=True, runtime=runtime))

    probe = (
        "from tinyserve.compare import memory_probe\n"
        "from tinyserve.engine import Engine, EngineConfig\n"
        f"engine = Engine({str(file)!r}, EngineConfig(runtime={runtime!r}))\n"
        "memory_probe(engine, engine.manifest.input.shape)\n"
    )
    return Candidate(version, runtime, _method(path), model_bytes(file), load, probe)


def memory_probe(model: Runnable, shape: tuple[int, ...], runs: int = 20) -> None:
    """Run ``model`` on 32-image batches and print this process's peak RSS in MB (the end of
    a ``Candidate.probe``)."""
    batch = np.zeros((32, *shape), dtype=np.uint8)
    for _ in range(runs):
        model.infer(batch)
    print(round(peak_rss_bytes() / 2**20, 1))


def measure_memory(probe: str) -> float | None:
    """Peak RSS in MB of a fresh Python running ``probe``; None if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def throughput(engine: Runnable, images: Pixels, batch_size: int, total_images: int) -> float:
    """Images per second running batches of ``batch_size``, after two warm-up batches."""
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    for _ in range(2):
        engine.infer(batch)
    runs = max(3, -(-total_images // batch_size))
    started = time.perf_counter()
    for _ in range(runs):
        engine.infer(batch)
    return runs * batch_size / (time.perf_counter() - started)


def write_outputs(comparison: Comparison, out: Path) -> list[Path]:
    """Write compare.md, compare.json and compare.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in OUTPUT_NAMES]
    paths[0].write_text(to_markdown(comparison))
    paths[1].write_text(comparison.to_json())
    write_png(comparison, paths[2])
    return paths


def to_markdown(comparison: Comparison) -> str:
    ref = comparison.rows[0]
    threads = [s.threads for s in comparison.rows[0].speeds]
    batches = list(comparison.rows[0].speeds[0].throughput_ips)
    head = ["version", "runtime", "method", "size MB", "size vs ref", "accuracy", "Δ acc pt"]
    head += ["agreement", "peak RSS MB"]
    for t in threads:
        head += [f"p50 ms ({t}t)", f"p99 ms ({t}t)"]
        head += [f"img/s b{b} ({t}t)" for b in batches]
    lines = [
        f"# {comparison.model}: versions compared",
        "",
        f"{comparison.samples:,} images of {comparison.dataset}; agreement is top-1 "
        f"agreement with the first row; latency is batch 1; peak RSS is that of a fresh "
        f"process running only that row at batch 32; {comparison.cores} core(s) of "
        f"{comparison.cpu or 'an unnamed CPU'} available; all rows measured in one run, "
        f"{comparison.measured_at}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|",
    ]
    for row in comparison.rows:
        cells = [
            str(row.version),
            row.runtime,
            row.method,
            f"{row.bytes / 1e6:.3f}",
            f"{row.bytes / ref.bytes:.0%}",
            f"{row.accuracy:.2%}",
            f"{(row.accuracy - ref.accuracy) * 100:+.2f}",
            f"{row.agreement:.2%}",
            "" if row.peak_rss_mb is None else f"{row.peak_rss_mb:.0f}",
        ]
        for speed in row.speeds:
            cells += [f"{speed.latency_ms['p50']:.3f}", f"{speed.latency_ms['p99']:.3f}"]
            cells += [f"{speed.throughput_ips[b]:,.0f}" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    if comparison.skipped:
        lines += ["", *(f"Not measured: {note}" for note in comparison.skipped)]
    return "\n".join(lines) + "\n"


def write_png(comparison: Comparison, path: Path) -> None:
    """Accuracy against batch-1 latency and against the largest batch's throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    biggest = max(comparison.rows[0].speeds[0].throughput_ips)
    markers = "os^Dv"
    for i, threads in enumerate(s.threads for s in comparison.rows[0].speeds):
        lat = [r.speeds[i].latency_ms["p50"] for r in comparison.rows]
        tp = [r.speeds[i].throughput_ips[biggest] for r in comparison.rows]
        acc = [r.accuracy * 100 for r in comparison.rows]
        marker = markers[i % len(markers)]
        ax_lat.scatter(lat, acc, marker=marker, label=f"{threads} thread(s)")
        ax_tp.scatter(tp, acc, marker=marker, label=f"{threads} thread(s)")
        for row, x, y in zip(comparison.rows, lat, acc, strict=True):
            ax_lat.annotate(
                f"v{row.version} {row.runtime} {row.method}",
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        for row, x, y in zip(comparison.rows, tp, acc, strict=True):
            ax_tp.annotate(
                f"v{row.version}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax_lat.set(
        xlabel="batch-1 latency p50 (ms)", ylabel="test accuracy (%)", title="Accuracy vs latency"
    )
    ax_tp.set(
        xlabel=f"throughput at batch {biggest} (images/s)",
        ylabel="test accuracy (%)",
        title="Accuracy vs throughput",
    )
    for ax in (ax_lat, ax_tp):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{comparison.model} on {comparison.dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed(engine: Runnable, threads: int, test: ImageDataset, config: CompareConfig) -> Speed:
    latency = batch1_latency(engine, test, config.latency_runs)
    rates = {
        b: round(throughput(engine, test.images, b, config.throughput_images), 1)
        for b in config.batch_sizes
    }
    return Speed(threads=threads, latency_ms=latency, throughput_ips=rates)


def _method(path: Path) -> str:
    return method_of(read_manifest(path))


def method_of(manifest: Manifest) -> str:
    """How a version was made: its optimization, its conversion, else its lineage or fp32."""
    source = manifest.source
    conversion = source.get("conversion") or {}
    if conversion.get("format"):
        return f"{conversion['format']} {conversion.get('precision', 'fp32')}"
    optimization = source.get("optimization") or {}
    if optimization.get("method"):
        return str(optimization["method"])
    lineage = source.get("lineage") or {}
    return str(lineage.get("method", "fp32"))


class _Steps:
    """A rich progress bar over measurement steps, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._progress: Any = None

    def __enter__(self) -> _Steps:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task("comparing", total=self.total)
        return self

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
