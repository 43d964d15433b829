"""Quantize a repository model with ONNX Runtime's tools and add it as a new version.

Three modes: ``dynamic`` (INT8 weights, activations quantized at run time), ``static`` (INT8
QDQ with per-channel weights, activation ranges calibrated on real training images fed
through the model's own uint8 NHWC input) and ``fp16`` (onnxruntime's float16 converter,
keeping the uint8 input and the float32 output). Every mode starts from ORT's quantization
pre-processing (shape inference and graph optimization).

The in-graph preprocessing (Cast, Mul, Sub, Transpose ahead of the first convolution) stays
in float: it is excluded from quantization, so the pixels are normalized exactly as before.
A candidate enters the repository only if it passes the agreement gate: its top-1 agreement
with the parent and its accuracy change on the test set are measured and recorded, and a
model that misses the bar is refused unless forced.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve import __version__
from tinyserve.detection import detect_all, iou_matrix, score_detections
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ConfigError, DatasetError, ModelError
from tinyserve.evaluate import evaluation_set, predict_classes
from tinyserve.imaging import Pixels
from tinyserve.manifest import Manifest, read_manifest, write_manifest
from tinyserve.repository import ModelRef, resolve, save_version_with_report
from tinyserve.scene_data import load_test_frames, load_train_frames

MODES = ("dynamic", "static", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
REPORT_FILE = "quantize_report.json"
# Op types that carry the network's compute; everything feeding the first of them from the
# graph input is the in-graph preprocessing.
_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class AgreementBar:
    """What a quantized model must achieve against its parent on the test set."""

    max_accuracy_drop: float = 1.0  # percentage points
    min_agreement: float = 0.0  # fraction of test images with the parent's top-1 class

    def __post_init__(self) -> None:
        if self.max_accuracy_drop < 0:
            raise ValueError(f"max accuracy drop must be >= 0 pt, got {self.max_accuracy_drop}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min agreement must be in [0, 1], got {self.min_agreement}")


@dataclass(frozen=True)
class Calibration:
    """Which training images calibrate static INT8 activation ranges, and how."""

    method: str = "minmax"
    samples: int = 512
    data: str | None = None  # the training split of this dataset; default: the test data's
    seed: int = 0
    percentile: float = 99.999
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, "
                f"got {self.method!r}"
            )
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("calibration samples and batch size must be at least 1")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")


@dataclass(frozen=True)
class QuantizeConfig:
    """Quantize version ``parent`` (default: the served one) of the model in ``model_dir``."""

    model_dir: Path
    mode: str = "static"
    parent: int | None = None
    data: str = "fashion-mnist"
    data_dir: Path | None = None
    calibration: Calibration = field(default_factory=Calibration)
    per_channel: bool = True
    # 7-bit weights: x86 CPUs without VNNI multiply uint8 x int8 with an instruction that
    # saturates 16-bit sums, so full-range weights lose accuracy there (and only there).
    reduce_range: bool = True
    bar: AgreementBar = field(default_factory=AgreementBar)
    force: bool = False
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.parent is not None and self.parent < 1:
            raise ValueError(f"parent version must be positive, got {self.parent}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass(frozen=True)
class GateResult:
    """The candidate measured against its parent on the test set."""

    dataset: str
    samples: int
    parent_accuracy: float
    accuracy: float
    accuracy_delta_pt: float
    agreement: float
    max_accuracy_drop: float
    min_agreement: float

    @property
    def passed(self) -> bool:
        return (
            -self.accuracy_delta_pt <= self.max_accuracy_drop + 1e-9
            and self.agreement >= self.min_agreement
        )


@dataclass(frozen=True)
class QuantizeResult:
    path: Path | None  # None when the gate refused the candidate
    version: int | None
    gate: GateResult
    report: dict[str, Any]


def quantize(config: QuantizeConfig, progress: bool = False) -> QuantizeResult:
    """Quantize, gate and (when it passes or is forced) write the next version."""
    if not config.model_dir.is_dir():
        raise ConfigError(f"{config.model_dir} is not a model folder (models/<name>)")
    parent = resolve(config.model_dir, config.parent)
    manifest = read_manifest(parent.path)
    done = manifest.source.get("optimization")
    if isinstance(done, dict) and done.get("mode"):
        raise ConfigError(
            f"version {parent.version} of {parent.name} is already {done['mode']}-quantized; "
            f"quantize its parent instead (--parent {done.get('parent_version', 1)})"
        )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tinyserve-quantize-") as tmp:
        candidate = Path(tmp) / "model.onnx"
        method = convert(parent.path, candidate, manifest, config)
        gate_of = detection_gate if manifest.task == "detect" else agreement_gate
        gate = gate_of(parent.path, candidate, manifest, config, progress)
        lineage = {
            "parent_version": parent.version,
            "method": method,
            "mode": config.mode,
            "per_channel": config.per_channel if config.mode != "fp16" else None,
            "reduce_range": config.reduce_range if config.mode != "fp16" else None,
            "calibration": _calibration_record(config) if config.mode == "static" else None,
            "gate": {**asdict(gate), "passed": gate.passed, "forced": config.force},
            "onnxruntime": _ort_version(),
            "tinyserve_version": __version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        report: dict[str, Any] = {
            "model": parent.name,
            "parent": {"version": parent.version, "bytes": parent.path.stat().st_size},
            "optimization": lineage,
            "candidate_bytes": candidate.stat().st_size,
            "seconds": 0.0,
        }
        if not gate.passed and not config.force:
            return QuantizeResult(None, None, gate, report)
        model = _versioned_model(candidate, manifest, parent, lineage)
        report["seconds"] = round(time.perf_counter() - started, 2)
        saved, report = save_version_with_report(config.model_dir, model, None, REPORT_FILE, report)
    return QuantizeResult(saved.path, saved.version, gate, report)


def convert(source: Path, target: Path, manifest: Manifest, config: QuantizeConfig) -> str:
    """Write the quantized form of ``source`` to ``target``; returns the method's name."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name("prepared.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
    except Exception as exc:  # the pre-processor raises whatever its passes raise
        raise ModelError(
            f"ONNX Runtime cannot pre-process {source} for quantization: {exc}"
        ) from exc
    graph = _name_nodes(prepared)
    keep_float = preprocessing_nodes(graph)
    if manifest.task == "detect":  # box decoding and peak keeping stay float too
        keep_float += postprocessing_nodes(graph)
    if config.mode == "dynamic":
        # ConvInteger on CPU takes uint8 weights only; MatMul/Gemm take either.
        quantize_dynamic(
            str(prepared),
            str(target),
            weight_type=QuantType.QUInt8,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            nodes_to_exclude=keep_float,
        )
        return "dynamic-int8"
    if config.mode == "static":
        reader = CalibrationReader(
            calibration_images(manifest, config), config.calibration, graph.input[0].name
        )
        quantize_static(
            str(prepared),
            str(target),
            reader,
            quant_format=_enum("QuantFormat", "QDQ"),
            per_channel=config.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=config.reduce_range,
            calibrate_method=_calibration_method(config.calibration.method),
            nodes_to_exclude=keep_float,
            extra_options=_calibration_options(config.calibration),
        )
        return "static-int8-qdq"
    _to_fp16(prepared, target, keep_float)
    return "fp16"


