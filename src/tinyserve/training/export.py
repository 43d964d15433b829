"""Export a checkpoint to a tinyserve ONNX model, and prove it matches PyTorch.

The network is exported behind its preprocessing (``ServingModel``) so the file takes uint8
``[N, H, W, C]`` pixels. Every export runs ``onnx.checker``, simplifies the graph with
onnxslim, and compares PyTorch with ONNX Runtime on real images; the numbers go into the
model's metadata and into ``export_report.json`` beside it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyserve import __version__
from tinyserve.datasets import ImageDataset, load_dataset
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import CheckpointError, ConfigError, ModelError
from tinyserve.manifest import InputSpec, Manifest, write_manifest
from tinyserve.onnx_import import verification_pixels
from tinyserve.repository import save_version_with_report, validate_name
from tinyserve.training.models import ServingModel, create_model
from tinyserve.training.train import build_from_checkpoint, load_checkpoint

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ParityBar:
    """How closely ONNX Runtime must match PyTorch for an export to be accepted."""

    samples: int = 512
    max_abs_diff: float = 1e-4

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_abs_diff <= 0:
            raise ValueError("parity needs at least one sample and a positive tolerance")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    name: str
    repo: Path = Path("models")
    version: int | None = None
    data_dir: Path | None = None
    parity: ParityBar = field(default_factory=ParityBar)
    opset: int = 17
    simplify: bool = True


@dataclass(frozen=True)
class ExportResult:
    path: Path
    report: dict[str, Any]


def export_checkpoint(config: ExportConfig) -> ExportResult:
    """Export ``config.checkpoint`` into ``repo/name/version/model.onnx`` and verify it."""
    validate_name(config.name)
    state = load_checkpoint(config.checkpoint)
    model = build_from_checkpoint(state)
    meta = state["meta"]
    samples = parity_images(meta, config.data_dir, config.parity.samples)
    manifest = Manifest(
        labels=tuple(meta["labels"]),
        input=InputSpec(
            meta["height"],
            meta["width"],
            meta["in_channels"],
            "L" if meta["in_channels"] == 1 else "RGB",
        ),
        source={
            "architecture": meta["arch"],
            "dataset": meta["dataset"],
            "run_id": meta["run_id"],
            "epoch": meta["epoch"],
            "val_accuracy": round(float(meta["val_acc"]), 6),
            "split": {
                "val_fraction": meta["train_config"]["val_fraction"],
                "seed": meta["train_config"]["seed"],
            },
            "mean": meta["mean"],
            "std": meta["std"],
            "parameters": sum(p.numel() for p in model.net.parameters()),
            "checkpoint_sha256": _sha256(config.checkpoint),
            **{k: meta[k] for k in ("arch_options", "lineage") if k in meta},
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tinyserve_version": __version__,
        },
    )
    return export_model(model, manifest, samples, config)


@dataclass(frozen=True)
class WeightsSpec:
    """What a bare state_dict does not say about itself: architecture, classes, input.

    ``mean`` and ``std`` are per channel on the [0, 1] pixel scale (ImageNet's are
    ``0.485,0.456,0.406`` and ``0.229,0.224,0.225``).
    """

    arch: str
    labels: tuple[str, ...]
    input: InputSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = "unknown"
    arch_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        channels = self.input.channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need {channels} value(s), one per input channel; got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if any(not 0.0 <= m <= 1.0 for m in self.mean) or any(not 0.0 < s <= 1.0 for s in self.std):
            raise ValueError(
                "mean and std are on the [0, 1] pixel scale (divide 0-255 values by 255), "
                f"got mean {list(self.mean)} and std {list(self.std)}"
            )
        if len(self.labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {len(self.labels)}")


def export_state_dict(
    config: ExportConfig,
    spec: WeightsSpec,
    images: Sequence[Path] = (),
    source: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export a bare state_dict (``config.checkpoint``) of a registered architecture.

    The parity check runs on ``images`` (files or folders; each also mirrored) and, to make
    up ``config.parity.samples``, on smooth random images.
    """
    validate_name(config.name)
    weights = load_state_dict(config.checkpoint)
    model = build_from_state_dict(weights, spec)
    samples, origin = verification_pixels(images, spec.input, config.parity.samples)
    manifest = Manifest(
        labels=spec.labels,
        input=spec.input,
        source={
            "architecture": spec.arch,
            "arch_options": dict(spec.arch_options),
            "dataset": spec.dataset,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "parameters": sum(p.numel() for p in model.net.parameters()),
            "checkpoint_sha256": _sha256(config.checkpoint),
            "parity_images": origin,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tinyserve_version": __version__,
            **(source or {}),
        },
    )
    return export_model(model, manifest, samples, config)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a bare state_dict with ``weights_only=True`` (no code in the file is run).

    Also accepted: a mapping that holds the state_dict under ``"state_dict"`` or ``"model"``,
    and keys prefixed ``module.`` (saved from ``nn.DataParallel``).
    """
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors, so it cannot be loaded safely "
            "(weights_only=True); if you trust its origin, convert it once to a plain "
            "state_dict: torch.save(torch.load(PATH, weights_only=False).state_dict(), "
            "'weights.pt')"
        ) from None
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of tensors)")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds values other than tensors; expected a state_dict")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k).removeprefix("module."): v for k, v in state.items()}
    return {str(k): v for k, v in state.items()}


def build_from_state_dict(weights: Mapping[str, torch.Tensor], spec: WeightsSpec) -> ServingModel:
    """Build ``spec.arch`` for ``spec``'s classes and channels, load ``weights``, wrap it."""
    try:
        net = create_model(
            spec.arch,
            num_classes=len(spec.labels),
            in_channels=spec.input.channels,
            **spec.arch_options,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    own = net.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or reshaped:
        first = reshaped[0] if reshaped else None
        detail = (
            f"; e.g. {first} is {tuple(weights[first].shape)} in the file, "
            f"{tuple(own[first].shape)} in the model"
            if first
            else f"; e.g. {(missing or unexpected)[0]!r}"
        )
        raise CheckpointError(
            f"the weights do not fit {spec.arch} with {len(spec.labels)} classes and "
            f"{spec.input.channels} input channel(s): {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(reshaped)} mis-shaped tensors{detail}"
        )
    net.load_state_dict(weights)
    return ServingModel(net, spec.mean, spec.std).eval()


def export_model(
    model: ServingModel,
    manifest: Manifest,
    samples: np.ndarray,
    config: ExportConfig,
) -> ExportResult:
    """Write ``model`` with ``manifest`` into the repository once it passes the parity bar."""
    import onnx

    started = time.perf_counter()
    onnx_model = to_onnx(model, manifest.input, config.opset)
    if config.simplify:
        import onnxslim

        onnx_model = onnxslim.slim(onnx_model)
    onnx.checker.check_model(onnx_model, full_check=True)
    write_manifest(onnx_model, manifest)

    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        onnx.save(onnx_model, str(candidate))
        parity = check_parity(model, candidate, samples, config.parity)

    manifest = manifest.with_source(parity=parity)
    write_manifest(onnx_model, manifest)
    model_dir = config.repo / config.name
    report = {
        "model": config.name,
        "opset": config.opset,
        "simplified": config.simplify,
        "parity": parity,
        "source": dict(manifest.source),
        "seconds": round(time.perf_counter() - started, 2),
    }
    saved, report = save_version_with_report(
        model_dir, onnx_model, config.version, "export_report.json", report
    )
    return ExportResult(saved.path, report)


def to_onnx(
    model: torch.nn.Module,
    spec: InputSpec,
    opset: int = 17,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> Any:
    """Trace ``model`` (uint8 ``spec``-shaped input) to an ``onnx.ModelProto`` with a dynamic
    batch axis; a classifier's tensor names unless others are given (the detector's)."""
    import onnx

    model = model.eval()
    dummy = torch.zeros((1, *spec.shape), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model,
            (dummy,),
            buffer,  # type: ignore[arg-type]
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def check_parity(
    model: ServingModel, onnx_path: Path, images: np.ndarray, bar: ParityBar
) -> dict[str, Any]:
    """Compare PyTorch and ONNX Runtime logits on ``images``; raise if they disagree."""
    engine = Engine(onnx_path, EngineConfig(warmup_runs=0))
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    got = np.concatenate([engine.infer(images[i : i + 256]) for i in range(0, len(images), 256)])
    max_diff = float(np.abs(expected - got).max())
    top1_same = float((expected.argmax(1) == got.argmax(1)).mean())
    result = {
        "samples": len(images),
        "max_abs_logit_diff": max_diff,
        "top1_agreement": top1_same,
        "tolerance": bar.max_abs_diff,
    }
    if max_diff > bar.max_abs_diff or top1_same < 1.0:
        raise ModelError(
            f"ONNX Runtime disagrees with PyTorch on {len(images)} images: max |logit diff| "
            f"{max_diff:.2e} (limit {bar.max_abs_diff:.0e}), top-1 agreement {top1_same:.4f}"
        )
    return result


def parity_images(meta: Mapping[str, Any], data_dir: Path | None, count: int) -> np.ndarray:
    """Real images for the parity check: the model's own test (or validation) data."""
    config = meta.get("train_config", {})
    if data_dir is None and config.get("data_dir"):
        data_dir = Path(config["data_dir"])
    dataset: ImageDataset
    if meta.get("dataset") == "fashion-mnist":
        dataset = load_dataset("fashion-mnist", "test", data_dir=data_dir)
    else:
        spec = InputSpec(
            meta["height"],
            meta["width"],
            meta["in_channels"],
            "L" if meta["in_channels"] == 1 else "RGB",
        )
        dataset = load_dataset(
            config["data"],
            "val",
            spec,
            val_fraction=config.get("val_fraction", 1 / 12),
            seed=config.get("seed", 0),
        )
    return np.ascontiguousarray(dataset.images[:count])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
