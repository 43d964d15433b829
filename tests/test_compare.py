from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinyserve.cli import app
from tinyserve.compare import CompareConfig, compare, to_markdown, write_outputs
from tinyserve.quantize import QuantizeConfig, quantize


@pytest.fixture
def two_versions(tiny_repo: Path, image_folder: Path, tmp_path: Path) -> Path:
    """The tiny model (v1) and its dynamic INT8 quantization (v2)."""
    model_dir = Path(shutil.copytree(tiny_repo / "colors", tmp_path / "repo" / "colors"))
    # forced: whether INT8 flips one of the 12 test images depends on the CPU's kernels, and
    # the comparison measures v2 either way (the gate has its own tests)
    quantize(QuantizeConfig(model_dir, mode="dynamic", data=str(image_folder), force=True))
    return model_dir


def test_compare_measures_every_version(two_versions: Path, image_folder: Path) -> None:
    config = CompareConfig(
        two_versions,
        data=str(image_folder),
        threads=(1, 2),
        batch_sizes=(4, 8),
        latency_runs=5,
        throughput_images=16,
    )
    result = compare(config)
    assert [r.version for r in result.rows] == [1, 2]
    assert [r.method for r in result.rows] == ["fp32", "dynamic-int8"]
    assert result.reference_version == 1 and result.samples == 12
    assert result.rows[0].agreement == 1.0  # v1 against itself: the same kernels, bit for bit
    for row in result.rows:
        assert row.bytes == (two_versions / str(row.version) / "model.onnx").stat().st_size
        assert [s.threads for s in row.speeds] == [1, 2]
        for speed in row.speeds:
            assert set(speed.latency_ms) == {"p50", "p95", "p99"}
            assert speed.latency_ms["p50"] <= speed.latency_ms["p99"]
            assert set(speed.throughput_ips) == {4, 8} and min(speed.throughput_ips.values()) > 0


def test_outputs_are_markdown_json_and_png(
    two_versions: Path, image_folder: Path, tmp_path: Path
) -> None:
    config = CompareConfig(
        two_versions,
        data=str(image_folder),
        threads=(1,),
        batch_sizes=(4,),
        latency_runs=3,
        throughput_images=8,
    )
    paths = write_outputs(compare(config), tmp_path / "out")
    markdown, data, png = (p.read_bytes() for p in paths)
    lines = markdown.decode().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 3 and "dynamic-int8" in table[2]  # header and two versions
    assert "agreement" in table[0] and "p99 ms (1t)" in table[0]
    assert [r["version"] for r in json.loads(data)["rows"]] == [1, 2]
    assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_evaluate_compare_command_writes_all_three(
    two_versions: Path, image_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    args = [
        "evaluate",
        "--compare",
        str(two_versions),
        "--data",
        str(image_folder),
        "--out",
        str(out),
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    rows = json.loads(result.output)["rows"]
    assert [sorted(r["speeds"][0]["throughput_ips"]) for r in rows] == [["256", "32"]] * 2
    assert [s["threads"] for s in rows[0]["speeds"]] == [1, 2]


def test_compare_needs_versions(tmp_path: Path) -> None:
    from tinyserve.errors import ModelNotFound

    with pytest.raises(ModelNotFound):
        compare(CompareConfig(tmp_path))
    with pytest.raises(ValueError, match="thread counts"):
        CompareConfig(tmp_path, threads=(0,))


def test_rows_per_runtime_and_pytorch(two_versions: Path, image_folder: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from tinyserve.convert import ConvertConfig, convert
    from tinyserve.training.torch_rows import torch_candidates

    ir = convert(ConvertConfig(two_versions, "openvino", parent=1, samples=(image_folder,)))
    assert ir.version == 3
    config = CompareConfig(
        two_versions,
        data=str(image_folder),
        threads=(1,),
        batch_sizes=(4,),
        latency_runs=3,
        throughput_images=8,
        runtimes=("all",),
    )
    extra = torch_candidates(two_versions / "1" / "model.onnx", 1, None)
    result = compare(config, extra=extra)
    rows = {(r.version, r.runtime): r for r in result.rows}
    assert {(1, "onnxruntime"), (1, "openvino"), (2, "onnxruntime"), (3, "openvino")} <= set(rows)
    assert (1, "pytorch eager") in rows and (1, "torchscript") in rows
    assert rows[(3, "openvino")].method == "openvino fp32"
    assert rows[(3, "openvino")].bytes == sum(
        (two_versions / "3" / f).stat().st_size for f in ("model.xml", "model.bin")
    )
    for key in ((1, "openvino"), (3, "openvino"), (1, "pytorch eager"), (1, "torchscript")):
        assert rows[key].agreement == 1.0, key  # float runtimes agree with ONNX Runtime
    # Every discovered (version, runtime) is either measured or said not to be.
    assert len(result.rows) + len(result.skipped) == 7
    # A fresh process per row: the interpreter, NumPy and the runtime are at least 20 MB.
    assert all(r.peak_rss_mb is not None and r.peak_rss_mb > 20 for r in result.rows), [
        (r.runtime, r.peak_rss_mb) for r in result.rows
    ]
    assert result.cpu
    markdown = to_markdown(result)
    assert "| 1 | torchscript |" in markdown and "peak RSS MB" in markdown
    with pytest.raises(ValueError, match="runtimes must be among"):
        CompareConfig(two_versions, runtimes=("tensorflow",))
