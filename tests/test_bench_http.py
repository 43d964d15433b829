"""The HTTP load generator, against a small Starlette app served by uvicorn in a thread."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from typer.testing import CliRunner

from conftest import SAMPLES
from tinyserve.bench.client import Connection, Target, build_request, encode_body
from tinyserve.bench.loadgen import LoadConfig, LoadReport, run_load
from tinyserve.bench.noop import noop_server
from tinyserve.bench.report import load_table, render_html
from tinyserve.bench.scrape import bucket_quantile, parse_metrics, server_delta
from tinyserve.cli import app as cli
from tinyserve.errors import ConfigError

IMAGE = SAMPLES / "0000_ankle-boot.png"
SERVICE_S = 0.05


@dataclass
class Server:
    """What the test app saw, and its Prometheus collectors."""

    url: str = ""
    images: list[bytes] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    flaky_log: list[int] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.batch = Histogram(
            "tinyserve_batch_size", "", ["model"], buckets=(1, 2, 4, 8), registry=self.registry
        )
        self.stage = Histogram(
            "tinyserve_stage_seconds",
            "",
            ["model", "stage"],
            buckets=(0.001, 0.005, 0.01),
            registry=self.registry,
        )
        self.requests = PromCounter(
            "tinyserve_requests", "", ["route", "status"], registry=self.registry
        )


def make_app(server: Server) -> Starlette:
    lock = asyncio.Lock()
    flaky = [0]

    async def predict(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0]
        if kind == "multipart/form-data":
            async with request.form() as form:
                upload = form["file"]
                assert not isinstance(upload, str)
                image = await upload.read()
        elif kind == "application/json":
            image = base64.b64decode(orjson.loads(await request.body())["image"])
        else:
            image = await request.body()
        server.images.append(image)
        server.kinds[kind] += 1
        server.batch.labels("m").observe(4)
        server.stage.labels("m", "queue").observe(0.002)
        server.requests.labels("/predict", "200").inc()
        return JSONResponse({"bytes": len(image)})

    async def slow(request: Request) -> Response:
        await request.body()
        async with lock:  # one at a time: capacity 1 / SERVICE_S requests/s
            await asyncio.sleep(SERVICE_S)
        return JSONResponse({})

    async def flaky_route(request: Request) -> Response:
        await request.body()
        flaky[0] += 1
        status = 503 if flaky[0] % 3 == 0 else 200
        server.flaky_log.append(status)
        return JSONResponse({}, status_code=status)

    async def chunked(request: Request) -> Response:
        await request.body()

        async def parts() -> AsyncIterator[bytes]:
            for part in (b'{"a":', b" 1", b"}"):
                yield part

        return StreamingResponse(parts(), media_type="application/json")

    async def missing(request: Request) -> Response:
        return JSONResponse({"error": {"code": "not_found", "message": "no model x"}}, 404)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(server.registry), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/flaky", flaky_route, methods=["POST"]),
            Route("/chunked", chunked, methods=["POST"]),
            Route("/missing", missing, methods=["POST"]),
            Route("/metrics", metrics),
        ]
    )


@contextmanager
def serving(server: Server) -> Iterator[Server]:
    """Run the test app with uvicorn on a free 127.0.0.1 port in a background thread."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every answer written in two pieces waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        make_app(server), lifespan="off", ws="none", log_level="warning", loop="asyncio"
    )
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield server
    finally:
        runner.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serving(Server()) as running:
        yield running


def load(url: str, **options: object) -> LoadReport:
    settings: dict[str, object] = {
        "image": IMAGE,
        "concurrency": (2,),
        "warmup_s": 0.0,
        "duration_s": 0.3,
        "uvloop": False,
    }
    settings.update(options)
    return run_load(LoadConfig(url, **settings))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["raw", "multipart", "json"])
def test_bodies_arrive_intact_and_closed_loop_counts_every_request(
    server: Server, kind: str
) -> None:
    server.images.clear()
    report = load(server.url + "/predict", body=kind, concurrency=(1, 3))
    image = IMAGE.read_bytes()
    assert server.images and all(received == image for received in server.images)
    steps = report.steps
    assert [s.concurrency for s in steps] == [1, 3] and all(s.mode == "closed" for s in steps)
    # With no warm-up every request but the probe starts inside a measured window.
    assert len(server.images) == 1 + sum(s.requests for s in steps)
    for step in steps:
        assert step.requests == step.ok == step.statuses["200"] > 0 and step.errors == {}
        assert step.sent_rps == pytest.approx(step.requests / 0.3, rel=0.01)
        # Answers inside the window: all but those still in flight when it closed.
        assert 0 <= step.requests - round(step.achieved_rps * 0.3) <= step.concurrency
        assert step.ok_rps == step.achieved_rps
        assert step.latency_ms["count"] == step.ok and step.cdf_ms[-1][1] == 1.0
    expected = {"raw": "image/png", "multipart": "multipart/form-data", "json": "application/json"}
    assert set(server.kinds) >= {expected[kind]}


