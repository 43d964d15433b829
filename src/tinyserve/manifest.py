"""Model metadata that travels inside the ONNX file: labels, input contract and lineage.

A tinyserve model takes uint8 pixels shaped ``[N, H, W, C]`` and does the rest of the
preprocessing in its graph. What a server needs to build that input (size, colour mode,
resize policy) and to name the outputs (labels) is stored in the model's ``metadata_props``
under the ``tinyserve.*`` keys, so that evaluation and serving read one description.

A model in another format (an OpenVINO IR, a LiteRT flat buffer) carries the same keys in a
``manifest.json`` beside it (``write_sidecar``), which also says the file and its format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyserve.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import onnx

LABELS_KEY = "tinyserve.labels"
INPUT_KEY = "tinyserve.input"
SOURCE_KEY = "tinyserve.source"
TASK_KEY = "tinyserve.task"
OUTPUTS_KEY = "tinyserve.outputs"
TASKS = ("classify", "detect")
SIDECAR = "manifest.json"

COLOR_CHANNELS = {"L": 1, "RGB": 3}
RESIZE_POLICIES = ("stretch", "crop")


@dataclass(frozen=True)
class InputSpec:
    """How raw images become the model's uint8 ``[H, W, C]`` input.

    ``resize="stretch"`` scales the image to ``height x width`` ignoring the aspect ratio;
    ``resize="crop"`` scales the shorter side to ``size / crop_fraction`` and takes the
    centre ``height x width`` crop. Transparent pixels are laid over ``background`` (0-255).
    """

    height: int
    width: int
    channels: int = 3
    color: str = "RGB"
    resize: str = "stretch"
    crop_fraction: float = 1.0
    background: int = 0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if self.color not in COLOR_CHANNELS:
            raise ValueError(f"color must be one of {sorted(COLOR_CHANNELS)}, got {self.color!r}")
        if COLOR_CHANNELS[self.color] != self.channels:
            raise ValueError(f"color {self.color!r} needs {COLOR_CHANNELS[self.color]} channels")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if not 0 <= self.background <= 255:
            raise ValueError(f"background must be in 0..255, got {self.background}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Manifest:
    """Everything a server needs to know about a model besides its graph."""

    labels: tuple[str, ...]
    input: InputSpec
    source: Mapping[str, Any] = field(default_factory=dict)
    # "classify" (logits [N, classes]) or "detect" (see detection.py for its output contract,
    # which ``outputs`` describes); classifiers written before tasks existed have neither key.
    task: str = "classify"
    outputs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_metadata(self) -> dict[str, str]:
        metadata = {
            LABELS_KEY: json.dumps(list(self.labels)),
            INPUT_KEY: json.dumps(asdict(self.input)),
            SOURCE_KEY: json.dumps(dict(self.source), sort_keys=True),
        }
        if self.task != "classify":
            metadata[TASK_KEY] = self.task
            metadata[OUTPUTS_KEY] = json.dumps(dict(self.outputs), sort_keys=True)
        return metadata

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: str = "model") -> Manifest:
        missing = [k for k in (LABELS_KEY, INPUT_KEY) if k not in metadata]
        if missing:
            raise ModelError(
                f"{where} has no tinyserve metadata ({', '.join(missing)}); export it with "
                "'tinyserve export' or bring it in with 'tinyserve import'"
            )
        try:
            labels = tuple(str(x) for x in json.loads(metadata[LABELS_KEY]))
            spec = InputSpec.from_dict(json.loads(metadata[INPUT_KEY]))
            source = json.loads(metadata.get(SOURCE_KEY, "{}"))
            outputs = json.loads(metadata.get(OUTPUTS_KEY, "{}"))
            return cls(
                labels=labels,
                input=spec,
                source=source,
                task=metadata.get(TASK_KEY, "classify"),
                outputs=outputs,
            )
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{where} has malformed tinyserve metadata: {exc}") from exc

    def with_source(self, **updates: Any) -> Manifest:
        return Manifest(
            self.labels, self.input, {**self.source, **updates}, self.task, self.outputs
        )


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Class names, in class-index order, from a text file (one per line) or a JSON file.

    JSON may be a list, or an object mapping indices ``"0"``, ``"1"``, ... to names.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            if isinstance(data, dict):
                data = [data[str(i)] for i in range(len(data))]
        except (ValueError, KeyError) as exc:
            raise ConfigError(
                f"{path} must hold a JSON list of names or an object keyed 0..N-1: {exc}"
            ) from exc
        labels = [str(x).strip() for x in data]
    else:
        labels = [line.strip() for line in text.splitlines()]
        while labels and not labels[-1]:
            labels.pop()
    if not labels:
        raise ConfigError(f"labels file {path} is empty")
    if "" in labels:
        raise ConfigError(f"labels file {path} has an empty name at index {labels.index('')}")
    return tuple(labels)


def write_manifest(model: onnx.ModelProto, manifest: Manifest) -> None:
    """Store ``manifest`` in ``model.metadata_props``, replacing older tinyserve keys."""
    keep = [p for p in model.metadata_props if not p.key.startswith("tinyserve.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in manifest.to_metadata().items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def write_sidecar(
    folder: Path, manifest: Manifest, fmt: str, file: str, tensors: tuple[str, str]
) -> Path:
    """Write ``folder/manifest.json``: the manifest of the ``fmt`` model ``file`` beside it,
    and the (input, output) tensor names clients use, those of the ONNX model it came from
    (a converter may rename them: LiteRT calls its input ``serving_default_args_0``)."""
    path = folder / SIDECAR
    body = {
        "format": fmt,
        "file": file,
        "tensors": {"input": tensors[0], "output": tensors[1]},
        "metadata": manifest.to_metadata(),
    }
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(path: Path) -> Manifest:
    """The manifest of a non-ONNX model file, from the manifest.json beside it."""
    return Manifest.from_metadata(_sidecar(path)["metadata"], str(path.parent / SIDECAR))


def sidecar_tensors(path: Path) -> tuple[str, str] | None:
    """The (input, output) tensor names the manifest.json beside ``path`` gives, if any."""
    tensors = _sidecar(path).get("tensors")
    if isinstance(tensors, dict) and {"input", "output"} <= tensors.keys():
        return str(tensors["input"]), str(tensors["output"])
    return None


def _sidecar(path: Path) -> dict[str, Any]:
    sidecar = path.parent / SIDECAR
    if not sidecar.is_file():
        raise ModelError(
            f"{path} has no {SIDECAR} beside it: a model that is not ONNX needs one (the "
            "'tinyserve convert' commands write it)"
        )
    try:
        body = json.loads(sidecar.read_text(encoding="utf-8"))
        metadata = body["metadata"]
        if not isinstance(metadata, dict):
            raise TypeError("'metadata' must be an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{sidecar} is not a valid manifest: {exc}") from exc
    body["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    return dict(body)


def read_manifest(path: str | Path) -> Manifest:
    """Read the manifest of the model at ``path`` without loading its weights: from the
    ONNX metadata, or from manifest.json for any other format."""
    import onnx

    if Path(path).suffix.lower() != ".onnx":
        return read_sidecar(Path(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several unrelated types for bad files
        raise ModelError(f"cannot read ONNX model {path}: {exc}") from exc
    return Manifest.from_metadata({p.key: p.value for p in model.metadata_props}, str(path))
