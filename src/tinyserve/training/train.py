"""Training: the fit loop, checkpoints (tensors and plain values only), history and curves."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tinyserve.datasets import ImageDataset, load_dataset
from tinyserve.errors import CheckpointError, ConfigError
from tinyserve.manifest import InputSpec
from tinyserve.training.data import Augment, batches
from tinyserve.training.models import ServingModel, create_model

CHECKPOINT_FORMAT = "tinyserve-checkpoint/1"
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``out`` receives best.pt, last.pt, history.json and curves.png."""

    out: Path
    data: str = "fashion-mnist"
    data_dir: Path | None = None
    arch: str = "vgg_lite"
    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    pad: int = 2
    flip: bool = True
    erase_prob: float = 0.0
    camera_prob: float = 0.0  # share of images shown as a video's crops (data.camera)
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 = off
    widths: tuple[int, ...] | None = None  # the architecture's stage widths, if it has them
    image_size: int = 64
    channels: int = 3
    val_fraction: float = 1 / 12
    max_train_samples: int | None = None
    seed: int = 0
    threads: int = 0
    precision: str = "auto"
    resume: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("lr must be positive and label_smoothing in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0.0 <= self.erase_prob <= 1.0 or not 0.0 <= self.camera_prob <= 1.0:
            raise ValueError("erase_prob and camera_prob are shares of images, in [0, 1]")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (0 = off, e.g. 0.999), got {self.ema}")
        if self.widths is not None and (not self.widths or min(self.widths) < 1):
            raise ValueError(f"widths must be positive channel counts, got {self.widths}")

    def plain(self) -> dict[str, Any]:
        """The config as JSON-friendly values (it goes into checkpoints and the history)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    images_per_s: float
    seconds: float


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    best_val_acc: float
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0


ProgressHook = Callable[[str, Mapping[str, float]], None]


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(logits, labels, inputs) -> loss``; ``inputs`` are the augmented uint8 images."""


def fit(
    config: TrainConfig,
    progress: bool = True,
    *,
    net: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``config.arch`` on ``config.data`` and write checkpoints to ``config.out``.

    Args:
        net: start from this network instead of a fresh ``config.arch`` (fine-tuning); its
            constructor options must be in ``extra_meta["arch_options"]`` to be rebuilt.
        loss_fn: replaces cross-entropy (distillation).
        extra_meta: recorded in the checkpoints' ``meta`` (lineage, architecture options).
    """
    started = time.perf_counter()
    threads = config.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    spec = InputSpec(
        config.image_size,
        config.image_size,
        config.channels,
        "L" if config.channels == 1 else "RGB",
    )
    train_set = load_dataset(
        config.data, "train", spec, config.data_dir, config.val_fraction, config.seed, progress
    )
    val_set = load_dataset(
        config.data, "val", spec, config.data_dir, config.val_fraction, config.seed, progress
    )
    if config.max_train_samples is not None and config.max_train_samples < len(train_set):
        train_set = train_set.subset(np.arange(config.max_train_samples))
    mean, std = channel_stats(train_set)
    in_channels = train_set.images.shape[3]
    extra = dict(extra_meta or {})
    if net is None:
        options = dict(extra.get("arch_options", {}))
        if config.widths is not None:
            options["widths"] = list(config.widths)
        if options:
            extra["arch_options"] = options
        net = create_model(
            config.arch, num_classes=len(train_set.classes), in_channels=in_channels, **options
        )
    model = ServingModel(net, mean, std).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # The average is what validation scores and the checkpoints keep; the raw weights train.
    averaged = _ema(model, config.ema) if config.ema > 0 else None
    scored: ServingModel = averaged.module if averaged is not None else model  # type: ignore[assignment]

    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    optimizer = _make_optimizer(config, model)
    scheduler = _make_scheduler(config, optimizer, steps_per_epoch)
    meta: dict[str, Any] = {
        "arch": config.arch,
        "num_classes": len(train_set.classes),
        "in_channels": in_channels,
        "height": int(train_set.images.shape[1]),
        "width": int(train_set.images.shape[2]),
        "mean": mean,
        "std": std,
        "labels": list(train_set.classes),
        "dataset": train_set.name.split("/")[0],
        "run_id": uuid.uuid4().hex[:12],
        "train_config": config.plain(),
        **extra,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    best_path, last_path = config.out / "best.pt", config.out / "last.pt"
    history: list[EpochStats] = []
    start_epoch, best_acc = 0, -1.0
    if config.resume:
        state = load_checkpoint(last_path)
        planned = state["meta"]["train_config"]["epochs"]
        if planned != config.epochs:
            raise ConfigError(
                f"{last_path} belongs to a {planned}-epoch run; resume it with --epochs {planned} "
                "(the learning-rate schedule is sized by the total)"
            )
        model.net.load_state_dict(state.get("train_model", state["model"]))
        if averaged is not None:
            scored.net.load_state_dict(state["model"])
            averaged.n_averaged.fill_(int(state["averaged_steps"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        best_acc = float(state["best_val_acc"])
        meta["run_id"] = state["meta"]["run_id"]
        history = [EpochStats(**h) for h in state["history"]]

    generator = torch.Generator().manual_seed(config.seed + start_epoch)
    augment = Augment(config.pad, config.flip, config.erase_prob, config.camera_prob)
    cross_entropy = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    compute_loss: LossFn = loss_fn or (lambda logits, labels, _: cross_entropy(logits, labels))
    use_bf16 = uses_bf16(config)
    meta["train_config"]["precision"] = "bf16" if use_bf16 else "fp32"
    with _Progress(progress, config.epochs, steps_per_epoch, start_epoch) as bar:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            model.train()
            seen, loss_sum, correct = 0, 0.0, 0
            for images, labels in batches(train_set, config.batch_size, True, generator):
                inputs = augment(images, generator)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    logits = model(inputs).float()
                loss = compute_loss(logits, labels, inputs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                n = len(labels)
                seen += n
                loss_sum += float(loss.detach()) * n
                correct += int((logits.argmax(1) == labels).sum())
                elapsed = time.perf_counter() - t0
                bar.step(loss_sum / seen, correct / seen, seen / elapsed)
            train_seconds = time.perf_counter() - t0
            val_loss, val_acc = evaluate_model(scored, val_set)
            stats = EpochStats(
                epoch=epoch + 1,
                train_loss=loss_sum / seen,
                train_acc=correct / seen,
                val_loss=val_loss,
                val_acc=val_acc,
                lr=float(scheduler.get_last_lr()[0]),
                images_per_s=seen / train_seconds,
                seconds=time.perf_counter() - t0,
            )
            history.append(stats)
            bar.epoch_done(stats)
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": scored.net.state_dict(),
                "meta": {**meta, "epoch": epoch + 1, "val_acc": val_acc},
                "epoch": epoch + 1,
                "best_val_acc": max(best_acc, val_acc),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": [asdict(h) for h in history],
            }
            if averaged is not None:
                state["train_model"] = model.net.state_dict()
                state["averaged_steps"] = int(averaged.n_averaged)
            _atomic_save(state, last_path)
            if val_acc > best_acc:
                best_acc = val_acc
                _atomic_save({k: state[k] for k in ("format", "model", "meta", "epoch")}, best_path)

    result = TrainResult(best_path, last_path, best_acc, history, time.perf_counter() - started)
    write_history(result, config, config.out)
    return result


def _ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    average = get_ema_multi_avg_fn(decay)  # type: ignore[no-untyped-call]
    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)


def uses_bf16(config: TrainConfig) -> bool:
    """Whether ``config`` trains under bfloat16 autocast."""
    return config.precision == "bf16" or (config.precision == "auto" and bf16_supported())


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def channel_stats(dataset: ImageDataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the pixels, scaled to [0, 1]."""
    pixels = dataset.images.reshape(-1, dataset.images.shape[3]).astype(np.float64) / 255.0
    return [round(float(x), 6) for x in pixels.mean(0)], [round(float(x), 6) for x in pixels.std(0)]


@torch.no_grad()
def evaluate_model(
    model: nn.Module, dataset: ImageDataset, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of a uint8-input model on ``dataset``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for images, labels in batches(dataset, batch_size, shuffle=False):
        logits = model(images)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    return loss_sum / len(dataset), correct / len(dataset)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a tinyserve checkpoint safely (``weights_only=True``) and check its format."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is damaged or not a tinyserve checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a tinyserve checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            "for a bare state_dict use 'tinyserve export --arch NAME'"
        )
    return state


def build_from_checkpoint(state: Mapping[str, Any]) -> ServingModel:
    """Rebuild the serving-wrapped network recorded in a checkpoint, in eval mode."""
    meta = state["meta"]
    net = create_model(
        meta["arch"],
        num_classes=meta["num_classes"],
        in_channels=meta["in_channels"],
        **meta.get("arch_options", {}),
    )
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit {meta['arch']}: {exc}") from exc
    return ServingModel(net, meta["mean"], meta["std"]).eval()


def finetune_config(meta: Mapping[str, Any], out: Path, **changes: Any) -> TrainConfig:
    """The training setup recorded in a checkpoint's ``meta``, changed into a fine-tuning run.

    Everything not in ``changes`` (data, augmentation, optimizer) stays as the parent had it,
    except that the run never resumes and keeps no weight average unless ``changes`` sets
    ``ema`` (a few epochs from trained weights need none); a ``data_dir`` of ``None`` in
    ``changes`` keeps the parent's.
    """
    recorded = dict(meta["train_config"])
    known = set(TrainConfig.__dataclass_fields__)
    base = {k: v for k, v in recorded.items() if k in known and k not in ("out", "widths")}
    if changes.get("data_dir", None) is None:
        changes.pop("data_dir", None)
        base["data_dir"] = Path(base["data_dir"]) if base.get("data_dir") else None
    return TrainConfig(**{**base, "out": out, "resume": False, "ema": 0.0, **changes})


def write_history(result: TrainResult, config: TrainConfig, out: Path) -> None:
    """Write history.json and, when matplotlib is available, curves.png."""
    record = {
        "config": config.plain(),
        "best_val_acc": result.best_val_acc,
        "seconds": round(result.seconds, 1),
        "epochs": [asdict(h) for h in result.history],
    }
    (out / "history.json").write_text(json.dumps(record, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h.epoch for h in result.history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h.train_loss for h in result.history], label="train")
    ax_loss.plot(epochs, [h.val_loss for h in result.history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [h.train_acc for h in result.history], label="train")
    ax_acc.plot(epochs, [h.val_acc for h in result.history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def _make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=0.2
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def _atomic_save(state: Mapping[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state), tmp)
    tmp.replace(path)


class _Progress:
    """A rich progress bar over all training steps, with loss, accuracy and images/s."""

    def __init__(self, enabled: bool, epochs: int, steps: int, start_epoch: int) -> None:
        self.enabled = enabled
        self.epochs, self.steps, self.epoch = epochs, steps, start_epoch
        self._progress: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.4f}"),
                TextColumn("{task.fields[ips]:,.0f} img/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train",
                total=self.epochs * self.steps,
                completed=self.epoch * self.steps,
                epoch=self.epoch + 1,
                epochs=self.epochs,
                loss=0.0,
                acc=0.0,
                ips=0.0,
            )
        return self

    def step(self, loss: float, acc: float, ips: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss, acc=acc, ips=ips)

    def epoch_done(self, stats: EpochStats) -> None:
        if self._progress is not None:
            self._progress.console.print(
                f"epoch {stats.epoch:>3}  train loss {stats.train_loss:.4f} "
                f"acc {stats.train_acc:.4f}  val loss {stats.val_loss:.4f} "
                f"acc {stats.val_acc:.4f}  lr {stats.lr:.2e}  "
                f"{stats.images_per_s:,.0f} img/s  {stats.seconds:.0f}s"
            )
            self._progress.update(self._task, epoch=min(stats.epoch + 1, self.epochs))

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
