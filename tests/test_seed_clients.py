"""Clients written for the seed projects work unchanged: each seed's exact request, its fields.

Seed 001 (C++ REST server, §4.2, and its Python benchmark client), seed 002 (FastAPI service,
its curl examples and response JSON) and seed 003 (the Lambda body). tinyserve's own, richer
fields sit beside the seed's; these tests read only what the seed's clients read.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from tinyserve import serverless

BOOT_PATH = SAMPLES / "0000_ankle-boot.png"
BOOT = BOOT_PATH.read_bytes()
TOKEN = "x" * 16
ORIGIN = "http://example.test"
SEED_002_STATS = (
    "uptime_seconds",
    "total_requests",
    "successful_requests",
    "failed_requests",
    "success_rate",
    "average_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
    "requests_per_second",
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("utf-8")  # as seed 001's client encodes


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_seed_001_predictions(predictions: list[dict[str, Any]], count: int) -> None:
    """Seed 001's prediction items: class_id, class_name, confidence; best first."""
    assert len(predictions) == count
    for item in predictions:
        assert is_int(item["class_id"])
        assert isinstance(item["class_name"], str)
        assert isinstance(item["confidence"], float)
        assert 0.0 < item["confidence"] <= 1.0
    confidences = [item["confidence"] for item in predictions]
    assert confidences == sorted(confidences, reverse=True)


def assert_seed_002_predictions(predictions: list[dict[str, Any]]) -> None:
    """Seed 002's prediction items: label, confidence; best first."""
    assert predictions
    for item in predictions:
        assert isinstance(item["label"], str)
        assert isinstance(item["confidence"], float)
        assert 0.0 < item["confidence"] <= 1.0
    confidences = [item["confidence"] for item in predictions]
    assert confidences == sorted(confidences, reverse=True)


@pytest.fixture
def client(app_client: Callable[..., TestClient]) -> TestClient:
    return app_client(repo=BUNDLED_MODEL.parent)


# Seed 001: POST /predict {"image": <base64>, "top_k": 5}


def test_seed_001_predict_answers_class_id_class_name_confidence(client: TestClient) -> None:
    response = client.post("/predict", json={"image": b64(BOOT), "top_k": 5})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert_seed_001_predictions(predictions, 5)
    assert (predictions[0]["class_id"], predictions[0]["class_name"]) == (9, "Ankle boot")


def test_seed_001_predict_answers_inference_time_ms(client: TestClient) -> None:
    body = client.post("/predict", json={"image": b64(BOOT), "top_k": 5}).json()
    assert is_number(body["inference_time_ms"])
    assert body["inference_time_ms"] >= 0


@pytest.mark.parametrize(
    ("image", "shape"),
    [
        pytest.param(BOOT, [28, 28, 1], id="28x28-grey"),
        pytest.param(
            encoded(
                Image.fromarray(
                    np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
                )
            ),
            [30, 40, 3],
            id="40x30-rgb",
        ),
    ],
)
def test_seed_001_predict_answers_image_shape_rows_cols_channels(
    client: TestClient, image: bytes, shape: list[int]
) -> None:
    response = client.post("/predict", json={"image": b64(image), "top_k": 5})
    assert response.status_code == 200
    assert response.json()["image_shape"] == shape


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_seed_001_predict_top_k_in_the_body_limits_the_count(
    client: TestClient, top_k: int
) -> None:
    response = client.post("/predict", json={"image": b64(BOOT), "top_k": top_k})
    assert response.status_code == 200
    assert_seed_001_predictions(response.json()["predictions"], top_k)


def test_seed_001_predict_without_top_k_answers_five(client: TestClient) -> None:
    response = client.post("/predict", json={"image": b64(BOOT)})
    assert response.status_code == 200
    assert_seed_001_predictions(response.json()["predictions"], 5)


def test_seed_001_predict_without_image_answers_400_with_error(client: TestClient) -> None:
    response = client.post("/predict", json={"top_k": 5})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert "error" in response.json()


# Seed 001: POST /predict/batch {"images": [{"image": <base64>}, ...], "top_k": 5}

BATCH = [SAMPLES / "0000_ankle-boot.png", SAMPLES / "0002_trouser.png", SAMPLES / "0018_bag.png"]


def seed_001_batch(client: TestClient, top_k: int = 5) -> dict[str, Any]:
    images = [{"image": b64(path.read_bytes())} for path in BATCH]
    response = client.post("/predict/batch", json={"images": images, "top_k": top_k})
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_seed_001_batch_answers_batch_predictions_in_order(client: TestClient) -> None:
    batch = seed_001_batch(client)["batch_predictions"]
    assert [item["image_index"] for item in batch] == list(range(len(BATCH)))
    assert all(is_int(item["image_index"]) for item in batch)
    for item in batch:
        assert_seed_001_predictions(item["predictions"], 5)
    assert (batch[0]["predictions"][0]["class_id"], batch[0]["predictions"][0]["class_name"]) == (
        9,
        "Ankle boot",
    )


