from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from tinyserve.errors import CheckpointError
from tinyserve.quantize import QuantizeConfig, quantize
from tinyserve.training.export import ExportConfig, ParityBar, export_checkpoint
from tinyserve.training.models import create_model
from tinyserve.training.qat import (
    ActivationQuant,
    QatConfig,
    fold_batchnorm,
    prepare,
    qat_finetune,
    quantized_weight,
)
from tinyserve.training.train import build_from_checkpoint, load_checkpoint


def _with_statistics(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("arch", ["vgg_lite", "custom_cnn"])
def test_folding_batchnorm_keeps_the_function(arch: str) -> None:
    net = _with_statistics(
        create_model(
            arch,
            num_classes=4,
            in_channels=1,
            widths=(8, 8, 8, 8)[: 3 if arch == "vgg_lite" else 4],
        )
    )
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        before = net(x)
        folded = fold_batchnorm(net)
        # a folded BatchNorm stays frozen even when the network is put back in training
        net.train()
        net.classifier[1].eval()  # dropout off, to compare outputs
        after = net(x)
    assert folded == sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert all(
        not m.weight.requires_grad for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )


@pytest.mark.parametrize(("reduce_range", "limit"), [(True, 64), (False, 127)])
def test_weights_round_per_channel_to_the_quantizer_grid(reduce_range: bool, limit: int) -> None:
    weight = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(-1, 1, 1, 1)
    rounded = quantized_weight(weight, reduce_range)
    scale = weight.abs().flatten(1).amax(1) / limit
    steps = rounded / scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    assert steps.abs().max() <= limit + 1e-3
    assert (rounded - weight).abs().max() <= scale.max() / 2 + 1e-6


def test_activations_round_to_uint8_over_the_moving_range() -> None:
    quant = ActivationQuant(momentum=0.5)
    layer = torch.nn.Identity().train()
    (first,) = quant(layer, (torch.linspace(-1.0, 3.0, 1000),))
    assert first.unique().numel() <= 256
    assert (quant.low, quant.high) == (-1.0, 3.0)
    quant(layer, (torch.linspace(-3.0, 5.0, 10),))
    assert (quant.low, quant.high) == (-2.0, 4.0)
    # in evaluation the range is fixed: a value beyond it saturates
    (clipped,) = quant(layer.eval(), (torch.tensor([10.0, 0.0]),))
    assert clipped[0] == pytest.approx(4.0, abs=6 / 255) and clipped[1] == 0.0


def test_prepare_hooks_every_compute_layer() -> None:
    net = create_model("vgg_lite", num_classes=4, in_channels=1, widths=(8, 8, 8))
    assert prepare(net) == 6  # five convolutions and the linear head
    out = net.train()(torch.randn(4, 1, 12, 12))
    out.sum().backward()  # gradients pass straight through the rounding
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.slow
def test_qat_checkpoint_exports_and_passes_the_quantize_gate(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    config = QatConfig(
        tiny_checkpoint, tmp_path / "qat", epochs=1, lr=0.005, batch_size=8, threads=1
    )
    result = qat_finetune(config, progress=False)
    state = load_checkpoint(result.checkpoint)
    assert state["meta"]["lineage"]["method"] == "quantization-aware fine-tune"
    assert state["meta"]["train_config"]["precision"] == "fp32"
    build_from_checkpoint(state)  # a plain checkpoint of the same architecture
    report = json.loads((tmp_path / "qat" / "qat_report.json").read_text())
    assert report["quantized_layers"] == result.quantized_layers > 0

    repo = tmp_path / "repo"
    export_checkpoint(ExportConfig(result.checkpoint, "colors", repo=repo, parity=ParityBar(12)))
    quantized = quantize(QuantizeConfig(repo / "colors", data=str(image_folder)))
    assert quantized.version == 2 and quantized.gate.passed
    ops = {node.op_type for node in onnx.load(str(quantized.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        QatConfig(tmp_path / "a.pt", tmp_path, epochs=0)
    with pytest.raises(ValueError, match="momentum"):
        QatConfig(tmp_path / "a.pt", tmp_path, momentum=0.0)


def test_cli_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    from tinyserve.cli.compress import qat

    with pytest.raises(CheckpointError, match="does not exist"):
        qat(tmp_path / "missing.pt", tmp_path / "out", progress=False)
