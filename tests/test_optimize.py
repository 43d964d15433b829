from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyserve.errors import ModelError
from tinyserve.repository import resolve
from tinyserve.training.optimize import OptimizeConfig, optimize


def _config(checkpoint: Path, tmp_path: Path, **options: object) -> OptimizeConfig:
    settings: dict[str, object] = dict(
        distill_epochs=2, prune_epochs=1, batch_size=8, threads=1, latency_runs=5
    )
    return OptimizeConfig(
        checkpoint, tmp_path / "run", "colors", repo=tmp_path / "repo", **{**settings, **options}
    )  # type: ignore[arg-type]


@pytest.mark.slow
def test_every_step_runs_is_measured_and_lands_in_the_repository(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = _config(
        tiny_checkpoint,
        tmp_path,
        distill_arch="custom_cnn",
        distill_widths=(8, 16, 16, 32),
        prune="channels",
        max_drop=100.0,
    )
    report = optimize(config, progress=False)
    assert report.passed
    assert [s.name for s in report.steps] == ["input", "distill", "prune", "export", "quantize"]
    sizes = [s.measured.parameters for s in report.steps]
    assert sizes[1] < sizes[0] and sizes[2] < sizes[1]  # the student, then fewer channels
    quantized = report.steps[-1]  # (on a 675-parameter network QDQ nodes outweigh the savings)
    assert quantized.note == "static" and quantized.artifact.endswith("2/model.onnx")
    assert resolve(tmp_path / "repo" / "colors", None).version == 2
    saved = json.loads((tmp_path / "run" / "optimize_report.json").read_text())
    assert [s["name"] for s in saved["steps"]] == [s.name for s in report.steps]
    table = (tmp_path / "run" / "OPTIMIZE.md").read_text()
    assert "| quantize |" in table and "passed" in table


@pytest.mark.slow
def test_a_step_that_loses_too_much_stops_the_pipeline(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # Removing 95% of the weights with one short epoch costs far more than 0 points.
    config = _config(
        tiny_checkpoint, tmp_path, prune="magnitude", prune_ratio=0.95, max_drop=0.0,
        max_train_samples=8,
    )  # fmt: skip
    report = optimize(config, progress=False)
    assert report.stopped_at == "prune" and not report.passed
    assert [s.name for s in report.steps] == ["input", "prune"]
    assert "more than --max-drop" in report.steps[-1].note
    assert not (tmp_path / "repo" / "colors").exists()  # nothing was exported


def test_skipping_everything_but_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    report = optimize(_config(tiny_checkpoint, tmp_path, quantize=None), progress=False)
    assert [s.name for s in report.steps] == ["input", "export"]
    assert report.steps[1].note.startswith("parity")
    assert report.steps[1].measured.test_accuracy == pytest.approx(
        report.steps[0].measured.test_accuracy, abs=0.02
    )


def test_config_is_validated(tmp_path: Path) -> None:
    for bad in ({"prune": "random"}, {"quantize": "int4"}, {"max_drop": -1.0}):
        with pytest.raises(ValueError):
            OptimizeConfig(tmp_path / "a.pt", tmp_path, "m", **bad)  # type: ignore[arg-type]


def test_cli_reports_a_failed_gate_as_an_error(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tinyserve.training.optimize as module
    from tinyserve.cli.optimize import optimize as command

    def stopped(config: OptimizeConfig, progress: bool) -> module.OptimizeReport:
        return module.OptimizeReport(stopped_at="quantize")

    monkeypatch.setattr(module, "optimize", stopped)
    with pytest.raises(ModelError, match="quantize step failed its gate"):
        command(tiny_checkpoint, "colors", tmp_path / "run", progress=False)
