from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_config
from tinyserve.errors import ConfigError
from tinyserve.training.distill import DistillConfig, distill, distillation_loss
from tinyserve.training.train import TrainConfig, load_checkpoint


def test_loss_is_cross_entropy_at_alpha_zero() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    expected = torch.nn.functional.cross_entropy(student, labels)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 4.0, 0.0), expected)


def test_soft_term_is_scaled_kl_divergence() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.zeros(6, dtype=torch.long)
    temperature = 3.0
    p_teacher = torch.softmax(teacher / temperature, 1)
    log_student = torch.log_softmax(student / temperature, 1)
    kl = (p_teacher * (p_teacher.log() - log_student)).sum(1).mean()
    got = distillation_loss(student, teacher, labels, temperature, 1.0)
    torch.testing.assert_close(got, kl * temperature**2)
    same = distillation_loss(teacher, teacher, labels, temperature, 1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_distill_trains_student_and_baseline(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    student = tiny_train_config(tmp_path / "student", image_folder, arch="vgg_lite", epochs=2)
    result = distill(
        DistillConfig(tiny_checkpoint, student, temperature=2.0, alpha=0.7), progress=False
    )
    assert result.baseline is not None and result.baseline_test_accuracy is not None
    assert result.student.parent == tmp_path / "student"
    assert result.baseline.parent == tmp_path / "student" / "baseline"
    meta = load_checkpoint(result.student)["meta"]
    assert meta["lineage"]["method"] == "distilled" and meta["lineage"]["alpha"] == 0.7
    assert "lineage" not in load_checkpoint(result.baseline)["meta"]
    report = json.loads((tmp_path / "student" / "distill_report.json").read_text())
    assert report["student_test_accuracy"] == result.student_test_accuracy
    assert report["teacher_parameters"] > 0 and report["student_parameters"] > 0


def test_teacher_must_match_the_students_data(tiny_checkpoint: Path, tmp_path: Path) -> None:
    student = TrainConfig(out=tmp_path, data="fashion-mnist", arch="vgg_lite", epochs=1)
    with pytest.raises(ConfigError, match="trained on"):
        distill(DistillConfig(tiny_checkpoint, student), progress=False)


def test_config_is_validated(tmp_path: Path) -> None:
    student = TrainConfig(out=tmp_path)
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(tmp_path, student, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(tmp_path, student, temperature=0)