def preprocessing_nodes(graph: Any) -> list[str]:
    """Names of the nodes of ``graph`` between its input and the first compute node.

    These are the in-graph Cast / Mul / Sub / Transpose that turn pixels into the network's
    input; they stay float so that normalization is exact.
    """
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: list[str] = []
    frontier = [i.name for i in graph.input]
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type in _COMPUTE_OPS or node.name in found:
                continue
            found.append(node.name)
            frontier.extend(node.output)
    return found


def postprocessing_nodes(graph: Any) -> list[str]:
    """Names of the nodes between the last compute nodes and the graph's outputs (a
    detector's in-graph decoding: sigmoid, peak keeping, top-k, box arithmetic)."""
    producers = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    frontier = [o.name for o in graph.output]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.op_type in _COMPUTE_OPS or node.name in found:
            continue
        found.append(node.name)
        frontier.extend(node.input)
    return found


def _name_nodes(path: Path) -> Any:
    """Give every unnamed node of the model at ``path`` a name (exclusion lists need one)."""
    import onnx

    model = onnx.load(str(path))
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)
    onnx.save(model, str(path))
    return model.graph


def calibration_images(manifest: Manifest, config: QuantizeConfig) -> Pixels:
    """``calibration.samples`` random training images shaped by the model's input contract."""
    if manifest.task == "detect":  # scene frames: --data names a 'tinyserve data scenes' folder
        spec = manifest.input
        frames = load_train_frames(
            Path(config.calibration.data or config.data), spec.width, spec.height
        )
        pick = np.random.default_rng(config.calibration.seed).permutation(len(frames.images))
        return np.ascontiguousarray(frames.images[np.sort(pick[: config.calibration.samples])])
    train = evaluation_set(
        manifest, config.calibration.data or config.data, config.data_dir, split="train"
    )
    count = min(config.calibration.samples, len(train))
    rng = np.random.default_rng(config.calibration.seed)
    chosen = np.sort(rng.choice(len(train), size=count, replace=False))
    return np.ascontiguousarray(train.images[chosen])


class CalibrationReader:
    """Feeds uint8 NHWC batches to ORT's calibrator under the model's input name."""

    def __init__(self, images: Pixels, calibration: Calibration, input_name: str) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
            raise DatasetError("calibration needs at least one uint8 [N, H, W, C] image")
        self.images = images
        self.batch_size = calibration.batch_size
        self.input_name = input_name
        self._batches: Iterator[Pixels] | None = None

    def get_next(self) -> dict[str, Pixels] | None:
        if self._batches is None:
            self._batches = (
                self.images[i : i + self.batch_size]
                for i in range(0, len(self.images), self.batch_size)
            )
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = None


