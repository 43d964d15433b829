"""Structured channel pruning with fine-tuning: a genuinely smaller dense network.

Each convolution keeps the output channels whose BatchNorm-folded filters have the largest
L1 norm (Li et al., 2017, with the BN scale folded in as in network slimming); the layers
after it lose the matching input channels. The result is the same architecture built with
narrower ``widths``, so its ONNX graph really has fewer channels and dense ONNX Runtime runs
it faster. (Unstructured sparsity, by contrast, leaves every tensor its full size: dense ONNX
Runtime kernels gain no speed from zeros, which is why it is not offered here.) The pruned
network is then fine-tuned with the ordinary training loop, and size, accuracy and latency
are reported before and after.
"""

from __future__ import annotations

import inspect
import json
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyserve.datasets import ImageDataset, load_dataset
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ConfigError
from tinyserve.evaluate import batch1_latency
from tinyserve.manifest import InputSpec
from tinyserve.training.models import ServingModel, create_model
from tinyserve.training.train import (
    TrainConfig,
    build_from_checkpoint,
    evaluate_model,
    finetune_config,
    fit,
    load_checkpoint,
)

REPORT_FILE = "prune_report.json"


@dataclass(frozen=True)
class PruneConfig:
    """Remove ``ratio`` of every convolution's channels, then fine-tune for ``epochs``."""

    checkpoint: Path
    out: Path
    ratio: float = 0.5
    epochs: int = 3
    lr: float = 0.02
    batch_size: int = 128
    data_dir: Path | None = None
    max_train_samples: int | None = None
    threads: int = 0
    latency_runs: int = 300

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1 and lr positive")
        if self.latency_runs < 1:
            raise ValueError("latency_runs must be at least 1")


@dataclass(frozen=True)
class Measured:
    """One network's size, accuracy and ONNX Runtime speed."""

    parameters: int
    onnx_bytes: int
    compressed_bytes: int  # the ONNX file after deflate (zip, gzip): what zeros save
    weight_sparsity: float  # fraction of zeros among convolution and linear weights
    test_accuracy: float
    latency_ms: dict[str, float]
    throughput_ips: float


@dataclass(frozen=True)
class PruneResult:
    checkpoint: Path
    widths: list[int]
    before: Measured
    pruned: Measured  # right after pruning, before fine-tuning
    after: Measured

    def to_json(self) -> str:
        return (
            json.dumps(
                {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()},
                indent=2,
            )
            + "\n"
        )


def prune_checkpoint(config: PruneConfig, progress: bool = True) -> PruneResult:
    """Prune, fine-tune and measure; writes ``out/best.pt`` and ``out/prune_report.json``."""
    state = load_checkpoint(config.checkpoint)
    meta = state["meta"]
    original = build_from_checkpoint(state)
    widths = pruned_widths(meta, config.ratio)
    options = {**meta.get("arch_options", {}), "widths": widths}
    slim = create_model(
        meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], **options
    )
    transfer_channels(original.net, slim)

    train_config = _train_config(meta, config)
    test = test_set(meta, train_config)
    spec = input_spec(meta)
    before = measure(original, test, spec, config.latency_runs)
    pruned = measure(
        ServingModel(slim, meta["mean"], meta["std"]).eval(), test, spec, config.latency_runs
    )
    lineage = {
        "method": f"channel-pruned-{config.ratio:g}",
        "parent_checkpoint": str(config.checkpoint),
        "parent_run_id": meta["run_id"],
        "ratio": config.ratio,
        "fine_tune_epochs": config.epochs,
    }
    result = fit(
        train_config, progress, net=slim, extra_meta={"arch_options": options, "lineage": lineage}
    )
    tuned = build_from_checkpoint(load_checkpoint(result.best_path))
    after = measure(tuned, test, spec, config.latency_runs)
    report = PruneResult(result.best_path, widths, before, pruned, after)
    (config.out / REPORT_FILE).write_text(report.to_json())
    return report


def pruned_widths(meta: dict[str, Any], ratio: float) -> list[int]:
    """The architecture's stage widths with ``ratio`` of each removed (at least one kept)."""
    arch = meta["arch"]
    current = meta.get("arch_options", {}).get("widths")
    if current is None:
        probe = create_model(arch, num_classes=meta["num_classes"], in_channels=meta["in_channels"])
        factory_widths = _default_widths(type(probe))
        if factory_widths is None:
            raise ConfigError(
                f"architecture {arch!r} has no 'widths' option; channel pruning needs one"
            )
        current = factory_widths
    return [max(1, round(w * (1.0 - ratio))) for w in current]


