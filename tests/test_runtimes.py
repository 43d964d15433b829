"""Every runtime serves the bundled model with ONNX Runtime's answers, through every front door,
and every runtime or provider that cannot run says why and what to install."""

from __future__ import annotations

import builtins
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, ROOT, SAMPLES, needs_fashion_mnist
from tinyserve.engine import Engine, EngineConfig, select_file, softmax
from tinyserve.errors import ModelError, RuntimeUnavailable
from tinyserve.imaging import load_image
from tinyserve.manifest import InputSpec, read_manifest

pytest.importorskip("openvino", reason="the openvino extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")

SPEC = InputSpec(28, 28, 1, "L")
PNGS = sorted(SAMPLES.glob("*.png"))
# The bundled model's version 1 (as of the fixture's convert_report.json) as a LiteRT file
# beside its model.onnx (the manifest.json names model.tflite, so "auto" runs it on LiteRT);
# made by `tinyserve convert litert`. Every runtime is compared with ONNX Runtime on that
# model.onnx, so the tests hold when the bundled model is retrained (docs/backends.md says
# how to make the fixture again).
LITERT_VERSION = ROOT / "tests" / "fixtures" / "fashion-cnn-litert" / "1"
TOLERANCE = 1e-4  # the parity reports' bar for float conversions
RUNTIMES = ("onnxruntime", "openvino", "litert")


def has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray[Any, Any]:
    return np.stack([load_image(p, SPEC) for p in PNGS])


