"""The result cache: bounds, keys, hits across front doors, reloads and versions, and a real
Redis (started on loopback) that is shared, then killed mid-run without a failed request."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from redis_server import RedisServer
from test_v2 import binary_request, bytes_tensor
from tinyserve.cache import Cached, MemoryCache, RedisCache, cache_key, open_cache
from tinyserve.errors import ConfigError

TOKEN = "cache-admin-token"


def entry(n: int = 10) -> Cached:
    return Cached((28, 28, 1), np.arange(n, dtype=np.float32))


def test_an_entry_round_trips_and_garbage_is_no_entry() -> None:
    value = entry()
    back = Cached.decode(value.encode())
    assert back is not None and back.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(back.logits, value.logits)
    assert Cached.decode(b"short") is None
    assert Cached.decode(value.encode() + b"x") is None


def test_keys_depend_on_the_bytes_and_on_the_version_fingerprint() -> None:
    assert cache_key(b"image", "v1") == cache_key(b"image", "v1")
    assert cache_key(b"image", "v1") != cache_key(b"image", "v2")
    assert cache_key(b"image", "v1") != cache_key(b"imagf", "v1")


def test_memory_cache_is_bounded_in_entries_and_in_bytes() -> None:
    async def scenario() -> None:
        cache = MemoryCache(max_entries=3, max_bytes=10_000)
        for i in range(5):
            cache.put(b"k%d" % i, entry())
        assert len(cache) == 3
        assert await cache.get(b"k0") is None  # the least recently used went first
        assert await cache.get(b"k4") is not None
        small = MemoryCache(max_entries=100, max_bytes=300)
        for i in range(10):
            small.put(b"k%d" % i, entry())
        assert small.size_bytes <= 300 and len(small) == 300 // (3 + 12 + 40)
        small.put(b"huge", entry(1000))  # larger than the whole cache: not kept
        assert await small.get(b"huge") is None
        assert (cache.stats.hits, cache.stats.misses) == (1, 1)

    asyncio.run(scenario())


def test_a_cache_setting_that_is_not_one_says_what_is() -> None:
    assert open_cache("off") is None
    assert isinstance(open_cache("memory"), MemoryCache)
    with pytest.raises(ConfigError, match="off, memory or redis://"):
        open_cache("memcached://x")


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    (repo / "fashion-cnn" / "config.toml").write_text('versions = "all"\n')
    return repo


def _post(client: TestClient, path: str, body: bytes) -> tuple[dict[str, object], str]:
    response = client.post(path, content=body, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json(), response.headers.get("x-cache", "")


def test_a_hit_skips_decode_and_inference_and_says_so(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = app_client(repo=_repo(tmp_path), cache="memory")
    image = (SAMPLES / "0000_ankle-boot.png").read_bytes()
    first, state = _post(client, "/predict", image)
    assert state == "miss" and first["cached"] is False
    second, state = _post(client, "/predict", image)
    assert state == "hit" and second["cached"] is True
    assert second["predictions"] == first["predictions"]
    assert second["image_shape"] == first["image_shape"]
    assert second["latency_ms"]["inference"] == 0.0  # type: ignore[index]
    # top_k is applied to the cached logits: another top_k is still a hit
    third = client.post("/predict?top_k=2", content=image, headers={"content-type": "image/png"})
    assert third.headers["x-cache"] == "hit" and len(third.json()["predictions"]) == 2
    # another version has another answer: a miss
    other = client.post("/predict?version=1", content=image, headers={"content-type": "image/png"})
    assert other.headers["x-cache"] == "miss" and other.json()["version"] == 1
    metrics = client.get("/metrics").text
    assert 'tinyserve_cache_requests_total{result="hit"} 2.0' in metrics
    assert 'tinyserve_cache_requests_total{result="miss"} 2.0' in metrics


def test_batches_mix_hits_and_misses_and_v2_bytes_are_cached(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = app_client(repo=_repo(tmp_path), cache="memory")
    images = [p.read_bytes() for p in sorted(SAMPLES.glob("*.png"))[:3]]
    _post(client, "/predict", images[1])  # one of the three is cached beforehand
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    files.append(("images", ("bad.png", b"not an image", "image/png")))
    batch = client.post("/v1/models/fashion-cnn/predict/batch", files=files).json()
    assert batch["cached_images"] == 1 and batch["succeeded"] == 3 and batch["failed"] == 1
    uncached = app_client(repo=_repo(tmp_path / "b")).post(
        "/v1/models/fashion-cnn/predict/batch", files=files
    )
    assert [r["predictions"] for r in batch["results"]] == [
        r["predictions"] for r in uncached.json()["results"]
    ]
    assert batch["results"][3]["error"]["code"] == "invalid_image"
    again = client.post("/v1/models/fashion-cnn/predict/batch", files=files[:3]).json()
    assert again["cached_images"] == 3 and again["cached"] is True
    encoded = bytes_tensor([images[0]])
    header = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(encoded)}}]}  # fmt: skip
    body, headers = binary_request(header, encoded)
    answers = []
    for _ in range(2):
        v2 = client.post("/v2/models/fashion-cnn/infer", content=body, headers=headers)
        assert v2.status_code == 200, v2.text
        answers.append(v2.json()["outputs"])
    assert answers[0] == answers[1]
    stats = client.app.context.cache.stats  # type: ignore[attr-defined]
    assert stats.hits >= 5  # 1 in the batch, 3 in the second batch, 1 on V2


def test_a_reload_with_another_file_never_serves_the_old_answer(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL / "1", repo / "fashion-cnn" / "1")
    client = app_client(repo=repo, cache="memory", admin_token=TOKEN)
    image = (SAMPLES / "0000_ankle-boot.png").read_bytes()
    _post(client, "/predict", image)
    assert _post(client, "/predict", image)[1] == "hit"
    # the same version number, another file (the INT8 one): its answers are not the old ones
    shutil.copy(BUNDLED_MODEL / "2" / "model.onnx", repo / "fashion-cnn" / "1" / "model.onnx")
    reloaded = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert reloaded.status_code == 200, reloaded.text
    assert _post(client, "/predict", image)[1] == "miss"
    assert _post(client, "/predict", image)[1] == "hit"


def test_redis_is_shared_between_servers(
    app_client: Callable[..., TestClient], tmp_path: Path, redis_server: RedisServer
) -> None:
    image = (SAMPLES / "0001_pullover.png").read_bytes()
    one = app_client(repo=_repo(tmp_path / "one"), cache=redis_server.url)
    two = app_client(repo=_repo(tmp_path / "two"), cache=redis_server.url)
    first, state = _post(one, "/predict", image)
    assert state == "miss"
    for _ in range(50):  # the write is not awaited by the request
        answer, state = _post(two, "/predict", image)
        if state == "hit":
            break
    assert state == "hit", "the second server never found the first one's answer in Redis"
    assert answer["predictions"] == first["predictions"]


def test_redis_going_down_mid_run_fails_no_request(
    app_client: Callable[..., TestClient], tmp_path: Path, redis_server: RedisServer
) -> None:
    client = app_client(repo=_repo(tmp_path), cache=redis_server.url)
    images = [p.read_bytes() for p in sorted(SAMPLES.glob("*.png"))]
    statuses = []
    for i in range(60):
        if i == 20:
            redis_server.stop()
        if i == 45:
            redis_server.start()
        response = client.post(
            "/predict", content=images[i % len(images)], headers={"content-type": "image/png"}
        )
        statuses.append(response.status_code)
    assert statuses == [200] * 60
    assert client.app.context.cache.stats.errors >= 1  # type: ignore[attr-defined]
    assert 'tinyserve_cache_requests_total{result="error"}' in client.get("/metrics").text


def test_a_slow_redis_costs_at_most_its_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        import socket

        # A server that accepts connections and never answers: Redis hung.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        cache = RedisCache(f"redis://127.0.0.1:{port}/0", timeout_s=0.05, retry_s=60)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await cache.get(b"key") is None
        assert loop.time() - started < 1.0
        started = loop.time()
        assert await cache.get(b"key") is None  # down: not tried again for retry_s
        assert loop.time() - started < 0.01
        assert cache.stats.errors == 1 and not cache.available
        await cache.close()
        listener.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_real_server_caches_in_redis(serve: Callable[..., object], tmp_path: Path,
                                       redis_server: RedisServer) -> None:  # fmt: skip
    import httpx

    repo = _repo(tmp_path)
    server = serve("--cache", redis_server.url, repo=repo)
    url = f"{server.url}/predict"  # type: ignore[attr-defined]
    image = (SAMPLES / "0002_trouser.png").read_bytes()
    states = []
    deadline = time.monotonic() + 15  # a slow first connection marks Redis down for 2 s
    while time.monotonic() < deadline:
        response = httpx.post(url, content=image, headers={"content-type": "image/png"})
        assert response.status_code == 200
        states.append(response.headers["x-cache"])
        if states[-1] == "hit":
            break
        time.sleep(0.05)
    assert states[0] == "miss" and states[-1] == "hit"
    redis_server.stop()
    for _ in range(10):
        response = httpx.post(url, content=image, headers={"content-type": "image/png"})
        assert response.status_code == 200 and response.headers["x-cache"] == "miss"
