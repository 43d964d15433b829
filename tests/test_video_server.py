"""Video streams on a real server with the bundled models: confinement, admin token, SSE,
MJPEG, failure isolation, metrics, the detect route, the seed routes' default model, and the
web page's live view in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("av")
pytest.importorskip("trackers")

from live_server import TOKEN, Server, wait_until  # noqa: E402
from tinyserve.datasets import load_fashion_mnist  # noqa: E402
from tinyserve.scenes import SceneConfig, write_sequence  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not (MODELS / "scene-det").is_dir(), reason="the bundled detector is not in models/"
)


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("streams")
    write_sequence(
        folder / "clip",
        SceneConfig(photos=ROOT / "samples" / "photos"),
        load_fashion_mnist("test"),
        seed=7,
        count=150,
    )
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(5000))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, stream_dir: Path) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("fashion-cnn", "fashion-cnn-video", "scene-det"):
        shutil.copytree(MODELS / name, repo / name)
    served = Server(repo, "--stream-dir", str(stream_dir), "--max-streams", "3")
    yield served
    served.stop()


def _start(server: Server, source: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/streams", json={"source": source, **extra}, headers=AUTH, timeout=30
    )


def test_starting_a_stream_needs_the_admin_token_and_a_confined_source(server: Server) -> None:
    # The first streams request loads the video stack (PyAV, the tracker): on a busy machine
    # that takes longer than httpx's default 5 s.
    assert httpx.get(f"{server.url}/v1/streams", timeout=60).json() == {"streams": []}
    refused = httpx.post(f"{server.url}/v1/streams", json={"source": "clip/video.mp4"}, timeout=30)
    assert refused.status_code in (401, 403)
    for source in (
        "../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        "http://example.com/x.mp4",
        "/dev/video0",
    ):
        answer = _start(server, source)
        assert answer.status_code in (403, 422), (source, answer.text)
        assert "error" in answer.json()
    assert httpx.get(f"{server.url}/v1/streams", timeout=30).json() == {"streams": []}


def test_a_stream_runs_with_events_view_and_metrics_and_a_broken_one_fails_alone(
    server: Server,
) -> None:
    good = _start(server, "clip/video.mp4", fps=30)
    assert good.status_code == 201, good.text
    stream = good.json()
    sid = stream["id"]
    assert stream["classifier"] == "fashion-cnn-video"  # the tracks' classifier by default
    assert stream["view_url"] == f"/v1/streams/{sid}/mjpeg"
    bad = _start(server, "broken.mp4")
    assert bad.status_code == 201
    bad_id = bad.json()["id"]

    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{server.url}/v1/streams/{sid}/events", timeout=30) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: {}":
                events.append(json.loads(line[6:]))
            if any(e["type"] == "classified" for e in events) and len(events) >= 3:
                break
    kinds = {e["type"] for e in events}
    assert {"appear", "classified"} <= kinds
    classified = next(e for e in events if e["type"] == "classified")
    assert classified["label"] and 0 <= classified["class_id"] < 10

    with httpx.stream("GET", f"{server.url}{stream['view_url']}", timeout=30) as reply:
        assert reply.headers["content-type"].startswith("multipart/x-mixed-replace")
        head = b""
        for chunk in reply.iter_bytes():
            head += chunk
            if len(head) > 2000:
                break
    assert head.startswith(b"--frame\r\nContent-Type: image/jpeg") and b"\xff\xd8" in head

    wait_until(lambda: httpx.get(f"{server.url}/v1/streams/{bad_id}").json()["state"] == "failed")
    failed = httpx.get(f"{server.url}/v1/streams/{bad_id}").json()
    assert "broken.mp4" in failed["error"]
    assert httpx.get(f"{server.url}/v1/streams/{sid}").json()["state"] in ("running", "finished")
    assert httpx.get(f"{server.url}/health").status_code == 200

    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'tinyserve_stream_fps{{stream="{sid}"}}' in metrics
    assert f'tinyserve_stream_frame_latency_seconds_bucket{{le="0.05",stream="{sid}"}}' in metrics
    assert "tinyserve_stream_dropped_frames_total" in metrics
    assert 'tinyserve_video_detector_selected{detector="scene-det"' in metrics

    listed = httpx.get(f"{server.url}/v1/streams").json()["streams"]
    assert {s["id"] for s in listed} == {sid, bad_id}
    assert httpx.delete(f"{server.url}/v1/streams/{sid}").status_code in (401, 403)
    gone = httpx.delete(f"{server.url}/v1/streams/{sid}", headers=AUTH, timeout=30)
    assert gone.status_code == 200 and gone.json()["deleted"] == sid
    assert httpx.get(f"{server.url}/v1/streams/{sid}").status_code == 404
    httpx.delete(f"{server.url}/v1/streams/{bad_id}", headers=AUTH, timeout=30)


def test_detect_route_and_seed_routes_keep_the_classifier(server: Server, stream_dir: Path) -> None:
    import av
    from PIL import Image

    with av.open(str(stream_dir / "clip" / "video.mp4")) as container:
        frame = next(container.decode(video=0)).to_image()
    png = io.BytesIO()
    frame.save(png, format="PNG")
    found = httpx.post(
        f"{server.url}/v1/models/scene-det/detect",
        content=png.getvalue(),
        headers={"content-type": "image/png"},
        timeout=30,
    ).json()
    assert found["width"] == 640 and found["height"] == 480
    truth = [
        line.split(",") for line in (stream_dir / "clip" / "gt" / "gt.txt").read_text().splitlines()
    ]
    first = [r for r in truth if r[0] == "1" and float(r[8]) > 0.9]
    assert len(found["detections"]) >= len(first) >= 1
    boot = ROOT / "samples" / "fashion" / "0000_ankle-boot.png"
    seed = httpx.post(f"{server.url}/predict", files={"file": boot.read_bytes()}, timeout=30)
    # Two classifiers are served; the one kept for video tracks is no default candidate.
    assert seed.status_code == 200 and seed.json()["model"] == "fashion-cnn"
    wrong = httpx.post(
        f"{server.url}/v1/models/fashion-cnn/detect",
        content=boot.read_bytes(),
        headers={"content-type": "image/png"},
        timeout=30,
    )
    assert wrong.status_code == 422
    classify_a_detector = httpx.post(
        f"{server.url}/v1/models/scene-det/predict", files={"file": boot.read_bytes()}, timeout=30
    )
    assert classify_a_detector.status_code == 422
    assert "detect" in classify_a_detector.json()["error"]["message"]
    del Image


@pytest.fixture
def page(server: Server) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield browser.new_page()
        browser.close()


def test_the_web_page_shows_a_streams_live_view_and_events(page: Any, server: Server) -> None:
    sid = _start(server, "clip/video.mp4", fps=30).json()["id"]
    page.goto(f"{server.url}/#streams")
    page.get_by_role("button", name=f"Open {sid}").click(timeout=15_000)
    page.wait_for_function(
        "() => document.querySelector('#stream-image').naturalWidth > 0", timeout=15_000
    )
    page.wait_for_function(
        "() => document.querySelectorAll('#stream-events li').length > 0", timeout=15_000
    )
    first = page.locator("#stream-events li").first.text_content()
    assert json.loads(first)["stream"] == sid
    httpx.delete(f"{server.url}/v1/streams/{sid}", headers=AUTH, timeout=30)


def test_the_detector_is_served_over_v2_with_uint8_frames() -> None:
    import numpy as np
    from starlette.testclient import TestClient

    from tinyserve.app import ServerConfig, create_app

    frame = np.zeros((1, 240, 320, 3), np.uint8)
    frame[0, 80:140, 100:160] = 200  # one bright card-sized square
    body = {
        "inputs": [
            {
                "name": "frames",
                "datatype": "UINT8",
                "shape": [1, 240, 320, 3],
                "data": frame.flatten().tolist(),
            }
        ]
    }
    with TestClient(create_app(ServerConfig(repo=MODELS))) as client:
        answer = client.post("/v2/models/scene-det/versions/1/infer", json=body)
    assert answer.status_code == 200
    out = next(o for o in answer.json()["outputs"] if o["name"] == "detections")
    assert out["shape"] == [1, 100, 6]
    rows = np.asarray(out["data"], np.float32).reshape(100, 6)
    assert (np.diff(rows[:, 4]) <= 1e-6).all()


def test_tinyserve_video_needs_no_flag_but_the_outputs(stream_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tinyserve.cli import app as cli_app

    mot, events = tmp_path / "tracks.txt", tmp_path / "events.jsonl"
    clip = str(stream_dir / "clip" / "video.mp4")
    command = ["video", clip, "--repo", str(MODELS), "--mot", str(mot), "--json", str(events)]
    result = CliRunner().invoke(cli_app, [*command, "--max-frames", "60", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "detector scene-det:1" in result.output
    assert "classifier of tracks: fashion-cnn-video:1" in result.output
    lines = [line.split(",") for line in mot.read_text().splitlines()]
    assert lines and all(len(p) == 10 and p[8:] == ["-1", "-1"] for p in lines)
    assert 1 <= min(int(p[0]) for p in lines) and max(int(p[0]) for p in lines) <= 60
    labelled = {p[1]: int(p[7]) for p in lines if p[7] != "-1"}
    assert labelled and all(0 <= c < 10 for c in labelled.values())
    kinds = {json.loads(line)["type"] for line in events.read_text().splitlines()}
    assert {"appear", "classified", "left"} <= kinds
