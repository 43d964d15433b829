"""The Open Inference Protocol (V2): in-process for shapes and errors, tritonclient for real."""

from __future__ import annotations

import asyncio
import base64
import gzip
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from live_server import TOKEN as SERVER_TOKEN
from live_server import Server
from test_server import _batch_sizes
from tinyserve.bench.client import Target, encode_body, image_request
from tinyserve.imaging import load_image
from tinyserve.manifest import InputSpec

TOKEN = "v2-admin-token"
SPEC = InputSpec(28, 28, 1, "L")
PNGS = sorted(SAMPLES.glob("*.png"))
INFER = "/v2/models/fashion-cnn/infer"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("v2-repo")
    shutil.copytree(BUNDLED_MODEL / "1", root / "fashion-cnn" / "1")
    return root


@pytest.fixture
def make_client(repo: Path, app_client: Callable[..., TestClient]) -> Callable[..., TestClient]:
    return lambda **overrides: app_client(**{"repo": repo, **overrides})


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(admin_token=TOKEN, max_batch_images=16)


def pixels(paths: list[Path]) -> np.ndarray[Any, Any]:
    return np.stack([load_image(p, SPEC) for p in paths])


def binary_request(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def bytes_tensor(images: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in images)


def rest_probabilities(client: TestClient, path: Path) -> dict[int, float]:
    body = client.post("/predict", content=path.read_bytes(), params={"top_k": 10}).json()
    return {p["class_id"]: p["confidence"] for p in body["predictions"]}


def split_binary(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    n = int(response.headers["inference-header-content-length"])
    header: dict[str, Any] = orjson.loads(response.content[:n])
    return header, response.content[n:]


# -- health, metadata, config -----------------------------------------------------------------


def test_health_and_server_metadata(client: TestClient) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/fashion-cnn/ready",
                 "/v2/models/fashion-cnn/versions/1/ready"):  # fmt: skip
        response = client.get(path)
        assert response.status_code == 200 and response.content == b"", path
    assert client.get("/v2/models/nope/ready").status_code == 400
    assert client.get("/v2/models/fashion-cnn/versions/7/ready").status_code == 400
    meta = client.get("/v2").json()
    assert meta["name"] == "tinyserve"
    assert set(meta["extensions"]) >= {"binary_tensor_data", "classification", "statistics"}
    assert "model_repository" in meta["extensions"]


def test_repository_extension_is_off_without_a_token(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    assert "model_repository" not in client.get("/v2").json()["extensions"]
    response = client.post("/v2/repository/index")
    assert response.status_code == 401 and "admin" in response.json()["error"]


def test_access_log_covers_v2_routes(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(access_log=True)
    with caplog.at_level("INFO", logger="tinyserve.access"):
        client.get("/v2/health/live")
    (line,) = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "tinyserve.access"]
    assert line["path"] == "/v2/health/live" and line["status"] == 200


def test_model_metadata_and_config(client: TestClient) -> None:
    meta = client.get("/v2/models/fashion-cnn").json()
    assert meta["name"] == "fashion-cnn" and meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 28, 28, 1]}
    assert meta["inputs"][1] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    assert all(o["shape"] == [-1, 10] and o["datatype"] == "FP32" for o in meta["outputs"])
    config = client.get("/v2/models/fashion-cnn/versions/1/config").json()
    assert config["max_batch_size"] == 32
    assert config["input"][0]["data_type"] == "TYPE_UINT8" and config["input"][0]["dims"] == [
        28,
        28,
        1,
    ]
    assert config["output"][0] == {
        "name": "logits", "data_type": "TYPE_FP32", "dims": [10], "label_filename": "",
    }  # fmt: skip
    assert "dynamic_batching" in config
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    for path in ("/v2/nothing", "/v2/models/fashion-cnn/versions/1/nothing"):
        unknown = client.get(path)
        assert unknown.status_code == 404 and path in unknown.json()["error"]


# -- inference --------------------------------------------------------------------------------


