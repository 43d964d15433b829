"""Convert a repository version to another format and add it as a new version, checked.

Two targets, each read by its own runtime (``tinyserve.runtimes``):

- ``openvino``: an OpenVINO IR (model.xml + model.bin) from the ONNX file, with
  ``openvino.convert_model`` and ``save_model`` (weights kept in FP32, or as the INT8 of a
  QDQ parent, which OpenVINO runs as INT8).
- ``litert``: a LiteRT flat buffer (model.tflite) through PyTorch and ``litert-torch``
  (``training/litert_export.py``), run in the converter's own Python because litert-torch
  pins packages the serving environment keeps newer. ``int8`` quantizes its weights.

Both keep the model contract: uint8 ``[N, H, W, C]`` in, preprocessing in the graph, logits
out. The new version holds the converted file and a ``manifest.json`` (labels, input,
lineage, parity) in place of model.onnx. A candidate enters the repository only if it
passes its parity check against the parent on ONNX Runtime: the same top-1 class on every
sample image, and every probability within ``tolerance``; the check is written into the
version's ``convert_report.json`` and its manifest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve import __version__
from tinyserve.engine import Engine, EngineConfig, softmax
from tinyserve.errors import ConfigError, DatasetError, ModelError, RuntimeUnavailable
from tinyserve.evaluate import evaluation_set, predict_classes
from tinyserve.imaging import Pixels, load_image
from tinyserve.manifest import Manifest, read_manifest, write_sidecar
from tinyserve.predict import expand_images
from tinyserve.repository import FORMATS, resolve, sibling, staged_version

TARGETS = ("openvino", "litert")
REPORT_FILE = "convert_report.json"
LITERT_PYTHON_ENV = "TINYSERVE_LITERT_PYTHON"
# Probabilities of a float conversion match to rounding; INT8 weights move them more.
FLOAT_TOLERANCE = 1e-4
INT8_TOLERANCE = 0.05


@dataclass(frozen=True)
class ConvertConfig:
    """Convert version ``parent`` (default: the served one) of ``model_dir`` to ``target``."""

    model_dir: Path
    target: str
    parent: int | None = None
    samples: tuple[Path, ...] = (Path("samples/fashion"),)
    tolerance: float | None = None  # largest probability difference; None: by precision
    int8: bool = False  # litert: INT8 weights
    converter_python: str | None = None  # litert: a Python with litert-torch
    checkpoint: Path | None = None  # litert: convert the parent's training module itself
    data: str | None = "fashion-mnist"  # also measure top-1 agreement here (None: skip)
    data_dir: Path | None = None
    agreement_samples: int = 2000
    force: bool = False

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.checkpoint is not None and self.target != "litert":
            raise ValueError("--checkpoint applies to litert (PyTorch -> LiteRT)")
        if self.int8 and self.target != "litert":
            raise ValueError(
                "--int8 applies to litert; for an INT8 OpenVINO IR convert an INT8 (QDQ) "
                "version made by 'tinyserve quantize'"
            )
        if self.tolerance is not None and not 0 < self.tolerance <= 1:
            raise ValueError(f"tolerance must be in (0, 1], got {self.tolerance}")
        if self.agreement_samples < 1:
            raise ValueError("agreement_samples must be at least 1")

    @property
    def bar(self) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return INT8_TOLERANCE if self.int8 else FLOAT_TOLERANCE


@dataclass(frozen=True)
class ConvertResult:
    path: Path | None  # None when the parity check refused the candidate
    version: int | None
    report: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return dict(self.report["parity"])


def convert(config: ConvertConfig) -> ConvertResult:
    """Convert, check parity and (when it passes or is forced) write the next version."""
    if not config.model_dir.is_dir():
        raise ConfigError(f"{config.model_dir} is not a model folder (models/<name>)")
    served = resolve(config.model_dir, config.parent)
    onnx_file = sibling(served.path, "onnx")
    if onnx_file is None:
        raise ConfigError(
            f"version {served.version} of {served.name} holds no model.onnx; conversions start "
            "from an ONNX version (--parent N)"
        )
    parent = replace(served, path=onnx_file)
    manifest = read_manifest(parent.path)
    if config.checkpoint is not None:
        _check_checkpoint(config.checkpoint, manifest, parent.version)
    started = time.perf_counter()
    file = FORMATS[config.target]
    with tempfile.TemporaryDirectory(prefix="tinyserve-convert-") as tmp:
        folder = Path(tmp)
        converter = _convert(parent.path, folder / file, config)
        lineage: dict[str, Any] = {
            "format": config.target,
            "file": file,
            "parent_version": parent.version,
            "converter": converter,
            "precision": "int8-weights" if config.int8 else _parent_precision(manifest),
            "tinyserve_version": __version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        reference = Engine(parent.path, EngineConfig(runtime="onnxruntime", warmup_runs=0))
        tensors = (reference.input_name, reference.output_name)
        versioned = _versioned(manifest, parent.version, lineage)
        write_sidecar(folder, versioned, config.target, file, tensors)
        candidate = Engine(folder / file, EngineConfig(runtime=config.target, warmup_runs=0))
        pixels = sample_pixels(config.samples, manifest)
        lineage["parity"] = check_parity(reference, candidate, pixels, config.bar)
        lineage["parity"]["agreement"] = _agreement(reference, candidate, manifest, config)
        del reference, candidate
        report: dict[str, Any] = {
            "model": parent.name,
            "parent": {"version": parent.version, "path": str(parent.path)},
            "conversion": {k: v for k, v in lineage.items() if k != "parity"},
            "parity": lineage["parity"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        if not lineage["parity"]["passed"] and not config.force:
            return ConvertResult(None, None, report)
        versioned = _versioned(manifest, parent.version, lineage)
        write_sidecar(folder, versioned, config.target, file, tensors)
        with staged_version(config.model_dir, None, file) as staged:
            for item in folder.iterdir():
                shutil.copy2(item, staged.folder / item.name)
            report = {**report, "version": staged.version, "path": str(staged.path)}
            report["bytes"] = sum(p.stat().st_size for p in staged.folder.iterdir())
            staged.write(REPORT_FILE, _json(report))
    return ConvertResult(staged.path, staged.version, report)


def sample_pixels(paths: tuple[Path, ...], manifest: Manifest) -> Pixels:
    """The sample images, decoded for the model the way a server decodes them."""
    files = expand_images(paths)
    return np.stack([load_image(f, manifest.input) for f in files])


def check_parity(
    reference: Engine, candidate: Engine, pixels: Pixels, tolerance: float
) -> dict[str, Any]:
    """The candidate against the reference on ``pixels``, as one batch and one by one (a
    runtime with fixed shapes must also get batch sizes other than its first right)."""
    expected = reference.infer(pixels)
    batched = candidate.infer(pixels)
    single = np.concatenate([candidate.infer(pixels[i : i + 1]) for i in range(len(pixels))])
    worst_logit = max(float(np.abs(got - expected).max()) for got in (batched, single))
    worst_prob = max(
        float(np.abs(softmax(got) - softmax(expected)).max()) for got in (batched, single)
    )
    same = bool(
        (batched.argmax(1) == expected.argmax(1)).all()
        and (single.argmax(1) == expected.argmax(1)).all()
    )
    return {
        "samples": len(pixels),
        "reference": reference.describe(),
        "candidate": candidate.describe(),
        "top1_identical": same,
        "max_abs_logit_diff": worst_logit,
        "max_abs_probability_diff": worst_prob,
        "tolerance": tolerance,
        "passed": same and worst_prob <= tolerance,
    }


def _agreement(
    reference: Engine, candidate: Engine, manifest: Manifest, config: ConvertConfig
) -> dict[str, Any] | None:
    """Top-1 agreement on the first ``agreement_samples`` test images, where they fit."""
    if config.data is None:
        return None
    try:
        test = evaluation_set(manifest, config.data, config.data_dir)
    except (DatasetError, ConfigError):
        return None  # not installed, or another model's data: the samples decide alone
    if len(test) > config.agreement_samples:
        test = test.subset(np.arange(config.agreement_samples))
    expected, got = (predict_classes(e, test, 200) for e in (reference, candidate))
    return {
        "dataset": test.name,
        "samples": len(test),
        "top1_agreement": round(float((expected == got).mean()), 6),
    }


def _convert(source: Path, target: Path, config: ConvertConfig) -> dict[str, str]:
    if config.target == "openvino":
        return _to_openvino(source, target)
    return _to_litert(source, target, config)


def _to_openvino(source: Path, target: Path) -> dict[str, str]:
    from tinyserve.runtimes.openvino import load_openvino

    ov = load_openvino()
    try:
        model = ov.convert_model(str(source))
        ov.save_model(model, str(target), compress_to_fp16=False)
    except Exception as exc:  # OpenVINO raises RuntimeError and its own types
        raise ModelError(f"OpenVINO cannot convert {source}: {exc}") from exc
    return {"tool": "openvino.convert_model", "version": str(ov.__version__)}


def litert_python(given: str | None) -> str:
    """The Python that runs litert-torch: given, ``TINYSERVE_LITERT_PYTHON``, or this one."""
    chosen = given or os.environ.get(LITERT_PYTHON_ENV)
    if chosen:
        if shutil.which(chosen) is None and not Path(chosen).is_file():
            raise RuntimeUnavailable(f"the converter Python {chosen} does not exist")
        return chosen
    if importlib.util.find_spec("litert_torch") is not None:
        return sys.executable
    raise RuntimeUnavailable(
        "converting to LiteRT needs litert-torch, which this environment does not have (it "
        "needs typing-extensions<4.13 and brings jax, so it lives in an environment of its "
        "own): `make litert-env` builds .venv-litert from requirements-litert.lock (or "
        "python3 -m venv .venv-litert && .venv-litert/bin/pip install torch==2.13.0 "
        "litert-torch onnx); then pass --converter-python .venv-litert/bin/python (or set "
        f"{LITERT_PYTHON_ENV})"
    )


def _to_litert(source: Path, target: Path, config: ConvertConfig) -> dict[str, str]:
    python = litert_python(config.converter_python)
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    origin = config.checkpoint or source
    command = [python, "-m", "tinyserve.training.litert_export", str(origin), str(target)]
    command += ["--int8"] if config.int8 else []
    command += ["--checkpoint"] if config.checkpoint is not None else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not target.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ModelError(f"litert-torch could not convert {source}:\n{tail}")
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('litert-torch'), "
         "m.version('torch'))"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    return {
        "tool": "litert-torch" + (" + ai-edge-quantizer dynamic_wi8_afp32" if config.int8 else ""),
        "version": versions[0] if versions else "unknown",
        "torch": versions[1] if len(versions) > 1 else "unknown",
        "route": (
            f"PyTorch ServingModel of checkpoint {config.checkpoint.name}"
            if config.checkpoint is not None
            else "ONNX graph rebuilt as a PyTorch module (training/litert_export.py)"
        ),
    }


def _check_checkpoint(checkpoint: Path, manifest: Manifest, version: int) -> None:
    """The checkpoint must be the one the parent was exported from, or parity means little."""
    import hashlib

    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} does not exist")
    recorded = manifest.source.get("checkpoint_sha256")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    if recorded != digest:
        raise ConfigError(
            f"{checkpoint} is not the checkpoint version {version} was exported from (its "
            f"SHA-256 differs from the one in the version's lineage); give that checkpoint, or "
            "convert the version's ONNX graph (no --checkpoint)"
        )


def _parent_precision(manifest: Manifest) -> str:
    done = manifest.source.get("optimization")
    if isinstance(done, dict) and done.get("method"):
        return str(done["method"])
    return "fp32"


def _versioned(manifest: Manifest, parent_version: int, lineage: dict[str, Any]) -> Manifest:
    source = {k: v for k, v in manifest.source.items() if k != "parity"}
    source.update(parent_version=parent_version, conversion=lineage)
    return Manifest(manifest.labels, manifest.input, source, manifest.task, manifest.outputs)


def _json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"
