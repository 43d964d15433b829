from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from tinyserve.errors import ConfigError
from tinyserve.manifest import read_manifest
from tinyserve.training.export import ExportConfig, ParityBar, export_checkpoint
from tinyserve.training.models import create_model
from tinyserve.training.prune import PruneConfig, prune_checkpoint, transfer_channels
from tinyserve.training.train import build_from_checkpoint, load_checkpoint


def _parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_dropping_dead_channels_changes_nothing() -> None:
    """Channels whose BatchNorm output is zero are the ones removed, and exactly those."""
    torch.manual_seed(0)
    wide = create_model("vgg_lite", num_classes=4, in_channels=1, widths=(8, 8, 8)).eval()
    dead = [1, 2, 5, 6]
    with torch.no_grad():
        for m in wide.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight[dead] = 0.0
                m.bias[dead] = 0.0
    narrow = create_model("vgg_lite", num_classes=4, in_channels=1, widths=(4, 4, 4)).eval()
    transfer_channels(wide, narrow)
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        # sums over 8 channels (half of them exact zeros) or 4 may round apart by a few ulp
        torch.testing.assert_close(narrow(x), wide(x), rtol=1e-5, atol=1e-5)
    assert _parameters(narrow) < _parameters(wide) / 2


def test_depthwise_architectures_prune_consistently() -> None:
    wide = create_model("custom_cnn", num_classes=3, in_channels=3, widths=(8, 16, 16, 32))
    narrow = create_model("custom_cnn", num_classes=3, in_channels=3, widths=(4, 8, 8, 16))
    transfer_channels(wide.eval(), narrow.eval())
    with torch.no_grad():
        assert narrow(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_mismatched_architectures_are_refused() -> None:
    a = create_model("vgg_lite", num_classes=4, in_channels=1, widths=(8, 8, 8))
    b = create_model("custom_cnn", num_classes=4, in_channels=1, widths=(4, 4, 4, 4))
    with pytest.raises(ConfigError, match="layer sequence"):
        transfer_channels(a, b)


@pytest.mark.slow
def test_prune_shrinks_fine_tunes_and_exports(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = PruneConfig(
        tiny_checkpoint,
        tmp_path / "pruned",
        ratio=0.5,
        epochs=1,
        lr=0.01,
        batch_size=8,
        threads=1,
        latency_runs=5,
    )
    result = prune_checkpoint(config, progress=False)
    assert result.widths == [16, 32, 64, 128]  # custom_cnn's (32, 64, 128, 256) halved
    assert result.after.parameters < result.before.parameters / 3
    assert result.after.onnx_bytes < result.before.onnx_bytes / 2
    for measured in (result.before, result.pruned, result.after):
        assert 0.0 <= measured.test_accuracy <= 1.0 and measured.throughput_ips > 0
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["widths"] == result.widths

    state = load_checkpoint(result.checkpoint)
    assert state["meta"]["arch_options"] == {"widths": [16, 32, 64, 128]}
    assert state["meta"]["lineage"]["method"] == "channel-pruned-0.5"
    assert _parameters(build_from_checkpoint(state).net) == result.after.parameters

    exported = export_checkpoint(
        ExportConfig(result.checkpoint, "slim", repo=tmp_path / "repo", parity=ParityBar(8))
    )
    onnx.checker.check_model(str(exported.path), full_check=True)
    source = read_manifest(exported.path).source
    assert source["lineage"]["ratio"] == 0.5 and source["parameters"] == result.after.parameters


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ratio"):
        PruneConfig(tmp_path, tmp_path, ratio=1.0)
