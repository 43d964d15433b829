"""Conversions to OpenVINO IR and LiteRT: each a new version with its lineage and a parity
report, refused when it misses its bar."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import BUNDLED_MODEL, SAMPLES
from tinyserve.convert import ConvertConfig, convert, litert_python
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ConfigError, RuntimeUnavailable
from tinyserve.manifest import read_manifest
from tinyserve.repository import list_versions

pytest.importorskip("openvino", reason="the openvino extra is not installed")


def converter_python() -> str | None:
    """A Python with litert-torch: $TINYSERVE_LITERT_PYTHON, or this one if it has it."""
    given = os.environ.get("TINYSERVE_LITERT_PYTHON")
    if given:
        return given
    return sys.executable if importlib.util.find_spec("litert_torch") is not None else None


needs_litert_torch = pytest.mark.skipif(
    converter_python() is None,
    reason="no Python with litert-torch: set TINYSERVE_LITERT_PYTHON (docs/backends.md)",
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fashion-cnn"
    shutil.copytree(BUNDLED_MODEL, folder)
    return folder


def check_version(model_dir: Path, version: int, fmt: str, file: str) -> dict[str, Any]:
    folder = model_dir / str(version)
    report = json.loads((folder / "convert_report.json").read_text())
    parity = report["parity"]
    assert parity["samples"] == 10 and parity["top1_identical"] and parity["passed"]
    assert parity["max_abs_probability_diff"] <= parity["tolerance"]
    assert parity["candidate"]["runtime"] == fmt
    manifest = read_manifest(folder / file)
    assert manifest.source["conversion"]["parity"] == parity
    assert manifest.source["parent_version"] == report["parent"]["version"]
    assert not (folder / "model.onnx").exists()
    engine = Engine(folder / file)  # auto: the version's own runtime
    assert engine.runtime == fmt and engine.input_name == "pixels"
    return report


def test_openvino_conversion_of_the_float_and_int8_versions(model_dir: Path) -> None:
    for parent in (1, 2):
        result = convert(ConvertConfig(model_dir, "openvino", parent=parent, samples=(SAMPLES,)))
        assert result.path is not None and result.path.name == "model.xml"
        report = check_version(model_dir, result.version or 0, "openvino", "model.xml")
        assert (result.path.with_suffix(".bin")).is_file()
        assert report["parity"]["tolerance"] == 1e-4
        agreement = report["parity"]["agreement"]
        if agreement is not None:  # Fashion-MNIST installed
            assert agreement["top1_agreement"] >= 0.999
    methods = [read_manifest(model_dir / v / "model.xml").source["conversion"] for v in "34"]
    assert [m["precision"] for m in methods] == ["fp32", "static-int8-qdq"]
    assert list_versions(model_dir) == [1, 2, 3, 4]


def test_a_conversion_that_misses_its_bar_is_refused_unless_forced(model_dir: Path) -> None:
    strict = ConvertConfig(model_dir, "openvino", parent=2, samples=(SAMPLES,), tolerance=1e-12)
    refused = convert(strict)
    # The INT8 IR is not bit-identical to ONNX Runtime's INT8 kernels on every CPU: if it
    # happens to be, the refusal cannot be shown with this model.
    if refused.parity["max_abs_probability_diff"] == 0.0:
        pytest.skip("OpenVINO and ONNX Runtime agree to the bit on this CPU")
    assert refused.path is None and not refused.parity["passed"]
    assert list_versions(model_dir) == [1, 2]
    forced = convert(ConvertConfig(**{**strict.__dict__, "force": True}))
    assert forced.version == 3 and not forced.parity["passed"]


def test_conversion_errors_say_what_to_do(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--int8 applies to litert"):
        ConvertConfig(model_dir, "openvino", int8=True)
    with pytest.raises(ValueError, match="target must be one of openvino, litert"):
        ConvertConfig(model_dir, "coreml")
    with pytest.raises(ConfigError, match="not a model folder"):
        convert(ConvertConfig(model_dir / "nothing", "openvino"))
    convert(ConvertConfig(model_dir, "openvino", parent=1, samples=(SAMPLES,), data=None))
    with pytest.raises(ConfigError, match="holds no model.onnx; conversions start from an ONNX"):
        convert(ConvertConfig(model_dir, "openvino", parent=3, samples=(SAMPLES,)))
    monkeypatch.delenv("TINYSERVE_LITERT_PYTHON", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeUnavailable, match="litert-torch.*--converter-python"):
        litert_python(None)
    with pytest.raises(RuntimeUnavailable, match="does not exist"):
        litert_python("/no/such/python")


def test_the_onnx_graph_rebuilt_in_pytorch_matches_onnx_runtime() -> None:
    """The heart of the LiteRT route, without litert-torch: the rebuilt module's logits."""
    pytest.importorskip("torch", reason="the train extra is not installed")
    import onnx
    import torch

    from tinyserve.convert import sample_pixels
    from tinyserve.training.litert_export import OnnxModule

    path = BUNDLED_MODEL / "1" / "model.onnx"
    pixels = sample_pixels((SAMPLES,), read_manifest(path))
    module = OnnxModule(onnx.load(str(path))).eval()
    with torch.no_grad():
        got = module(torch.from_numpy(pixels)).numpy()
    expected = Engine(path, EngineConfig(warmup_runs=0)).infer(pixels)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(ValueError, match="QuantizeLinear.*convert the float ONNX version"):
        OnnxModule(onnx.load(str(BUNDLED_MODEL / "2" / "model.onnx")))


