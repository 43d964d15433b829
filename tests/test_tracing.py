"""OpenTelemetry tracing: spans of each step, nested under the request (and an incoming
traceparent) across the batcher's task and thread; the OTLP exporter; nothing when off."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from tinyserve import tracing
from tinyserve.batcher import BatchConfig
from tinyserve.settings import BY_NAME, from_env

BOOT = (SAMPLES / "0000_ankle-boot.png").read_bytes()
TROUSER = (SAMPLES / "0002_trouser.png").read_bytes()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STEPS = ("receive", "decode", "queue", "inference", "respond")

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The process's tracer provider (set once), sending every span to memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    return _EXPORTER


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[Callable[[], list[ReadableSpan]]]:
    exporter.clear()
    yield lambda: list(exporter.get_finished_spans())
    exporter.clear()


@pytest.fixture
def traced(app_client: Callable[..., TestClient]) -> Callable[..., TestClient]:
    def make(**options: Any) -> TestClient:
        return app_client(repo=BUNDLED_MODEL.parent, trace=True, **options)

    return make


def by_name(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def server_spans(found: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in found if s.kind == trace.SpanKind.SERVER]


def children(found: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    span_id = parent.context.span_id
    return [s for s in found if s.parent is not None and s.parent.span_id == span_id]


def test_a_prediction_has_a_span_per_step_under_the_incoming_traceparent(
    traced: Callable[..., TestClient], spans: Callable[[], list[ReadableSpan]]
) -> None:
    client = traced()
    response = client.post(
        "/v1/models/fashion-cnn/predict",
        content=BOOT,
        headers={"content-type": "image/png", "traceparent": TRACEPARENT},
    )
    assert response.status_code == 200
    found = spans()
    (server,) = server_spans(found)
    assert server.name == "POST /v1/models/{model}/predict"
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.path"] == "/v1/models/fashion-cnn/predict"
    steps = {s.name: s for s in children(found, server)}
    assert set(STEPS) <= set(steps), sorted(steps)
    for span in found:
        assert span.context.trace_id == server.context.trace_id, span.name
    # In order, each inside the request: receive -> decode -> queue -> inference -> respond.
    assert server.start_time is not None and server.end_time is not None
    times = [(steps[n].start_time, steps[n].end_time) for n in STEPS]
    for start, end in times:
        assert start is not None and end is not None
        assert server.start_time <= start <= end <= server.end_time
    ends = [end for _, end in times]
    starts = [start for start, _ in times]
    for previous_end, start in zip(ends, starts[1:], strict=False):
        assert previous_end is not None and start is not None
        assert previous_end <= start + 1_000  # 1 µs: the clocks are converted, not shared


def test_the_batch_span_is_linked_to_every_request_in_it(
    traced: Callable[..., TestClient], spans: Callable[[], list[ReadableSpan]]
) -> None:
    # A long window makes concurrent requests share one batch.
    client = traced(batching=BatchConfig(max_delay_ms=300, max_batch_size=8))
    headers = {"content-type": "image/png"}

    def post(_: int) -> int:
        return client.post("/predict", content=BOOT, headers=headers).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(post, range(4))) == [200] * 4
    found = spans()
    requests = server_spans(found)
    assert len(requests) == 4
    assert len({s.context.trace_id for s in requests}) == 4  # no traceparent: four traces
    batches = by_name(found, "batch")
    shared = max(batches, key=lambda s: len(s.links))
    assert shared.attributes is not None and shared.attributes["tinyserve.batch_size"] >= 2
    linked = {link.context.span_id for link in shared.links}
    assert len(linked) == shared.attributes["tinyserve.batch_size"]
    assert linked <= {s.context.span_id for s in requests}
    # Each request's inference span names the batch it ran in, and nests under the request.
    for request in requests:
        (inference,) = by_name(children(found, request), "inference")
        assert inference.attributes is not None
        batch_id = inference.attributes["tinyserve.batch_id"]
        ran_in = [b for b in batches if (b.attributes or {}).get("tinyserve.batch_id") == batch_id]
        assert len(ran_in) == 1
        assert request.context.span_id in {link.context.span_id for link in ran_in[0].links}


def test_a_batch_request_has_a_queue_and_inference_span_per_image(
    traced: Callable[..., TestClient], spans: Callable[[], list[ReadableSpan]]
) -> None:
    client = traced()
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate([BOOT, TROUSER])]
    files.append(("files", ("bad.txt", b"not an image", "text/plain")))
    assert client.post("/infer/batch", files=files).status_code == 200
    found = spans()
    (server,) = server_spans(found)
    names = [s.name for s in children(found, server)]
    assert names.count("queue") == names.count("inference") == 2  # the bad file never queued
    (decode,) = by_name(found, "decode")
    assert decode.attributes is not None and decode.attributes["tinyserve.images"] == 3


def test_a_failed_request_is_traced_with_its_status(
    traced: Callable[..., TestClient], spans: Callable[[], list[ReadableSpan]]
) -> None:
    client = traced()
    response = client.post("/predict", content=b"nope", headers={"content-type": "image/png"})
    assert response.status_code == 400
    (server,) = server_spans(spans())
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 400


def test_routes_that_classify_nothing_have_only_the_request_span(
    traced: Callable[..., TestClient], spans: Callable[[], list[ReadableSpan]]
) -> None:
    client = traced()
    assert client.get("/health").status_code == 200
    found = spans()
    assert [s.name for s in found] == ["GET /health"]


def test_closing_the_server_turns_tracing_off(
    traced: Callable[..., TestClient], spans: Callable[[], list[ReadableSpan]]
) -> None:
    client = traced()
    assert tracing.tracer is not None
    client.__exit__(None, None, None)
    assert tracing.tracer is None


def test_a_server_without_trace_makes_no_spans(
    app_client: Callable[..., TestClient], spans: Callable[[], list[ReadableSpan]]
) -> None:
    client = app_client(repo=BUNDLED_MODEL.parent)
    headers = {"content-type": "image/png", "traceparent": TRACEPARENT}
    assert client.post("/predict", content=BOOT, headers=headers).status_code == 200
    assert spans() == []


def test_tracing_off_never_imports_opentelemetry() -> None:
    script = f"""
import sys
from starlette.testclient import TestClient
from tinyserve.app import ServerConfig, create_app
from pathlib import Path
with TestClient(create_app(ServerConfig(repo=Path({str(BUNDLED_MODEL.parent)!r})))) as client:
    image = Path({str(SAMPLES / "0000_ankle-boot.png")!r}).read_bytes()
    headers = {{"content-type": "image/png", "traceparent": {TRACEPARENT!r}}}
    response = client.post("/predict", content=image, headers=headers)
    assert response.status_code == 200, response.text
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_endpoint_setting_reads_the_standard_otel_variable() -> None:
    assert from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == {
        "otlp_endpoint": "http://collector:4318"
    }
    both = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "TINYSERVE_OTLP_ENDPOINT": "http://b"}
    assert from_env(both)["otlp_endpoint"] == "http://b"
    assert from_env({"TINYSERVE_TRACE": "1"}) == {"trace": True}
    assert BY_NAME["trace"].default is False


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, self.headers["content-type"], body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_reach_an_otlp_http_collector() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        provider = tracing._otlp_provider(f"http://127.0.0.1:{server.server_port}/")
        provider.get_tracer("test").start_span("probe").end()
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    (path, kind, body), *_ = _Collector.received
    assert path == "/v1/traces"
    assert kind == "application/x-protobuf"
    assert b"probe" in body and b"tinyserve" in body  # the span and the service name
