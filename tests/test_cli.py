from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL, SAMPLES, needs_fashion_mnist
from tinyserve.cli import app

COMMANDS = ["train", "export", "import", "evaluate", "predict"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from tinyserve.cli import main; main()"
    env = {**os.environ, "COLUMNS": "250"}  # keep rich tables on one line per row
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_top_level_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_explains_itself(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and "--help" in result.output


def test_predict_classifies_the_bundled_samples() -> None:
    result = run_cli("predict", str(BUNDLED_MODEL), str(SAMPLES), "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 10
    correct = 0
    for item in lines:
        true_slug = Path(item["image"]).stem.split("_", 1)[1]
        predicted = item["predictions"][0]["label"].lower().replace("/", "-").replace(" ", "-")
        correct += predicted == true_slug
        assert len(item["predictions"]) == 2
    assert correct >= 9


def test_predict_reports_a_bad_file_and_keeps_going(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    sample = next(SAMPLES.glob("*.png"))
    result = run_cli("predict", str(BUNDLED_MODEL), str(sample), str(tmp_path / "notes.png"))
    assert result.returncode == 1
    assert "not a recognised image" in result.stdout


@needs_fashion_mnist
@pytest.mark.slow
def test_evaluate_the_bundled_model_through_onnx_runtime(tmp_path: Path) -> None:
    result = run_cli("evaluate", str(BUNDLED_MODEL), "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 10000
    # The INT8 version scores 93.5-93.6 % on the CPUs seen so far; the bound leaves room for
    # other kernels' rounding and still fails a broken model.
    assert report["accuracy"] >= 0.925
    assert report["bytes"] <= 2_000_000
    assert sum(map(sum, report["confusion"])) == 10000
    assert (tmp_path / "confusion.png").stat().st_size > 10_000


def test_missing_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: Fashion-MNIST not found")
    assert "apt-get install -y dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"garbage")
    result = run_cli("export", str(bad), "--name", "x", "--repo", str(tmp_path))
    assert result.returncode == 2
    assert "damaged or not a tinyserve checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_option_value_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("train", "--out", str(tmp_path), "--optimizer", "lbfgs")
    assert result.returncode == 2
    assert "optimizer must be one of" in result.stderr


def test_export_and_evaluate_a_tiny_model_end_to_end(
    tiny_checkpoint: Path, image_folder: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "export",
        str(tiny_checkpoint),
        "--name",
        "colors",
        "--repo",
        str(tmp_path),
        "--parity-samples",
        "12",
    )
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement 100.00%" in result.stdout
    result = run_cli("evaluate", f"{tmp_path / 'colors'}:1", "--data", str(image_folder), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] >= 0.9
