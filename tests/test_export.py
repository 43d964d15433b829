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


def _bare_state_dict(tmp_path: Path, classes: int = 3) -> tuple[Path, torch.nn.Module]:
    from tinyserve.training.models import create_model

    torch.manual_seed(0)
    net = create_model("custom_cnn", num_classes=classes, in_channels=3).eval()
    path = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # DataParallel
    return path, net


def test_a_bare_state_dict_exports_with_given_preprocessing(
    tmp_path: Path, image_folder: Path
) -> None:
    from tinyserve.manifest import InputSpec
    from tinyserve.training.export import WeightsSpec, export_state_dict
    from tinyserve.training.models import ServingModel

    weights, net = _bare_state_dict(tmp_path)
    spec = WeightsSpec(
        arch="custom_cnn",
        labels=("blue", "green", "red"),
        input=InputSpec(16, 16, 3, resize="crop", crop_fraction=0.875),
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
    )
    config = ExportConfig(weights, "bare", repo=tmp_path, parity=ParityBar(samples=40))
    result = export_state_dict(config, spec, [image_folder])
    manifest = read_manifest(result.path)
    assert manifest.labels == ("blue", "green", "red")
    assert manifest.input == spec.input
    assert manifest.source["architecture"] == "custom_cnn"
    assert manifest.source["parity_images"] == {"files": 40, "synthetic": 0}
    pixels = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = ServingModel(net, spec.mean, spec.std)(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(Engine(result.path).infer(pixels), expected, atol=1e-4)


def test_cli_exports_a_bare_state_dict(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tinyserve.cli import app

    weights, _ = _bare_state_dict(tmp_path)
    args = ["export", str(weights), "--name", "bare", "--repo", str(tmp_path), "--arch"]
    flags = ["--num-classes", "3", "--size", "16x12", "--mean", "0.5", "--std", "0.25"]
    result = CliRunner().invoke(app, [*args, "custom_cnn", *flags, "--in-channels", "3"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "bare" / "1" / "model.onnx")
    assert manifest.labels == ("0", "1", "2")
    assert (manifest.input.height, manifest.input.width) == (16, 12)
    assert manifest.source["mean"] == [0.5, 0.5, 0.5]
    assert manifest.source["parity_images"]["synthetic"] == 512


def test_weights_that_do_not_fit_the_architecture_are_explained(tmp_path: Path) -> None:
    from tinyserve.errors import CheckpointError
    from tinyserve.manifest import InputSpec
    from tinyserve.training.export import WeightsSpec, export_state_dict

    weights, _ = _bare_state_dict(tmp_path, classes=5)
    spec = WeightsSpec("custom_cnn", ("a", "b", "c"), InputSpec(16, 16), (0.5,) * 3, (0.5,) * 3)
    config = ExportConfig(weights, "bare", repo=tmp_path)
    with pytest.raises(CheckpointError, match=r"2 mis-shaped .*\(5, 256\) in the file"):
        export_state_dict(config, spec)


def test_a_pickled_module_is_refused_with_a_way_out(tmp_path: Path) -> None:
    from tinyserve.errors import CheckpointError
    from tinyserve.training.export import load_state_dict

    path = tmp_path / "whole-model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # the module object, not its state_dict
    with pytest.raises(CheckpointError, match="cannot be loaded safely.*state_dict"):
        load_state_dict(path)
