"""The Lambda handler: event shapes, errors, and cold/warm starts from a real S3 endpoint."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import BUNDLED_MODEL, SAMPLES
from s3_endpoint import S3Endpoint
from tinyserve import serverless
from tinyserve.errors import ConfigError
from tinyserve.serverless import HandlerConfig, handler

MODEL = BUNDLED_MODEL / "1" / "model.onnx"
BOOT = (SAMPLES / "0000_ankle-boot.png").read_bytes()


@pytest.fixture
def local_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    folder = tmp_path / "fashion-cnn" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").symlink_to(MODEL)
    monkeypatch.setenv("TINYSERVE_MODEL_URI", str(folder.parent))
    monkeypatch.setenv("TINYSERVE_CACHE_DIR", str(tmp_path / "cache"))
    serverless.reset()
    yield
    serverless.reset()


def upload_model(s3: S3Endpoint, body: bytes | None = None) -> str:
    bucket = s3.bucket()
    key = "models/fashion-cnn/1/model.onnx"
    if body is None:
        s3.client().upload_file(str(MODEL), bucket, key)
    else:
        s3.client().put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/models/fashion-cnn"


def call(event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = handler(event, None)
    assert response["headers"] == {"Content-Type": "application/json"}
    return response["statusCode"], json.loads(response["body"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_config_from_env() -> None:
    config = HandlerConfig.from_env(
        {"TINYSERVE_MODEL_URI": "s3://b/p", "TINYSERVE_MODEL_VERSION": "2", "TINYSERVE_TOP_K": "3"}
    )
    assert (config.model_uri, config.version, config.default_top_k) == ("s3://b/p", 2, 3)
    with pytest.raises(ConfigError, match="TINYSERVE_MODEL_URI"):
        HandlerConfig.from_env({})
    with pytest.raises(ConfigError, match="TINYSERVE_TOP_K must be a number"):
        HandlerConfig.from_env({"TINYSERVE_MODEL_URI": "x", "TINYSERVE_TOP_K": "many"})


V1 = {"httpMethod": "POST", "headers": {"Content-Type": "image/png"}, "isBase64Encoded": True}
V2 = {"version": "2.0", "requestContext": {"http": {"method": "POST"}}}


@pytest.mark.parametrize(
    "event",
    [
        pytest.param({**V1, "body": b64(BOOT)}, id="rest-v1-base64-image"),
        pytest.param(
            {
                **V2,
                "headers": {"content-type": "application/json"},
                "body": json.dumps({"image": b64(BOOT), "top_k": 3}),
                "isBase64Encoded": False,
            },
            id="http-v2-json",
        ),  # fmt: skip
        pytest.param(
            {
                **V2,
                "headers": {"content-type": "application/json"},
                "body": b64(json.dumps({"image": b64(BOOT)}).encode()),
                "isBase64Encoded": True,
                "queryStringParameters": {"top_k": "3"},
            },
            id="function-url-base64-json",
        ),  # fmt: skip
        pytest.param({"image": "data:image/png;base64," + b64(BOOT), "top_k": 3}, id="direct"),
    ],
)
def test_event_shapes(local_model: None, event: dict[str, Any]) -> None:
    status, body = call(event)
    assert status == 200, body
    assert (body["model"], body["version"], body["label"], body["class_id"]) == (
        "fashion-cnn",
        1,
        "Ankle boot",
        9,
    )
    assert body["predictions"][0]["label"] == "Ankle boot"
    assert body["confidence"] == body["predictions"][0]["confidence"] > 0.5
    assert len(body["predictions"]) == (3 if "top_k" in str(event) else 5)
    assert set(body["timings"]) >= {"model_load_s", "preprocess_s", "inference_s"}


def test_cold_then_warm(local_model: None) -> None:
    status, cold = call({**V1, "body": b64(BOOT)})
    assert status == 200 and cold["cold_start"] is True
    assert cold["timings"]["model_load_s"] > 0
    status, warm = call({**V1, "body": b64(BOOT)})
    assert status == 200 and warm["cold_start"] is False
    assert warm["timings"]["model_load_s"] == 0.0
    assert warm["predictions"] == cold["predictions"]
    status, info = call({"httpMethod": "GET"})
    assert status == 200 and info["model"] == "fashion-cnn" and len(info["labels"]) == 10


@pytest.mark.parametrize(
    ("event", "status", "code"),
    [
        ({**V1, "body": None}, 400, "invalid_image"),
        ({**V1, "body": "not base64!"}, 400, "invalid_image"),
        ({**V1, "body": b64(b"plain text, not an image")}, 400, "invalid_image"),
        ({**V2, "headers": {"content-type": "application/json"}, "body": "{oops"}, 400,
         "malformed_request"),
        ({**V2, "body": json.dumps({"picture": b64(BOOT)})}, 400, "malformed_request"),
        ({**V2, "body": json.dumps({"image": 42})}, 422, "invalid_parameter"),
        ({"image": b64(BOOT), "top_k": 0}, 422, "invalid_parameter"),
        ({"image": b64(BOOT), "top_k": True}, 422, "invalid_parameter"),
        ({**V1, "body": b64(BOOT), "queryStringParameters": {"top_k": "lots"}}, 422,
         "invalid_parameter"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx(
    local_model: None, event: dict[str, Any], status: int, code: str
) -> None:
    got, body = call(event)
    assert (got, body["error"]["code"]) == (status, code)
    assert body["error"]["message"]


def test_missing_configuration_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINYSERVE_MODEL_URI", raising=False)
    serverless.reset()
    status, body = call({"image": b64(BOOT)})
    assert status == 400 and "TINYSERVE_MODEL_URI" in body["error"]["message"]


def test_s3_cold_start_then_warm_and_reload_on_change(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uri = upload_model(s3)
    monkeypatch.setenv("TINYSERVE_MODEL_URI", uri)
    monkeypatch.setenv("TINYSERVE_CACHE_DIR", str(tmp_path))
    serverless.reset()
    status, cold = call({**V1, "body": b64(BOOT)})
    assert status == 200, cold
    assert (cold["label"], cold["cold_start"]) == ("Ankle boot", True)
    cached = tmp_path / "s3" / uri.removeprefix("s3://") / "1" / "model.onnx"
    assert cached.read_bytes() == MODEL.read_bytes()
    before = cached.stat()
    assert call({**V1, "body": b64(BOOT)})[1]["cold_start"] is False

    serverless.reset()  # a new container with the same /tmp: nothing is downloaded again
    status, again = call({**V1, "body": b64(BOOT)})
    assert status == 200 and again["cold_start"] is True
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # A request cannot point the handler at another source.
    other = upload_model(s3).removeprefix("s3://").split("/")[0]
    status, body = call({"image": b64(BOOT), "model_uri": f"s3://{other}/models/fashion-cnn"})
    assert status == 200 and body["model"] == "fashion-cnn"
    assert not (tmp_path / "s3" / other).exists()


def test_s3_corrupt_or_missing_model_is_a_clear_error(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TINYSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TINYSERVE_MODEL_URI", "s3://no-such-bucket/models/fashion-cnn")
    serverless.reset()
    status, body = call({"image": b64(BOOT)})
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    assert "no-such-bucket" in body["error"]["message"]

    uri = upload_model(s3, body=b"this is not an ONNX model")
    monkeypatch.setenv("TINYSERVE_MODEL_URI", uri)
    status, body = call({"image": b64(BOOT)})
    assert (status, body["error"]["code"]) == (500, "model_error")
    assert "cannot load" in body["error"]["message"]
    model_files = [p for p in tmp_path.rglob("*") if p.is_file() and "model.onnx" in p.name]
    assert model_files == []  # the unusable download was dropped from the cache

    s3.client().upload_file(str(MODEL), uri.removeprefix("s3://").split("/")[0],
                            "models/fashion-cnn/1/model.onnx")  # fmt: skip
    status, body = call({"image": b64(BOOT)})  # initialization is retried on the next call
    assert (status, body["label"], body["cold_start"]) == (200, "Ankle boot", True)


COLD_WARM = """
import base64, json, sys, time
started = time.perf_counter()
from tinyserve.serverless import handler
event = {"body": base64.b64encode(open(sys.argv[1], "rb").read()).decode(), "isBase64Encoded": True}
first = handler(event, None)
cold = time.perf_counter() - started
t = time.perf_counter()
second = handler(event, None)
warm = time.perf_counter() - t
print(json.dumps({"cold_s": cold, "warm_s": warm, "first": json.loads(first["body"]),
                  "second": json.loads(second["body"])}))
"""


@pytest.mark.slow
def test_fresh_processes_download_once(s3: S3Endpoint, tmp_path: Path) -> None:
    uri = upload_model(s3)
    env = {**os.environ, "TINYSERVE_MODEL_URI": uri, "TINYSERVE_CACHE_DIR": str(tmp_path)}
    cached = tmp_path / "s3" / uri.removeprefix("s3://") / "1" / "model.onnx"
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", COLD_WARM, str(SAMPLES / "0000_ankle-boot.png")],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        runs.append(json.loads(out.stdout))
        runs[-1]["stat"] = (cached.stat().st_ino, cached.stat().st_mtime_ns)
    for run in runs:
        assert run["first"]["label"] == run["second"]["label"] == "Ankle boot"
        assert (run["first"]["cold_start"], run["second"]["cold_start"]) == (True, False)
    assert runs[0]["stat"] == runs[1]["stat"]  # the second container reused the cached file
