from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from tinyserve.cli import app
from tinyserve.engine import Engine
from tinyserve.errors import ConfigError, ModelError
from tinyserve.manifest import Manifest, read_manifest
from tinyserve.quantize import (
    AgreementBar,
    Calibration,
    CalibrationReader,
    GateResult,
    QuantizeConfig,
    preprocessing_nodes,
    quantize,
)


@pytest.fixture(scope="module")
def trained_repo(train_tiny: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained long enough to be accurate, so that the gate has something to lose.

    It is the last epoch's weights, not best.pt (the first epoch to reach full validation
    accuracy): their smallest top-1 margin is about 9 logits, against INT8 errors of at most
    a few tenths, so a sound quantization answers like its parent on any CPU's kernels.
    """
    from tinyserve.training.export import ExportConfig, ParityBar, export_checkpoint

    repo = tmp_path_factory.mktemp("quantize-repo")
    checkpoint = train_tiny(epochs=8).with_name("last.pt")
    export_checkpoint(ExportConfig(checkpoint, "colors", repo=repo, parity=ParityBar(samples=12)))
    return repo


@pytest.fixture
def repo(trained_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the trained repository (quantizing adds versions to it)."""
    return Path(shutil.copytree(trained_repo, tmp_path / "repo"))


def constant_folder(root: Path, size: int = 16) -> Path:
    """The tiny model's three classes, every image one flat grey: a useless calibration set."""
    for name in ("blue", "green", "red"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (size, size), (128, 128, 128)).save(root / name / f"{i}.png")
    return root


def blind(path: Path) -> None:
    """Zero the in-graph pixel scale of the model at ``path``: every image then looks the same.

    Its logits no longer depend on the image (x * 0 is exactly 0), so it gives one class to
    the whole test set, a third of which is that class, whatever kernels the CPU runs. A bad
    calibration is no such certainty: how much it costs depends on the CPU's INT8 rounding.
    """
    model = onnx.load(str(path))
    pre = preprocessing_nodes(model.graph)
    (mul,) = [n for n in model.graph.node if n.name in pre and n.op_type == "Mul"]
    (scale,) = [i for i in model.graph.initializer if i.name in mul.input]
    zeros = np.zeros_like(onnx.numpy_helper.to_array(scale))
    scale.CopyFrom(onnx.numpy_helper.from_array(zeros, scale.name))
    onnx.save(model, str(path))


