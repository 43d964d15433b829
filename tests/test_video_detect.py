"""The detector: training for a few steps, export with decoding in the graph and its parity
check, the output contract in the manifest, the quantize gate on mAP@0.5, and the bundled
detector finding what the generator drew."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")

from tinyserve.datasets import load_fashion_mnist  # noqa: E402
from tinyserve.detection import from_output, iou_matrix, mean_average_precision  # noqa: E402
from tinyserve.engine import Engine  # noqa: E402
from tinyserve.errors import ConfigError, ModelError  # noqa: E402
from tinyserve.manifest import read_manifest  # noqa: E402
from tinyserve.scenes import GenerateConfig, SceneConfig, generate, new_scene  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = SceneConfig(width=192, height=144, min_objects=2, max_objects=3, min_size=24, max_size=48)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tinyserve.training.detect import DetectTrainConfig, fit_detector

    data = tmp_path_factory.mktemp("scenes")
    generate(
        GenerateConfig(
            data,
            SMALL,
            train_sequences=6,
            train_frames_per_sequence=4,
            test_sequences=1,
            test_frames=24,
        )
    )
    out = tmp_path_factory.mktemp("run")
    config = DetectTrainConfig(
        out=out,
        data=data,
        width=192,
        height=144,
        crop_width=160,
        crop_height=128,
        epochs=2,
        batch_size=4,
        val_frames=4,
        threads=1,
    )
    result = fit_detector(config, log=lambda _: None)
    assert result.best_path.is_file() and len(result.history) == 2
    return data, result.best_path


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinyserve.training.detect_export import DetectExportConfig, export_detector

    data, checkpoint = trained
    repo = tmp_path_factory.mktemp("repo")
    path, report = export_detector(
        DetectExportConfig(
            checkpoint, "det", data, width=192, height=144, repo=repo, parity_frames=16
        )
    )
    assert report["parity"]["max_abs_score_diff"] <= 1e-4
    return path


def test_export_writes_the_detector_contract(exported: Path) -> None:
    manifest = read_manifest(exported)
    assert manifest.task == "detect" and manifest.labels == ("object",)
    assert manifest.outputs["detections"]["layout"] == ["x1", "y1", "x2", "y2", "score", "class"]
    assert manifest.input.shape == (144, 192, 3)
    engine = Engine(exported)
    frames = np.random.default_rng(0).integers(0, 256, (3, 144, 192, 3), dtype=np.uint8)
    out = engine.infer(frames)
    assert out.shape == (3, 100, 6)
    assert (np.diff(out[:, :, 4], axis=1) <= 1e-6).all()  # sorted by score
    assert ((out[:, :, :4] >= 0) & (out[:, :, :4] <= 1)).all()


def test_the_parity_check_catches_a_graph_that_differs(
    trained: tuple[Path, Path], exported: Path
) -> None:
    from tinyserve.training.detect import build_detector, load_detector_checkpoint
    from tinyserve.training.detect_export import check_parity

    data, checkpoint = trained
    model = build_detector(load_detector_checkpoint(checkpoint))
    frames = np.random.default_rng(1).integers(0, 256, (4, 144, 192, 3), dtype=np.uint8)
    assert check_parity(model, exported, frames, 1e-4)["max_abs_score_diff"] <= 1e-4
    with torch.no_grad():
        model.net.head[-1].bias[0] += 4.0  # the heatmap's logit: every score rises above 0.1
    with pytest.raises(ModelError, match="disagrees"):
        check_parity(model, exported, frames, 1e-4)


def test_int8_goes_through_the_gate_on_map50(trained: tuple[Path, Path], exported: Path) -> None:
    from tinyserve.quantize import AgreementBar, Calibration, QuantizeConfig, quantize

    data, _ = trained
    config = QuantizeConfig(
        exported.parent.parent,
        mode="static",
        data=str(data),
        calibration=Calibration(samples=8, batch_size=4),
        bar=AgreementBar(max_accuracy_drop=100.0),
    )
    result = quantize(config)
    assert result.path is not None and "mAP@0.5" in result.gate.dataset
    manifest = read_manifest(result.path)
    assert manifest.task == "detect" and manifest.outputs  # the contract survives


def test_the_video_pipeline_refuses_a_classifier_as_detector() -> None:
    from tinyserve.engine import EngineConfig
    from tinyserve.video_run import load_detectors

    with pytest.raises(ConfigError, match="not a detector"):
        load_detectors(ROOT / "models", "fashion-cnn", EngineConfig())


def test_the_bundled_detector_finds_what_was_drawn() -> None:
    engine = Engine(ROOT / "models" / "scene-det" / "1" / "model.onnx")
    scene = new_scene(
        SceneConfig(photos=ROOT / "samples" / "photos"), load_fashion_mnist("test"), 11
    )
    predicted, truth = [], []
    for _ in range(30):
        image, boxes = scene.step()
        from PIL import Image

        small = np.asarray(Image.fromarray(image).resize((320, 240), Image.Resampling.BILINEAR))
        found = from_output(engine.infer(small[None])[0], 640, 480, 0.05)
        visible = [b.clipped(640, 480) for b in boxes if b.visibility >= 0.9]
        truth.append(np.array([v for v in visible if v], np.float32).reshape(-1, 4))
        predicted.append((found.boxes, found.scores))
    assert mean_average_precision(predicted, truth, (0.5,)) > 0.85
    assert iou_matrix(truth[0], predicted[0][0]).max(axis=1).min() > 0.5
