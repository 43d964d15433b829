from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tinyserve.engine import Engine
from tinyserve.errors import ModelError
from tinyserve.manifest import read_manifest
from tinyserve.training.export import ExportConfig, ParityBar, check_parity, export_checkpoint
from tinyserve.training.train import build_from_checkpoint, load_checkpoint


def test_export_writes_a_verified_model_with_metadata(tiny_repo: Path) -> None:
    path = tiny_repo / "colors" / "1" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    manifest = read_manifest(path)
    assert manifest.labels == ("blue", "green", "red")
    assert manifest.input.shape == (16, 16, 3)
    assert manifest.input.color == "RGB"
    assert manifest.source["architecture"] == "custom_cnn"
    assert manifest.source["parity"]["max_abs_logit_diff"] <= 1e-4
    assert manifest.source["parity"]["top1_agreement"] == 1.0
    report = json.loads((path.parent / "export_report.json").read_text())
    assert report["version"] == 1 and report["parity"]["samples"] == 12


def test_exported_graph_takes_uint8_nhwc_with_a_dynamic_batch(
    tiny_repo: Path, tiny_checkpoint: Path
) -> None:
    engine = Engine(tiny_repo / "colors" / "1" / "model.onnx")
    model = build_from_checkpoint(load_checkpoint(tiny_checkpoint))
    pixels = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    got = engine.infer(pixels)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).numpy()
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_takes_the_next_free_version(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = ExportConfig(tiny_checkpoint, "colors", repo=tmp_path, parity=ParityBar(samples=4))
    assert export_checkpoint(config).path == tmp_path / "colors" / "1" / "model.onnx"
    assert export_checkpoint(config).path == tmp_path / "colors" / "2" / "model.onnx"


def test_parity_check_rejects_a_model_that_disagrees(
    tiny_repo: Path, tiny_checkpoint: Path
) -> None:
    model = build_from_checkpoint(load_checkpoint(tiny_checkpoint))
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.5)  # the PyTorch side now differs from the exported file
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ModelError, match="disagrees with PyTorch"):
        check_parity(model, tiny_repo / "colors" / "1" / "model.onnx", images, ParityBar())
