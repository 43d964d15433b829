"""In-process tests of the HTTP API (TestClient runs the lifespan)."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES, color_image, png_claiming_size
from tinyserve.batcher import BatchConfig
from tinyserve.errors import ModelNotReady
from tinyserve.imaging import ImageLimits
from tinyserve.registry import ModelRegistry
from tinyserve.repository import resolve

TOKEN = "s3cret-token"
BOOT = next(SAMPLES.glob("*ankle-boot.png")).read_bytes()
SERVED_VERSION = resolve(BUNDLED_MODEL).version  # pinned in config.toml, else the highest


def png(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_repo: Path) -> Path:
    """Two models: the bundled grey fashion-cnn and the tiny RGB 'colors' model."""
    root = tmp_path_factory.mktemp("serve-repo")
    shutil.copytree(BUNDLED_MODEL, root / "fashion-cnn")
    shutil.copytree(tiny_repo / "colors", root / "colors")
    return root


@pytest.fixture
def make_client(repo: Path, app_client: Callable[..., TestClient]) -> Callable[..., TestClient]:
    return lambda **overrides: app_client(
        **{"repo": repo, "default_model": "fashion-cnn", **overrides}
    )


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(admin_token=TOKEN)


def assert_prediction(body: dict[str, Any], label: str = "Ankle boot") -> None:
    assert body["label"] == label
    assert body["model"] == "fashion-cnn" and body["version"] == SERVED_VERSION
    assert 0.0 < body["confidence"] <= 1.0
    assert body["predictions"][0] == {
        "label": body["label"],
        "class_id": body["class_id"],
        "class_name": body["label"],
        "confidence": body["confidence"],
    }
    assert set(body["latency_ms"]) == {"decode", "queue", "inference", "total"}


def test_raw_bytes_like_seed_000(client: TestClient) -> None:
    response = client.post("/predict", content=BOOT, headers={"content-type": "image/png"})
    assert response.status_code == 200
    body = response.json()
    assert_prediction(body)
    assert len(body["predictions"]) == 5
    octet = client.post(
        "/predict", content=BOOT, headers={"content-type": "application/octet-stream"}
    )
    assert octet.json()["label"] == "Ankle boot"


def test_base64_json_like_seed_001(client: TestClient) -> None:
    response = client.post("/predict", json={"image": b64(BOOT), "top_k": 3})
    assert response.status_code == 200
    assert_prediction(response.json())
    assert len(response.json()["predictions"]) == 3
    samples = sorted(SAMPLES.glob("*.png"))[:3]
    batch = client.post(
        "/predict/batch",
        json={
            "images": [{"image": b64(p.read_bytes())} for p in samples[:2]]
            + [b64(samples[2].read_bytes())],
            "top_k": 2,
        },
    )
    assert batch.status_code == 200
    body = batch.json()
    assert (body["total"], body["succeeded"], body["failed"]) == (3, 3, 0)
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    assert all(len(r["predictions"]) == 2 and r["error"] is None for r in body["results"])


def test_multipart_like_seed_002(client: TestClient) -> None:
    response = client.post("/infer", files={"file": ("boot.png", BOOT, "image/png")})
    assert response.status_code == 200
    assert_prediction(response.json())
    assert "inference_time_ms" in response.json()
    samples = sorted(SAMPLES.glob("*.png"))[:3]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in samples]
    batch = client.post("/infer/batch", files=files)
    assert batch.status_code == 200
    body = batch.json()
    assert body["total"] == 3 and body["succeeded"] == 3
    assert [r["filename"] for r in body["results"]] == [p.name for p in samples]
    for result, path in zip(body["results"], samples, strict=True):
        slug = path.stem.split("_", 1)[1]
        assert result["predictions"][0]["label"].lower().replace("/", "-").replace(" ", "-") == slug


def test_batch_results_equal_single_results(client: TestClient) -> None:
    samples = sorted(SAMPLES.glob("*.png"))
    singles = [
        client.post("/predict", content=p.read_bytes(), params={"top_k": 3}).json()["predictions"]
        for p in samples
    ]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in samples]
    batch = client.post("/v1/models/fashion-cnn/predict/batch?top_k=3", files=files).json()
    for single, result in zip(singles, batch["results"], strict=True):
        assert [p["class_id"] for p in single] == [p["class_id"] for p in result["predictions"]]
        np.testing.assert_allclose(
            [p["confidence"] for p in single],
            [p["confidence"] for p in result["predictions"]],
            rtol=1e-5,
            atol=1e-6,  # a batch may run other kernels than one image; tiny classes differ most
        )


def test_one_bad_image_fails_only_its_item(client: TestClient) -> None:
    files = [
        ("files", ("good.png", BOOT, "image/png")),
        ("files", ("bad.png", b"not an image", "image/png")),
    ]
    body = client.post("/infer/batch", files=files).json()
    assert (body["succeeded"], body["failed"]) == (1, 1)
    assert body["results"][1]["error"]["code"] == "invalid_image"
    assert body["results"][1]["predictions"] is None


def test_canonical_routes_versions_and_model_listing(client: TestClient) -> None:
    red = png(color_image("red"))
    response = client.post("/v1/models/colors/predict?version=1&top_k=1", content=red)
    assert response.status_code == 200
    assert response.json()["label"] == "red" and response.json()["model"] == "colors"
    models = client.get("/v1/models").json()
    assert [m["name"] for m in models["models"]] == ["colors", "fashion-cnn"]
    info = client.get("/v1/models/colors").json()
    assert info["versions"][0]["input"]["shape"] == [-1, 16, 16, 3]
    assert info["class_names"] == ["blue", "green", "red"]
    seed_info = client.get("/model/info").json()
    assert seed_info["num_classes"] == 10 and seed_info["input_shape"] == [-1, 28, 28, 1]


def test_health_metrics_and_stats(client: TestClient) -> None:
    client.post("/predict", content=BOOT)
    client.post("/predict", content=b"")
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").json()["status"] == "ready"
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'tinyserve_requests_total{route="/predict",status="200"} 1.0' in text
    assert 'tinyserve_requests_total{route="/predict",status="400"} 1.0' in text
    assert 'tinyserve_batch_size_count{model="fashion-cnn"} 1.0' in text
    assert 'tinyserve_stage_seconds_count{model="fashion-cnn",stage="inference"} 1.0' in text
    assert 'tinyserve_model_loaded{model="colors",version="1"} 1.0' in text
    assert "tinyserve_queue_depth" in text
    stats = client.get("/stats").json()
    for key in (
        "uptime_seconds",
        "total_requests",
        "successful_requests",
        "failed_requests",
        "success_rate",
        "average_latency_ms",
        "p50_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "requests_per_second",
    ):
        assert key in stats
    assert stats["total_requests"] == 2 and stats["failed_requests"] == 1
    assert stats["success_rate"] == 50.0
    assert stats["models"]["fashion-cnn"]["total_requests"] == 2
    assert stats["models"]["fashion-cnn"]["failed_requests"] == 1


def test_docs_and_openapi(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/models/{model}/predict" in spec["paths"]
    assert "swagger-ui" in client.get("/docs").text


def _cmyk_jpeg() -> bytes:
    return png(Image.new("CMYK", (28, 28), (0, 0, 0, 0)), "JPEG")


def _sixteen_bit_png() -> bytes:
    return png(Image.fromarray(np.full((28, 28), 40000, dtype=np.uint16)))


def _palette_png_with_transparency() -> bytes:
    image = Image.new("P", (28, 28), 0)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    return png(image, transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("L", (28, 28), v) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return png(Image.open(io.BytesIO(BOOT)).convert("L"), "JPEG", exif=exif)


RGB_BOOT = png(Image.open(io.BytesIO(BOOT)).convert("RGB"))
GREY_RED = png(Image.new("L", (16, 16), 128))

BAD_INPUTS: list[tuple[str, str, dict[str, Any], int, str]] = [
    # (id, path, request kwargs, status, words the message must contain)
    ("zero-bytes", "/predict", {"content": b""}, 400, "empty"),
    ("plain-text", "/predict", {"content": b"hello world"}, 400, "not a recognised image"),
    ("truncated-jpeg", "/predict", {"content": png(Image.new("RGB", (64, 64)), "JPEG")[:200]},
     400, "truncated"),
    ("truncated-png", "/predict", {"content": BOOT[:70]}, 400, "truncated"),
    ("invalid-base64", "/predict", {"json": {"image": "@@not base64@@"}}, 400, "base64"),
    ("missing-image-field", "/predict", {"json": {"picture": b64(BOOT)}}, 400, "'image'"),
    ("bad-json", "/predict", {"content": b"{", "headers": {"content-type": "application/json"}},
     400, "not valid JSON"),
    ("wrong-content-type", "/predict",
     {"content": b"a=1", "headers": {"content-type": "text/plain"}},
     415, "not accepted"),
    ("30000x30000-png", "/predict", {"content": png_claiming_size(30000, 30000)}, 413, "pixels"),
    ("body-over-limit", "/predict", {"content": b"\0" * 300_000}, 413, "limit"),
    ("unknown-model", "/v1/models/nope/predict", {"content": BOOT}, 404, "nope"),
    ("unknown-version", "/v1/models/fashion-cnn/predict?version=9", {"content": BOOT}, 404,
     "no served version 9"),
    ("version-not-a-number", "/predict?version=x", {"content": BOOT}, 422, "integer"),
    ("top-k-zero", "/predict?top_k=0", {"content": BOOT}, 422, "between 1 and 10"),
    ("top-k-huge", "/predict?top_k=100000", {"content": BOOT}, 422, "between 1 and 10"),
    ("top-k-in-json", "/predict", {"json": {"image": b64(BOOT), "top_k": "many"}}, 422, "integer"),
    ("batch-of-raw-bytes", "/predict/batch", {"content": BOOT}, 415, "multipart"),
    ("empty-batch", "/predict/batch", {"json": {"images": []}}, 422, "empty"),
    ("unknown-route", "/predictions", {"content": BOOT}, 404, "no route"),
]  # fmt: skip

GOOD_ODDITIES: list[tuple[str, str, bytes]] = [
    ("cmyk-jpeg", "/predict", _cmyk_jpeg()),
    ("16-bit-png", "/predict", _sixteen_bit_png()),
    ("palette-png-transparency", "/predict", _palette_png_with_transparency()),
    ("animated-gif", "/predict", _animated_gif()),
    ("exif-rotated-jpeg", "/predict", _exif_rotated_jpeg()),
    ("rgb-to-grey-model", "/predict", RGB_BOOT),
    ("grey-to-rgb-model", "/v1/models/colors/predict", GREY_RED),
]


@pytest.mark.parametrize(
    "path,kwargs,status,words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(
    make_client: Callable[..., TestClient],
    path: str,
    kwargs: dict[str, Any],
    status: int,
    words: str,
) -> None:
    client = make_client(max_body_bytes=200_000)
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    assert error["code"]
    assert client.post("/predict", content=BOOT).json()["label"] == "Ankle boot"


@pytest.mark.parametrize(
    "path,data", [c[1:] for c in GOOD_ODDITIES], ids=[c[0] for c in GOOD_ODDITIES]
)
def test_unusual_but_valid_images_are_classified(
    client: TestClient, path: str, data: bytes
) -> None:
    response = client.post(path, content=data)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"]


def test_image_limits_apply_per_image(make_client: Callable[..., TestClient]) -> None:
    client = make_client(limits=ImageLimits(max_bytes=100))
    response = client.post("/predict", content=BOOT)
    assert response.status_code == 413 and "image is" in response.json()["error"]["message"]


def test_full_queue_answers_503_with_retry_after(make_client: Callable[..., TestClient]) -> None:
    client = make_client(batching=BatchConfig(max_batch_size=1, max_queue=1))
    files = [("files", (f"{i}.png", BOOT, "image/png")) for i in range(3)]
    response = client.post("/infer/batch", files=files)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "queue" in response.json()["error"]["message"]


def test_rate_limit_answers_429(make_client: Callable[..., TestClient]) -> None:
    client = make_client(rate_limit=2)
    replies = [client.post("/predict", content=BOOT) for _ in range(5)]
    statuses = [r.status_code for r in replies]
    assert statuses[:2] == [200, 200] and 429 in statuses
    limited = replies[statuses.index(429)]
    assert int(limited.headers["retry-after"]) >= 1


def test_admin_routes_are_off_without_a_token(make_client: Callable[..., TestClient]) -> None:
    off = make_client().post("/admin/reload")
    assert off.status_code == 401 and "--admin-token" in off.json()["error"]["message"]
    client = make_client(admin_token=TOKEN)
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_a_replaced_version_is_closed_and_its_memory_given_back(
    make_client: Callable[..., TestClient], repo: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from tinyserve import registry

    trims: list[int] = []
    monkeypatch.setattr(registry, "release_freed_memory", lambda: trims.append(1) or True)
    local = tmp_path / "repo"
    shutil.copytree(repo / "colors", local / "colors")
    client = make_client(repo=local, default_model=None, admin_token=TOKEN)
    served = client.app.context.registry.get("colors")  # type: ignore[attr-defined]
    assert client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"}).is_success
    for _ in range(100):  # the old version drains and closes in the background
        if trims:
            break
        client.get("/health")
        time.sleep(0.01)
    assert trims, "the replaced version's memory was never given back"
    assert served.batcher._closing  # and the replaced version is closed


def test_release_freed_memory_answers_on_any_platform() -> None:
    from tinyserve.registry import release_freed_memory

    assert isinstance(release_freed_memory(), bool)


def test_reload_swaps_in_a_new_version_and_refuses_a_broken_one(
    make_client: Callable[..., TestClient], repo: Path, tmp_path: Path
) -> None:
    local = tmp_path / "repo"
    shutil.copytree(repo / "colors", local / "colors")
    client = make_client(repo=local, default_model=None, admin_token=TOKEN)
    auth = {"authorization": f"Bearer {TOKEN}"}
    red = png(color_image("red"))
    assert client.post("/predict", content=red).json()["version"] == 1

    shutil.copytree(local / "colors" / "1", local / "colors" / "2")
    response = client.post("/admin/models/colors/reload", headers=auth)
    assert response.status_code == 200, response.text
    assert response.json()["default_version"] == 2
    assert client.post("/predict", content=red).json()["version"] == 2

    (local / "colors" / "3").mkdir()
    (local / "colors" / "3" / "model.onnx").write_bytes(b"broken")
    response = client.post("/admin/reload", headers=auth)
    assert response.status_code == 500
    assert "previous version keeps serving" in response.json()["error"]["message"]
    again = client.post("/predict", content=red)
    assert again.status_code == 200 and again.json()["version"] == 2
    assert client.get("/health/ready").status_code == 200


def test_a_request_caught_by_a_reload_runs_on_the_new_version(repo: Path, tmp_path: Path) -> None:
    """A request looks its model up, then reads its body; a reload may land in between."""
    local = tmp_path / "repo"
    shutil.copytree(repo / "colors", local / "colors")

    async def scenario() -> None:
        registry = ModelRegistry(local)
        await registry.load_all()
        picked = registry.get("colors")  # looked up, body not read yet
        shutil.copytree(local / "colors" / "1", local / "colors" / "2")
        await registry.load("colors")  # the old version is retired and drains
        await asyncio.sleep(0.05)
        assert picked.batcher.closing
        with pytest.raises(ModelNotReady):
            await picked.infer_one(np.zeros(picked.manifest.input.shape, np.uint8))
        live = picked.live()
        assert live is registry.get("colors") and live.version == 2
        logits, _ = await live.infer_one(np.zeros(live.manifest.input.shape, np.uint8))
        assert logits.shape == (live.manifest.num_classes,)
        await registry.close()

    asyncio.run(scenario())


def test_a_broken_model_is_reported_and_others_still_serve(
    make_client: Callable[..., TestClient], repo: Path, tmp_path: Path
) -> None:
    local = tmp_path / "repo"
    shutil.copytree(repo / "fashion-cnn", local / "fashion-cnn")
    (local / "broken" / "1").mkdir(parents=True)
    (local / "broken" / "1" / "model.onnx").write_bytes(b"broken")
    client = make_client(repo=local)
    assert client.post("/predict", content=BOOT).status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and "broken" in ready.json()["failed"]
    assert client.get("/health").json()["status"] == "degraded"
    response = client.post("/v1/models/broken/predict", content=BOOT)
    assert response.status_code == 503 and "failed to load" in response.json()["error"]["message"]


def test_shortcut_and_router_give_the_same_answers(client: TestClient) -> None:
    direct = client.post("/v1/models/fashion-cnn/predict?top_k=3", content=BOOT).json()
    # a trailing slash misses the shortcut; Starlette's router redirects it to the same route
    routed = client.post("/v1/models/fashion-cnn/predict/?top_k=3", content=BOOT).json()
    assert direct["predictions"] == routed["predictions"]
    assert len(direct["predictions"]) == 3
    multipart = client.post(
        "/infer", files={"file": ("b.png", BOOT, "image/png")}, data={"top_k": "2"}
    )
    assert [p["label"] for p in multipart.json()["predictions"]] == [
        p["label"] for p in direct["predictions"][:2]
    ]
    assert client.get("/predict").status_code == 405  # the router still owns other methods
    assert client.post("/v1/models//predict", content=BOOT).status_code == 404
    stats = client.get("/stats").json()
    assert stats["models"]["fashion-cnn"]["total_requests"] >= 3  # the shortcut is counted


def test_a_learned_batch_size_is_served_and_described(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(batching=BatchConfig(max_batch_size=4, learn_batch_size=True))
    batching = client.get("/v1/models/fashion-cnn").json()["versions"][-1]["batching"]
    assert batching["max_batch_size"] == 4
    assert sorted(batching["throughput_curve"]) == ["1", "2", "4"]
    assert batching["batch_limit"] in (1, 2, 4)
    assert all(ips > 0 for ips in batching["throughput_curve"].values())
    body = (SAMPLES / "0000_ankle-boot.png").read_bytes()
    assert client.post("/predict", content=body).json()["label"] == "Ankle boot"