@pytest.fixture
def blind_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate that ``quantize`` makes in this test is blinded after conversion."""
    import tinyserve.quantize as module

    real_convert = module.convert

    def convert(source: Path, target: Path, manifest: Manifest, config: QuantizeConfig) -> str:
        method = real_convert(source, target, manifest, config)
        blind(target)
        return method

    monkeypatch.setattr(module, "convert", convert)


@pytest.mark.parametrize("mode", ["dynamic", "static", "fp16"])
def test_each_mode_writes_a_loadable_version_with_lineage(
    repo: Path, image_folder: Path, mode: str
) -> None:
    config = QuantizeConfig(repo / "colors", mode=mode, data=str(image_folder))
    result = quantize(config)
    assert result.path == repo / "colors" / "2" / "model.onnx" and result.version == 2
    engine = Engine(result.path)  # uint8 NHWC in, float32 logits out, or it refuses to load
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    logits = engine.infer(pixels)
    assert logits.shape == (3, 3) and logits.dtype == np.float32
    assert engine.session.session.get_outputs()[0].type == "tensor(float)"  # the ORT session

    source = read_manifest(result.path).source
    assert source["parent_version"] == 1 and "parity" not in source
    lineage = source["optimization"]
    assert lineage["mode"] == mode and lineage["parent_version"] == 1
    gate = lineage["gate"]
    assert gate["passed"] and not gate["forced"] and gate["samples"] == 12
    assert 0.0 <= gate["agreement"] <= 1.0 and gate["max_accuracy_drop"] == 1.0
    if mode == "static":
        assert lineage["calibration"] == {
            "method": "minmax",
            "dataset": f"{image_folder}/train",
            "samples": 512,
            "seed": 0,
        }
    assert (result.path.parent / "quantize_report.json").is_file()


@pytest.mark.parametrize("reduce_range", [True, False])
def test_weights_are_seven_bit_unless_full_range_is_asked(
    repo: Path, image_folder: Path, reduce_range: bool
) -> None:
    # forced: this is about the file's weights, not about what full-range ones cost a CPU
    config = QuantizeConfig(
        repo / "colors", data=str(image_folder), reduce_range=reduce_range, force=True
    )
    result = quantize(config)
    assert result.path is not None
    assert read_manifest(result.path).source["optimization"]["reduce_range"] is reduce_range
    graph = onnx.load(str(result.path)).graph
    weights = [
        onnx.numpy_helper.to_array(i)
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.INT8
    ]
    largest = max(int(np.abs(w.astype(np.int16)).max()) for w in weights if w.size > 1)
    # Without VNNI, uint8 x int8 products are summed in saturating int16 pairs: 7-bit weights
    # keep them exact, full-range ones reach +-127 and can overflow.
    assert largest <= 64 if reduce_range else largest == 127


def test_static_int8_is_qdq_and_keeps_preprocessing_in_float(
    repo: Path, image_folder: Path
) -> None:
    parent = repo / "colors" / "1" / "model.onnx"
    result = quantize(QuantizeConfig(repo / "colors", data=str(image_folder)))
    assert result.path is not None
    graph = onnx.load(str(result.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights = {i.name: i for i in graph.initializer}
    conv_weight_dq = [
        n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
    ]
    assert conv_weight_dq and all(
        onnx.numpy_helper.to_array(weights[n.input[1]]).size > 1 for n in conv_weight_dq
    )  # per-channel scales
    # The graph input feeds the in-graph preprocessing directly, not a QuantizeLinear.
    first = [n for n in graph.node if graph.input[0].name in n.input]
    assert [n.op_type for n in first] in (["Transpose"], ["Cast"])
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    pre = [n for n in graph.node if n.name in preprocessing_nodes(graph)]
    float_pre = [n for n in pre if n.op_type in ("Transpose", "Cast", "Mul", "Sub")]
    assert [n.op_type for n in float_pre] == ["Transpose", "Cast", "Mul", "Sub"]
    assert not any(set(n.input) & dequantized for n in float_pre)
    # and the quantized model still answers like its parent on real images
    images = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB").resize((16, 16)))
            for p in sorted(image_folder.rglob("*.png"))[:12]
        ]
    )
    expected = Engine(parent).infer(images).argmax(1)
    assert (Engine(result.path).infer(images).argmax(1) == expected).mean() >= 0.9


def test_fp16_converts_weights_but_keeps_uint8_input(repo: Path, image_folder: Path) -> None:
    result = quantize(QuantizeConfig(repo / "colors", mode="fp16", data=str(image_folder)))
    assert result.path is not None
    model = onnx.load(str(result.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    kinds = {i.name: i.data_type for i in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and {kinds[w] for w in conv_weights} == {onnx.TensorProto.FLOAT16}
    # the preprocessing constants (scale and shift) stay float32, as the nodes using them
    pre = set(preprocessing_nodes(model.graph))
    pre_consts = {i for n in model.graph.node if n.name in pre for i in n.input if i in kinds}
    assert pre_consts and {kinds[c] for c in pre_consts} == {onnx.TensorProto.FLOAT}


@pytest.mark.usefixtures("blind_candidates")
def test_gate_refuses_a_candidate_that_loses_accuracy_unless_forced(
    repo: Path, image_folder: Path
) -> None:
    config = QuantizeConfig(repo / "colors", data=str(image_folder))
    refused = quantize(config)
    assert refused.gate.parent_accuracy >= 0.9  # the parent is good; the candidate is blind
    assert refused.path is None and not refused.gate.passed
    assert refused.gate.samples == 12 and refused.gate.accuracy == pytest.approx(1 / 3)
    assert refused.gate.accuracy_delta_pt < -50.0
    assert not (repo / "colors" / "2").exists()

    forced = quantize(replace(config, force=True))
    assert forced.path is not None and forced.version == 2
    gate = read_manifest(forced.path).source["optimization"]["gate"]
    assert gate["forced"] and not gate["passed"]


def test_the_bar_admits_exactly_the_allowed_loss() -> None:
    def gate(delta_pt: float, agreement: float = 1.0) -> GateResult:
        return GateResult("d", 100, 0.9, 0.9 + delta_pt / 100, delta_pt, agreement, 1.0, 0.95)

    assert gate(0.0).passed and gate(-1.0).passed and gate(+2.0).passed
    assert not gate(-1.01).passed
    assert gate(-0.5, agreement=0.95).passed and not gate(-0.5, agreement=0.94).passed


def test_agreement_bar_also_gates(repo: Path, image_folder: Path) -> None:
    config = QuantizeConfig(
        repo / "colors",
        mode="dynamic",
        data=str(image_folder),
        bar=AgreementBar(max_accuracy_drop=100.0, min_agreement=1.0),
    )
    result = quantize(config)
    assert result.gate.passed == (result.gate.agreement == 1.0)


@pytest.mark.usefixtures("blind_candidates")
def test_cli_reports_a_refusal_as_an_error(repo: Path, image_folder: Path, tmp_path: Path) -> None:
    flat = constant_folder(tmp_path / "flat")
    args = [
        "quantize",
        str(repo / "colors"),
        "--data",
        str(image_folder),
        "--calib-data",
        str(flat),
        "--calibration-samples",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ModelError)
    assert "misses the bar" in result.exception.message and "--force" in result.exception.message
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
    written = repo / "colors" / "2" / "model.onnx"
    calibration = read_manifest(written).source["optimization"]["calibration"]
    assert calibration["dataset"] == f"{flat}/train" and calibration["samples"] == 1


def test_calibration_reader_feeds_uint8_nhwc_batches() -> None:
    images = np.zeros((70, 8, 8, 1), dtype=np.uint8)
    reader = CalibrationReader(images, Calibration(batch_size=32), "pixels")
    batches = list(iter(reader.get_next, None))
    assert [b["pixels"].shape[0] for b in batches] == [32, 32, 6]
    assert all(
        b["pixels"].dtype == np.uint8 and b["pixels"].shape[1:] == (8, 8, 1) for b in batches
    )
    reader.rewind()
    assert reader.get_next() is not None


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        QuantizeConfig(tmp_path, mode="int4")
    with pytest.raises(ValueError, match="parent version"):
        QuantizeConfig(tmp_path, parent=0)
    with pytest.raises(ValueError, match="accuracy drop"):
        AgreementBar(max_accuracy_drop=-1)
    with pytest.raises(ValueError, match="calibration method"):
        Calibration(method="mse")


def test_unlabelled_photos_gate_on_agreement_with_the_parent(
    repo: Path, image_folder: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"  # images without class folders, as for an ImageNet model
    photos.mkdir()
    for path in sorted(image_folder.rglob("*.png"))[:9]:
        shutil.copy(path, photos / f"{path.parent.name}-{path.name}")
    result = quantize(QuantizeConfig(repo / "colors", data=str(photos)))
    assert result.gate.samples == 9
    assert result.gate.parent_accuracy == 1.0  # the parent's answers are the labels
    assert result.gate.accuracy == result.gate.agreement
    assert result.path is not None
    strict = QuantizeConfig(
        repo / "colors", parent=1, data=str(photos), bar=AgreementBar(min_agreement=1.0)
    )
    gated = quantize(strict)
    assert gated.gate.passed == (gated.gate.agreement == 1.0)
    assert (gated.path is not None) == gated.gate.passed


def test_an_already_quantized_version_is_refused_with_its_parent_named(
    repo: Path, image_folder: Path
) -> None:
    first = quantize(QuantizeConfig(repo / "colors", data=str(image_folder)))
    assert first.version == 2
    with pytest.raises(ConfigError, match="already static-quantized.*--parent 1"):
        quantize(QuantizeConfig(repo / "colors", data=str(image_folder)))  # default: v2
