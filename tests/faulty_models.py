"""Real ONNX models that misbehave on purpose: a slow copy and a failing copy of a model.

Both keep the original's input, output and tinyserve metadata, and both pass the server's
warm-up (an all-zero image): the slow one is slow on every batch, the failing one fails only
on images with a non-zero pixel, which every real image has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _rewire(model: onnx.ModelProto) -> tuple[onnx.GraphProto, str, str]:
    """Rename the graph's output so new nodes can add to it; (graph, input, inner output)."""
    graph = model.graph
    out = graph.output[0].name
    inner = out + "_inner"
    for node in graph.node:
        node.output[:] = [inner if name == out else name for name in node.output]
    return graph, graph.input[0].name, inner


def _save(model: onnx.ModelProto, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def slow_copy(src: Path, dst: Path, matmuls: int = 8, size: int = 384) -> Path:
    """``src`` plus a chain of ``matmuls`` [size, size] products that depend on the input
    (so nothing can be folded away) and add nothing to the logits."""
    model = onnx.load(str(src))
    graph, pixels, inner = _rewire(model)
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((size, size)).astype(np.float32) / size,
        "slow_weight",
    )
    zero = numpy_helper.from_array(np.zeros((), np.float32), "slow_zero")
    graph.initializer.extend([weight, zero])
    nodes = [
        helper.make_node("Cast", [pixels], ["slow_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["slow_f"], ["slow_mean"], keepdims=0),
        helper.make_node("Mul", ["slow_weight", "slow_mean"], ["slow_m0"]),
    ]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"slow_m{i}", "slow_weight"], [f"slow_m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"slow_m{matmuls}"], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
        helper.make_node("Add", [inner, "slow_nothing"], [graph.output[0].name]),
    ]
    graph.node.extend(nodes)
    return _save(model, dst)


def failing_copy(src: Path, dst: Path) -> Path:
    """``src`` that fails at run time (an out-of-range Gather) on any non-zero pixel."""
    model = onnx.load(str(src))
    graph, pixels, inner = _rewire(model)
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "fail_table"))
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "fail_shape"))
    graph.node.extend(
        [
            helper.make_node("ReduceMax", [pixels], ["fail_max"], keepdims=0),
            helper.make_node("Cast", ["fail_max"], ["fail_index"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["fail_index", "fail_shape"], ["fail_indices"]),
            helper.make_node("Gather", ["fail_table", "fail_indices"], ["fail_value"]),
            helper.make_node("Add", [inner, "fail_value"], [graph.output[0].name]),
        ]
    )
    return _save(model, dst)
