"""Magnitude pruning: global unstructured L1 sparsity on a schedule, with fine-tuning.

Every convolution and linear weight competes in one pool: at each update the smallest
weights by absolute value, across all layers together, are set to zero until the network
holds the scheduled fraction of zeros. The fraction ramps up along Zhu and Gupta's cubic
schedule (2017), ``s(t) = s_final * (1 - (1 - t / T)^3)``, over the first part of the
fine-tuning steps, so the network adapts while it loses weights; the rest of the run
fine-tunes with the mask fixed. Pruned weights stay zero: the mask is applied before every
forward pass, so the gradient step that follows cannot bring them back.

What it buys is measured, not assumed: the tensors keep their shapes, so the ONNX file is
as large as before and dense ONNX Runtime kernels run it at the same speed; the zeros only
make the file compress better (the report gives its deflate size). For a network that is
really smaller and faster, see channel pruning (``training.prune``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tinyserve.datasets import load_dataset
from tinyserve.training.prune import Measured, input_spec, measure, test_set
from tinyserve.training.train import (
    build_from_checkpoint,
    finetune_config,
    fit,
    load_checkpoint,
)

REPORT_FILE = "sparsity_report.json"


@dataclass(frozen=True)
class SparsityConfig:
    """Prune ``sparsity`` of all weights by magnitude while fine-tuning for ``epochs``."""

    checkpoint: Path
    out: Path
    sparsity: float = 0.7
    epochs: int = 3
    lr: float = 0.02
    ramp: float = 0.6  # fraction of the fine-tuning steps over which sparsity ramps up
    frequency: int = 50  # steps between mask updates during the ramp
    batch_size: int = 128
    data_dir: Path | None = None
    max_train_samples: int | None = None
    threads: int = 0
    latency_runs: int = 300

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not 0.0 < self.ramp <= 1.0:
            raise ValueError(f"ramp must be in (0, 1], got {self.ramp}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or self.frequency < 1:
            raise ValueError("epochs, batch_size and frequency must be at least 1, lr positive")
        if self.latency_runs < 1:
            raise ValueError("latency_runs must be at least 1")


@dataclass(frozen=True)
class SparsityResult:
    checkpoint: Path
    target_sparsity: float
    before: Measured
    pruned: Measured  # the target sparsity at once, before any fine-tuning
    after: Measured

    def to_json(self) -> str:
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        return json.dumps(plain, indent=2) + "\n"


class MagnitudePruner:
    """Keeps the largest weights of ``net`` by magnitude, as a forward pre-hook on it.

    In training mode every forward pass is one step of the schedule; the mask is
    recomputed every ``frequency`` steps until ``ramp_steps`` and then stays fixed.
    """

    def __init__(self, net: nn.Module, target: float, ramp_steps: int, frequency: int = 50) -> None:
        self.layers = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        self.masks = [torch.ones_like(m.weight, dtype=torch.bool) for m in self.layers]
        self.target, self.ramp_steps, self.frequency = target, max(1, ramp_steps), frequency
        self.step = 0
        net.register_forward_pre_hook(self._before_forward)

    def scheduled(self, step: int) -> float:
        """The fraction of zeros at ``step`` of the cubic ramp."""
        progress = min(step / self.ramp_steps, 1.0)
        return self.target * (1.0 - (1.0 - progress) ** 3)

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        """Zero the ``sparsity`` fraction of weights with the smallest magnitude, globally."""
        magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in self.layers])
        keep = magnitudes.numel() - int(sparsity * magnitudes.numel())
        if keep >= magnitudes.numel():
            return
        threshold = torch.topk(magnitudes, keep, sorted=False).values.min()
        self.masks = [m.weight.detach().abs() >= threshold for m in self.layers]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for layer, mask in zip(self.layers, self.masks, strict=True):
            layer.weight.mul_(mask)

    def _before_forward(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training and self.step <= self.ramp_steps:
            if self.step % self.frequency == 0 or self.step == self.ramp_steps:
                self.update(self.scheduled(self.step))
            self.step += 1
        self.apply()


def sparsify_checkpoint(config: SparsityConfig, progress: bool = True) -> SparsityResult:
    """Prune by magnitude while fine-tuning; writes ``out/best.pt`` and a report."""
    state = load_checkpoint(config.checkpoint)
    meta = state["meta"]
    train = finetune_config(
        meta,
        config.out,
        data_dir=config.data_dir,
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        max_train_samples=config.max_train_samples,
        threads=config.threads,
        schedule="cosine",
    )
    test, spec, runs = test_set(meta, train), input_spec(meta), config.latency_runs
    before = measure(build_from_checkpoint(state), test, spec, runs)
    at_once = build_from_checkpoint(state)
    MagnitudePruner(at_once.net, config.sparsity, 1).update(config.sparsity)
    pruned = measure(at_once, test, spec, runs)

    images = len(load_dataset(train.data, "train", None, train.data_dir, train.val_fraction))
    if config.max_train_samples is not None:
        images = min(images, config.max_train_samples)
    total = config.epochs * math.ceil(images / config.batch_size)
    net = build_from_checkpoint(state).net
    MagnitudePruner(net, config.sparsity, round(config.ramp * total), config.frequency)
    lineage = {
        "method": f"magnitude-pruned-{config.sparsity:g}",
        "parent_checkpoint": str(config.checkpoint),
        "parent_run_id": meta["run_id"],
        "sparsity": config.sparsity,
        "schedule": f"cubic over {config.ramp:.0%} of {total} steps, every {config.frequency}",
        "fine_tune_epochs": config.epochs,
    }
    extra = {"lineage": lineage, **_arch_options(meta)}
    result = fit(train, progress, net=net.train(), extra_meta=extra)
    # The last epoch, not the best: an earlier one may not have reached the full sparsity.
    final = load_checkpoint(result.last_path)
    after = measure(build_from_checkpoint(final), test, spec, runs)
    checkpoint = config.out / "sparse.pt"
    torch.save({k: final[k] for k in ("format", "model", "meta", "epoch")}, checkpoint)
    report = SparsityResult(checkpoint, config.sparsity, before, pruned, after)
    (config.out / REPORT_FILE).write_text(report.to_json())
    return report


def _arch_options(meta: dict[str, object]) -> dict[str, object]:
    return {"arch_options": meta["arch_options"]} if "arch_options" in meta else {}
