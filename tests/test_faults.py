"""Injected faults, and what must hold through them.

- A SIGKILL at each step of writing a new version (``quantize``, ``export``, ``import``)
  never leaves a version that a server would load: the kill lands exactly on a step through
  an audit hook (tests/killpoint.py).
- A write that fails for want of space says so and adds nothing.
- ONNX Runtime raising in one batch fails that batch's requests only (500 ``internal``).
- A model file truncated or deleted before a reload: the old version keeps serving.
- A client hanging up mid-request, 500 times a second, leaks nothing.
- S3 down, slow or corrupt (tests/fault_proxy.py in front of moto): clear errors in bounded
  time at start-up, and the last complete copy on a refresh.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, ROOT, SAMPLES
from fault_proxy import FaultProxy
from test_onnx_import import MEAN, STD, float_onnx, labels_file  # noqa: F401 (fixtures)
from test_sources import KEY, upload_repo
from tinyserve import sources
from tinyserve.engine import Engine
from tinyserve.errors import ModelError
from tinyserve.repository import list_versions, save_version
from tinyserve.sources import materialize

KILLPOINT = ROOT / "tests" / "killpoint.py"
TOKEN = "faults-admin-token"
PNG = {"content-type": "image/png"}

# Each step of a version's write, as the audit events that start it: creating the hidden
# staging folder, opening its model for writing, opening its report, renaming it into place.
STEPS = [
    ("os.mkdir", "*/.partial-*"),
    ("open", "*/.partial-*/model.onnx"),
    ("open", "*/.partial-*/*.json"),
    ("os.rename", "*/.partial-*"),
]


def run_killed(event: str, pattern: str, args: list[str]) -> int:
    result = subprocess.run(
        [sys.executable, str(KILLPOINT), event, pattern, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode


def assert_whole(model_dir: Path, versions: list[int]) -> None:
    """Only complete versions are visible: exactly ``versions``, each loadable with a report."""
    assert list_versions(model_dir) == versions
    for version in versions:
        folder = model_dir / str(version)
        Engine(folder / "model.onnx")
        assert any(folder.glob("*report*.json")), f"{folder} has no report"
    visible = sorted(p.name for p in model_dir.iterdir() if p.name.isdigit())
    assert visible == [str(v) for v in versions], visible


def kill_at_every_step(model_dir: Path, args: list[str], before: list[int]) -> None:
    for event, pattern in STEPS:
        code = run_killed(event, pattern, args)
        assert code == -9, f"{event} {pattern}: the step was never reached (exit {code})"
        assert_whole(model_dir, before)
    # A run that is not killed adds one whole version, and clears the staging leftovers.
    result = subprocess.run([sys.executable, "-m", "tinyserve", *args], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert_whole(model_dir, [*before, max(before, default=0) + 1])
    assert not list(model_dir.glob(".partial-*"))


@pytest.mark.slow
def test_sigkill_while_quantize_writes_never_leaves_half_a_version(
    tiny_repo: Path, image_folder: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    model_dir = repo / "colors"
    args = ["quantize", str(model_dir), "--mode", "static", "--data", str(image_folder),
            "--force"]  # fmt: skip
    kill_at_every_step(model_dir, args, [1])


@pytest.mark.slow
def test_sigkill_while_export_writes_never_leaves_half_a_version(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    args = ["export", str(tiny_checkpoint), "--repo", str(repo), "--name", "colors"]
    kill_at_every_step(repo / "colors", args, [])


@pytest.mark.slow
def test_sigkill_while_import_writes_never_leaves_half_a_version(
    float_onnx: Callable[..., Path],  # noqa: F811
    labels_file: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    args = ["import", str(float_onnx()), "--repo", str(repo), "--name", "imported",
            "--labels", str(labels_file), "--mean", ",".join(map(str, MEAN)),
            "--std", ",".join(map(str, STD))]  # fmt: skip
    kill_at_every_step(repo / "imported", args, [])


def test_a_full_disk_is_a_clear_error_and_adds_nothing(tmp_path: Path) -> None:
    """The write of a version runs out of room (RLIMIT_FSIZE: the same failed write() as a
    full disk, without needing a small filesystem): the error says so, nothing is added."""
    model_dir = tmp_path / "full" / "fashion-cnn"
    script = f"""
