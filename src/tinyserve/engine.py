"""The engine: one loaded model version on one runtime, plus softmax and top-k in NumPy.

``Engine`` is the one interface the rest of tinyserve runs models through; what runs them is
a runtime (``tinyserve.runtimes``): ONNX Runtime by default (on the CPU or one of its
execution providers), the OpenVINO runtime, or LiteRT. Every runtime takes the same uint8
``[N, H, W, C]`` pixels and the same manifest, so batching, metrics and every front door
are the same whichever one runs a model. ``select_file`` picks the file of a version
folder a runtime reads; the runtime modules (and their libraries) are imported only when
chosen.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tinyserve.errors import ConfigError, InvalidParameter, ModelError
from tinyserve.imaging import Pixels
from tinyserve.manifest import Manifest, read_sidecar, sidecar_tensors
from tinyserve.repository import FORMATS, format_of, sibling

Logits = npt.NDArray[np.float32]
# --runtime: "auto" runs each version on the runtime of its own format.
RUNTIMES = ("auto", "onnxruntime", "openvino", "litert")
PROVIDERS = ("cpu", "openvino", "cuda", "tensorrt")
# The formats each runtime reads, the one it prefers first.
READS: Mapping[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx",),
    "openvino": ("openvino", "onnx"),
    "litert": ("litert",),
}
_OWN_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino", "litert": "litert"}
_CONVERT = {"openvino": "tinyserve convert openvino", "litert": "tinyserve convert litert"}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineConfig:
    """How a model is run. ``intra_op_threads=0`` means one per available core.

    ``runtime`` is one of ``RUNTIMES``; ``provider`` (one of ``PROVIDERS``) picks ONNX
    Runtime's execution provider, and must be ``cpu`` for the other runtimes.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    runtime: str = "auto"
    provider: str = "cpu"
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
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.provider not in PROVIDERS:
            raise ValueError(
                f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}"
            )


class Session(Protocol):
    """What a runtime module offers the engine for one opened model file."""

    runtime: str
    input_name: str
    output_name: str
    metadata: Mapping[str, str] | None  # the tinyserve.* keys, when the file carries them

    def run(self, batch: Pixels) -> Logits: ...

    def describe(self) -> dict[str, Any]: ...


class Runnable(Protocol):
    """Anything that runs a model as an ``Engine`` does: uint8 pixels in, logits out (a
    PyTorch module measured beside the engines, in ``tinyserve evaluate --compare --torch``)."""

    def infer(self, batch: Pixels) -> Logits: ...


@dataclass(slots=True)  # not frozen: a frozen field costs a setattr call, 5 per request
class Prediction:
    label: str
    class_id: int
    confidence: float


def select_file(path: Path, runtime: str, provider: str = "cpu") -> tuple[str, Path]:
    """The runtime that will run the model at ``path``, and the file of its version folder
    it reads: ``auto`` runs a file on the runtime of its format (ONNX on ONNX Runtime); a
    named runtime takes the file it reads from beside ``path`` (an IR before an ONNX file
    for OpenVINO)."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if runtime != "auto":
        chosen = runtime
    elif provider != "cpu":
        chosen = "onnxruntime"  # the providers are ONNX Runtime's
    else:
        chosen = _OWN_RUNTIME[format_of(path)]
    for candidate in READS[chosen]:
        found = sibling(path, candidate)
        if found is not None:
            return chosen, found
    wanted = READS[chosen][0]
    hint = f"; make one with '{_CONVERT[wanted]}'" if wanted in _CONVERT else ""
    raise ModelError(
        f"the {chosen} runtime reads {' or '.join(FORMATS[f] for f in READS[chosen])}, and "
        f"{path.parent} holds none (it has {path.name}){hint}"
    )


def open_session(runtime: str, file: Path, config: EngineConfig) -> Session:
    """Open ``file`` (as chosen by ``select_file``) on ``runtime``."""
    threads = config.intra_op_threads or available_cores()
    args = (file, threads, config.inter_op_threads, config.spin, config.provider)
    if runtime == "onnxruntime":
        from tinyserve.runtimes.ort import OrtSession

        return OrtSession(*args)
    if runtime == "openvino":
        from tinyserve.runtimes.openvino import OpenVinoSession

        return OpenVinoSession(*args)
    if runtime == "litert":
        from tinyserve.runtimes.litert import LiteRtSession

        return LiteRtSession(*args)
    raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


class Engine:
    """Runs a tinyserve model: uint8 ``[N, H, W, C]`` pixels in, float32 logits out.

    ``path`` is a model file (or a version's file: the runtime then reads its own format
    from the same folder); ``self.path`` is the file the runtime opened.
    """

    def __init__(self, path: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        started = time.perf_counter()
        self.runtime, self.path = select_file(Path(path), self.config.runtime, self.config.provider)
        self.session = open_session(self.runtime, self.path, self.config)
        metadata = self.session.metadata
        # The tensor names clients see (V2) are the ONNX model's, whatever runs it.
        self.input_name = self.session.input_name
        self.output_name = self.session.output_name
        if self.path.suffix.lower() == ".onnx":
            self.manifest = Manifest.from_metadata(metadata or {}, str(self.path))
        else:
            self.manifest = read_sidecar(self.path)
            self.input_name, self.output_name = sidecar_tensors(self.path) or (
                self.input_name,
                self.output_name,
            )
        self.load_seconds = time.perf_counter() - started
        self.warmup()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    def describe(self) -> dict[str, Any]:
        """The runtime, its version and provider, and the file it runs."""
        return {**self.session.describe(), "file": self.path.name}

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
        logits = self.session.run(batch)
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
