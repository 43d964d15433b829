"""One ONNX Runtime session per loaded model version, plus softmax and top-k in NumPy."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tinyserve.errors import InvalidParameter, ModelError
from tinyserve.imaging import Pixels
from tinyserve.manifest import Manifest

Logits = npt.NDArray[np.float32]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineConfig:
    """How a session is built. ``intra_op_threads=0`` means one per available core."""

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    warmup_runs: int = 2
    warmup_batch_sizes: tuple[int, ...] = (1,)
    # Whether ORT's worker threads spin while waiting for work: good for a lone benchmark
    # loop (which asks for it), bad for a server whose event loop and decoders need the
    # same cores.
    spin: bool = False

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 1:
            raise ValueError("thread counts must be >= 0 (intra) and >= 1 (inter)")
        if self.warmup_runs < 0 or any(b < 1 for b in self.warmup_batch_sizes):
            raise ValueError("warm-up runs must be >= 0 and batch sizes >= 1")


@dataclass(slots=True)  # not frozen: a frozen field costs a setattr call, 5 per request
class Prediction:
    label: str
    class_id: int
    confidence: float


class Engine:
    """Runs a tinyserve model: uint8 ``[N, H, W, C]`` pixels in, float32 logits out."""

    def __init__(self, path: str | Path, config: EngineConfig | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.config = config or EngineConfig()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.config.intra_op_threads or available_cores()
        options.inter_op_num_threads = self.config.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not self.config.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        started = time.perf_counter()
        if not self.path.is_file():
            raise ModelError(f"model file {self.path} does not exist")
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=list(self.config.providers)
            )
        except Exception as exc:  # ORT raises its own unrelated exception types
            raise ModelError(f"cannot load {self.path}: {exc}") from exc
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.manifest = Manifest.from_metadata(metadata, str(self.path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise ModelError(
                f"{self.path} must take one uint8 [N, H, W, C] input, has "
                f"{[(i.name, i.type, i.shape) for i in inputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.load_seconds = time.perf_counter() - started
        self.warmup()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    def warmup(self) -> None:
        """Run a few zero batches so the first real request does not pay for allocation."""
        for batch_size in self.config.warmup_batch_sizes:
            zeros = np.zeros((batch_size, *self.manifest.input.shape), dtype=np.uint8)
            for _ in range(self.config.warmup_runs):
                self.infer(zeros)

    def infer(self, batch: Pixels) -> Logits:
        """Logits ``[N, num_classes]`` for a uint8 batch shaped ``[N, *input.shape]``."""
        if batch.shape[1:] != self.manifest.input.shape:
            raise InvalidParameter(
                f"batch shape {batch.shape} does not match the model input "
                f"[N, {', '.join(map(str, self.manifest.input.shape))}]"
            )
        outputs = self.session.run([self.output_name], {self.input_name: batch})
        logits: Logits = np.asarray(outputs[0], dtype=np.float32)
        if logits.shape[0] != batch.shape[0]:
            raise ModelError(
                f"the model returned {logits.shape[0]} rows for a batch of {batch.shape[0]}"
            )
        return logits

    def predict(self, batch: Pixels, top_k: int = 5) -> list[list[Prediction]]:
        """Top-``top_k`` predictions per image."""
        return rank(self.infer(batch), self.labels, top_k)


def rank(logits: Logits, labels: Sequence[str], top_k: int) -> list[list[Prediction]]:
    """The ``top_k`` most probable classes of each row of logits, best first."""
    return top_predictions(softmax(logits), labels, top_k)


def softmax(logits: Logits) -> Logits:
    shifted: Logits = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def top_predictions(
    probabilities: Logits, labels: Sequence[str], top_k: int
) -> list[list[Prediction]]:
    """The ``top_k`` most probable classes of each row, best first."""
    if top_k < 1:
        raise InvalidParameter(f"top_k must be at least 1, got {top_k}")
    k = min(top_k, probabilities.shape[1])
    # A stable sort of every row: the best first, ties to the lower class id.
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    # Plain fancy indexing: np.take_along_axis builds its index in Python, which costs more
    # than the rest of the ranking for the one-row batches of single requests.
    values = probabilities[np.arange(len(best))[:, None], best]
    return [
        [Prediction(labels[c], c, p) for c, p in zip(ids, row, strict=True)]
        for ids, row in zip(best.tolist(), values.tolist(), strict=True)
    ]
