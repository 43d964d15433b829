"""Evaluate an exported model on its runtime: accuracy, per-class accuracy, confusion matrix,
latency and size. It measures the artifact that will be served, not a PyTorch module."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tinyserve.datasets import (
    ImageDataset,
    is_unlabelled_folder,
    load_dataset,
    load_unlabelled_folder,
)
from tinyserve.engine import RUNTIMES, Engine, EngineConfig, Runnable
from tinyserve.errors import DatasetError
from tinyserve.manifest import Manifest
from tinyserve.repository import model_bytes, resolve


@dataclass(frozen=True)
class EvalConfig:
    target: str
    data: str = "fashion-mnist"
    data_dir: Path | None = None
    batch_size: int = 256
    latency_runs: int = 200
    threads: int = 0
    runtime: str = "auto"  # engine.RUNTIMES

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.latency_runs < 1:
            raise ValueError("batch_size and latency_runs must be at least 1")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")


@dataclass
class EvalReport:
    model: str
    version: int
    path: str
    bytes: int
    dataset: str
    samples: int
    accuracy: float
    per_class: dict[str, float]
    confusion: list[list[int]]
    latency_ms: dict[str, float]
    throughput_ips: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def evaluate(config: EvalConfig, progress: bool = False) -> EvalReport:
    """Run the model over the whole evaluation set and time it."""
    ref = resolve(config.target)
    engine = Engine(
        ref.path, EngineConfig(intra_op_threads=config.threads, spin=True, runtime=config.runtime)
    )
    dataset = evaluation_set(engine.manifest, config.data, config.data_dir)
    started = time.perf_counter()
    predictions = predict_classes(
        engine, dataset, config.batch_size, progress, f"evaluating {ref.name}"
    )
    throughput = len(dataset) / (time.perf_counter() - started)

    k = len(engine.labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (dataset.labels, predictions), 1)
    per_class = {
        label: float(confusion[i, i] / max(confusion[i].sum(), 1))
        for i, label in enumerate(engine.labels)
    }
    return EvalReport(
        model=ref.name,
        version=ref.version,
        path=str(engine.path),
        bytes=model_bytes(engine.path),
        dataset=dataset.name,
        samples=len(dataset),
        accuracy=float(np.trace(confusion) / len(dataset)),
        per_class=per_class,
        confusion=confusion.tolist(),
        latency_ms=batch1_latency(engine, dataset, config.latency_runs),
        throughput_ips=throughput,
    )


def batch1_latency(engine: Runnable, dataset: ImageDataset, runs: int) -> dict[str, float]:
    """p50/p95/p99 of single-image inference, after warm-up."""
    for i in range(min(20, runs)):
        engine.infer(dataset.images[i : i + 1])
    times = np.empty(runs)
    for i in range(runs):
        image = dataset.images[i % len(dataset) : i % len(dataset) + 1]
        t0 = time.perf_counter()
        engine.infer(image)
        times[i] = time.perf_counter() - t0
    p50, p95, p99 = np.percentile(times * 1000, [50, 95, 99])
    return {"p50": round(p50, 4), "p95": round(p95, 4), "p99": round(p99, 4)}


def write_confusion_png(report: EvalReport, path: Path) -> None:
    """Plot the confusion matrix with per-class accuracy on the y labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(report.confusion)
    labels = list(report.per_class)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(labels), 0.8 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(
        range(len(labels)), [f"{name} ({acc:.1%})" for name, acc in report.per_class.items()]
    )
    threshold = matrix.max() / 2
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            color = "white" if value > threshold else "black"
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{report.model} v{report.version}: {report.accuracy:.2%} on {report.dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predict_classes(
    engine: Runnable,
    dataset: ImageDataset,
    batch_size: int = 256,
    progress: bool = False,
    what: str = "evaluating",
) -> npt.NDArray[np.int64]:
    """Top-1 class of every image in ``dataset``, through ONNX Runtime."""
    predictions = np.empty(len(dataset), dtype=np.int64)
    for start in _steps(len(dataset), batch_size, progress, what):
        batch = dataset.images[start : start + batch_size]
        predictions[start : start + len(batch)] = engine.infer(batch).argmax(1)
    return predictions


def evaluation_set(
    manifest: Manifest, data: str, data_dir: Path | None = None, split: str = "test"
) -> ImageDataset:
    """The ``split`` of ``data`` a model is measured on, checked against its input contract.

    An image-folder model reuses the train/validation split recorded at export, so its
    "test" images are the ones it never trained on. A folder of images without class
    sub-folders gives an unlabelled set (labels -1).
    """
    spec = manifest.input
    if is_unlabelled_folder(Path(data)):
        # Images without classes (e.g. photos for an ImageNet model): every split is all of
        # them, and only agreement between two models can be measured on them.
        return load_unlabelled_folder(Path(data), spec)
    if data == "fashion-mnist":
        dataset = load_dataset("fashion-mnist", split, data_dir=data_dir)
    else:
        recorded = manifest.source.get("split", {})
        dataset = load_dataset(
            data,
            split,
            spec,
            val_fraction=recorded.get("val_fraction", 1 / 12),
            seed=recorded.get("seed", 0),
        )
    if dataset.images.shape[1:] != spec.shape:
        raise DatasetError(
            f"{dataset.name} images are {dataset.images.shape[1:]}, the model takes {spec.shape}"
        )
    if len(dataset.classes) != manifest.num_classes:
        raise DatasetError(
            f"{dataset.name} has {len(dataset.classes)} classes, the model {manifest.num_classes}"
        )
    return dataset


def _steps(total: int, step: int, progress: bool, what: str) -> Any:
    starts = range(0, total, step)
    if not progress:
        return starts
    from rich.progress import track

    return track(starts, description=what, total=len(starts))