@torch.no_grad()
def transfer_channels(source: nn.Module, target: nn.Module) -> None:
    """Copy the most important channels of ``source`` into the narrower ``target``.

    Both must be the same architecture (same module sequence) at different widths, built
    from Conv2d (plain or depthwise), BatchNorm2d, parameter-free layers and a final Linear
    after global pooling.
    """
    src_modules = [m for m in source.modules() if not list(m.children())]
    dst_modules = [m for m in target.modules() if not list(m.children())]
    if [type(m) for m in src_modules] != [type(m) for m in dst_modules]:
        raise ConfigError("the pruned network does not have the original's layer sequence")
    keep: torch.Tensor | None = None  # channels of the current activation that survive
    for index, (src, dst) in enumerate(zip(src_modules, dst_modules, strict=True)):
        if isinstance(src, nn.Conv2d):
            assert isinstance(dst, nn.Conv2d)
            in_keep = keep if keep is not None else torch.arange(src.in_channels)
            depthwise = src.groups > 1 and src.groups == src.in_channels
            if depthwise:
                out_keep = in_keep
                weight = src.weight[out_keep]
            elif src.groups == 1:
                bn = _next_batchnorm(src_modules, index)
                out_keep = _strongest(src, bn, dst.out_channels)
                weight = src.weight[out_keep][:, in_keep]
            else:
                raise ConfigError("grouped (non-depthwise) convolutions cannot be pruned")
            _copy(dst.weight, weight)
            if src.bias is not None and dst.bias is not None:
                _copy(dst.bias, src.bias[out_keep])
            keep = out_keep
        elif isinstance(src, nn.BatchNorm2d):
            assert isinstance(dst, nn.BatchNorm2d) and keep is not None
            for name in ("weight", "bias", "running_mean", "running_var"):
                _copy(getattr(dst, name), getattr(src, name)[keep])
            if src.num_batches_tracked is not None and dst.num_batches_tracked is not None:
                dst.num_batches_tracked.copy_(src.num_batches_tracked)
        elif isinstance(src, nn.Linear):
            assert isinstance(dst, nn.Linear)
            in_keep = keep if keep is not None else torch.arange(src.in_features)
            _copy(dst.weight, src.weight[:, in_keep])
            if src.bias is not None and dst.bias is not None:
                _copy(dst.bias, src.bias)
            keep = torch.arange(src.out_features)
        elif any(True for _ in src.parameters()):
            raise ConfigError(f"cannot prune through a {type(src).__name__} layer")


def measure(model: ServingModel, test: ImageDataset, spec: InputSpec, runs: int) -> Measured:
    """Parameters, test accuracy (PyTorch), and ONNX size and speed (ONNX Runtime)."""
    import onnx

    from tinyserve.manifest import Manifest, write_manifest
    from tinyserve.training.export import to_onnx

    model = model.eval()
    _, accuracy = evaluate_model(model, test)
    labels = tuple(str(i) for i in range(test.labels.max() + 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        graph = to_onnx(model, spec)
        write_manifest(graph, Manifest(labels, spec))
        onnx.save(graph, str(path))
        return measure_file(path, test, runs, model.net, accuracy)


def measure_file(
    path: Path,
    test: ImageDataset,
    runs: int,
    net: nn.Module,
    accuracy: float | None = None,
) -> Measured:
    """Size and speed of the ONNX file at ``path`` (ONNX Runtime) for the network ``net``.

    ``accuracy`` defaults to the file's own top-1 accuracy on ``test`` through ONNX Runtime
    (a quantized file is measured as it runs, not as its float network would).
    """
    from tinyserve.compare import throughput
    from tinyserve.evaluate import predict_classes

    engine = Engine(path, EngineConfig())
    if accuracy is None:
        accuracy = float((predict_classes(engine, test) == test.labels).mean())
    latency = batch1_latency(engine, test, runs)
    rate = throughput(engine, test.images, 256, 4096)
    data = path.read_bytes()
    return Measured(
        parameters=sum(p.numel() for p in net.parameters()),
        onnx_bytes=len(data),
        compressed_bytes=len(zlib.compress(data, 9)),
        weight_sparsity=round(weight_sparsity(net), 4),
        test_accuracy=round(accuracy, 6),
        latency_ms=latency,
        throughput_ips=round(rate, 1),
    )


def weight_sparsity(net: nn.Module) -> float:
    """The fraction of zeros among the convolution and linear weights of ``net``."""
    weights = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _strongest(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` output channels with the largest folded L1 norm."""
    norms = conv.weight.abs().flatten(1).sum(1)
    if bn is not None and bn.running_var is not None:
        norms = norms * (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps))
    return torch.sort(torch.topk(norms, count).indices).values


def _next_batchnorm(modules: list[nn.Module], index: int) -> nn.BatchNorm2d | None:
    following = modules[index + 1] if index + 1 < len(modules) else None
    return following if isinstance(following, nn.BatchNorm2d) else None


def _copy(target: torch.Tensor, value: torch.Tensor) -> None:
    if target.shape != value.shape:
        raise ConfigError(
            f"pruned shape {tuple(value.shape)} does not fit the narrower layer "
            f"{tuple(target.shape)}; this architecture cannot be pruned channel-wise"
        )
    target.copy_(value)


def _default_widths(cls: type) -> list[int] | None:
    parameter = inspect.signature(cls).parameters.get("widths")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return [int(w) for w in parameter.default]


def _train_config(meta: dict[str, Any], config: PruneConfig) -> TrainConfig:
    """The parent's training setup, shortened to a fine-tuning run."""
    return finetune_config(
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


def test_set(meta: dict[str, Any], config: TrainConfig) -> ImageDataset:
    return load_dataset(
        config.data, "test", input_spec(meta), config.data_dir, config.val_fraction, config.seed
    )


def input_spec(meta: dict[str, Any]) -> InputSpec:
    channels = meta["in_channels"]
    return InputSpec(meta["height"], meta["width"], channels, "L" if channels == 1 else "RGB")
