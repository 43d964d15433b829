from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tinyserve.engine import Engine, EngineConfig, softmax, top_predictions
from tinyserve.errors import InvalidParameter, ModelError


def test_softmax_rows_sum_to_one_and_survive_large_logits() -> None:
    probs = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]], dtype=np.float32))
    # float32 exp is a few ulp off, by an amount that depends on numpy's SIMD kernel
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-5)


def test_top_predictions_are_sorted_and_capped() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
    ranked = top_predictions(probs, ["a", "b", "c"], top_k=2)
    assert [[p.label for p in row] for row in ranked] == [["b", "c"], ["a", "c"]]
    assert ranked[0][0].class_id == 1 and ranked[0][0].confidence == pytest.approx(0.6)
    assert len(top_predictions(probs, ["a", "b", "c"], top_k=100)[0]) == 3
    with pytest.raises(InvalidParameter):
        top_predictions(probs, ["a", "b", "c"], top_k=0)


def test_engine_runs_the_tiny_model(tiny_repo: Path) -> None:
    engine = Engine(tiny_repo / "colors" / "1" / "model.onnx", EngineConfig(intra_op_threads=1))
    red = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    red[..., 0] = 200
    ((best, *_),) = engine.predict(red, top_k=3)
    assert best.label == "red"
    with pytest.raises(InvalidParameter, match="does not match the model input"):
        engine.infer(np.zeros((1, 8, 8, 3), dtype=np.uint8))


def test_engine_refuses_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        Engine(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        Engine(tmp_path / "bad.onnx")
