"""LiteRT (``ai-edge-litert``, formerly TensorFlow Lite): a model.tflite on the CPU.

The interpreter has fixed tensor shapes: a batch of another size resizes the input and
re-plans the tensors first. On the bundled model that costs too little to measure next to a
run (batches of 1 and 7 alternating take as long as the mean of each alone). An interpreter
is not thread-safe: one lock serializes its runs (a server calls a model from its inference
thread and, for a lone request, from the event loop thread).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tinyserve.errors import ModelError, RuntimeUnavailable

_INSTALL = "install the litert extra (pip install 'tinyserve[litert]')"


class LiteRtSession:
    """One LiteRT interpreter over a tinyserve model.tflite."""

    runtime = "litert"
    metadata: Mapping[str, str] | None = None  # a .tflite carries its manifest in manifest.json

    def __init__(
        self, path: Path, threads: int, inter_op_threads: int, spin: bool, provider: str
    ) -> None:
        del inter_op_threads, spin
        if provider != "cpu":
            raise RuntimeUnavailable(
                f"the litert runtime runs on the CPU; provider {provider!r} is one of ONNX "
                "Runtime's (use --provider cpu)"
            )
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise RuntimeUnavailable(f"the litert runtime is not installed; {_INSTALL}") from exc
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"LiteRT cannot load {path}: {exc}") from exc
        self.provider = provider
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or inputs[0]["dtype"] != np.uint8 or len(inputs[0]["shape"]) != 4:
            raise ModelError(
                f"{path} must take one uint8 [N, H, W, C] input, has "
                f"{[(i['name'], i['dtype'].__name__, i['shape'].tolist()) for i in inputs]}"
            )
        self.input_name: str = inputs[0]["name"]
        self.output_name: str = outputs[0]["name"]
        self._input = int(inputs[0]["index"])
        self._output = int(outputs[0]["index"])
        self._batch = int(inputs[0]["shape"][0])
        self._lock = threading.Lock()

    def run(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        with self._lock:
            if len(batch) != self._batch:
                self.interpreter.resize_tensor_input(self._input, list(batch.shape))
                self.interpreter.allocate_tensors()
                self._batch = len(batch)
            self.interpreter.set_tensor(self._input, np.ascontiguousarray(batch))
            self.interpreter.invoke()
            return np.array(self.interpreter.get_tensor(self._output), dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"runtime": self.runtime, "version": version("ai-edge-litert"), "provider": "cpu"}
