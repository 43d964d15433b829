"""Bring an ONNX image classifier with float input into the repository as a tinyserve model.

The source takes normalized float pixels (``[N, C, H, W]`` or ``[N, H, W, C]``). The import
prepends the tinyserve preprocessing to its graph (Cast, Mul, Sub and, for NCHW sources,
Transpose), so the result takes uint8 ``[N, H, W, C]`` like every exported model and carries
its labels and input contract in its metadata. A fixed batch axis is made dynamic when the
graph allows it. Before anything is written, the imported model is run against the original
on the same images (the original fed NumPy-normalized floats) and must match it.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tinyserve import __version__
from tinyserve.engine import Engine, EngineConfig, Logits
from tinyserve.errors import ConfigError, ModelError
from tinyserve.imaging import Pixels, load_image
from tinyserve.manifest import InputSpec, Manifest, write_manifest
from tinyserve.predict import expand_images
from tinyserve.repository import save_version_with_report, validate_name

LAYOUTS = ("nchw", "nhwc")
INPUT_NAME = "pixels"
REPORT_FILE = "import_report.json"
_PREFIX = "tinyserve_preprocess/"
_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class OnnxImportConfig:
    """How to wrap ``source``. ``mean``/``std`` are per channel on the [0, 1] pixel scale;
    their length sets the channels (1 = grey, 3 = RGB). ``size`` is ``(height, width)``;
    ``None`` takes the source's fixed spatial size."""

    source: Path
    name: str
    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int] | None = None
    layout: str = "nchw"
    resize: str = "stretch"
    crop_fraction: float = 1.0
    repo: Path = Path("models")
    version: int | None = None
    images: tuple[Path, ...] = ()
    samples: int = 32
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(
                "mean and std need 1 (grey) or 3 (RGB) values each, got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if any(not 0.0 <= m <= 1.0 for m in self.mean) or any(not 0.0 < s <= 1.0 for s in self.std):
            raise ValueError(
                "mean and std are on the [0, 1] pixel scale (divide 0-255 values by 255), "
                f"got mean {list(self.mean)} and std {list(self.std)}"
            )
        if len(self.labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {len(self.labels)}")
        if self.samples < 1 or self.tolerance <= 0:
            raise ValueError("verification needs at least one sample and a positive tolerance")
        if self.version is not None and self.version < 1:
            raise ValueError(f"version must be a positive integer, got {self.version}")

    @property
    def channels(self) -> int:
        return len(self.mean)


@dataclass(frozen=True)
class ImportResult:
    path: Path
    report: dict[str, Any]


def import_onnx(config: OnnxImportConfig) -> ImportResult:
    """Wrap ``config.source``, verify it against the original, write ``repo/name/version``."""
    import onnx

    validate_name(config.name)
    started = time.perf_counter()
    source = _load(config.source)
    graph_input = _single_input(source)
    spec = _input_spec(graph_input, config)
    batch_was_fixed = _free_batch_axis(source)
    combined = _prepend_preprocessing(source, graph_input.name, spec, config)
    try:
        onnx.checker.check_model(combined, full_check=True)
    except Exception as exc:  # the checker raises its own and shape-inference errors
        raise ModelError(f"the imported graph does not pass onnx.checker: {exc}") from exc
    manifest = Manifest(
        labels=config.labels,
        input=spec,
        source={
            "imported_from": config.source.name,
            "source_sha256": _sha256(config.source),
            "source_layout": config.layout,
            "mean": list(config.mean),
            "std": list(config.std),
            "batch_axis_made_dynamic": batch_was_fixed,
            "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tinyserve_version": __version__,
        },
    )
    write_manifest(combined, manifest)
    pixels, origin = verification_pixels(config.images, spec, config.samples)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        onnx.save(combined, str(candidate))
        verification = verify_import(config.source, candidate, pixels, config, batch_was_fixed)
    verification["images"] = origin
    write_manifest(combined, manifest.with_source(verification=verification))

    model_dir = config.repo / config.name
    report = {
        "model": config.name,
        "input": asdict(spec),
        "verification": verification,
        "source": dict(manifest.source),
        "seconds": round(time.perf_counter() - started, 2),
    }
    saved, report = save_version_with_report(
        model_dir, combined, config.version, REPORT_FILE, report
    )
    return ImportResult(saved.path, report)


def verify_import(
    source: Path,
    imported: Path,
    pixels: Pixels,
    config: OnnxImportConfig,
    one_at_a_time: bool = False,
) -> dict[str, Any]:
    """Compare the imported model on uint8 ``pixels`` with the source on normalized floats."""
    import onnxruntime as ort

    engine = Engine(imported, EngineConfig(warmup_runs=0))
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    name = original.get_inputs()[0].name
    floats = normalize(pixels, config.mean, config.std, config.layout)
    chunks = [floats[i : i + 1] for i in range(len(floats))] if one_at_a_time else [floats]
    expected: Logits = np.concatenate([original.run(None, {name: c})[0] for c in chunks])
    try:
        got = engine.infer(pixels)
    except Exception as exc:  # ORT's own error types: typically a batch size baked in
        raise ModelError(
            f"the imported model fails on a batch of {len(pixels)} ({exc}); if the source "
            "has a fixed batch size, export it again with a dynamic batch axis"
        ) from exc
    if got.shape != expected.shape:
        raise ModelError(f"imported output {got.shape} differs from the source's {expected.shape}")
    if got.ndim != 2 or got.shape[1] != len(config.labels):
        raise ConfigError(
            f"the model outputs {' x '.join(map(str, got.shape[1:]))} scores per image but "
            f"{len(config.labels)} labels were given"
        )
    max_diff = float(np.abs(got - expected).max())
    top1 = float((got.argmax(1) == expected.argmax(1)).mean())
    if max_diff > config.tolerance or top1 < 1.0:
        raise ModelError(
            f"the imported model disagrees with the source on {len(pixels)} images: max |diff| "
            f"{max_diff:.2e} (limit {config.tolerance:.0e}), top-1 agreement {top1:.4f}"
        )
    return {
        "samples": len(pixels),
        "max_abs_diff": max_diff,
        "top1_agreement": top1,
        "tolerance": config.tolerance,
    }


def normalize(
    pixels: Pixels, mean: Sequence[float], std: Sequence[float], layout: str = "nchw"
) -> Logits:
    """uint8 ``[N, H, W, C]`` -> float32 ``(x / 255 - mean) / std`` in ``layout``."""
    x: Logits = pixels.astype(np.float32) * np.float32(1 / 255)
    x = ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def verification_pixels(
    paths: Sequence[Path], spec: InputSpec, count: int, seed: int = 0
) -> tuple[Pixels, dict[str, int]]:
    """``count`` inputs for a parity check: the images in ``paths`` and their mirror images,
    then smooth random images (seeded) to make up the number."""
    real: list[Pixels] = []
    for path in expand_images(paths) if paths else []:
        pixels = load_image(path, spec)
        real += [pixels, np.ascontiguousarray(pixels[:, ::-1])]
    real = real[:count]
    rng = np.random.default_rng(seed)
    synthetic = []
    for _ in range(count - len(real)):
        coarse = rng.integers(0, 256, (8, 8, spec.channels), dtype=np.uint8)
        image = Image.fromarray(coarse[:, :, 0] if spec.channels == 1 else coarse)
        smooth = np.asarray(image.resize((spec.width, spec.height), Image.Resampling.BICUBIC))
        synthetic.append(smooth.reshape(spec.shape))
    batch = np.ascontiguousarray(np.stack(real + synthetic), dtype=np.uint8)
    return batch, {"files": len(real), "synthetic": len(synthetic)}


def _load(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises several unrelated types for bad files
        raise ModelError(f"cannot read ONNX model {path}: {exc}") from exc


def _single_input(model: Any) -> Any:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(
            f"an image classifier has one input; this model has {len(inputs)}: "
            f"{[i.name for i in inputs]}"
        )
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != _FLOAT:
        raise ModelError(
            f"input {inputs[0].name!r} must be float32 (normalized pixels); a model that "
            "already takes uint8 pixels needs no import, only tinyserve metadata"
        )
    if len(tensor.shape.dim) != 4:
        raise ModelError(f"input {inputs[0].name!r} must have 4 dimensions, has {tensor.shape}")
    return inputs[0]


def _input_spec(graph_input: Any, config: OnnxImportConfig) -> InputSpec:
    """The uint8 input contract, checked against whatever the source fixes."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in _dims(graph_input)]
    c_axis, h_axis, w_axis = (1, 2, 3) if config.layout == "nchw" else (3, 1, 2)
    if dims[c_axis] is not None and dims[c_axis] != config.channels:
        raise ConfigError(
            f"the model takes {dims[c_axis]} channel(s) on axis {c_axis} ({config.layout}) but "
            f"{config.channels} mean/std value(s) were given; check --layout, --mean/--std and "
            "--in-channels"
        )
    fixed = (dims[h_axis], dims[w_axis])
    if config.size is None:
        if None in fixed:
            raise ConfigError("the model's input size is not fixed; give it with --size")
        height, width = int(fixed[0]), int(fixed[1])  # type: ignore[arg-type]
    else:
        height, width = config.size
        if (fixed[0] not in (None, height)) or (fixed[1] not in (None, width)):
            raise ConfigError(
                f"the model's input is fixed at {fixed[0]}x{fixed[1]}, not {height}x{width}"
            )
    try:
        return InputSpec(
            height,
            width,
            config.channels,
            "L" if config.channels == 1 else "RGB",
            config.resize,
            config.crop_fraction,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _dims(value_info: Any) -> Any:
    return value_info.type.tensor_type.shape.dim


def _free_batch_axis(model: Any) -> bool:
    """Make a fixed batch axis symbolic; True if it was fixed. Verification proves it works."""
    graph = model.graph
    first = _dims(_single_input(model))[0]
    if not first.HasField("dim_value") or first.dim_value < 1:
        return False
    first.dim_param = "batch"
    for output in graph.output:
        dims = _dims(output)
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == first.dim_value:
            dims[0].dim_param = "batch"
    del graph.value_info[:]  # inferred shapes that still carry the old batch size
    return True


def _prepend_preprocessing(
    source: Any, source_input: str, spec: InputSpec, config: OnnxImportConfig
) -> Any:
    """One graph: uint8 NHWC pixels -> normalized floats (in the source's layout) -> source."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < 7:
        raise ModelError(f"the model uses ONNX opset {opset}; import needs opset 7 or later")
    taken = {n.name for n in source.graph.node} | {t.name for t in source.graph.initializer}
    taken |= {v.name for v in [*source.graph.input, *source.graph.output]}
    if INPUT_NAME in taken or any(name.startswith(_PREFIX) for name in taken):
        raise ModelError(f"the model already uses the name {INPUT_NAME!r} or {_PREFIX}*")

    p = _PREFIX
    std = np.asarray(config.std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (np.asarray(config.mean, np.float32) / std).astype(np.float32)
    last = p + "normalized" if config.layout == "nhwc" else p + "nchw"
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], [p + "float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [p + "float", p + "scale"], [p + "scaled"]),
        helper.make_node("Sub", [p + "scaled", p + "shift"], [p + "normalized"]),
    ]
    if config.layout == "nchw":
        nodes.append(helper.make_node("Transpose", [p + "normalized"], [last], perm=[0, 3, 1, 2]))
    batch = _dims(_single_input(source))[0]
    batch_dim: str | int = batch.dim_param or batch.dim_value or "batch"
    graph = helper.make_graph(
        nodes,
        "tinyserve_preprocess",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch_dim, *spec.shape])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(scale, p + "scale"), numpy_helper.from_array(shift, p + "shift")],
    )
    preprocess = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=source.ir_version
    )
    try:
        combined = onnx.compose.merge_models(
            preprocess,
            source,
            io_map=[(last, source_input)],
            outputs=[source.graph.output[0].name],
        )
    except Exception as exc:  # onnx.compose raises ValueError and checker errors
        raise ModelError(f"cannot prepend the preprocessing to the model: {exc}") from exc
    combined.graph.name = source.graph.name or "tinyserve_import"
    return combined


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
