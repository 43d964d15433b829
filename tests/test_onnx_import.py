from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tinyserve.cli import app
from tinyserve.engine import Engine
from tinyserve.errors import ConfigError, ModelError
from tinyserve.manifest import read_manifest
from tinyserve.onnx_import import (
    OnnxImportConfig,
    import_onnx,
    normalize,
    verification_pixels,
    verify_import,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HEIGHT, WIDTH = 20, 24  # not square, so a swapped axis shows


class TinyNet(nn.Module):
    """A small float NCHW classifier with non-trivial batch-norm statistics."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, classes),
        )
        bn = self.body[1]
        assert isinstance(bn, nn.BatchNorm2d)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


class Nhwc(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))  # type: ignore[no-any-return]


def export_float(model: nn.Module, path: Path, shape: tuple[int, ...], dynamic: bool) -> Path:
    axes = {"input": {0: "n"}, "scores": {0: "n"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(shape),),
            str(path),
            input_names=["input"],
            output_names=["scores"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: TinyNet exported as a float model (NCHW or NHWC, dynamic or fixed batch)."""
    folder = tmp_path_factory.mktemp("float-onnx")

    def make(layout: str = "nchw", dynamic: bool = True) -> Path:
        net = TinyNet()
        model: nn.Module = net if layout == "nchw" else Nhwc(net)
        shape = (1, 3, HEIGHT, WIDTH) if layout == "nchw" else (1, HEIGHT, WIDTH, 3)
        return export_float(model, folder / f"tiny-{layout}-{dynamic}.onnx", shape, dynamic)

    return make


@pytest.fixture()
def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("apple\nbanana\ncherry\ndate\n")
    return path


def config(source: Path, repo: Path, **overrides: object) -> OnnxImportConfig:
    values: dict[str, object] = {
        "source": source,
        "name": "tiny",
        "labels": ("apple", "banana", "cherry", "date"),
        "mean": MEAN,
        "std": STD,
        "repo": repo,
        "samples": 8,
    }
    return OnnxImportConfig(**{**values, **overrides})  # type: ignore[arg-type]


def torch_reference(pixels: np.ndarray) -> np.ndarray:
    """What the original network gives for uint8 pixels normalized the usual way."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return TinyNet()(x).numpy()  # type: ignore[no-any-return]


def test_import_round_trip_matches_the_original_network(
    float_onnx: Callable[..., Path], tmp_path: Path, image_folder: Path
) -> None:
    result = import_onnx(config(float_onnx(), tmp_path, images=(image_folder,)))
    assert result.path == tmp_path / "tiny" / "1" / "model.onnx"
    onnx.checker.check_model(str(result.path), full_check=True)

    engine = Engine(result.path)  # the serving contract: one uint8 [N, H, W, C] input
    pixels = np.random.default_rng(3).integers(0, 256, (5, HEIGHT, WIDTH, 3), dtype=np.uint8)
    np.testing.assert_allclose(engine.infer(pixels), torch_reference(pixels), atol=1e-4)

    manifest = read_manifest(result.path)
    assert manifest.labels == ("apple", "banana", "cherry", "date")
    assert manifest.input.shape == (HEIGHT, WIDTH, 3)
    assert manifest.source["source_layout"] == "nchw"
    check = manifest.source["verification"]
    assert check["images"] == {"files": 8, "synthetic": 0}
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    report = json.loads((result.path.parent / "import_report.json").read_text())
    assert report["version"] == 1 and report["verification"]["samples"] == 8


def test_a_fixed_batch_axis_is_made_dynamic(
    float_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    source = float_onnx(dynamic=False)
    first = onnx.load(str(source)).graph.input[0].type.tensor_type.shape.dim[0]
    assert first.dim_value == 1
    result = import_onnx(config(source, tmp_path))
    assert read_manifest(result.path).source["batch_axis_made_dynamic"] is True
    pixels = np.random.default_rng(4).integers(0, 256, (3, HEIGHT, WIDTH, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        Engine(result.path).infer(pixels), torch_reference(pixels), atol=1e-4
    )


def test_nhwc_sources_get_no_transpose(float_onnx: Callable[..., Path], tmp_path: Path) -> None:
    result = import_onnx(config(float_onnx("nhwc"), tmp_path, layout="nhwc"))
    nodes = onnx.load(str(result.path)).graph.node
    ours = [n.op_type for n in nodes if n.output[0].startswith("tinyserve_preprocess/")]
    assert ours == ["Cast", "Mul", "Sub"]
    pixels = np.random.default_rng(5).integers(0, 256, (2, HEIGHT, WIDTH, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        Engine(result.path).infer(pixels), torch_reference(pixels), atol=1e-4
    )


def test_verification_catches_a_wrong_normalization(
    float_onnx: Callable[..., Path], tmp_path: Path
) -> None:
    source = float_onnx()
    imported = import_onnx(config(source, tmp_path)).path
    pixels, _ = verification_pixels([], read_manifest(imported).input, 6)
    other = config(source, tmp_path, mean=(0.5, 0.5, 0.5))  # not what the graph was built with
    with pytest.raises(ModelError, match="disagrees with the source"):
        verify_import(source, imported, pixels, other)


def test_labels_must_match_the_outputs(float_onnx: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="4 scores per image but 3 labels"):
        import_onnx(config(float_onnx(), tmp_path, labels=("a", "b", "c")))
    assert not (tmp_path / "tiny").exists()


def test_the_size_must_fit_a_fixed_input(float_onnx: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fixed at 20x24, not 32x32"):
        import_onnx(config(float_onnx(), tmp_path, size=(32, 32)))
    with pytest.raises(ConfigError, match="3 channel"):
        import_onnx(config(float_onnx(), tmp_path, mean=(0.5,), std=(0.5,)))


def test_a_model_with_uint8_input_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 3, 4, 4])],
    )
    path = tmp_path / "u8.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ModelError, match="must be float32"):
        import_onnx(config(path, tmp_path))


def test_normalize_matches_the_usual_formula() -> None:
    pixels = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    got = normalize(pixels, MEAN, STD, "nchw")
    expected = (np.array([0, 128, 255]) / 255.0 - MEAN) / STD
    assert got.shape == (1, 3, 1, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-6)


def test_cli_import_of_an_onnx_file(
    float_onnx: Callable[..., Path], tmp_path: Path, labels_file: Path
) -> None:
    args = ["import", str(float_onnx()), "--repo", str(tmp_path), "--labels", str(labels_file)]
    norm = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
    result = CliRunner().invoke(app, [*args, *norm, "--resize", "crop", "--crop-fraction", "0.9"])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 100.00%" in result.output
    path = tmp_path / "tiny-nchw-True" / "1" / "model.onnx"
    spec = read_manifest(path).input
    assert (spec.resize, spec.crop_fraction) == ("crop", 0.9)

    missing = CliRunner().invoke(app, [*args])
    assert missing.exit_code != 0
    assert isinstance(missing.exception, ConfigError)
    assert "--mean and --std" in missing.exception.message
