"""ONNX model -> LiteRT flat buffer, through PyTorch and ``litert-torch``; run as a script.

    python -m tinyserve.training.litert_export SOURCE.onnx TARGET.tflite [--int8]
    python -m tinyserve.training.litert_export --checkpoint BEST.pt TARGET.tflite [--int8]

``litert-torch`` converts a PyTorch module. A tinyserve ONNX file already holds the whole
serving graph, preprocessing included (uint8 NHWC in, logits out), so this script rebuilds
that graph as a PyTorch module (``OnnxModule``: the initializers as buffers, the nodes run
in order with their ``torch`` counterparts) and converts it: the .tflite takes the same
uint8 input and does the same cast, scaling, normalization and transpose inside its graph.
It works for every repository version, whether or not its training checkpoint is at hand.
Given the checkpoint instead (``--checkpoint``), the script converts the training module
itself, ``ServingModel`` (the network behind the same in-graph preprocessing as the ONNX
export), as the seed's PyTorch -> LiteRT path.
``--int8`` then quantizes the weights to INT8 with ``ai-edge-quantizer`` (dynamic range:
INT8 weights, float activations, no calibration data needed), which litert-torch brings.

It runs in its own environment: litert-torch pins packages (typing_extensions) that the
serving environment keeps newer, so ``tinyserve convert litert`` starts this script with
the Python that has litert-torch (``--converter-python``) and checks the result itself.
Only the float graph ops of tinyserve's CNNs are rebuilt; an op outside ``OPS`` is refused
with its name, and a QDQ (INT8) ONNX file should be converted from its float parent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve.errors import TinyServeError

# ONNX TensorProto data types -> torch
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64}


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: Sequence[int], x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """ONNX pads [top, left, bottom, right]: symmetric ones for the op, others padded first."""
    top, left, bottom, right = pads
    if (top, left) == (bottom, right):
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, **a: Any) -> Any:
    x, padding = _pads(a.get("pads", [0, 0, 0, 0]), x)
    return F.conv2d(
        x, w, b, a.get("strides", [1, 1]), padding, a.get("dilations", [1, 1]), a.get("group", 1)
    )


def _max_pool(x: torch.Tensor, **a: Any) -> Any:
    x, padding = _pads(a.get("pads", [0, 0, 0, 0]), x)
    kernel = a["kernel_shape"]
    return F.max_pool2d(
        x, kernel, a.get("strides", kernel), padding, a.get("dilations", [1, 1]),
        bool(a.get("ceil_mode", 0)),
    )  # fmt: skip


def _avg_pool(x: torch.Tensor, **a: Any) -> Any:
    x, padding = _pads(a.get("pads", [0, 0, 0, 0]), x)
    kernel = a["kernel_shape"]
    return F.avg_pool2d(
        x, kernel, a.get("strides", kernel), padding, bool(a.get("ceil_mode", 0)),
        not a.get("count_include_pad", 0),
    )  # fmt: skip


def _gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, **a: Any) -> Any:
    if a.get("transA", 0):
        x = x.t()
    y = a.get("alpha", 1.0) * (x @ (w.t() if a.get("transB", 0) else w))
    return y if b is None else y + a.get("beta", 1.0) * b


def _reshape(x: torch.Tensor, shape: torch.Tensor, **a: Any) -> Any:
    dims = [int(d) for d in shape.tolist()]
    dims = [x.shape[i] if d == 0 and not a.get("allowzero", 0) else d for i, d in enumerate(dims)]
    if len(dims) > 1 and -1 not in dims:
        dims[0] = -1  # keep the batch axis free: the interpreter is resized per batch
    return x.reshape(dims)


def _clip(x: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None,
          **a: Any) -> Any:  # fmt: skip
    return torch.clamp(x, low if low is None else float(low), high if high is None else float(high))


OPS: dict[str, Callable[..., Any]] = {
    "Add": lambda x, y: x + y,
    "Sub": lambda x, y: x - y,
    "Mul": lambda x, y: x * y,
    "Div": lambda x, y: x / y,
    "Relu": lambda x: F.relu(x),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "HardSigmoid": lambda x, **a: torch.clamp(
        a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0
    ),
    "HardSwish": lambda x: F.hardswish(x),
    "Clip": _clip,
    "Identity": lambda x: x,
    "Dropout": lambda x, *rest, **a: x,
    "Transpose": lambda x, **a: x.permute(*a["perm"]),
    "Cast": lambda x, **a: x.to(_DTYPES[a["to"]]),
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "Flatten": lambda x, **a: torch.flatten(x, a.get("axis", 1)),
    "Gemm": _gemm,
    "MatMul": lambda x, y: x @ y,
    "Reshape": _reshape,
    "Softmax": lambda x, **a: torch.softmax(x, a.get("axis", -1)),
    "Concat": lambda *xs, **a: torch.cat(xs, a["axis"]),
    "BatchNormalization": lambda x, scale, bias, mean, var, **a: F.batch_norm(
        x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5)
    ),
}


class OnnxModule(nn.Module):
    """An ONNX graph run node by node with torch operations (float CNN ops, ``OPS``)."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        super().__init__()
        graph = model.graph
        unknown = sorted({n.op_type for n in graph.node} - set(OPS) - {"Constant"})
        if unknown:
            raise ValueError(
                f"cannot rebuild ops {unknown} for LiteRT (known: {', '.join(sorted(OPS))}); "
                "convert the float ONNX version, not a quantized one"
            )
        self.constants: dict[str, torch.Tensor] = {}
        for index, init in enumerate(graph.initializer):
            buffer = f"c{index}"
            self.register_buffer(buffer, torch.from_numpy(numpy_helper.to_array(init).copy()))
            self.constants[init.name] = getattr(self, buffer)
        self.nodes: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        for node in graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                value = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
                self.register_buffer(f"k{len(self.constants)}", value)
                self.constants[node.output[0]] = value
                continue
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = {**self.constants, self.input_name: pixels, "": None}
        for op, inputs, outputs, attrs in self.nodes:
            args = [values[name] for name in inputs]
            while args and args[-1] is None:
                args.pop()
            values[outputs[0]] = OPS[op](*args, **attrs)
        return values[self.output_name]  # type: ignore[no-any-return]