def test_seed_001_batch_top_k_limits_each_image(client: TestClient) -> None:
    for item in seed_001_batch(client, top_k=2)["batch_predictions"]:
        assert_seed_001_predictions(item["predictions"], 2)


def test_seed_001_batch_answers_counts_and_times(client: TestClient) -> None:
    body = seed_001_batch(client)
    assert is_int(body["num_images"]) and body["num_images"] == len(BATCH)
    assert is_number(body["total_inference_time_ms"]) and body["total_inference_time_ms"] >= 0
    assert is_number(body["average_time_per_image_ms"]) and body["average_time_per_image_ms"] >= 0


# Seed 001: GET /model/info


def test_seed_001_model_info(client: TestClient) -> None:
    response = client.get("/model/info")
    assert response.status_code == 200
    info = response.json()
    assert isinstance(info["model_path"], str) and info["model_path"]
    assert isinstance(info["input_shape"], list) and info["input_shape"]
    assert isinstance(info["output_shape"], list) and info["output_shape"]
    assert is_int(info["num_classes"]) and info["num_classes"] == 10
    names = info["class_names"]
    assert isinstance(names, list) and len(names) == info["num_classes"]
    assert all(isinstance(name, str) for name in names)
    assert names[9] == "Ankle boot"


# GET /health: seed 002's status and model_loaded, seed 001's timestamp, service, version


def test_seed_002_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["model_loaded"] is True


def test_seed_001_health_answers_timestamp_service_version(client: TestClient) -> None:
    body = client.get("/health").json()
    assert is_number(body["timestamp"])
    assert abs(body["timestamp"] - time.time()) < 300  # seconds since the epoch, not ms
    assert isinstance(body["service"], str) and body["service"]
    assert isinstance(body["version"], str) and body["version"]


# Seed 002: curl -X POST /infer -F file=@cat.jpg


