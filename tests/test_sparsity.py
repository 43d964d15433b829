from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinyserve.training.export import ExportConfig, ParityBar, export_checkpoint
from tinyserve.training.models import create_model
from tinyserve.training.prune import weight_sparsity
from tinyserve.training.sparsity import MagnitudePruner, SparsityConfig, sparsify_checkpoint
from tinyserve.training.train import load_checkpoint


def test_the_schedule_ramps_cubically_to_the_target() -> None:
    pruner = MagnitudePruner(torch.nn.Linear(4, 4), 0.8, ramp_steps=100)
    assert pruner.scheduled(0) == 0.0
    assert pruner.scheduled(50) == pytest.approx(0.8 * (1 - 0.5**3))
    assert pruner.scheduled(100) == pruner.scheduled(500) == pytest.approx(0.8)


def test_the_threshold_is_global_across_layers() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False), torch.nn.Linear(10, 10))
    with torch.no_grad():
        net[0].weight.fill_(0.01)  # every weight of the first layer is smaller
        net[1].weight.uniform_(1.0, 2.0)
    MagnitudePruner(net, 0.5, 1).update(0.5)
    assert bool((net[0].weight == 0).all()) and bool((net[1].weight != 0).all())
    assert weight_sparsity(net) == 0.5


def test_pruned_weights_stay_zero_through_training() -> None:
    torch.manual_seed(0)
    net = create_model("vgg_lite", num_classes=4, in_channels=1, widths=(8, 8, 8))
    pruner = MagnitudePruner(net, 0.6, ramp_steps=6, frequency=2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []
    for _ in range(10):
        loss = net.train()(torch.randn(4, 1, 12, 12)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(weight_sparsity(net))
    assert seen[0] == 0.0 and seen[5] < 0.6  # the ramp is gradual
    net.eval()(torch.randn(1, 1, 12, 12))  # the next forward re-applies the mask
    assert weight_sparsity(net) == pytest.approx(0.6, abs=0.01)
    assert pruner.step == 7  # the schedule stopped counting once the ramp was done


@pytest.mark.slow
def test_magnitude_pruning_fine_tunes_exports_and_reports(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = SparsityConfig(
        tiny_checkpoint,
        tmp_path / "sparse",
        sparsity=0.7,
        epochs=2,
        lr=0.01,
        frequency=1,
        batch_size=8,
        threads=1,
        latency_runs=5,
    )
    result = sparsify_checkpoint(config, progress=False)
    assert result.before.weight_sparsity < 0.01
    assert result.pruned.weight_sparsity == pytest.approx(0.7, abs=0.01)
    assert result.after.weight_sparsity == pytest.approx(0.7, abs=0.01)
    # same shapes: the file is as large, but its zeros compress
    assert result.after.parameters == result.before.parameters
    assert result.after.compressed_bytes < 0.7 * result.before.compressed_bytes
    report = json.loads((tmp_path / "sparse" / "sparsity_report.json").read_text())
    assert report["after"]["weight_sparsity"] == result.after.weight_sparsity

    state = load_checkpoint(result.checkpoint)
    assert state["meta"]["lineage"]["method"] == "magnitude-pruned-0.7"
    saved = export_checkpoint(
        ExportConfig(result.checkpoint, "sparse", repo=tmp_path / "repo", parity=ParityBar(12))
    )
    assert saved.path.is_file()


def test_config_is_validated(tmp_path: Path) -> None:
    for bad in ({"sparsity": 1.0}, {"ramp": 0.0}, {"frequency": 0}):
        with pytest.raises(ValueError):
            SparsityConfig(tmp_path / "a.pt", tmp_path, **bad)  # type: ignore[arg-type]
