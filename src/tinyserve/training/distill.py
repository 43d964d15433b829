"""Knowledge distillation: train a small student on a trained teacher's softened outputs.

The loss is Hinton et al.'s: ``KL(softmax(student / T) || softmax(teacher / T)) * T^2 * alpha
+ CE(student, labels) * (1 - alpha)``. The teacher sees exactly the augmented batch the
student sees. To show what the teacher is worth, the same student can also be trained alone
with the same data, schedule and epochs, and both are scored on the test set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyserve.datasets import load_dataset
from tinyserve.errors import ConfigError
from tinyserve.manifest import InputSpec
from tinyserve.training.train import (
    TrainConfig,
    TrainResult,
    build_from_checkpoint,
    evaluate_model,
    fit,
    load_checkpoint,
    uses_bf16,
)

REPORT_FILE = "distill_report.json"


@dataclass(frozen=True)
class DistillConfig:
    """Train ``student.arch`` into ``student.out`` from ``teacher``'s soft targets."""

    teacher: Path
    student: TrainConfig
    temperature: float = 4.0
    alpha: float = 0.5
    baseline: bool = True  # also train the student without a teacher, into out/baseline

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class DistillResult:
    student: Path
    baseline: Path | None
    teacher_test_accuracy: float
    student_test_accuracy: float
    baseline_test_accuracy: float | None
    teacher_parameters: int
    student_parameters: int
    seconds: float

    def to_json(self) -> str:
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        return json.dumps(plain, indent=2) + "\n"


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``KL(student/T, teacher/T) * T^2 * alpha + CE * (1 - alpha)``, batch-averaged."""
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student / temperature, dim=1),
        nn.functional.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = nn.functional.cross_entropy(student, labels, label_smoothing=label_smoothing)
    return soft * (temperature**2) * alpha + hard * (1.0 - alpha)


def distill(config: DistillConfig, progress: bool = True) -> DistillResult:
    """Train the student with the teacher (and, if asked, without); score all on the test set."""
    state = load_checkpoint(config.teacher)
    _check_compatible(state["meta"], config.student)
    teacher = build_from_checkpoint(state).requires_grad_(False)
    use_bf16 = uses_bf16(config.student)
    student_config = config.student

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            targets = teacher(inputs).float()
        return distillation_loss(
            logits,
            targets,
            labels,
            config.temperature,
            config.alpha,
            student_config.label_smoothing,
        )

    lineage = {
        "method": "distilled",
        "teacher": str(config.teacher),
        "teacher_run_id": state["meta"]["run_id"],
        "teacher_arch": state["meta"]["arch"],
        "temperature": config.temperature,
        "alpha": config.alpha,
    }
    student = fit(student_config, progress, loss_fn=loss_fn, extra_meta={"lineage": lineage})
    baseline: TrainResult | None = None
    if config.baseline:
        baseline = fit(replace(student_config, out=student_config.out / "baseline"), progress)

    test = load_dataset(
        student_config.data,
        "test",
        _spec(state["meta"]),
        student_config.data_dir,
        student_config.val_fraction,
        student_config.seed,
    )
    student_model = build_from_checkpoint(load_checkpoint(student.best_path))
    baseline_acc = None
    if baseline is not None:
        baseline_model = build_from_checkpoint(load_checkpoint(baseline.best_path))
        baseline_acc = round(evaluate_model(baseline_model, test)[1], 6)
    result = DistillResult(
        student=student.best_path,
        baseline=baseline.best_path if baseline else None,
        teacher_test_accuracy=round(evaluate_model(teacher, test)[1], 6),
        student_test_accuracy=round(evaluate_model(student_model, test)[1], 6),
        baseline_test_accuracy=baseline_acc,
        teacher_parameters=_parameters(teacher.net),
        student_parameters=_parameters(student_model.net),
        seconds=round(student.seconds + (baseline.seconds if baseline else 0.0), 1),
    )
    (student_config.out / REPORT_FILE).write_text(result.to_json())
    return result


def _check_compatible(meta: dict[str, Any], student: TrainConfig) -> None:
    """The teacher must have been trained on the student's data with the same input."""
    data = student.data if student.data == "fashion-mnist" else Path(student.data).name
    if meta["dataset"] != data:
        raise ConfigError(
            f"the teacher was trained on {meta['dataset']!r}, the student would be on {data!r}"
        )
    if student.data != "fashion-mnist" and (
        meta["height"] != student.image_size or meta["in_channels"] != student.channels
    ):
        raise ConfigError(
            f"the teacher takes {meta['height']}x{meta['width']}x{meta['in_channels']} images; "
            f"train the student with --image-size {meta['height']} --channels "
            f"{meta['in_channels']}"
        )


def _spec(meta: dict[str, Any]) -> InputSpec:
    channels = meta["in_channels"]
    return InputSpec(meta["height"], meta["width"], channels, "L" if channels == 1 else "RGB")


def _parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