def test_json_uint8_nested_and_flat_match_rest(client: TestClient) -> None:
    batch = pixels(PNGS[:2])
    for data in (batch.tolist(), batch.reshape(-1).tolist()):
        request = {
            "id": "req-7",
            "inputs": [{"name": "pixels", "shape": list(batch.shape), "datatype": "UINT8",
                        "data": data}],
            "outputs": [{"name": "probabilities"}],
        }  # fmt: skip
        response = client.post(INFER, json=request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == "req-7" and body["model_version"] == "1"
        (out,) = body["outputs"]
        assert out["name"] == "probabilities" and out["shape"] == [2, 10]
        probs = np.array(out["data"]).reshape(2, 10)
        for path, row in zip(PNGS[:2], probs, strict=True):
            rest = rest_probabilities(client, path)
            assert np.allclose([rest[c] for c in range(10)], row, atol=1e-5)


def test_binary_uint8_and_bytes_images_agree(client: TestClient) -> None:
    batch = pixels(PNGS)
    header = {
        "inputs": [{"name": "pixels", "shape": list(batch.shape), "datatype": "UINT8",
                    "parameters": {"binary_data_size": batch.nbytes}}],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    body, headers = binary_request(header, batch.tobytes())
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    meta, raw = split_binary(response)
    logits_size = meta["outputs"][0]["parameters"]["binary_data_size"]
    logits = np.frombuffer(raw[:logits_size], "<f4").reshape(len(PNGS), 10)
    probs = np.frombuffer(raw[logits_size:], "<f4").reshape(len(PNGS), 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    encoded = bytes_tensor([p.read_bytes() for p in PNGS])
    header = {
        "inputs": [{"name": "image", "shape": [len(PNGS)], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(encoded)}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    body, headers = binary_request(header, encoded)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    meta, raw = split_binary(response)
    assert meta["outputs"][0]["shape"] == [len(PNGS), 10]
    assert np.allclose(np.frombuffer(raw, "<f4").reshape(len(PNGS), 10), logits, atol=1e-5)
    for path, row in zip(PNGS, probs, strict=True):
        rest = rest_probabilities(client, path)
        assert np.allclose([rest[c] for c in range(10)], row, atol=1e-5)


def test_json_bytes_with_classification_and_gzip(client: TestClient) -> None:
    images = [base64.b64encode(p.read_bytes()).decode() for p in PNGS[:3]]
    request = {
        "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": images}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        response = client.post(
            INFER,
            content=compress(orjson.dumps(request)),
            headers={"Content-Encoding": encoding},
        )
        assert response.status_code == 200, response.text
        (out,) = response.json()["outputs"]
        assert out["datatype"] == "BYTES" and out["shape"] == [3, 3]
        for path, row in zip(PNGS[:3], np.array(out["data"]).reshape(3, 3), strict=True):
            rest = client.post("/predict", content=path.read_bytes(), params={"top_k": 3}).json()
            expected = [(p["class_id"], p["label"]) for p in rest["predictions"]]
            parsed = [s.split(":", 2) for s in row]
            assert [(int(i), label) for _, i, label in parsed] == expected
            assert abs(float(parsed[0][0]) - rest["confidence"]) < 1e-5


def test_gzip_body_past_the_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=4096)
    bomb = gzip.compress(b'{"inputs": []}' + b" " * 100_000)
    response = client.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "limit" in response.json()["error"]


def _uint8(shape: list[int], data: Any, datatype: str = "UINT8") -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "shape": shape, "datatype": datatype, "data": data}]}


MALFORMED: list[tuple[str, Any, dict[str, str] | None, str]] = [
    ("wrong datatype", _uint8([1, 28, 28, 1], [0] * 784, "FP32"), None, "must be UINT8"),
    ("short data", _uint8([1, 28, 28, 1], [0] * 783), None, "needs 784 values"),
    ("model shape", _uint8([1, 28, 28, 3], [0] * 2352), None, "[N, 28, 28, 1]"),
    ("out of range", _uint8([1, 28, 28, 1], [300] * 784), None, "0 to 255"),
    ("floats", _uint8([1, 28, 28, 1], [0.5] * 784), None, "0 to 255"),
    ("ragged", _uint8([1, 28, 28, 1], [[0] * 783, [0]]), None, "evenly nested"),
    ("not json", b"{nope", None, "not valid JSON"),
    ("no inputs", {"inputs": []}, None, "exactly one tensor"),
    (
        "unknown input",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]},
        None,
        "unknown input 'x'",
    ),  # fmt: skip
    (
        "unknown output",
        {**_uint8([1, 28, 28, 1], [0] * 784), "outputs": [{"name": "scores"}]},
        None,
        "unknown output 'scores'",
    ),
    (
        "header past body",
        b'{"inputs": []}',
        {"Inference-Header-Content-Length": "500"},
        "body holds only",
    ),  # fmt: skip
    (
        "binary size mismatch",
        *binary_request(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": [1, 28, 28, 1],
                        "datatype": "UINT8",
                        "parameters": {"binary_data_size": 784},
                    }
                ]
            },
            bytes(700),
        ),
        "binary_data_size is 784 but 700 bytes",
    ),  # fmt: skip
    (
        "not an image",
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(b"plain text").decode()],
                }
            ]
        },
        None,
        "BYTES element 0: the data is not a recognised image",
    ),  # fmt: skip
    (
        "bytes count",
        {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]},
        None,
        "needs 2 BYTES elements",
    ),
    (
        "classification range",
        {
            **_uint8([1, 28, 28, 1], [0] * 784),
            "outputs": [{"name": "logits", "parameters": {"classification": 11}}],
        },
        None,
        "classification must be between 1 and 10",
    ),  # fmt: skip
    (
        "too many images",
        _uint8([17, 28, 28, 1], [0] * 784 * 17),
        None,
        "the limit is 16",
    ),
    ("bad encoding", b"{}", {"Content-Encoding": "br"}, "Content-Encoding 'br'"),
    ("bad gzip", b"not gzip", {"Content-Encoding": "gzip"}, "cannot be decompressed"),
]