@needs_litert_torch
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_litert_conversion_float_and_int8(model_dir: Path, int8: bool) -> None:
    python = converter_python()
    config = ConvertConfig(
        model_dir, "litert", parent=1, samples=(SAMPLES,), int8=int8, converter_python=python
    )
    result = convert(config)
    assert result.path is not None and result.path.name == "model.tflite"
    report = check_version(model_dir, result.version or 0, "litert", "model.tflite")
    assert report["parity"]["tolerance"] == (0.05 if int8 else 1e-4)
    assert report["conversion"]["precision"] == ("int8-weights" if int8 else "fp32")
    size = result.path.stat().st_size
    onnx_size = (BUNDLED_MODEL / "1" / "model.onnx").stat().st_size
    assert size < onnx_size / 3 if int8 else size > onnx_size / 2


def test_convert_command_writes_and_refuses(model_dir: Path) -> None:
    from typer.testing import CliRunner

    from tinyserve.cli import app

    runner = CliRunner()
    args = ["convert", "openvino", str(model_dir), "--parent", "1", "--data", "none"]
    result = runner.invoke(app, [*args, "--samples", str(SAMPLES)])
    assert result.exit_code == 0, result.output
    assert f"wrote {model_dir / '3' / 'model.xml'}" in result.output
    assert "top-1 identical" in result.output
    refused = runner.invoke(app, [*args, "--tolerance", "1e-12"])
    if "largest probability difference 0.00e+00" not in str(refused.exception):
        assert refused.exit_code != 0 and "fails the parity check" in str(refused.exception)
    assert list_versions(model_dir) == [1, 2, 3]
    help_text = runner.invoke(app, ["convert", "litert", "--help"]).output
    assert "--int8" in help_text and "--converter-python" in help_text


def test_a_checkpoint_must_be_the_parents(model_dir: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="is not the checkpoint version 1 was exported from"):
        convert(ConvertConfig(model_dir, "litert", parent=1, checkpoint=tiny_checkpoint))
    with pytest.raises(ValueError, match="--checkpoint applies to litert"):
        ConvertConfig(model_dir, "openvino", checkpoint=tiny_checkpoint)


@needs_litert_torch
def test_litert_from_the_training_checkpoint(
    tiny_repo: Path, tiny_checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    """The seed's PyTorch -> LiteRT path: the checkpoint's ServingModel, preprocessing in it."""
    model_dir = tmp_path / "colors"
    shutil.copytree(tiny_repo / "colors", model_dir)
    config = ConvertConfig(
        model_dir, "litert", parent=1, samples=(image_folder,), checkpoint=tiny_checkpoint,
        converter_python=converter_python(),
    )  # fmt: skip
    result = convert(config)
    assert result.path is not None and result.parity["passed"], result.report
    assert "ServingModel of checkpoint" in result.report["conversion"]["converter"]["route"]
    assert Engine(result.path).runtime == "litert"