def test_server_metrics_are_read_around_each_step(server: Server) -> None:
    report = load(server.url + "/predict", concurrency=(2,), duration_s=0.4)
    assert report.server_metrics == server.url + "/metrics"
    stats = report.steps[0].server
    assert stats is not None
    assert stats["batch_size"]["mean"] == 4.0 and stats["batch_size"]["batches"] > 0
    assert {"bucket": "3-4", "count": stats["batch_size"]["batches"]} in stats["batch_size"][
        "distribution"
    ]
    assert stats["stages"]["queue"]["mean_ms"] == pytest.approx(2.0)
    assert stats["requests_by_status"]["200"] == stats["batch_size"]["batches"]


def test_error_statuses_are_counted(server: Server) -> None:
    server.flaky_log.clear()
    report = load(server.url + "/flaky", concurrency=(1,), metrics=False)
    step = report.steps[0]
    seen = Counter(server.flaky_log[1:])  # the first request is the probe
    assert step.statuses == {"200": seen[200], "503": seen[503]}
    assert step.errors == {"503": seen[503]} and seen[503] > 0
    assert step.ok == seen[200] and step.latency_ms["count"] == seen[200]


def test_chunked_answers_are_read(server: Server) -> None:
    step = load(server.url + "/chunked").steps[0]
    assert step.ok > 0 and step.errors == {}


@pytest.mark.slow
def test_open_loop_counts_latency_from_the_schedule(server: Server) -> None:
    # 60 requests/s offered to a server that serves 20/s: a closed loop would report ~50 ms,
    # but each request waits behind those scheduled before it, so latency keeps growing.
    rate, duration = 60.0, 1.0
    report = load(server.url + "/slow", concurrency=(), rates=(rate,), duration_s=duration,
                  connections=4, metrics=False)  # fmt: skip
    step = report.steps[0]
    assert step.mode == "open" and step.rate == rate and step.concurrency == 4
    assert step.requests == step.ok == int(rate * duration) and step.errors == {}
    assert step.latency_ms["min"] >= SERVICE_S * 1000
    # The last request is scheduled ~1 s in and served after the ~60 before it (3 s).
    assert step.latency_ms["max"] >= (rate * duration * SERVICE_S - duration) * 1000 * 0.9
    first, last = step.timeline[0], step.timeline[-1]
    assert last["mean_ms"] > 5 * first["mean_ms"]
    closed = load(server.url + "/slow", concurrency=(4,), duration_s=duration, metrics=False)
    assert closed.steps[0].latency_ms["p50"] < step.latency_ms["p50"]


def test_open_loop_stops_at_the_hard_cap(server: Server) -> None:
    # 100 requests/s for 0.2 s into a 20/s server with a 0.05 s timeout: almost every request
    # times out, and the step still ends within its cap.
    cap = LoadConfig("http://127.0.0.1/", IMAGE, duration_s=0.2, timeout_s=0.05).step_cap_s(True)
    started = time.monotonic()
    step = load(server.url + "/slow", concurrency=(), rates=(100.0,), duration_s=0.2,
                connections=2, timeout_s=0.05, metrics=False).steps[0]  # fmt: skip
    assert time.monotonic() - started < cap + 5
    assert step.requests == 20 and step.errors.get("timeout", 0) > 0


def test_a_wrong_path_fails_fast(server: Server) -> None:
    with pytest.raises(ConfigError, match="answered 404 to a probe request"):
        load(server.url + "/missing")


def test_an_absent_server_is_reported() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError, match="is the server running"):
        load(f"http://127.0.0.1:{port}/predict")


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3/predict", "http://example.com:8000/", "http://[2001:db8::1]/"]
)
def test_remote_targets_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="only loopback targets"):
        LoadConfig(url, IMAGE)
    assert LoadConfig(url, IMAGE, allow_remote=True).target.port in (80, 8000)
    result = CliRunner().invoke(cli, ["bench", "http", url, "--image", str(IMAGE)])
    assert isinstance(result.exception, ConfigError)
    assert "--allow-remote" in result.exception.message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000/v1/models/m/predict?top_k=1",
         Target("127.0.0.1", 8000, "/v1/models/m/predict?top_k=1")),
        ("http://127.9.9.9", Target("127.9.9.9", 80, "/")),
        ("http://LocalHost:1/", Target("localhost", 1, "/")),
        ("http://[::1]:8000/x", Target("::1", 8000, "/x")),
    ],
)  # fmt: skip
def test_loopback_targets_are_accepted(url: str, expected: Target) -> None:
    target = Target.parse(url)
    assert target == expected
    assert target.with_path("/metrics").url == target.base_url + "/metrics"
    assert Target.parse(target.url) == target


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="http://"):
        Target.parse("https://127.0.0.1/")
    with pytest.raises(ValueError, match="body"):
        LoadConfig("http://127.0.0.1/", IMAGE, body="xml")
    with pytest.raises(ValueError, match="at least one"):
        LoadConfig("http://127.0.0.1/", IMAGE, concurrency=())
    with pytest.raises(ValueError, match="duration"):
        LoadConfig("http://127.0.0.1/", IMAGE, duration_s=0)


