"""The scripts in benchmarks/ run and measure what they say (small sizes; no timing claims)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BUNDLED_MODEL

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_servers  # noqa: E402
import large_photo_decode  # noqa: E402
import serve_modes  # noqa: E402
import server_cold_start  # noqa: E402


def test_large_photo_paths_agree_and_are_timed() -> None:
    photo = large_photo_decode.make_photo(
        BENCHMARKS.parent / "samples/photos/cat.png", (1600, 1200), 90, grain=3
    )
    result = large_photo_decode.measure(photo, runs=1)
    assert result["bytes"] == len(photo)
    assert result["plain_pil_ms"] > 0 and result["tinyserve_ms"] > 0
    assert result["speedup"] == pytest.approx(
        result["plain_pil_ms"] / result["tinyserve_ms"], rel=0.02
    )
    # the draft-mode picture is the same picture: a fraction of a grey level apart on average
    assert result["mean_abs_pixel_difference"] < 2.0


@pytest.mark.slow
def test_cold_start_reaches_a_prediction_and_reads_memory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "fashion-cnn").symlink_to(BUNDLED_MODEL)
    image = next((BENCHMARKS.parent / "samples/fashion").glob("*.png")).read_bytes()
    run = server_cold_start.one_run(repo, image, requests=20, extra=["--threads", "1"])
    assert 0 < run["cold_start_s"] < 60
    assert 20 < run["rss_mb"] <= run["peak_rss_mb"] < 2000


def test_stopping_a_server_stops_the_workers_it_started() -> None:
    # a parent that leaves a grandchild behind, as LitServe's workers do
    process = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; wait"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    with process.stdout:
        worker = int(process.stdout.readline())
    compare_servers.stop_group(process)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the worker outlived its server")


def test_comparison_table_gives_ratios_and_the_bare_ort_share() -> None:
    def rep(rps: float) -> list[dict[str, object]]:
        return [
            {"concurrency": 32, "ok_rps": rps, "requests": 10, "ok": 10,
             "latency_ms": {"p50": 1.0, "p99": 2.0}}
        ]  # fmt: skip

    results = [
        {
            "model": "m",
            "image": "x.png",
            "servers": {
                "tinyserve": {"body": "multipart", "reps": [rep(90), rep(100), rep(110)]},
                "fastapi": {"body": "multipart", "reps": [rep(40), rep(50), rep(60)]},
            },
            "bare_ort": [{"batch_size": 32, "throughput_ips": 120.0, "latency_ms": {"p50": 5.0}}],
        }
    ]
    text = compare_servers.markdown(results)
    assert "| tinyserve | multipart | 32 | 100 | 1.00 |" in text
    assert "| fastapi | multipart | 32 | 50 | 0.50 |" in text
    assert "c=32: 83%" in text


def test_comparison_states_each_goal_with_its_ratio() -> None:
    def rep(rps_1: float, p50_1: float, rps_64: float) -> list[dict[str, object]]:
        return [
            {"concurrency": 1, "ok_rps": rps_1, "requests": 10, "ok": 10,
             "latency_ms": {"p50": p50_1, "p99": 2.0}},
            {"concurrency": 64, "ok_rps": rps_64, "requests": 10, "ok": 10,
             "latency_ms": {"p50": 9.0, "p99": 20.0}},
        ]  # fmt: skip

    result = {
        "model": "fashion-cnn:2",
        "int8": True,
        "image": "x.png",
        "servers": {
            "tinyserve": {"body": "multipart", "reps": [rep(1000, 0.5, 3000)]},
            "tinyserve (raw)": {"body": "raw", "reps": [rep(1000, 0.5, 4000)]},
            "tinyserve (v2)": {"body": "v2", "reps": [rep(900, 0.6, 3000)]},
            "fastapi": {"body": "multipart", "reps": [rep(900, 0.6, 2000)]},
        },
        "bare_ort": [{"batch_size": 64, "throughput_ips": 10000.0, "latency_ms": {"p50": 5.0}}],
    }
    lines = compare_servers.goals(result)
    text = "\n".join(lines)
    # INT8: the share goal is 50 %; raw reaches 40 % of bare ORT's 10,000 images/s.
    share = "| tinyserve (raw): best req/s ≥ 50% of bare ORT's best (10,000 img/s) |"
    assert f"{share} 4,000 | 0.40 | no |" in text
    assert "| V2 within 10 % of raw at c=64 | 3,000 vs 4,000 | 0.75 | no |" in text
    assert "| c=1 p50 ≤ 0.4 ms (raw) | 0.50 ms | 1.25 | no |" in text
    assert "| c=1 p50 below the FastAPI app's | 0.50 vs 0.60 ms | 0.83 | yes |" in text


@pytest.mark.slow
def test_production_costs_measures_every_configuration() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "production_costs.py"), "--rounds", "1",
         "--duration", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "µs" not in line
    ]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert names == ["off", "cache memory (hits)", "api keys", "traffic = {2 = 100}"]
    assert all(float(row.split(" | ")[2]) > 0 for row in rows)


def test_reliability_gives_the_server_and_the_open_loop_cpus_of_their_own() -> None:
    import reliability

    cpus = os.sched_getaffinity(0)
    split = reliability.split_cpus()
    if len(cpus) < 2:
        assert split is None
        return
    assert split is not None
    server, load = split
    assert server and load and not server & load and server | load == cpus


def test_reliability_before_needs_a_tinyserve_tree(tmp_path: Path) -> None:
    answer = subprocess.run(
        [sys.executable, str(BENCHMARKS / "reliability.py"), "--before", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert answer.returncode != 0 and "has no src/tinyserve" in answer.stderr


def test_serve_modes_reads_cpu_time_and_wrk_latencies() -> None:
    assert serve_modes.tree_cpu_s(os.getpid()) > 0
    assert serve_modes._ms("710.00us") == pytest.approx(0.71)
    assert serve_modes._ms("1.23ms") == pytest.approx(1.23)
    assert serve_modes._ms("1.50s") == pytest.approx(1500.0)


@pytest.mark.slow
def test_reuseport_spreads_connections_over_both_processes() -> None:
    shared, own = serve_modes.spread(False), serve_modes.spread(True)
    assert sum(shared) == sum(own) == 64
    assert min(own) > 0  # hashed over both sockets: one left empty has odds of 2**-63