@pytest.fixture(scope="module")
def expected(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """ONNX Runtime's probabilities for the samples: what every runtime must reproduce."""
    engine = Engine(LITERT_VERSION / "model.onnx", EngineConfig(runtime="onnxruntime"))
    return softmax(engine.infer(pixels))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fashion-cnn version 1 (model.onnx beside model.tflite), and version 2 as an IR."""
    from tinyserve.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("runtimes") / "models"
    shutil.copytree(LITERT_VERSION, root / "fashion-cnn" / "1")
    config = ConvertConfig(root / "fashion-cnn", "openvino", parent=1, samples=(SAMPLES,))
    assert convert(config).version == 2
    return root


def test_the_fixture_is_a_checked_conversion() -> None:
    report = json.loads((LITERT_VERSION / "convert_report.json").read_text())
    assert report["conversion"]["format"] == "litert" and report["parity"]["passed"]
    manifest = read_manifest(LITERT_VERSION / "model.tflite")
    assert manifest.source["conversion"]["parent_version"] == 1
    assert manifest.source["checkpoint_sha256"] == read_manifest(
        LITERT_VERSION / "model.onnx"
    ).source.get("checkpoint_sha256")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_matches_onnx_runtime_on_the_samples(
    runtime: str, pixels: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]
) -> None:
    engine = Engine(LITERT_VERSION / "model.onnx", EngineConfig(runtime=runtime))
    assert engine.runtime == runtime and engine.describe()["runtime"] == runtime
    assert (engine.input_name, engine.output_name) == ("pixels", "logits")
    for got in (
        softmax(engine.infer(pixels)),
        np.concatenate([softmax(engine.infer(pixels[i : i + 1])) for i in range(len(pixels))]),
    ):
        assert (got.argmax(1) == expected.argmax(1)).all()
        np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_auto_runs_each_version_on_its_own_format(repo: Path) -> None:
    folder = repo / "fashion-cnn"
    assert select_file(folder / "1" / "model.onnx", "auto")[0] == "onnxruntime"
    assert select_file(folder / "1" / "model.tflite", "auto")[0] == "litert"
    assert select_file(folder / "2" / "model.xml", "auto")[0] == "openvino"
    # OpenVINO prefers an IR to the ONNX file; LiteRT and ONNX Runtime read their own only.
    assert select_file(folder / "1" / "model.tflite", "openvino")[1].name == "model.onnx"
    assert select_file(folder / "2" / "model.xml", "openvino")[1].name == "model.xml"
    with pytest.raises(ModelError, match="onnxruntime runtime reads model.onnx"):
        select_file(folder / "2" / "model.xml", "onnxruntime")
    with pytest.raises(ModelError, match="tinyserve convert litert"):
        select_file(folder / "2" / "model.xml", "litert")


def served_answers(client: TestClient, model: str) -> tuple[list[np.ndarray[Any, Any]], ...]:
    """Probabilities of every sample by REST predict, REST batch, V2 BYTES images and V2
    UINT8 pixels (under the ONNX model's input name, whatever the runtime calls it)."""
    rest = []
    for path in PNGS:
        body = client.post(
            f"/v1/models/{model}/predict", content=path.read_bytes(), params={"top_k": 10}
        ).json()
        rest.append(_by_class(body["predictions"]))
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in PNGS]
    answer = client.post(f"/v1/models/{model}/predict/batch", files=files, params={"top_k": 10})
    assert answer.status_code == 200, answer.text
    batch = [_by_class(item["predictions"]) for item in answer.json()["results"]]
    data = b"".join(struct.pack("<I", len(b)) + b for b in (p.read_bytes() for p in PNGS))
    header = (
        b'{"inputs":[{"name":"image","shape":[%d],"datatype":"BYTES",'
        b'"parameters":{"binary_data_size":%d}}],"outputs":[{"name":"probabilities",'
        b'"parameters":{"binary_data":false}}]}' % (len(PNGS), len(data))
    )
    answer = client.post(
        f"/v2/models/{model}/infer",
        content=header + data,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert answer.status_code == 200, answer.text
    (out,) = answer.json()["outputs"]
    v2 = list(np.array(out["data"], dtype=np.float32).reshape(len(PNGS), 10))
    pixels = np.stack([load_image(p, SPEC) for p in PNGS])
    request = {
        "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                    "data": pixels.reshape(-1).tolist()}],
        "outputs": [{"name": "probabilities"}],
    }  # fmt: skip
    answer = client.post(f"/v2/models/{model}/infer", json=request)
    assert answer.status_code == 200, answer.text
    (out,) = answer.json()["outputs"]
    v2_pixels = list(np.array(out["data"], dtype=np.float32).reshape(len(PNGS), 10))
    return rest, batch, v2, v2_pixels


def _by_class(predictions: list[dict[str, Any]]) -> np.ndarray[Any, Any]:
    row = np.zeros(10, dtype=np.float32)
    for p in predictions:
        row[p["class_id"]] = p["confidence"]
    return row


@pytest.mark.parametrize(
    ("version", "runtime", "served"),
    [(1, "auto", "litert"), (1, "onnxruntime", "onnxruntime"), (1, "openvino", "openvino"),
     (2, "auto", "openvino")],
)  # fmt: skip
def test_every_front_door_answers_the_same_on_every_runtime(
    repo: Path,
    app_client: Callable[..., TestClient],
    expected: np.ndarray[Any, Any],
    version: int,
    runtime: str,
    served: str,
) -> None:
    (repo / "fashion-cnn" / "config.toml").write_text(f"version = {version}\n")
    try:
        client = app_client(repo=repo, engine=EngineConfig(runtime=runtime))
        info = client.get("/v1/models/fashion-cnn").json()
        assert info["versions"][0]["runtime"]["runtime"] == served, info
        for answers in served_answers(client, "fashion-cnn"):
            got = np.stack(answers)
            assert (got.argmax(1) == expected.argmax(1)).all()
            np.testing.assert_allclose(got, expected, atol=TOLERANCE)
        metrics = client.get("/metrics").text
        assert 'tinyserve_batch_size_count{model="fashion-cnn"' in metrics
    finally:
        (repo / "fashion-cnn" / "config.toml").unlink()


def test_config_toml_chooses_a_models_runtime(
    repo: Path, app_client: Callable[..., TestClient]
) -> None:
    (repo / "fashion-cnn" / "config.toml").write_text('version = 1\nruntime = "openvino"\n')
    try:
        client = app_client(repo=repo)
        info = client.get("/v1/models/fashion-cnn").json()
        assert info["versions"][0]["runtime"]["runtime"] == "openvino"
        (repo / "fashion-cnn" / "config.toml").write_text('runtime = "tflite"\n')
        bad = app_client(repo=repo)
        assert bad.get("/health").json()["failed"] == ["fashion-cnn"]
        answer = bad.post("/v1/models/fashion-cnn/predict", content=PNGS[0].read_bytes())
        assert "runtime must be one of auto, onnxruntime, openvino, litert" in answer.text
    finally:
        (repo / "fashion-cnn" / "config.toml").unlink()


# -- what cannot run says why -----------------------------------------------------------------


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_providers_without_a_gpu_name_the_gpu_extra(provider: str) -> None:
    if has_cuda():
        pytest.skip("this machine has ONNX Runtime's CUDA provider; see test_cuda_runs")
    with pytest.raises(RuntimeUnavailable, match=r"no GPU.*onnxruntime-gpu.*tinyserve\[gpu\]"):
        Engine(BUNDLED_MODEL / "1" / "model.onnx", EngineConfig(provider=provider))


def test_cuda_runs(pixels: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> None:
    if not has_cuda():
        pytest.skip("no CUDA: onnxruntime-gpu (the gpu extra) and an NVIDIA GPU are not here")
    engine = Engine(BUNDLED_MODEL / "1" / "model.onnx", EngineConfig(provider="cuda"))
    got = softmax(engine.infer(pixels))
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_onnx_runtimes_openvino_provider_points_at_the_openvino_runtime() -> None:
    import onnxruntime

    if "OpenVINOExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the OpenVINO execution provider")
    with pytest.raises(RuntimeUnavailable, match="onnxruntime-openvino.*--runtime openvino"):
        Engine(BUNDLED_MODEL / "1" / "model.onnx", EngineConfig(provider="openvino"))


@pytest.mark.parametrize("runtime", ["openvino", "litert"])
def test_providers_belong_to_onnx_runtime(runtime: str) -> None:
    with pytest.raises(RuntimeUnavailable, match="ONNX Runtime's"):
        Engine(LITERT_VERSION / "model.onnx", EngineConfig(runtime=runtime, provider="cuda"))


@pytest.mark.parametrize(
    ("runtime", "module", "extra"),
    [("openvino", "openvino", "openvino"), ("litert", "ai_edge_litert.interpreter", "litert")],
)
def test_a_runtime_that_is_not_installed_names_its_extra(
    runtime: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def missing(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    with pytest.raises(RuntimeUnavailable, match=rf"not installed.*tinyserve\[{extra}\]"):
        Engine(LITERT_VERSION / "model.onnx", EngineConfig(runtime=runtime))


def test_missing_and_broken_files_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        Engine(tmp_path / "model.tflite")
    folder = tmp_path / "1"
    folder.mkdir()
    shutil.copy(LITERT_VERSION / "model.tflite", folder / "model.tflite")
    with pytest.raises(ModelError, match="no manifest.json"):
        Engine(folder / "model.tflite")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a valid manifest"):
        Engine(folder / "model.tflite")
    (folder / "model.tflite").write_bytes(b"not a flat buffer")
    with pytest.raises(ModelError, match="LiteRT cannot load"):
        Engine(folder / "model.tflite")
    (folder / "model.xml").write_text("<net/>")
    with pytest.raises(ModelError, match="OpenVINO cannot load"):
        Engine(folder / "model.xml")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ModelError, match="not a model file"):
        Engine(tmp_path / "weights.pt")


def test_bench_model_on_cuda_says_there_is_no_gpu() -> None:
    if has_cuda():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tinyserve", "bench", "model", str(BUNDLED_MODEL),
         "--provider", "cpu,cuda", "--seconds", "0.1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: no GPU execution provider: provider 'cuda'" in done.stderr
    assert "tinyserve[gpu]" in done.stderr and "threads" not in done.stdout  # nothing measured


def test_bench_model_runs_on_each_runtime(repo: Path) -> None:
    from tinyserve.bench.model import ModelBenchConfig, bench_model

    for target, runtime in ((repo / "fashion-cnn" / "1" / "model.tflite", "litert"),
                            (repo / "fashion-cnn" / "2" / "model.xml", "openvino")):  # fmt: skip
        config = ModelBenchConfig(
            str(target), batch_sizes=(1, 4), threads=(1,), seconds=0.05, min_runs=2, warmup_runs=1
        )
        report = bench_model(config)
        assert report.runtimes["cpu"]["runtime"] == runtime
        assert [(r.provider, r.batch_size) for r in report.results] == [("cpu", 1), ("cpu", 4)]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_lambda_handler_runs_on_each_runtime(
    runtime: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected: np.ndarray[Any, Any]
) -> None:
    import base64

    from tinyserve import serverless

    shutil.copytree(LITERT_VERSION, tmp_path / "fashion-cnn" / "1")
    monkeypatch.setenv("TINYSERVE_MODEL_URI", str(tmp_path / "fashion-cnn"))
    monkeypatch.setenv("TINYSERVE_RUNTIME", runtime)
    serverless.reset()
    try:
        for path, row in zip(PNGS, expected, strict=True):
            event = {"image": base64.b64encode(path.read_bytes()).decode(), "top_k": 10}
            body = json.loads(serverless.handler(event, None)["body"])
            assert body["class_id"] == int(row.argmax()), body
            got = _by_class(body["predictions"])
            np.testing.assert_allclose(got, row, atol=TOLERANCE)
        assert serverless.load(serverless.HandlerConfig.from_env()).engine.runtime == runtime
    finally:
        serverless.reset()


@needs_fashion_mnist
def test_evaluate_on_another_runtime_scores_the_same() -> None:
    from tinyserve.evaluate import EvalConfig, evaluate

    onnx_file = str(LITERT_VERSION / "model.onnx")
    reports = [
        evaluate(EvalConfig(onnx_file, latency_runs=5, runtime=r)) for r in ("auto", "litert")
    ]
    assert [Path(r.path).name for r in reports] == ["model.onnx", "model.tflite"]
    assert reports[0].accuracy == pytest.approx(reports[1].accuracy, abs=2e-4)
    with pytest.raises(ValueError, match="runtime must be one of"):
        EvalConfig(onnx_file, runtime="tensorflow")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtimes_are_safe_to_call_from_several_threads(
    runtime: str, pixels: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]
) -> None:
    """A server calls a model from its inference thread and, for lone requests, from the
    event loop thread; batches of every size must still get their own answers."""
    from concurrent.futures import ThreadPoolExecutor

    engine = Engine(LITERT_VERSION / "model.onnx", EngineConfig(runtime=runtime, warmup_runs=0))

    def run(i: int) -> bool:
        start, size = i % 7, 1 + i % 4
        got = softmax(engine.infer(pixels[start : start + size]))
        return bool(np.allclose(got, expected[start : start + size], atol=TOLERANCE))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(80)))