def test_seed_002_infer_answers_label_confidence_and_time(client: TestClient) -> None:
    response = client.post("/infer", files={"file": ("cat.jpg", BOOT, "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert_seed_002_predictions(body["predictions"])
    assert body["predictions"][0]["label"] == "Ankle boot"
    assert is_number(body["inference_time_ms"]) and body["inference_time_ms"] >= 0


# Seed 002: curl -X POST /infer/batch -F files=@cat.jpg -F files=@dog.jpg -F files=@bird.jpg

UPLOADS = [
    ("files", ("cat.png", BOOT, "image/png")),
    ("files", ("notes.txt", b"this is not an image", "text/plain")),
    ("files", ("bird.png", (SAMPLES / "0002_trouser.png").read_bytes(), "image/png")),
]


def seed_002_batch(client: TestClient) -> dict[str, Any]:
    response = client.post("/infer/batch", files=UPLOADS)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_seed_002_batch_answers_counts_and_total_time(client: TestClient) -> None:
    body = seed_002_batch(client)
    assert (body["total_images"], body["successful"], body["failed"]) == (3, 2, 1)
    assert all(is_int(body[key]) for key in ("total_images", "successful", "failed"))
    assert is_number(body["total_time_ms"]) and body["total_time_ms"] >= 0


def test_seed_002_batch_results_keep_upload_order_and_filenames(client: TestClient) -> None:
    results = seed_002_batch(client)["results"]
    assert [r["filename"] for r in results] == ["cat.png", "notes.txt", "bird.png"]
    assert all({"filename", "predictions", "inference_time_ms", "error"} <= set(r) for r in results)


def test_seed_002_batch_successful_results(client: TestClient) -> None:
    results = seed_002_batch(client)["results"]
    for result in (results[0], results[2]):
        assert result["error"] is None
        assert_seed_002_predictions(result["predictions"])
        assert is_number(result["inference_time_ms"])
    assert results[0]["predictions"][0]["label"] == "Ankle boot"


def test_seed_002_batch_failed_result_has_error_and_no_predictions(client: TestClient) -> None:
    failed = seed_002_batch(client)["results"][1]
    assert failed["error"]
    assert failed["predictions"] is None


# Seed 002: GET /metrics (JSON when asked for it; Prometheus text stays the default)


@pytest.mark.parametrize("accept", [None, "*/*", "text/plain"])
def test_metrics_default_to_prometheus_text(client: TestClient, accept: str | None) -> None:
    client.post("/predict", json={"image": b64(BOOT)})
    headers = {} if accept is None else {"accept": accept}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "tinyserve_" in response.text


def test_seed_002_metrics_as_json(client: TestClient) -> None:
    client.post("/predict", json={"image": b64(BOOT)})
    response = client.get("/metrics", headers={"accept": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    for key in SEED_002_STATS:
        assert is_number(body[key]), key


# Seed 002: POST /admin/reload (tinyserve asks for the admin token)


def test_seed_002_admin_reload_message(app_client: Callable[..., TestClient]) -> None:
    client = app_client(repo=BUNDLED_MODEL.parent, admin_token=TOKEN)
    response = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.json()["message"] == "Model reloaded successfully"


# Seed 002's model_version = "latest" idea: ?version=latest and ?version=N

VERSIONED = ["/predict", "/v1/models/fashion-cnn/predict"]


@pytest.fixture
def two_versions(app_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    """The bundled model with both of its versions served side by side."""
    model = tmp_path / "fashion-cnn"
    model.mkdir()
    for version in ("1", "2"):
        (model / version).symlink_to(BUNDLED_MODEL / version, target_is_directory=True)
    (model / "config.toml").write_text("versions = [1, 2]\n")
    return app_client(repo=tmp_path)


def predict_raw(client: TestClient, url: str) -> dict[str, Any]:
    response = client.post(url, content=BOOT, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("path", VERSIONED)
def test_version_latest_is_the_default_version(client: TestClient, path: str) -> None:
    latest = predict_raw(client, f"{path}?version=latest")
    assert latest["version"] == predict_raw(client, path)["version"]
    assert latest["label"] == "Ankle boot"


@pytest.mark.parametrize("path", VERSIONED)
def test_version_latest_is_the_highest_of_several(two_versions: TestClient, path: str) -> None:
    latest = predict_raw(two_versions, f"{path}?version=latest")
    assert latest["version"] == predict_raw(two_versions, path)["version"] == 2


@pytest.mark.parametrize("path", VERSIONED)
@pytest.mark.parametrize("version", [1, 2])
def test_version_number_pins_that_version(
    two_versions: TestClient, path: str, version: int
) -> None:
    assert predict_raw(two_versions, f"{path}?version={version}")["version"] == version


# Seed 002: GET /docs (Swagger UI) and GET /redoc, served without a CDN


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def page_links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_are_html(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_name_no_other_host(client: TestClient, path: str) -> None:
    html = client.get(path).text
    for url in re.findall(r"""https?://[^\s"'<>()]+""", html) + page_links(html):
        assert urlsplit(url).netloc in ("", "testserver"), url


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_load_their_scripts_and_styles_from_tinyserve(
    client: TestClient, path: str
) -> None:
    page = client.get(path)
    links = [link for link in page_links(page.text) if not link.startswith("#")]
    assert any(link.endswith(".js") for link in links), links
    for link in links:
        asset = client.get(urljoin(str(page.url), link))
        assert asset.status_code == 200, link
        assert asset.content, link


# Seed 003: the Lambda body carries pred_index beside timings


@pytest.fixture
def local_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    folder = tmp_path / "fashion-cnn" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").symlink_to(BUNDLED_MODEL / "1" / "model.onnx")
    monkeypatch.setenv("TINYSERVE_MODEL_URI", str(folder.parent))
    monkeypatch.setenv("TINYSERVE_CACHE_DIR", str(tmp_path / "cache"))
    serverless.reset()
    yield
    serverless.reset()


def lambda_body() -> dict[str, Any]:
    event = {
        "httpMethod": "POST",
        "headers": {"Content-Type": "image/png"},
        "isBase64Encoded": True,
        "body": b64(BOOT),
    }
    response = serverless.handler(event, None)
    assert response["statusCode"] == 200
    assert isinstance(response["body"], str)
    body: dict[str, Any] = json.loads(response["body"])
    return body


def test_seed_003_lambda_body_has_pred_index(local_model: None) -> None:
    body = lambda_body()
    assert is_int(body["pred_index"]) and body["pred_index"] == 9


def test_seed_003_lambda_body_has_timings(local_model: None) -> None:
    timings = lambda_body()["timings"]
    for key in ("model_load_s", "preprocess_s", "inference_s"):
        assert is_number(timings[key]) and timings[key] >= 0, key


# Seed 001's server allowed every origin; tinyserve makes CORS opt-in


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.get("/health", headers={"origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_a_configured_origin(app_client: Callable[..., TestClient]) -> None:
    client = app_client(repo=BUNDLED_MODEL.parent, cors_origins=(ORIGIN,))
    response = client.post("/predict", json={"image": b64(BOOT)}, headers={"origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_cors_answers_a_preflight(app_client: Callable[..., TestClient]) -> None:
    client = app_client(repo=BUNDLED_MODEL.parent, cors_origins=(ORIGIN,))
    response = client.options(
        "/predict",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "content-type" in response.headers["access-control-allow-headers"].lower()