@pytest.mark.parametrize(
    ("body", "headers", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_are_400_and_the_server_keeps_serving(
    client: TestClient, body: Any, headers: dict[str, str] | None, message: str
) -> None:
    if isinstance(body, bytes):
        response = client.post(INFER, content=body, headers=headers)
    else:
        response = client.post(INFER, json=body, headers=headers)
    expected = 413 if "limit is" in message else 400
    assert response.status_code == expected, response.text
    assert message in response.json()["error"]
    ok = client.post(INFER, json=_uint8([1, 28, 28, 1], pixels(PNGS[:1]).reshape(-1).tolist()))
    assert ok.status_code == 200


def test_binary_header_length_is_checked_exactly(client: TestClient) -> None:
    header = {"inputs": [{"name": "pixels", "shape": [1, 28, 28, 1], "datatype": "UINT8",
                          "parameters": {"binary_data_size": 784}}]}  # fmt: skip
    body, _ = binary_request(header, bytes(784))
    n = len(orjson.dumps(header))
    response = client.post(INFER, content=body, headers={"Inference-Header-Content-Length": "x"})
    assert response.status_code == 400 and "must be a number" in response.json()["error"]
    response = client.post(
        INFER, content=body, headers={"Inference-Header-Content-Length": str(n - 1)}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def test_bench_v2_body_is_a_valid_request(client: TestClient) -> None:
    body, content_type = encode_body(PNGS[0].read_bytes(), PNGS[0].name, "v2")
    request = image_request(Target("127.0.0.1", 1, INFER), PNGS[0], "v2")
    head, _, sent = request.partition(b"\r\n\r\n")
    assert sent == body
    length = next(
        line.split(b": ")[1] for line in head.split(b"\r\n") if line.startswith(b"Inference-")
    )
    response = client.post(
        INFER,
        content=body,
        headers={"Content-Type": content_type, "Inference-Header-Content-Length": length.decode()},
    )
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["shape"] == [1, 5] and out["data"][0].endswith(":Ankle boot")


# -- statistics and repository ----------------------------------------------------------------


def test_statistics_count_v2_and_rest_requests(client: TestClient) -> None:
    client.post("/predict", content=PNGS[0].read_bytes())
    batch = pixels(PNGS[:3])
    client.post(INFER, json=_uint8(list(batch.shape), batch.reshape(-1).tolist()))
    client.post(INFER, json=_uint8([1, 28, 28, 1], [0]))  # a failure
    (stats,) = client.get("/v2/models/fashion-cnn/stats").json()["model_stats"]
    assert stats["name"] == "fashion-cnn" and stats["version"] == "1"
    assert stats["inference_count"] == 4
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 2 and inference["fail"]["count"] == 1
    assert inference["compute_infer"]["count"] == 4 and inference["compute_infer"]["ns"] > 0
    assert inference["queue"]["count"] == 4
    assert inference["compute_output"]["count"] == 1
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sum(size * n for size, n in sizes.items()) == 4
    assert stats["execution_count"] == sum(sizes.values())
    everything = client.get("/v2/models/stats").json()["model_stats"]
    assert [s["name"] for s in everything] == ["fashion-cnn"]
    assert client.get("/v2/models/fashion-cnn/versions/3/stats").status_code == 404


def test_repository_index_unload_and_load(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v2/repository/index").status_code == 401
    index = client.post("/v2/repository/index", headers=auth).json()
    assert index == [{"name": "fashion-cnn", "version": "1", "state": "READY"}]
    assert client.post("/v2/repository/models/fashion-cnn/unload", headers=auth).status_code == 200
    assert client.get("/v2/models/fashion-cnn/ready").status_code == 400
    index = client.post("/v2/repository/index", headers=auth).json()
    assert index[0]["state"] == "UNAVAILABLE"
    assert client.post("/v2/repository/index", headers=auth, json={"ready": True}).json() == []
    assert client.post("/v2/repository/models/fashion-cnn/load", headers=auth).status_code == 200
    assert client.get("/v2/models/fashion-cnn/ready").status_code == 200
    missing = client.post("/v2/repository/models/nope/load", headers=auth)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


# -- the real client against a real server ----------------------------------------------------


@pytest.mark.slow
def test_tritonclient_against_a_served_model(tmp_path: Path) -> None:
    import tritonclient.http as triton

    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL / "1", repo / "fashion-cnn" / "1")
    server = Server(repo, "--max-delay-ms", "2")
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("fashion-cnn")
        meta = client.get_model_metadata("fashion-cnn")
        assert meta["inputs"][0]["shape"] == [-1, 28, 28, 1]
        assert client.get_model_config("fashion-cnn")["input"][0]["data_type"] == "TYPE_UINT8"

        rest = [
            httpx.post(
                f"{server.url}/predict", content=p.read_bytes(), params={"top_k": 10}
            ).json()["predictions"]
            for p in PNGS
        ]
        expected = np.array([[{q["class_id"]: q["confidence"] for q in r}[c] for c in range(10)]
                             for r in rest])  # fmt: skip

        batch = pixels(PNGS)
        for binary in (True, False):
            tensor = triton.InferInput("pixels", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch, binary_data=binary)
            wanted = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
            result = client.infer("fashion-cnn", [tensor], outputs=wanted)
            assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)

        images = np.array([p.read_bytes() for p in PNGS], dtype=np.object_)
        tensor = triton.InferInput("image", [len(PNGS)], "BYTES")
        tensor.set_data_from_numpy(images)
        wanted = [
            triton.InferRequestedOutput("probabilities"),
            triton.InferRequestedOutput("logits", class_count=1),
        ]
        result = client.infer("fashion-cnn", [tensor], outputs=wanted, request_id="r1")
        assert result.get_response()["id"] == "r1"
        assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        top = [s.decode().split(":", 2) for s in result.as_numpy("logits").reshape(-1)]
        assert [r[0]["label"] for r in rest] == [label for _, _, label in top]

        stats = client.get_inference_statistics("fashion-cnn")["model_stats"][0]
        assert stats["inference_count"] == 4 * len(PNGS)  # rest, binary, JSON, BYTES
        assert stats["inference_stats"]["success"]["count"] == len(PNGS) + 3

        auth = {"Authorization": f"Bearer {SERVER_TOKEN}"}
        with pytest.raises(triton.InferenceServerException):
            client.unload_model("fashion-cnn")
        client.unload_model("fashion-cnn", headers=auth)
        assert not client.is_model_ready("fashion-cnn")
        client.load_model("fashion-cnn", headers=auth)
        assert client.is_model_ready("fashion-cnn")
        assert client.get_model_repository_index(headers=auth)[0]["state"] == "READY"
        client.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_v2_and_rest_requests_share_batches(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL / "1", repo / "fashion-cnn" / "1")
    # A batch waits up to 1 s for company: on any machine the 48 requests arrive within it.
    server = Server(repo, "--max-delay-ms", "1000")
    png = PNGS[0].read_bytes()
    encoded = bytes_tensor([png])
    v2_body, v2_headers = binary_request(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                     "parameters": {"binary_data_size": len(encoded)}}]},
        encoded,
    )  # fmt: skip

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            calls = []
            for i in range(48):
                if i % 2:
                    calls.append(http.post(f"{server.url}{INFER}", content=v2_body,
                                           headers=v2_headers))  # fmt: skip
                else:
                    calls.append(http.post(f"{server.url}/predict", content=png))
            return list(await asyncio.gather(*calls))

    try:
        responses = asyncio.run(fire())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:2]
        buckets = _batch_sizes(httpx.get(f"{server.url}/metrics").text)
        assert buckets["1.0"] < buckets["+Inf"], "every request ran alone"
        stats = httpx.get(f"{server.url}/v2/models/fashion-cnn/stats").json()["model_stats"][0]
        assert any(b["batch_size"] > 1 for b in stats["batch_stats"])
        assert stats["inference_count"] == 48
    finally:
        server.stop()
