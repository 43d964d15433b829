"""``tinyserve monitor`` against real servers, and the process metrics it reads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from live_server import Server, free_port, samples, wait_until
from tinyserve.bench.scrape import parse_metrics
from tinyserve.monitor import MonitorConfig

PROCESS_FAMILIES = (
    "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
    "process_max_fds", "python_gc_collections_total", "python_gc_objects_collected_total",
    "python_info", "tinyserve_threads",
)  # fmt: skip


def predict(server: Server, n: int) -> None:
    image = samples()[0].read_bytes()
    with httpx.Client() as client:
        for _ in range(n):
            reply = client.post(
                f"{server.url}/v1/models/fashion-cnn/predict",
                content=image,
                headers={"content-type": "image/png"},
            )
            assert reply.status_code == 200, reply.text


def test_process_metrics_are_served(serve: Callable[..., Server]) -> None:
    server = serve()
    names = {name for name, _ in parse_metrics(httpx.get(f"{server.url}/metrics").text)}
    missing = [f for f in PROCESS_FAMILIES if not any(n.startswith(f) for n in names)]
    assert missing == []
    snapshot = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    assert snapshot[("process_resident_memory_bytes", ())] > 10 * 2**20
    # the server runs an event loop, a decode pool and ONNX Runtime: more than one thread
    assert snapshot[("tinyserve_threads", ())] > 1


def test_monitor_reports_two_servers_and_an_unreachable_one(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    first, second = serve(), serve()
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "monitor.jsonl"
    monitor = subprocess.Popen(
        [sys.executable, "-m", "tinyserve", "monitor", first.url, second.url, dead,
         "--interval", "0.5", "--count", "3", "--timeout", "1", "--jsonl", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"COLUMNS": "200", "PATH": ""},
    )  # fmt: skip
    # load on the first server only, after the monitor's first round
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3)
    predict(first, 40)
    output, _ = monitor.communicate(timeout=30)
    assert monitor.returncode == 0, output
    assert "tinyserve monitor" in output and "unreachable" in output

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 9  # 3 rounds x 3 servers
    by_url: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        by_url.setdefault(str(line["url"]), []).append(line)
    busy, idle, gone = by_url[first.url], by_url[second.url], by_url[dead]
    assert all(s["ready"] for s in busy + idle) and not any(s["ready"] for s in gone)
    assert busy[0]["requests_per_s"] is None  # nothing to compare with in the first round
    assert sum(float(s["requests_per_s"] or 0) for s in busy[1:]) > 0  # type: ignore[arg-type]
    assert all(s["requests_per_s"] == 0 for s in idle[1:])  # its scrapes are not predictions
    assert any(s["p99_ms"] for s in busy[1:]) and any(s["batch_mean"] for s in busy[1:])
    assert all(float(s["rss_mb"]) > 10 for s in busy + idle)  # type: ignore[arg-type]
    assert all(s["models"] == 1 for s in busy + idle)
    assert all(s["rss_mb"] is None and str(s["status"]).startswith("unreachable") for s in gone)


def test_monitor_config_is_validated() -> None:
    for bad in ({"urls": ()}, {"urls": ("http://x",), "interval": 0},
                {"urls": ("http://x",), "count": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            MonitorConfig(**bad)  # type: ignore[arg-type]
