"""The engine microbenchmark (``tinyserve bench model``) and the latency statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SAMPLES
from tinyserve.bench.model import ModelBenchConfig, bench_model, time_calls
from tinyserve.bench.stats import LatencyHistogram, exact_summary_ms
from tinyserve.cli import app


def test_histogram_percentiles_are_within_one_percent() -> None:
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=-6, sigma=1.0, size=20_000)
    histogram = LatencyHistogram()
    for value in samples:
        histogram.record(float(value))
    qs = [50.0, 90.0, 99.0, 99.9]
    estimated = histogram.percentiles(qs)
    for q, exact in zip(qs, np.percentile(samples, qs, method="inverted_cdf"), strict=True):
        assert estimated[f"p{q:g}"] == pytest.approx(exact, rel=0.011)
    assert histogram.max == samples.max() and histogram.min == samples.min()
    assert histogram.total / histogram.count == pytest.approx(samples.mean())


def test_histogram_merge_summary_and_cdf() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    for ms in (1, 2, 3):
        a.record(ms / 1000)
    b.record(0.5)
    a.merge(b)
    summary = a.summary_ms()
    assert summary["count"] == 4 and summary["max"] == 500.0 and summary["min"] == 1.0
    assert summary["p50"] == pytest.approx(2.0, rel=0.011)
    cdf = a.cdf_ms()
    assert [f for _, f in cdf] == sorted(f for _, f in cdf) and cdf[-1] == (500.0, 1.0)
    empty = LatencyHistogram()
    assert empty.summary_ms() == {"count": 0} and empty.cdf_ms() == []
    assert math.isnan(empty.percentiles([50])["p50"])


def test_exact_summary_orders_percentiles() -> None:
    summary = exact_summary_ms(np.array([0.001, 0.002, 0.003, 0.010]))
    assert summary["min"] == 1.0 and summary["max"] == 10.0 and summary["count"] == 4
    assert summary["p50"] <= summary["p95"] <= summary["p99"] <= summary["max"]


def test_time_calls_honours_runs_and_budget() -> None:
    calls: list[int] = []
    times = time_calls(calls.append, warmup=2, min_runs=3, max_runs=5, budget_s=10.0)
    assert len(times) == 5 and calls == list(range(7)) and (times >= 0).all()
    calls.clear()
    times = time_calls(calls.append, warmup=0, min_runs=3, max_runs=1000, budget_s=0.0)
    assert len(times) == 3 and calls == [0, 1, 2]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="batch sizes"):
        ModelBenchConfig("m", batch_sizes=(0,))
    with pytest.raises(ValueError, match="thread"):
        ModelBenchConfig("m", threads=())
    with pytest.raises(ValueError, match="seconds"):
        ModelBenchConfig("m", seconds=0)


def test_bench_model_reports_every_step(tiny_repo: Path) -> None:
    config = ModelBenchConfig(
        str(tiny_repo / "colors"),
        batch_sizes=(1, 4),
        threads=(1, 2),
        seconds=0.05,
        warmup_runs=1,
        min_runs=3,
        images=SAMPLES,
    )
    seen: list[str] = []
    report = bench_model(config, progress=seen.append)
    data = json.loads(report.to_json())
    assert data["model"] == "colors" and data["version"] == 1
    assert data["input_shape"] == [16, 16, 3] and "images from" in data["data"]
    assert [(r["threads"], r["batch_size"]) for r in data["results"]] == [
        (1, 1),
        (1, 4),
        (2, 1),
        (2, 4),
    ]
    for r in data["results"]:
        lat = r["latency_ms"]
        assert r["runs"] >= 3 and lat["count"] == r["runs"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        # throughput is batch / mean latency; the mean is printed to 0.1 us, near 1% of a
        # batch-1 run of this tiny model on a fast CPU, so allow exactly that rounding
        slowest, fastest = (r["batch_size"] * 1000 / (lat["mean"] + d) for d in (5e-5, -5e-5))
        assert slowest - 0.005 <= r["throughput_ips"] <= fastest + 0.005
        assert r["peak_rss_mb"] > 0
    assert set(data["load"]) == {"1", "2"} and len(seen) == 6


def test_bench_model_cli_writes_json(tiny_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "model", str(tiny_repo / "colors"), "--batch-sizes", "2", "--threads", "1",
         "--seconds", "0.02", "--min-runs", "2", "--json", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == json.loads(out.read_text())
    assert printed["results"][0]["batch_size"] == 2


def test_bench_model_cli_rejects_a_bad_list(tiny_repo: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "model", str(tiny_repo), "--batch-sizes", "1,x"])
    assert result.exit_code != 0
    assert "--batch-sizes takes numbers" in str(result.exception)
