"""The OpenVINO runtime: an IR (model.xml + model.bin) or an ONNX file, compiled for the CPU.

Compiled with an ``f32`` inference precision: on CPUs with AVX-512 BF16 (AMD Zen 4, Intel
Sapphire Rapids) OpenVINO otherwise runs in bfloat16, whose logits differ from ONNX Runtime's
by about 1e-2, more than a parity report allows. One infer request per calling thread: a
request is not thread-safe, and a server calls a model from its inference thread and, for a
lone request, from the event loop thread (``BatchConfig.inline_ms``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tinyserve.errors import ModelError, RuntimeUnavailable

DEVICE = "CPU"
_INSTALL = "install the openvino extra (pip install 'tinyserve[openvino]')"


def load_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeUnavailable(f"the openvino runtime is not installed; {_INSTALL}") from exc
    return openvino


class OpenVinoSession:
    """One compiled OpenVINO model over a tinyserve model file."""

    runtime = "openvino"

    def __init__(
        self, path: Path, threads: int, inter_op_threads: int, spin: bool, provider: str
    ) -> None:
        del inter_op_threads, spin  # one stream; OpenVINO has no spin-wait setting
        if provider != "cpu":
            raise RuntimeUnavailable(
                f"the openvino runtime runs on the CPU here; provider {provider!r} is one of "
                "ONNX Runtime's (use --runtime onnxruntime --provider "
                f"{provider}, or --provider cpu)"
            )
        ov = load_openvino()
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(
                model,
                DEVICE,
                {
                    "INFERENCE_NUM_THREADS": threads,
                    "PERFORMANCE_HINT": "LATENCY",
                    "NUM_STREAMS": 1,
                    "INFERENCE_PRECISION_HINT": "f32",
                },
            )
        except Exception as exc:  # OpenVINO raises RuntimeError for every kind of failure
            raise ModelError(f"OpenVINO cannot load {path}: {exc}") from exc
        self.provider = provider
        self.version = str(ov.__version__)
        inputs, outputs = model.inputs, model.outputs
        if (
            len(inputs) != 1
            or inputs[0].get_element_type() != ov.Type.u8
            or inputs[0].get_partial_shape().rank.get_length() != 4
        ):
            raise ModelError(
                f"{path} must take one uint8 [N, H, W, C] input, has "
                f"{[(i.get_any_name(), str(i.get_element_type())) for i in inputs]}"
            )
        self.input_name: str = inputs[0].get_any_name()
        self.output_name: str = outputs[0].get_any_name()
        self.metadata: Mapping[str, str] | None = _framework_metadata(model)
        self._output = self.compiled.outputs[0]
        self._local = threading.local()

    def run(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({0: batch})
        # The request reuses its output buffer on its next run: copy it out.
        return np.array(result[self._output], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "version": self.version,
            "provider": self.provider,
            "device": DEVICE,
            "precision": "f32",
        }


def _framework_metadata(model: Any) -> dict[str, str] | None:
    """The ONNX ``metadata_props`` an ONNX file read by OpenVINO keeps in its rt_info."""
    info = model.get_rt_info()
    if "framework" not in info:
        return None
    found = {}
    for key in model.get_rt_info()["framework"]:
        if key.startswith("tinyserve."):
            found[key] = str(model.get_rt_info(["framework", key]).astype(str))
    return found or None