import resource, signal, sys
import onnx
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from tinyserve.errors import ModelError
from tinyserve.repository import save_version
model = onnx.load({str(BUNDLED_MODEL / "1" / "model.onnx")!r})
try:
    save_version(__import__("pathlib").Path({str(model_dir)!r}), model)
except ModelError as exc:
    print(exc.message)
    sys.exit(3)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot write version 1" in result.stdout
    assert "nothing was added to the repository" in result.stdout
    assert list_versions(model_dir) == [] and not list(model_dir.glob(".partial-*"))


def test_a_version_folder_that_already_holds_a_model_is_refused(tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(BUNDLED_MODEL / "1" / "model.onnx"))
    save_version(tmp_path / "m", model, 1)
    with pytest.raises(Exception, match="already holds a model"):
        save_version(tmp_path / "m", model, 1)
    assert list_versions(tmp_path / "m") == [1]


# -- the server ---------------------------------------------------------------------------


def test_onnx_runtime_raising_fails_that_batch_only(
    app_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    client = app_client(repo=repo)
    loaded = client.app.context.registry.get("fashion-cnn")  # type: ignore[attr-defined]
    engine = loaded.engine
    real = engine.infer
    calls: list[int] = []

    def flaky(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        calls.append(len(batch))
        if len(calls) == 2:  # the second batch fails inside the runtime
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")
        return real(batch)

    loaded.batcher.infer = flaky
    images = [p.read_bytes() for p in sorted(SAMPLES.glob("*.png"))]
    statuses = []
    for round_ in range(3):
        files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        response = client.post("/v1/models/fashion-cnn/predict/batch", files=files)
        statuses.append(response.status_code)
        if round_ == 1:
            assert response.json()["error"]["code"] == "internal"
    assert statuses == [200, 500, 200]
    assert client.post("/predict", content=images[0], headers=PNG).status_code == 200
    metrics = client.get("/metrics").text
    assert 'code="internal"' in metrics


@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage"])
def test_a_broken_model_file_on_reload_keeps_the_old_version_serving(
    app_client: Callable[..., TestClient], tmp_path: Path, damage: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL / "1", repo / "fashion-cnn" / "1")
    client = app_client(repo=repo, admin_token=TOKEN)
    image = (SAMPLES / "0000_ankle-boot.png").read_bytes()
    before = client.post("/predict", content=image, headers=PNG).json()
    path = repo / "fashion-cnn" / "1" / "model.onnx"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(os.urandom(4096))
    reload = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert 400 <= reload.status_code < 600 and reload.status_code != 200
    assert "previous version keeps serving" in reload.json()["error"]["message"]
    after = client.post("/predict", content=image, headers=PNG)
    assert after.status_code == 200 and after.json()["predictions"] == before["predictions"]
    assert client.get("/health/ready").status_code == 200


@pytest.mark.slow
def test_clients_vanishing_mid_request_leak_nothing(serve: Callable[..., Any]) -> None:
    """500 requests/s for 4 s whose clients hang up before (or while) the answer is sent;
    the server's tasks, threads, file descriptors and memory come back to where they were."""
    server = serve()
    host, port = "127.0.0.1", server.port
    image = (SAMPLES / "0000_ankle-boot.png").read_bytes()
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\ncontent-type: image/png\r\n"
            f"content-length: {len(image)}\r\n\r\n").encode()  # fmt: skip

    def process_figures() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        wanted = ("process_resident_memory_bytes", "process_open_fds", "tinyserve_threads")
        figures = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                figures[name] = float(value)
        return figures

    async def hang_up(half: bool) -> None:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.write(head + (image[: len(image) // 2] if half else image))
            await writer.drain()
            writer.transport.abort()  # gone before the answer
        except OSError:
            pass

    async def flood(seconds: float, rate: int) -> int:
        sent = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        tasks = []
        while loop.time() - started < seconds:
            tasks.append(asyncio.ensure_future(hang_up(half=sent % 2 == 0)))
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
        await asyncio.gather(*tasks)
        return sent

    for _ in range(50):  # warm: allocate what a steady server holds
        httpx.post(f"{server.url}/predict", content=image, headers=PNG)
    before = process_figures()
    sent = asyncio.run(flood(4.0, 500))
    assert sent >= 1500
    for _ in range(50):
        assert httpx.post(f"{server.url}/predict", content=image, headers=PNG).status_code == 200
    after = process_figures()
    assert after["process_open_fds"] <= before["process_open_fds"] + 2, (before, after)
    assert after["tinyserve_threads"] <= before["tinyserve_threads"] + 2, (before, after)
    grown = after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]
    assert grown < 20 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"


# -- S3 down, slow or corrupt, at start-up and on a refresh -------------------------------


@pytest.fixture
def s3_proxy(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, FaultProxy]]:
    """moto's S3 behind the fault proxy; the AWS endpoint points at the proxy."""
    proxy = FaultProxy(s3.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(sources, "S3_CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(sources, "S3_READ_TIMEOUT_S", 0.5)
    yield s3, proxy
    proxy.close()


def test_s3_faults_at_start_up_are_clear_errors_in_bounded_time(
    s3_proxy: tuple[Any, FaultProxy], tmp_path: Path
) -> None:
    s3, proxy = s3_proxy
    bucket = upload_repo(s3)
    # a corrupt body fails botocore's CRC check, or else tinyserve's MD5 check
    for mode, message in [("down", "cannot"), ("slow", "cannot"), ("corrupt", "not match")]:
        proxy.mode, proxy.delay_s = mode, 2.0
        started = time.monotonic()
        with pytest.raises(ModelError, match=message):
            materialize(f"s3://{bucket}/repo", tmp_path / mode)
        assert time.monotonic() - started < 15, f"{mode}: took too long to give up"
        assert not [p for p in (tmp_path / mode).rglob("model.onnx")], "a bad copy was kept"


def test_a_failed_refresh_serves_the_last_complete_copy(
    s3_proxy: tuple[Any, FaultProxy], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s3, proxy = s3_proxy
    bucket = upload_repo(s3)
    source, cache = f"s3://{bucket}/repo", tmp_path / "cache"
    root = materialize(source, cache)
    good = (root / KEY).read_bytes()
    # The object changes in S3; every refresh then fails in a new way.
    s3.client().put_object(Bucket=bucket, Key=f"repo/{KEY}", Body=good + b"\0")
    for mode in ("down", "slow", "corrupt"):
        proxy.mode, proxy.delay_s = mode, 2.0
        with caplog.at_level("WARNING", logger="tinyserve"):
            again = materialize(source, cache)
        assert again == root and (root / KEY).read_bytes() == good, mode
        assert "serving the copy of its last complete sync" in caplog.text
        Engine(root / KEY)  # still a whole, loadable model
    proxy.mode = "pass"
    assert (materialize(source, cache) / KEY).read_bytes() == good + b"\0"


@pytest.mark.slow
def test_a_server_starts_from_its_cache_while_s3_is_down(
    s3_proxy: tuple[Any, FaultProxy], tmp_path: Path
) -> None:
    from live_server import Server

    s3, proxy = s3_proxy
    bucket = upload_repo(s3)
    cache = tmp_path / "cache"
    first = Server(f"s3://{bucket}/repo", "--cache-dir", str(cache))  # type: ignore[arg-type]
    assert first.stop() == 0
    proxy.mode = "down"
    second = Server(f"s3://{bucket}/repo", "--cache-dir", str(cache))  # type: ignore[arg-type]
    try:
        image = (SAMPLES / "0000_ankle-boot.png").read_bytes()
        response = httpx.post(f"{second.url}/predict", content=image, headers=PNG)
        assert response.status_code == 200, response.text
        assert "serving the copy of its last complete sync" in second.output()
    finally:
        second.stop()
