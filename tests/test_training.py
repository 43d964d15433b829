from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import needs_fashion_mnist, tiny_train_config
from tinyserve.errors import CheckpointError, ConfigError
from tinyserve.training.train import (
    TrainConfig,
    build_from_checkpoint,
    evaluate_model,
    fit,
    load_checkpoint,
)


@needs_fashion_mnist
@pytest.mark.slow
def test_short_run_on_fashion_mnist_lowers_the_loss(tmp_path: Path) -> None:
    config = TrainConfig(
        out=tmp_path, arch="custom_cnn", epochs=2, max_train_samples=2048, batch_size=64, lr=0.05
    )
    result = fit(config, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < first.train_loss
    # Runs reach about 0.8 validation loss and 72% accuracy; the bounds leave room for the
    # drift that another CPU's rounding and thread count add over these 64 steps.
    assert last.val_loss < 2.0  # chance level is ln(10) = 2.30
    assert last.val_acc > 0.45
    assert (tmp_path / "curves.png").stat().st_size > 1000
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["epochs"]) == 2


def test_checkpoint_loads_with_weights_only(tiny_checkpoint: Path) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert state["format"] == "tinyserve-checkpoint/1"
    assert state["meta"]["labels"] == ["blue", "green", "red"]
    assert state["meta"]["height"] == 16
    model = build_from_checkpoint(state)
    logits = model(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    assert logits.shape == (1, 3)


def test_tiny_model_learns_the_colours(image_folder: Path, tiny_checkpoint: Path) -> None:
    from tinyserve.datasets import load_dataset
    from tinyserve.manifest import InputSpec

    model = build_from_checkpoint(load_checkpoint(tiny_checkpoint))
    val = load_dataset(str(image_folder), "val", InputSpec(16, 16, 3), val_fraction=0.25)
    _, accuracy = evaluate_model(model, val)
    assert accuracy >= 0.9


def test_resume_continues_an_interrupted_run(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tinyserve.training.train as train_module

    config = tiny_train_config(tmp_path, image_folder, epochs=3)
    real_evaluate = train_module.evaluate_model
    calls = []

    def interrupted(*args: object, **kwargs: object) -> tuple[float, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second epoch
        return real_evaluate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "evaluate_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(config, progress=False)
    first = load_checkpoint(tmp_path / "last.pt")
    assert first["epoch"] == 1

    monkeypatch.setattr(train_module, "evaluate_model", real_evaluate)
    result = fit(TrainConfig(**{**config.__dict__, "resume": True}), progress=False)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 3
    assert [h.epoch for h in result.history] == [1, 2, 3]
    assert state["meta"]["run_id"] == first["meta"]["run_id"]
    with pytest.raises(ConfigError, match="--epochs 3"):
        fit(TrainConfig(**{**config.__dict__, "resume": True, "epochs": 5}), progress=False)


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x80\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged or not a tinyserve checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not a tinyserve checkpoint"):
        load_checkpoint(bad)


def test_invalid_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(out=tmp_path, optimizer="lbfgs")


def test_augmentation_keeps_shape_and_dtype() -> None:
    from tinyserve.training.data import Augment

    images = torch.randint(0, 256, (6, 28, 28, 1), dtype=torch.uint8)
    out = Augment(pad=2, flip=True, erase_prob=1.0)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    same = Augment(pad=0, flip=False)(images, torch.Generator())
    assert torch.equal(same, images)


def test_camera_augmentation_looks_like_a_stretched_video_crop() -> None:
    from tinyserve.training.data import Augment, camera

    images = torch.zeros((64, 28, 28, 1), dtype=torch.uint8)
    images[:, 8:20, 10:18] = 200  # an object on a dark ground, not at full brightness
    out = camera(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    # Levels are stretched per image, as tinyserve.tracking.crop_square does to each crop.
    assert (out.flatten(1).amax(1) == 255).all() and (out.flatten(1).amin(1) == 0).all()
    assert out[:, 13, 13].float().mean() > 200 and out[:, 2, 2].float().mean() < 40
    flat = torch.full((4, 28, 28, 1), 90, dtype=torch.uint8)
    lit = camera(flat, torch.Generator().manual_seed(1)).flatten(1).float()
    assert (lit.amax(1) - lit.amin(1) < 32).all()  # lit and noisy, but nothing stretched
    mixed = Augment(pad=0, flip=False, camera_prob=0.5)(images, torch.Generator().manual_seed(2))
    kept = (mixed == images).flatten(1).all(1)
    assert 0 < int(kept.sum()) < len(images)  # about half shown through the camera
    with pytest.raises(ValueError, match="camera_prob"):
        TrainConfig(out=Path("x"), camera_prob=1.5)


def test_weight_average_is_what_the_checkpoints_keep(image_folder: Path, tmp_path: Path) -> None:
    config = tiny_train_config(tmp_path, image_folder, epochs=2, ema=0.9, widths=(8, 16, 16, 16))
    fit(config, progress=False)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["meta"]["arch_options"] == {"widths": [8, 16, 16, 16]}
    assert state["averaged_steps"] == 2 * 5  # 36 training images in batches of 8, twice
    averaged, raw = state["model"], state["train_model"]
    assert not torch.equal(averaged["classifier.2.weight"], raw["classifier.2.weight"])
    best = load_checkpoint(tmp_path / "best.pt")
    assert "train_model" not in best and build_from_checkpoint(best) is not None
    # resuming restores both sets of weights and the count of averaged steps
    fit(TrainConfig(**{**config.__dict__, "resume": True, "epochs": 2}), progress=False)
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(out=tmp_path, ema=1.0)
    with pytest.raises(ValueError, match="widths"):
        TrainConfig(out=tmp_path, widths=(8, 0))
