"""``tinyserve.client`` and ``tinyserve predict URL``: bounded retries with backoff and jitter,
against real local HTTP servers (one that answers 503 a few times, one that is not there)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import SAMPLES
from live_server import free_port
from tinyserve.auth import create_key
from tinyserve.cli import app as cli_app
from tinyserve.client import Client, RetryPolicy
from tinyserve.errors import RemoteError
from tinyserve.predict import predict_remote

BOOT = next(SAMPLES.glob("*ankle-boot.png"))
ANSWER = {"model": "m", "version": 1, "label": "boot", "class_id": 9, "confidence": 0.9,
          "predictions": [{"label": "boot", "class_id": 9, "confidence": 0.9}]}  # fmt: skip
FAST = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05, deadline_s=5.0)


class Flaky:
    """A real HTTP server on loopback: ``failures`` answers of ``status``, then 200s."""

    def __init__(self, failures: int, status: int = 503, retry_after: str | None = None) -> None:
        self.failures, self.status, self.retry_after = failures, status, retry_after
        self.requests: list[dict[str, str]] = []
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                flaky.requests.append({k.lower(): v for k, v in self.headers.items()})
                if len(flaky.requests) <= flaky.failures:
                    body = json.dumps({"error": {"code": "overloaded", "message": "busy"}})
                    self.send_response(flaky.status)
                    if flaky.retry_after is not None:
                        self.send_header("Retry-After", flaky.retry_after)
                else:
                    body = json.dumps(ANSWER)
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky() -> Iterator[Callable[..., Flaky]]:
    servers: list[Flaky] = []

    def start(failures: int, status: int = 503, retry_after: str | None = None) -> Flaky:
        servers.append(Flaky(failures, status, retry_after))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_503_is_retried_until_the_server_answers(flaky: Callable[..., Flaky]) -> None:
    server = flaky(failures=2)
    started = time.monotonic()
    with Client(server.url, api_key="tsk_00000000_secret", retries=FAST) as client:
        answer = client.predict(BOOT, top_k=1)
    assert answer == ANSWER and client.attempts == 3 and len(server.requests) == 3
    assert time.monotonic() - started < 2.0
    assert all(r["authorization"] == "Bearer tsk_00000000_secret" for r in server.requests)


def test_retries_are_bounded_and_the_last_503_is_raised(flaky: Callable[..., Flaky]) -> None:
    server = flaky(failures=100)
    started = time.monotonic()
    with Client(server.url, retries=FAST) as client, pytest.raises(RemoteError) as caught:
        client.predict(BOOT.read_bytes())
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        503, "overloaded", "busy",
    )  # fmt: skip
    assert client.attempts == 4 and len(server.requests) == 4
    assert time.monotonic() - started < 4 * 0.05 + 2.0


def test_retries_zero_sends_once(flaky: Callable[..., Flaky]) -> None:
    server = flaky(failures=1)
    with Client(server.url, retries=0) as client, pytest.raises(RemoteError):
        client.predict(BOOT)
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 429, 500])
def test_other_errors_are_answers_and_not_retried(flaky: Callable[..., Flaky], status: int) -> None:
    server = flaky(failures=1, status=status)
    with Client(server.url, retries=FAST) as client, pytest.raises(RemoteError) as caught:
        client.predict(BOOT)
    assert caught.value.status == status and len(server.requests) == 1


def test_retry_after_is_waited_out_up_to_the_cap(flaky: Callable[..., Flaky]) -> None:
    server = flaky(failures=1, retry_after="30")
    slept: list[float] = []
    policy = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.2)
    with Client(server.url, retries=policy, sleep=slept.append) as client:
        client.predict(BOOT)
    assert slept == [0.2]


def test_a_refused_connection_is_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    slept: list[float] = []
    policy = RetryPolicy(attempts=5, base_delay_s=0.01, max_delay_s=0.04)

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    started = time.monotonic()
    with Client(url, retries=policy, sleep=sleep) as client, pytest.raises(RemoteError) as caught:
        client.predict(BOOT)
    assert caught.value.status is None and caught.value.code == "unreachable"
    assert "after 5 attempt(s)" in caught.value.message and client.attempts == 5
    assert len(slept) == 4 and time.monotonic() - started < 2.0


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(attempts=10, base_delay_s=0.1, max_delay_s=1.0)
    rng = random.Random(7)
    for retry, cap in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        draws = [policy.delay(retry, None, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > 0.8 * cap and min(draws) < 0.2 * cap  # spread over the range


def test_the_deadline_stops_retrying_early(flaky: Callable[..., Flaky]) -> None:
    server = flaky(failures=100)
    policy = RetryPolicy(attempts=50, base_delay_s=0.05, max_delay_s=0.05, deadline_s=0.3)
    rng = random.Random(1)
    started = time.monotonic()
    with Client(server.url, retries=policy, rng=rng) as client, pytest.raises(RemoteError):
        client.predict(BOOT)
    assert time.monotonic() - started < 0.3 + 1.0
    assert 2 <= len(server.requests) < 50


def test_predict_remote_retries_with_the_same_policy(flaky: Callable[..., Flaky]) -> None:
    server = flaky(failures=2)
    results = predict_remote(server.url, [BOOT], top_k=1, retries=3)
    assert results[0]["predictions"] == ANSWER["predictions"] and len(server.requests) == 3


def test_predict_remote_reports_an_error_answer_per_image(flaky: Callable[..., Flaky]) -> None:
    server = flaky(failures=1, status=400)
    results = predict_remote(server.url, [BOOT, BOOT], top_k=1)
    assert results[0]["error"] == {"code": "overloaded", "message": "busy"}
    assert results[1]["predictions"] == ANSWER["predictions"]


def test_predict_command_sends_the_api_key_to_a_server(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    _, secret = create_key(keys, "cli")
    server = serve(env={"TINYSERVE_API_KEYS": str(keys)})
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["predict", server.url, str(BOOT), "--json"])
    assert json.loads(refused.stdout)["error"]["code"] == "unauthorized"
    env = {"TINYSERVE_API_KEY": secret}
    done = runner.invoke(cli_app, ["predict", server.url, str(BOOT), "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["predictions"][0]["label"] == "Ankle boot"
    flag = runner.invoke(cli_app, ["predict", server.url, str(BOOT), "--api-key", secret])
    assert flag.exit_code == 0 and "Ankle boot" in flag.stdout
