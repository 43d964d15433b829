"""The early 503 of a saturated model's predictions (tinyserve.shedding, cli.protocol).

In process: what ``Shedder.refusal`` answers, and when it stays out of the way. Over a real
socket: a server whose one queue place is held by a client still sending its body refuses
the next request from its headers, keeps that connection usable, and serves again once the
place is free.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import BUNDLED_MODEL, SAMPLES
from live_server import Server
from tinyserve.app import App, create_app
from tinyserve.batcher import BatchConfig
from tinyserve.http_errors import error_reply
from tinyserve.settings import ServerConfig

BOOT = next(SAMPLES.glob("*ankle-boot.png")).read_bytes()
NAME = BUNDLED_MODEL.name


def repo_of(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL, repo / NAME)
    return repo


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return status, headers, body


def run_saturated(tmp_path: Path, check: Callable[[App, Any], None], **options: Any) -> None:
    """``check(app, model)`` while the default model's only queue place is taken and
    nobody may wait; the place is given back after."""

    async def main() -> None:
        app = create_app(
            ServerConfig(
                repo=repo_of(tmp_path), batching=BatchConfig(max_queue=1, max_waiting=0), **options
            )
        )
        await app.context.start()
        try:
            model = app.context.registry.get()
            assert not model.batcher.saturated
            assert app.refusal(b"POST", b"/predict") is None  # a place is free
            ticket = await model.batcher.admit()
            assert model.batcher.saturated
            check(app, model)
            ticket.release()
            assert not model.batcher.saturated
            await asyncio.sleep(0)  # what was let through before is the app's by now
            assert app.refusal(b"POST", b"/predict") is None
        finally:
            await app.context.close()

    asyncio.run(main())


def test_a_saturated_model_is_refused_as_the_app_would_refuse_it(tmp_path: Path) -> None:
    def check(app: App, model: Any) -> None:
        expected = {shape: error_reply(model.batcher.refusal(), shape) for shape in ("rest", "v2")}
        for target, shape in (
            (b"/predict", "rest"),
            (b"/infer?top_k=3", "rest"),
            (b"/predict/batch", "rest"),
            (f"/v1/models/{NAME}/predict?version={model.version}".encode(), "rest"),
            (f"/v2/models/{NAME}/infer".encode(), "v2"),
            (f"/v2/models/{NAME}/versions/{model.version}/infer".encode(), "v2"),
        ):
            answer = app.refusal(b"POST", target)
            assert answer is not None, target
            status, headers, body = parse(answer)
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["content-type"] == "application/json"
            assert int(headers["content-length"]) == len(body)
            assert body == expected[shape].body, target
        assert json.loads(expected["rest"].body)["error"]["code"] == "overloaded"
        assert isinstance(json.loads(expected["v2"].body)["error"], str)  # the protocol's shape
        stats = app.context.metrics.registry.get_sample_value
        labels = {"route": "/predict", "status": "503"}
        assert stats("tinyserve_requests_total", labels) == 1
        assert stats("tinyserve_errors_total", {"route": "/predict", "code": "overloaded"}) == 1

    run_saturated(tmp_path, check)


def test_what_is_not_exactly_a_saturated_prediction_goes_to_the_app(tmp_path: Path) -> None:
    def check(app: App, model: Any) -> None:
        other = 1 if model.version != 1 else 2
        for method, target in (
            (b"GET", b"/predict"),  # not a prediction's method
            (b"POST", b"/health"),
            (b"POST", b"/v1/models/no-such-model/predict"),  # the app's 404
            (b"POST", f"/v1/models/{NAME}/predict?version=latest".encode()),
            (b"POST", f"/v1/models/{NAME}/predict?version={other}".encode()),  # not saturated
            (b"POST", f"/v2/models/{NAME}/versions/{other}/infer".encode()),
            (b"POST", f"/v2/models/{NAME}/versions/x/infer".encode()),
            (b"POST", f"/v1/models/{NAME}/detect".encode()),  # the app's 400: not a detector
            (b"POST", b"/pr%65dict"),  # encoded: the app decodes it
            (b"POST", b"/predict?version"),  # malformed query: the app's answer
        ):
            assert app.refusal(method, target) is None, (method, target)

    run_saturated(tmp_path, check)


def test_a_burst_is_let_through_only_as_far_as_the_app_would_take_it(tmp_path: Path) -> None:
    """Requests arriving together are all looked at before the app admits any: each one
    let through holds a place until the event loop's next turn."""

    async def main() -> None:
        batching = BatchConfig(max_queue=2, max_waiting=1)
        app = create_app(ServerConfig(repo=repo_of(tmp_path), batching=batching))
        await app.context.start()
        try:
            answers = [app.refusal(b"POST", b"/predict") for _ in range(5)]
            assert [a is None for a in answers] == [True, True, True, False, False]
            await asyncio.sleep(0)
            assert app.refusal(b"POST", b"/predict") is None
        finally:
            await app.context.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "options", [{"access_log": True}, {"cors_origins": ("https://a.example",)}, {"trace": True}]
)
def test_it_stays_out_of_the_way_of_what_sees_every_request(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    run_saturated(tmp_path, lambda app, model: _assert_none(app), **options)


def _assert_none(app: App) -> None:
    assert app.refusal(b"POST", b"/predict") is None


def test_random_paths_do_not_grow_its_memory(tmp_path: Path) -> None:
    def check(app: App, model: Any) -> None:
        shedder = app.refusal.__self__
        for i in range(3000):
            app.refusal(b"POST", b"/v1/models/m%d/predict" % i)
        assert len(shedder._known) <= 1024

    run_saturated(tmp_path, check)


# -- over a real socket -------------------------------------------------------------------


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[Server]:
    server = Server(repo_of(tmp_path), "--max-queue", "1", "--max-waiting", "0")
    yield server
    server.stop()


def request(path: str, body: bytes = BOOT, extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n".encode()
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    status, headers, body = parse(data)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, headers, body


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` answers that follow each other on ``sock`` (pipelined requests' answers)."""
    data, answers = b"", []
    while len(answers) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            status, headers, _ = parse(data[: head_end + 4])
            end = head_end + 4 + int(headers["content-length"])
            if len(data) >= end:
                answers.append((status, headers, data[head_end + 4 : end]))
                data = data[end:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(answers)} answers and {data!r}"
        data += chunk
    return answers


def hold_the_only_place(server: Server, extra: bytes = b"") -> socket.socket:
    """A client that sent its headers and half its body: admitted, so its place is held
    until it sends the rest. Returns once a request without a place is refused."""
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    holder.sendall(request("/predict", extra=extra)[: -(len(BOOT) // 2)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = httpx.post(f"{server.url}/predict", content=BOOT,
                           headers={"content-type": "image/png"}, timeout=10)  # fmt: skip
        if probe.status_code == 503:
            return holder
        time.sleep(0.05)
    raise AssertionError("the holder was never admitted")


def finish(holder: socket.socket) -> None:
    holder.sendall(BOOT[-(len(BOOT) // 2) :])
    status, _, body = read_answer(holder)
    holder.close()
    assert status == 200 and json.loads(body)["label"] == "Ankle boot"


@pytest.mark.slow
def test_a_saturated_server_refuses_from_the_headers_and_keeps_the_connection(
    tight: Server,
) -> None:
    holder = hold_the_only_place(tight)
    with socket.create_connection(("127.0.0.1", tight.port), timeout=10) as sock:
        # Headers only: the refusal comes without the body, which is then read and dropped.
        sock.sendall(request("/predict")[: -len(BOOT)])
        status, headers, body = read_answer(sock)
        assert status == 503 and headers["retry-after"] == "1" and "date" in headers
        assert json.loads(body)["error"]["code"] == "overloaded"
        sock.sendall(BOOT)
        sock.sendall(request(f"/v2/models/{NAME}/infer", b"{}"))
        status, _, body = read_answer(sock)
        assert status == 503 and isinstance(json.loads(body)["error"], str)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
        assert read_answer(sock)[0] == 200
        finish(holder)
        sock.sendall(request("/predict"))  # the place is free again
        status, _, body = read_answer(sock)
        assert status == 200 and json.loads(body)["label"] == "Ankle boot"
    metrics = httpx.get(f"{tight.url}/metrics", timeout=5).text
    assert re.search(r'tinyserve_requests_total\{route="/predict",status="503"\} [1-9]', metrics)


@pytest.mark.slow
def test_requests_pipelined_behind_a_refusal_are_answered_in_order(tight: Server) -> None:
    holder = hold_the_only_place(tight)
    with socket.create_connection(("127.0.0.1", tight.port), timeout=10) as sock:
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request("/predict") + health + request("/predict") + health)
        assert [status for status, _, _ in read_answers(sock, 4)] == [503, 200, 503, 200]
    finish(holder)


@pytest.mark.slow
def test_the_refusal_comes_before_the_api_key_check(tmp_path: Path) -> None:
    """Shed from its request line, a saturated model's 503 needs no key: a flood without
    keys is turned away as cheaply as one with them. With a place free, the same request
    without a key is 401 as always."""
    from tinyserve.auth import create_key

    keys = tmp_path / "keys.json"
    _, secret = create_key(keys, "ci")
    server = Server(repo_of(tmp_path), "--max-queue", "1", "--max-waiting", "0",
                    "--api-keys", str(keys))  # fmt: skip
    try:
        anonymous = {"content-type": "image/png"}
        url = f"{server.url}/predict"
        assert httpx.post(url, content=BOOT, headers=anonymous, timeout=10).status_code == 401
        holder = hold_the_only_place(server, f"X-API-Key: {secret}\r\n".encode())
        refused = httpx.post(url, content=BOOT, headers=anonymous, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        finish(holder)
        assert httpx.post(url, content=BOOT, headers=anonymous, timeout=10).status_code == 401
    finally:
        server.stop()