def convert(source: Path, target: Path, int8: bool = False, checkpoint: bool = False) -> None:
    """Write the LiteRT form of ``source`` to ``target``: an ONNX model, or with
    ``checkpoint`` a training checkpoint's ``ServingModel``."""
    import litert_torch

    module, shape = _from_checkpoint(source) if checkpoint else _from_onnx(source)
    sample = torch.zeros(shape, dtype=torch.uint8)
    with torch.no_grad():
        edge = litert_torch.convert(module, (sample,))
    edge.export(str(target))
    if int8:
        from ai_edge_quantizer import quantizer, recipe

        weights = quantizer.Quantizer(str(target))
        weights.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        weights.quantize().export_model(str(target), overwrite=True)


def _from_onnx(source: Path) -> tuple[nn.Module, list[int]]:
    import onnx

    model = onnx.load(str(source))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return OnnxModule(model).eval(), [1] + [int(d.dim_value) for d in dims[1:]]


def _from_checkpoint(source: Path) -> tuple[nn.Module, list[int]]:
    from tinyserve.training.train import build_from_checkpoint, load_checkpoint

    state = load_checkpoint(source)
    meta = state["meta"]
    return build_from_checkpoint(state), [1, meta["height"], meta["width"], meta["in_channels"]]


def main(argv: Sequence[str]) -> int:
    args = [a for a in argv if a not in ("--int8", "--checkpoint")]
    if len(args) != 2:
        print(
            "usage: python -m tinyserve.training.litert_export [--checkpoint] SOURCE "
            "TARGET.tflite [--int8]"
        )
        return 2
    try:
        convert(Path(args[0]), Path(args[1]), "--int8" in argv, "--checkpoint" in argv)
    except (ValueError, TinyServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
