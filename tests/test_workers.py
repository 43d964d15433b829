"""``tinyserve serve --workers N``: a real two-worker server, and the pieces it is made of."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from live_server import TOKEN, Server, samples, wait_until
from tinyserve.cli import workers
from tinyserve.errors import ConfigError
from tinyserve.metrics import Metrics, merge_stats, summarize
from tinyserve.peers import Peers
from tinyserve.settings import RunConfig, ServerConfig

BODY = samples()[0].read_bytes()


def _predict_fresh(url: str, n: int) -> list[dict[str, object]]:
    """``n`` predictions, each on a new connection, so the kernel spreads them over workers."""
    answers = []
    for _ in range(n):
        response = httpx.post(f"{url}/predict", content=BODY, headers={"connection": "close"})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def _counter(metrics: str, name: str, labels: str) -> float:
    found = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_two_workers_share_one_port_and_count_together(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "2")
    # Ready means one worker serves; /stats waits for the other through its Unix socket.
    assert len(httpx.get(f"{server.url}/stats", timeout=60).json()["workers"]) == 2
    _predict_fresh(server.url, 24)
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["total_requests"] == 24
    assert stats["models"]["fashion-cnn"]["total_requests"] == 24
    per_worker = {w["worker"]: w["total_requests"] for w in stats["workers"]}
    assert sorted(per_worker) == [0, 1]
    assert sum(per_worker.values()) == 24
    assert min(per_worker.values()) > 0, per_worker  # SO_REUSEPORT spread the connections
    metrics = httpx.get(f"{server.url}/metrics").text
    assert _counter(metrics, "tinyserve_requests_total", 'route="/predict",status="200"') == 24
    assert _counter(metrics, "tinyserve_batch_size_count", 'model="fashion-cnn"') >= 24
    assert _counter(metrics, "tinyserve_model_loaded", 'model="fashion-cnn",version="2"') == 1
    pids = [w["pid"] for w in stats["workers"]]
    assert server.stop() == 0
    for pid in pids:  # every worker stopped with the supervisor
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_a_reload_reaches_every_worker(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve("--workers", "2")
    assert {a["version"] for a in _predict_fresh(server.url, 8)} == {2}
    model = tmp_path / "repo" / "fashion-cnn"
    shutil.copytree(model / "1", model / "3")
    auth = {"authorization": f"Bearer {TOKEN}"}
    response = httpx.post(f"{server.url}/admin/reload", headers=auth, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["default_version"] == 3
    # Whichever worker each new connection reaches, it serves the new version.
    assert {a["version"] for a in _predict_fresh(server.url, 16)} == {3}
    stats = httpx.get(f"{server.url}/stats").json()
    assert all(w["total_requests"] > 0 for w in stats["workers"]), stats["workers"]
    # SIGHUP to the supervisor reloads every worker too.
    shutil.copytree(model / "1", model / "4")
    server.process.send_signal(signal.SIGHUP)

    def everywhere_4() -> bool:
        return {a["version"] for a in _predict_fresh(server.url, 8)} == {4}

    wait_until(everywhere_4, 30)
    assert {a["version"] for a in _predict_fresh(server.url, 16)} == {4}


@pytest.mark.slow
def test_a_revoked_key_stops_working_in_every_worker(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    from tinyserve.auth import create_key, revoke_key

    keys = tmp_path / "keys.json"
    _, secret = create_key(keys, "alice")
    server = serve("--workers", "2", env={"TINYSERVE_API_KEYS": str(keys)})
    alice = {"authorization": f"Bearer {secret}", "connection": "close"}

    def statuses() -> set[int]:
        return {
            httpx.post(f"{server.url}/predict", content=BODY, headers=alice).status_code
            for _ in range(16)
        }

    assert statuses() == {200}
    revoke_key(keys, "alice")
    auth = {"authorization": f"Bearer {TOKEN}"}
    response = httpx.post(f"{server.url}/admin/keys/reload", headers=auth)
    assert response.status_code == 200, response.text
    assert statuses() == {401}  # whichever worker each connection reached


@pytest.mark.slow
def test_sigterm_drains_every_worker(serve: Callable[..., Server]) -> None:
    # A long batching delay keeps requests waiting in both workers when SIGTERM arrives.
    server = serve("--workers", "2", "--max-delay-ms", "3000", "--max-batch-size", "64")

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            tasks = [
                asyncio.create_task(client.post(f"{server.url}/predict", content=BODY))
                for _ in range(16)
            ]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the workers' queues, added up
                metrics = (await client.get(f"{server.url}/metrics")).text
                if _counter(metrics, "tinyserve_queue_depth", 'model="fashion-cnn"') == 16:
                    break
                await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 16
    assert server.process.wait(30) == 0


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_its_counts_kept(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "2")
    _predict_fresh(server.url, 12)
    before = httpx.get(f"{server.url}/stats").json()["workers"]
    victim = max(before, key=lambda w: w["total_requests"])
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        try:
            now = httpx.get(f"{server.url}/stats", timeout=5).json()["workers"]
        except httpx.HTTPError:
            return False
        return len(now) == 2 and victim["pid"] not in {w["pid"] for w in now}

    wait_until(replaced, 60)
    _predict_fresh(server.url, 4)
    metrics = httpx.get(f"{server.url}/metrics").text
    # The killed worker's counts stay in its files: /metrics never goes backwards.
    assert _counter(metrics, "tinyserve_requests_total", 'route="/predict",status="200"') == 16
    assert "worker 0 exited" in server.output() or "worker 1 exited" in server.output()


def test_merge_stats_adds_up_workers() -> None:
    first, second = Metrics(), Metrics()
    for seconds in (0.001, 0.002, 0.003):
        first.observe_request("/predict", 200, seconds, "m")
    second.observe_request("/predict", 503, 0.010, "m")
    parts = [first.snapshot(), {**second.snapshot(), "worker": 1}]
    parts[1]["started"] = parts[0]["started"] - 5  # the older worker sets the uptime
    summary = summarize(merge_stats(parts))
    assert summary["total_requests"] == 4
    assert summary["failed_requests"] == 1
    assert summary["models"]["m"] == {
        "total_requests": 4,
        "failed_requests": 1,
        "average_latency_ms": 4.0,
    }
    assert summary["latency_window"] == 4
    assert summary["p99_latency_ms"] > 9
    assert summary["uptime_seconds"] >= 5
    assert summary["requests_by_status"] == {"200": 3, "503": 1}
    assert [w["total_requests"] for w in summary["workers"]] == [3, 1]
    # One worker's own summary is what /stats answered before workers existed.
    assert "workers" not in first.stats()
    assert first.stats()["total_requests"] == 3


def test_peers_report_a_sibling_that_does_not_answer(tmp_path: Path) -> None:
    peers = Peers(tmp_path, index=0, count=2, secret="s" * 32)
    assert peers.siblings == (1,)
    assert peers.is_forwarded({"x-tinyserve-peer": "s" * 32})
    assert not peers.is_forwarded({"x-tinyserve-peer": "t" * 32})
    assert not peers.is_forwarded({})
    [answer] = asyncio.run(peers.forward("GET", "/stats", {}, timeout_s=2))
    assert (answer.worker, answer.status, answer.running) == (1, 0, False)
    assert b"worker 1 is not running" in answer.body
    with pytest.raises(ValueError, match="outside"):
        Peers(tmp_path, index=2, count=2, secret="s" * 32)


def test_workers_setting_is_checked() -> None:
    assert RunConfig(workers="auto").workers == "auto"
    assert RunConfig(workers="4").workers == "4"
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="workers must be"):
            RunConfig(workers=bad)


def test_auto_workers_follows_cores_and_model_cost(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from conftest import BUNDLED_MODEL

    config = ServerConfig(repo=BUNDLED_MODEL.parent)
    monkeypatch.setattr(workers, "single_image_ms", lambda path: 0.1)
    assert workers.auto_workers(config, cores=4) == 4  # HTTP-bound: one worker per core
    assert workers.auto_workers(config, cores=1) == 1
    monkeypatch.setattr(workers, "single_image_ms", lambda path: 8.0)
    assert workers.auto_workers(config, cores=4) == 1  # compute-bound: ONNX Runtime's threads
    with pytest.raises(ConfigError, match="no model"):
        workers.auto_workers(ServerConfig(repo=tmp_path), cores=4)


def test_single_image_ms_measures_the_model() -> None:
    from conftest import BUNDLED_MODEL

    assert 0 < workers.single_image_ms(BUNDLED_MODEL / "2" / "model.onnx") < 1000


def test_workers_share_out_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    shared = workers._shared_threads(ServerConfig(), 4)
    assert shared.engine.intra_op_threads == 2
    assert workers._shared_threads(ServerConfig(), 16).engine.intra_op_threads == 1
    pinned = workers._shared_threads(shared, 2)  # an explicit --threads is kept
    assert pinned.engine.intra_op_threads == 2
