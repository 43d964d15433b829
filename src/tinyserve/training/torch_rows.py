"""PyTorch eager and TorchScript rows for ``tinyserve evaluate --compare --torch``.

The PyTorch model is the checkpoint's ``ServingModel`` when one is given (what training
evaluated), else the served ONNX graph rebuilt as a PyTorch module
(``litert_export.OnnxModule``: the same operations, batch-norm already folded into the
convolutions). TorchScript is that module traced (``torch.jit.trace``, deprecated in torch
2.13 in favour of ``torch.export``, and measured because deployments still use it). Both
take the same uint8 ``[N, H, W, C]`` pixels as every runtime, so they are measured by the
same code.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from tinyserve.compare import Candidate
from tinyserve.manifest import read_manifest
from tinyserve.training.litert_export import OnnxModule
from tinyserve.training.train import build_from_checkpoint, load_checkpoint


class TorchModel:
    """A PyTorch module run like an engine, on ``threads`` intra-op threads."""

    def __init__(self, module: nn.Module, threads: int) -> None:
        if threads:  # 0: torch's default, all cores
            torch.set_num_threads(threads)
        self.module = module

    def infer(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(batch)))
        return np.asarray(logits.numpy(), dtype=np.float32)


def torch_candidates(onnx_path: Path, version: int, checkpoint: Path | None) -> list[Candidate]:
    """Rows for the model of ``onnx_path``: PyTorch eager, then TorchScript."""
    manifest = read_manifest(onnx_path)
    if checkpoint is not None:
        eager: nn.Module = build_from_checkpoint(load_checkpoint(checkpoint)).eval()
        origin = "checkpoint"
    else:
        import onnx

        eager = OnnxModule(onnx.load(str(onnx_path))).eval()
        origin = "ONNX graph rebuilt"
    sample = torch.zeros((1, *manifest.input.shape), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        with torch.inference_mode():
            traced = torch.jit.trace(eager, sample)  # type: ignore[no-untyped-call]
            scripted = torch.jit.freeze(traced.eval())
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    size = sum(t.numel() * t.element_size() for t in eager.state_dict().values())

    def load(module: nn.Module) -> Callable[[int], TorchModel]:
        return lambda threads: TorchModel(module, threads)

    def probe(index: int) -> str:
        return (
            "from pathlib import Path\n"
            "from tinyserve.compare import memory_probe\n"
            "from tinyserve.training.torch_rows import torch_candidates\n"
            f"rows = torch_candidates(Path({str(onnx_path)!r}), {version}, "
            f"{None if checkpoint is None else str(checkpoint)!r})\n"
            f"memory_probe(rows[{index}].load(0), {tuple(manifest.input.shape)!r})\n"
        )

    return [
        Candidate(version, "pytorch eager", f"fp32 ({origin})", size, load(eager), probe(0)),
        Candidate(
            version, "torchscript", "fp32 (traced, frozen)", buffer.tell(), load(scripted),
            probe(1),
        ),
    ]  # fmt: skip
