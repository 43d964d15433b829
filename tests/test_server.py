"""Tests against a real ``tinyserve serve`` process on a free loopback port."""

from __future__ import annotations

import asyncio
import io
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import BUNDLED_MODEL, SAMPLES
from live_server import TOKEN, Server, samples, wait_until
from tinyserve.engine import Engine
from tinyserve.imaging import load_image
from tinyserve.repository import next_version, resolve

pytestmark = pytest.mark.slow


def test_serves_predictions_and_never_loads_torch(serve: Callable[..., Server]) -> None:
    server = serve()
    response = httpx.post(f"{server.url}/predict", content=samples()[0].read_bytes())
    assert response.status_code == 200
    assert response.json()["label"] == "Ankle boot"
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "site-packages/torch/" not in maps
    # TIFF's Pillow plugin is not loaded at start-up; the first TIFF upload still decodes.
    tiff = io.BytesIO()
    Image.open(samples()[0]).save(tiff, "TIFF")
    response = httpx.post(f"{server.url}/predict", content=tiff.getvalue())
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "Ankle boot"


async def _fire(url: str, bodies: list[bytes], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(body: bytes) -> httpx.Response:
            async with semaphore:
                return await client.post(url, content=body, params={"top_k": 3})

        return await asyncio.gather(*(one(b) for b in bodies))


def _batch_sizes(metrics: str) -> dict[str, float]:
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("tinyserve_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
    return counts


def test_concurrent_clients_share_batches_and_get_their_own_answers(
    serve: Callable[..., Server],
) -> None:
    server = serve("--max-delay-ms", "2")
    paths = samples() * 16
    engine = Engine(resolve(BUNDLED_MODEL).path)  # the version the server serves
    expected = {
        p: [x.class_id for x in engine.predict(load_image(p, engine.manifest.input)[None], 3)[0]]
        for p in samples()
    }
    responses = asyncio.run(_fire(f"{server.url}/predict", [p.read_bytes() for p in paths], 32))
    for path, response in zip(paths, responses, strict=True):
        assert response.status_code == 200
        assert [p["class_id"] for p in response.json()["predictions"]] == expected[path]
    buckets = _batch_sizes(httpx.get(f"{server.url}/metrics").text)
    assert buckets["+Inf"] < len(paths), "every request ran alone: no batching happened"
    assert buckets["1.0"] < buckets["+Inf"]


def test_hot_reload_under_load_drops_nothing(serve: Callable[..., Server], tmp_path: Path) -> None:
    repo = tmp_path / "reload-repo"
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    server = serve(repo=repo)
    body = samples()[0].read_bytes()
    stop = threading.Event()
    results: list[tuple[int, int]] = []

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(f"{server.url}/predict", content=body)
                results.append((r.status_code, r.json().get("version", -1)))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    wait_until(lambda: len(results) > 0)  # the old version has answered, however slow the CPU
    served, new = resolve(repo / "fashion-cnn").version, next_version(repo / "fashion-cnn")
    shutil.copytree(repo / "fashion-cnn" / "1", repo / "fashion-cnn" / str(new))
    reload = httpx.post(
        f"{server.url}/admin/models/fashion-cnn/reload",
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    wait_until(lambda: any(v == new for _, v in results[-4:]))
    stop.set()
    for w in workers:
        w.join()
    assert reload.status_code == 200, reload.text
    assert results and all(status == 200 for status, _ in results), Counter(s for s, _ in results)
    versions = [v for _, v in results]
    assert versions[0] == served and versions[-1] == new
    assert httpx.post(f"{server.url}/predict", content=body).json()["version"] == new


def test_sighup_reloads(serve: Callable[..., Server], tmp_path: Path) -> None:
    repo = tmp_path / "hup-repo"
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    server = serve(repo=repo)
    body = samples()[0].read_bytes()
    version, new = resolve(repo / "fashion-cnn").version, next_version(repo / "fashion-cnn")
    shutil.copytree(repo / "fashion-cnn" / "1", repo / "fashion-cnn" / str(new))
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while version != new and time.monotonic() < deadline:
        version = httpx.post(f"{server.url}/predict", content=body).json()["version"]
        time.sleep(0.05)
    assert version == new


def test_sigterm_finishes_every_admitted_request(serve: Callable[..., Server]) -> None:
    # A long batching delay keeps requests waiting inside the server when SIGTERM arrives.
    server = serve("--max-delay-ms", "3000", "--max-batch-size", "64")
    body = samples()[0].read_bytes()

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            tasks = [
                asyncio.create_task(client.post(f"{server.url}/predict", content=body))
                for _ in range(16)
            ]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until all 16 wait inside the server
                metrics = (await client.get(f"{server.url}/metrics")).text
                if 'tinyserve_queue_depth{model="fashion-cnn"} 16.0' in metrics:
                    break
                await asyncio.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 16
    assert server.process.wait(20) == 0


def test_remote_predict_through_the_cli(serve: Callable[..., Server]) -> None:
    server = serve()
    result = subprocess.run(
        [sys.executable, "-m", "tinyserve", "predict", server.url, str(SAMPLES), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('"label":"Ankle boot"') >= 1
    assert len(result.stdout.splitlines()) == 10
