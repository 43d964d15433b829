"""Quantization-aware fine-tuning: train a checkpoint under simulated INT8, export as usual.

The simulation mirrors what ``tinyserve quantize --mode static`` does to the exported graph,
so the weights learn to live with exactly that rounding:

* BatchNorm is folded into the convolution before fine-tuning (export folds it too, so the
  weights that are fake-quantized here are the weights ONNX Runtime quantizes). The folded
  layer keeps its BatchNorm module as an identity with a learnable shift, so the checkpoint
  still fits the architecture and exports with the ordinary code.
* Weights are rounded per output channel, symmetric, to ONNX Runtime's range: [-64, 64] with
  ``reduce_range`` (the default, for CPUs without VNNI), else [-127, 127].
* The input of every convolution and linear layer is rounded to uint8 with an asymmetric
  range that follows the batches' minimum and maximum (an exponential moving average).

Rounding uses PyTorch's fake-quantize operators, whose gradient passes straight through.
The result is a float checkpoint; ``tinyserve export`` and then ``tinyserve quantize`` turn it
into a QDQ model that enters the repository through the same agreement gate as any other.
Calibration there measures the activation ranges again on training images, as for
post-training quantization; what QAT changes is the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyserve.training.train import (
    TrainResult,
    build_from_checkpoint,
    finetune_config,
    fit,
    load_checkpoint,
)

REPORT_FILE = "qat_report.json"


@dataclass(frozen=True)
class QatConfig:
    """Fine-tune ``checkpoint`` under simulated INT8 for ``epochs`` into ``out``."""

    checkpoint: Path
    out: Path
    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 128
    data_dir: Path | None = None
    max_train_samples: int | None = None
    threads: int = 0
    reduce_range: bool = True  # match 'tinyserve quantize' (its default is 7-bit weights)
    momentum: float = 0.01  # how fast the activation ranges follow the batches

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1 and lr positive")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")


@dataclass(frozen=True)
class QatResult:
    checkpoint: Path
    val_accuracy: float
    quantized_layers: int
    seconds: float

    def to_json(self) -> str:
        return (
            json.dumps(
                {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=2
            )
            + "\n"
        )


class ActivationQuant:
    """Rounds a layer's input to uint8 over a moving [min, max] range (a forward pre-hook)."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.low: float | None = None
        self.high = 0.0

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0]
        if module.training or self.low is None:
            low, high = float(x.detach().min()), float(x.detach().max())
            if self.low is None:
                self.low, self.high = low, high
            else:
                self.low += self.momentum * (low - self.low)
                self.high += self.momentum * (high - self.high)
        # As ONNX Runtime does: the range always holds 0, and 0 is exactly representable.
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        scale = max((high - low) / 255.0, 1e-8)
        zero_point = int(min(max(round(-low / scale), 0), 255))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255),)


def quantized_weight(weight: torch.Tensor, reduce_range: bool) -> torch.Tensor:
    """``weight`` rounded per output channel, symmetric, as ONNX Runtime rounds it."""
    limit = 64 if reduce_range else 127
    absmax = weight.detach().abs().flatten(1).amax(1)
    # ORT's symmetric scale: the range [-absmax, absmax] over the 2 * limit steps.
    scale = torch.clamp(2 * absmax / (2 * limit), min=1e-12).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -limit, limit)


def fold_batchnorm(net: nn.Module) -> int:
    """Fold every BatchNorm that follows a bias-free convolution into it; returns how many.

    The BatchNorm stays as an identity (scale 1, mean 0, variance 1 - eps) whose bias is
    the folded shift; it is frozen in inference mode from then on.
    """
    folded = 0
    previous: nn.Module | None = None
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d):
            conv, bn = previous, module
            if conv.bias is not None or bn.running_var is None or bn.running_mean is None:
                previous = module
                continue
            with torch.no_grad():
                factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(factor.view(-1, 1, 1, 1))
                bn.bias.sub_(bn.running_mean * factor)
                bn.weight.fill_(1.0)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.requires_grad_(False)
            bn.register_forward_pre_hook(_inference_mode)
            folded += 1
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
            previous = module
    return folded


def prepare(net: nn.Module, reduce_range: bool = True, momentum: float = 0.01) -> int:
    """Fold BatchNorm and simulate INT8 in every convolution and linear layer of ``net``.

    Returns the number of layers that now compute on rounded weights and inputs.
    """
    fold_batchnorm(net)
    layers = 0
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_pre_hook(ActivationQuant(momentum))
            module.forward = _rounded_forward(module, reduce_range)  # type: ignore[method-assign]
            layers += 1
    return layers


def qat_finetune(config: QatConfig, progress: bool = True) -> QatResult:
    """Fine-tune the checkpoint under simulated INT8 and write a float checkpoint."""
    state = load_checkpoint(config.checkpoint)
    meta = state["meta"]
    net = build_from_checkpoint(state).net
    layers = prepare(net, config.reduce_range, config.momentum)
    lineage = {
        "method": "quantization-aware fine-tune",
        "parent": str(config.checkpoint),
        "parent_run_id": meta["run_id"],
        "parent_val_accuracy": meta.get("val_acc"),
        "weights": "int8 per channel, symmetric" + (", 7-bit" if config.reduce_range else ""),
        "activations": "uint8 asymmetric, moving min/max",
    }
    extra: dict[str, Any] = {"lineage": lineage}
    if "arch_options" in meta:
        extra["arch_options"] = meta["arch_options"]
    # Simulated rounding runs in float32 (bf16 would round again); finetune_config keeps no
    # weight average, which would copy the network without its rounding hooks.
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
        precision="fp32",
    )
    result: TrainResult = fit(train, progress, net=net.train(), extra_meta=extra)
    report = QatResult(
        result.best_path, round(result.best_val_acc, 6), layers, round(result.seconds, 1)
    )
    (config.out / REPORT_FILE).write_text(report.to_json())
    return report


def _inference_mode(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    module.training = False  # a folded BatchNorm must never use batch statistics again


def _rounded_forward(module: nn.Conv2d | nn.Linear, reduce_range: bool) -> Any:
    if isinstance(module, nn.Conv2d):

        def conv(x: torch.Tensor) -> torch.Tensor:
            weight = quantized_weight(module.weight, reduce_range)
            out: torch.Tensor = module._conv_forward(x, weight, module.bias)
            return out

        return conv

    def linear(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = nn.functional.linear(
            x, quantized_weight(module.weight, reduce_range), module.bias
        )
        return out

    return linear