def test_request_bytes_are_well_formed() -> None:
    target = Target.parse("http://127.0.0.1:9/p?q=1")
    body, content_type = encode_body(b"\x00\x01", "a.png", "multipart")
    request = build_request(target, "POST", body, content_type)
    head, _, rest = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n")
    assert f"Content-Length: {len(body)}".encode() in head and rest == body
    assert b'name="file"; filename="a.png"' in body and b"\x00\x01" in body
    assert encode_body(b"xy", "a.jpg", "raw") == (b"xy", "image/jpeg")
    assert orjson.loads(encode_body(b"xy", "a", "json")[0]) == {"image": "eHk="}


def test_connection_reads_keep_alive_answers(server: Server) -> None:
    async def two_requests() -> list[int]:
        connection = Connection(Target.parse(server.url + "/metrics"))
        request = build_request(connection.target)
        try:
            return [(await connection.request(request))[0] for _ in range(2)]
        finally:
            await connection.close()

    assert asyncio.run(two_requests()) == [200, 200]


def test_metric_deltas_from_a_registry() -> None:
    registry = CollectorRegistry()
    batch = Histogram("tinyserve_batch_size", "", ["model"], buckets=(1, 2, 4, 8),
                      registry=registry)  # fmt: skip
    stage = Histogram("tinyserve_stage_seconds", "", ["model", "stage"],
                      buckets=(0.001, 0.01, 0.1), registry=registry)  # fmt: skip
    requests = PromCounter("tinyserve_requests", "", ["route", "status"], registry=registry)
    batch.labels("a").observe(8)  # before the step: must not count
    requests.labels("/p", "200").inc(5)
    before = parse_metrics(generate_latest(registry).decode())
    for size in (1, 3, 3, 8):
        batch.labels("a").observe(size)
    batch.labels("b").observe(2)  # a series that appears during the step
    for seconds in (0.002, 0.004, 0.05):
        stage.labels("a", "queue").observe(seconds)
    stage.labels("a", "inference").observe(0.0005)
    requests.labels("/p", "200").inc(4)
    requests.labels("/p", "503").inc(1)
    after = parse_metrics(generate_latest(registry).decode())
    delta = server_delta(before, after)
    assert delta["batch_size"]["batches"] == 5 and delta["batch_size"]["images"] == 17
    assert delta["batch_size"]["mean"] == 3.4
    assert delta["batch_size"]["distribution"] == [
        {"bucket": "1", "count": 1},
        {"bucket": "2", "count": 1},
        {"bucket": "3-4", "count": 2},
        {"bucket": "5-8", "count": 1},
        {"bucket": ">8", "count": 0},
    ]
    assert delta["stages"]["queue"]["count"] == 3
    assert delta["stages"]["queue"]["mean_ms"] == pytest.approx(56 / 3, rel=1e-3)
    assert delta["stages"]["inference"]["count"] == 1
    assert delta["requests_by_status"] == {"200": 4, "503": 1}
    assert server_delta(after, after) == {}


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    buckets = [(1.0, 10.0), (2.0, 30.0), (4.0, 40.0), (float("inf"), 40.0)]
    assert bucket_quantile(buckets, 0.25) == 1.0
    assert bucket_quantile(buckets, 0.5) == 1.5
    assert bucket_quantile(buckets, 1.0) == 4.0
    assert bucket_quantile([(1.0, 1.0), (float("inf"), 2.0)], 0.99) == 1.0
    assert bucket_quantile([], 0.5) != bucket_quantile([], 0.5)  # NaN


def test_html_report_is_self_contained(server: Server, tmp_path: Path) -> None:
    report = load(server.url + "/predict", concurrency=(1, 2), rates=(50.0,), duration_s=0.3)
    page = render_html(report)
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?data:)""", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "https://" not in page and "@import" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # CDF, throughput, server batch sizes, open-loop timeline
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "c=1" in page and "rate 50/s" in page and "&quot;steps&quot;" in page
    assert load_table(report).row_count == 3


def test_cli_writes_report_and_json(server: Server, tmp_path: Path) -> None:
    html_path = tmp_path / "out.html"
    result = CliRunner().invoke(
        cli,
        ["bench", "http", server.url + "/predict", "--image", str(IMAGE), "--concurrency", "1",
         "--warmup", "0", "--duration", "0.2", "--report", str(html_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = orjson.loads((tmp_path / "out.json").read_bytes())
    assert data["steps"][0]["name"] == "c=1" and data["steps"][0]["ok"] > 0
    assert html_path.read_text().startswith("<!DOCTYPE html>")


def test_noop_server_measures_the_client() -> None:
    with noop_server() as url:
        report = load(url, concurrency=(4,), duration_s=0.3, metrics=False, uvloop=True)
    step = report.steps[0]
    assert step.ok > 0 and step.errors == {} and report.event_loop == "uvloop"
