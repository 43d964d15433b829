"""ONNX Runtime sessions, on the CPU or on one of the execution providers ORT was built with.

The providers are named as on the command line (``--provider``): ``cpu``, ``openvino``
(ORT's OpenVINO execution provider, from the onnxruntime-openvino package), ``cuda`` and
``tensorrt`` (from onnxruntime-gpu, the ``gpu`` extra). ORT silently falls back to the CPU
when a provider it has cannot find its device; a session here refuses instead, so that a
model asked to run on a GPU never runs on the CPU unnoticed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tinyserve.errors import ModelError, RuntimeUnavailable

# --provider -> ONNX Runtime's execution providers, in the order a session tries them.
PROVIDERS: Mapping[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "openvino": ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
# What to install for each provider that the default onnxruntime wheel lacks.
_PACKAGES = {
    "openvino": "onnxruntime-openvino (it replaces onnxruntime; or serve with --runtime "
    "openvino, the OpenVINO runtime itself)",
    "cuda": "onnxruntime-gpu (pip install 'tinyserve[gpu]', in place of onnxruntime) and a "
    "CUDA-capable NVIDIA GPU with its driver",
    "tensorrt": "onnxruntime-gpu (pip install 'tinyserve[gpu]', in place of onnxruntime), "
    "TensorRT and an NVIDIA GPU",
}


def check_provider(provider: str) -> tuple[str, ...]:
    """ORT's providers for ``provider``, or a clear error when this onnxruntime lacks it."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise RuntimeUnavailable(
            f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}"
        )
    wanted = PROVIDERS[provider]
    if wanted[0] not in ort.get_available_providers():
        gpu = "no GPU execution provider: " if provider in ("cuda", "tensorrt") else ""
        raise RuntimeUnavailable(
            f"{gpu}provider {provider!r} needs ONNX Runtime's {wanted[0]}, which this onnxruntime "
            f"{ort.__version__} does not have (it has {', '.join(ort.get_available_providers())})"
            f"; install {_PACKAGES[provider]}"
        )
    return wanted


class OrtSession:
    """One ``onnxruntime.InferenceSession`` over a tinyserve ONNX model."""

    runtime = "onnxruntime"

    def __init__(
        self, path: Path, threads: int, inter_op_threads: int, spin: bool, provider: str
    ) -> None:
        import onnxruntime as ort

        providers = check_provider(provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # ORT raises its own unrelated exception types
            raise ModelError(f"cannot load {path}: {exc}") from exc
        if providers[0] not in self.session.get_providers():
            raise RuntimeUnavailable(
                f"no device: provider {provider!r}: ONNX Runtime has {providers[0]} but could "
                f"not start it for {path}; it would have run on "
                f"{', '.join(self.session.get_providers())}. Install {_PACKAGES[provider]}, or "
                "use --provider cpu"
            )
        self.provider = provider
        self.metadata: Mapping[str, str] | None = self.session.get_modelmeta().custom_metadata_map
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise ModelError(
                f"{path} must take one uint8 [N, H, W, C] input, has "
                f"{[(i.name, i.type, i.shape) for i in inputs]}"
            )
        self.input_name: str = inputs[0].name
        self.output_name: str = outputs[0].name

    def run(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        outputs = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(outputs[0], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "runtime": self.runtime,
            "version": ort.__version__,
            "provider": self.provider,
            "execution_providers": list(self.session.get_providers()),
        }