def agreement_gate(
    parent: Path, candidate: Path, manifest: Manifest, config: QuantizeConfig, progress: bool
) -> GateResult:
    """Top-1 agreement and accuracy change of ``candidate`` against ``parent``.

    On an unlabelled image folder the parent's own top-1 answers serve as labels, so the
    accuracy change is the disagreement in points.
    """
    engines = [Engine(p, EngineConfig(warmup_runs=0)) for p in (parent, candidate)]
    test = evaluation_set(manifest, config.data, config.data_dir)
    reference, predicted = (
        predict_classes(e, test, config.batch_size, progress, f"testing {label}")
        for e, label in zip(engines, ("parent", config.mode), strict=True)
    )
    labels = test.labels
    if (labels < 0).all():
        # Unlabelled images: the parent's answers are the labels, so "accuracy" is agreement.
        labels = reference
    parent_acc = float((reference == labels).mean())
    accuracy = float((predicted == labels).mean())
    return GateResult(
        dataset=test.name,
        samples=len(test),
        parent_accuracy=round(parent_acc, 6),
        accuracy=round(accuracy, 6),
        accuracy_delta_pt=round((accuracy - parent_acc) * 100, 4),
        agreement=round(float((reference == predicted).mean()), 6),
        max_accuracy_drop=config.bar.max_accuracy_drop,
        min_agreement=config.bar.min_agreement,
    )


def detection_gate(
    parent: Path, candidate: Path, manifest: Manifest, config: QuantizeConfig, progress: bool
) -> GateResult:
    """mAP@0.5 of ``candidate`` against ``parent`` on the scene test videos (``--data``).

    ``accuracy`` is mAP@0.5 and ``agreement`` the share of the parent's confident detections
    (score >= 0.3) that the candidate also finds (IoU >= 0.5).
    """
    del progress
    spec = manifest.input
    test = load_test_frames(Path(config.data), spec.width, spec.height, every=3)
    found = [
        detect_all(
            Engine(p, EngineConfig(warmup_runs=0)).infer, test.images, test.width, test.height
        )
        for p in (parent, candidate)
    ]
    (parent_map, candidate_map) = (
        score_detections(f, test.boxes, test.ignored)["map50"] for f in found
    )
    kept = matched = 0
    for ours, theirs in zip(*found, strict=True):
        confident = ours.boxes[ours.scores >= 0.3]
        kept += len(confident)
        if len(confident):
            matched += int(
                (
                    iou_matrix(confident, theirs.boxes[theirs.scores >= 0.1]).max(axis=1, initial=0)
                    >= 0.5
                ).sum()
            )
    return GateResult(
        dataset=f"{config.data} test videos (mAP@0.5)",
        samples=len(test.images),
        parent_accuracy=parent_map,
        accuracy=candidate_map,
        accuracy_delta_pt=round((candidate_map - parent_map) * 100, 4),
        agreement=round(matched / max(kept, 1), 6),
        max_accuracy_drop=config.bar.max_accuracy_drop,
        min_agreement=config.bar.min_agreement,
    )


def _versioned_model(
    candidate: Path, manifest: Manifest, parent: ModelRef, lineage: dict[str, Any]
) -> Any:
    """The candidate with its parent's manifest and its own lineage."""
    import onnx

    model = onnx.load(str(candidate))
    source = {k: v for k, v in manifest.source.items() if k != "parity"}
    source.update(parent_version=parent.version, optimization=lineage)
    write_manifest(
        model, Manifest(manifest.labels, manifest.input, source, manifest.task, manifest.outputs)
    )
    return model


def _to_fp16(prepared: Path, target: Path, keep_float: list[str]) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(prepared))
    # keep_io_types keeps the float32 logits; the uint8 input is not a float and stays as is.
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=keep_float, disable_shape_infer=False
    )
    onnx.save(converted, str(target))


def _calibration_method(name: str) -> Any:
    return _enum("CalibrationMethod", {"minmax": "MinMax"}.get(name, name.capitalize()))


def _calibration_options(calibration: Calibration) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if calibration.method == "percentile":
        options["CalibPercentile"] = calibration.percentile
    return options


def _calibration_record(config: QuantizeConfig) -> dict[str, Any]:
    return {
        "method": config.calibration.method,
        "dataset": f"{config.calibration.data or config.data}/train",
        "samples": config.calibration.samples,
        "seed": config.calibration.seed,
        **_calibration_options(config.calibration),
    }


def _enum(kind: str, member: str) -> Any:
    import onnxruntime.quantization as q

    return getattr(getattr(q, kind), member)


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
