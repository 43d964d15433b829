"""OpenTelemetry traces of the request path; off unless ``--trace`` (``TINYSERVE_TRACE``).

One trace per request, its parent taken from an incoming W3C ``traceparent`` header:

    POST /v1/models/{model}/predict     (server span: Guard, from the first byte to the last)
      ├─ receive      reading and parsing the body, up to classify
      ├─ decode       the images to pixels
      ├─ queue        each image's wait for its batch        ┐ one pair per image,
      ├─ inference    the batch that image ran in            ┘ built by the batcher
      ├─ batch        one per batch run, on the inference thread; links to every request in it
      └─ respond      shaping the answer and sending it

The hooks in ``routes.Guard``, ``classify`` and the ``Batcher`` test ``tracing.tracer`` (None
while off) and do nothing else, so a server that does not trace pays one global lookup per
hook and never imports OpenTelemetry. The spans of the inner steps are made after the fact from
the times each step already measures (``time.perf_counter``): the batcher's consumer task and
its thread need no OpenTelemetry context, and a request's spans still nest under it because
each queued image carries its request's trace.

``enable`` uses the process's tracer provider when one is set (``opentelemetry-instrument``,
or the embedding program), else makes one that sends spans to the OTLP/HTTP endpoint
(``--otlp-endpoint``, or the standard ``OTEL_EXPORTER_OTLP_*`` variables).
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from tinyserve.asgi import Call
    from tinyserve.routes import Route

__all__ = ["RequestTrace", "Tracing", "disable", "enable", "tracer"]

# The one switch every hook reads: None while tracing is off.
tracer: Tracing | None = None

_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "tinyserve_request_trace", default=None
)


class RequestTrace:
    """One request's server span, and when its steps ended (``perf_counter`` seconds)."""

    __slots__ = ("answered", "context", "span", "started", "token", "tracing", "var_token")

    def __init__(self, tracing: Tracing, span: Span, context: Context, started: float) -> None:
        self.tracing = tracing
        self.span = span
        self.context = context  # the span's context: the parent of its steps
        self.started = started
        self.answered: float | None = None  # classify's end: 'respond' begins
        self.token: object = None
        self.var_token: contextvars.Token[RequestTrace | None] | None = None

    def end(self, status: int) -> None:
        """Close the 'respond' step and the request's span; restore the caller's context."""
        from opentelemetry import context as otel_context
        from opentelemetry.trace import Status, StatusCode

        now = time.perf_counter()
        if self.answered is not None:
            self.tracing.step("respond", self, self.answered, now)
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end(self.tracing.ns(now))
        if self.var_token is not None:
            _current.reset(self.var_token)
        otel_context.detach(self.token)  # type: ignore[arg-type]


class Tracing:
    """Makes tinyserve's spans on one tracer; ``tracer`` holds the enabled one."""

    def __init__(self, provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer: Tracer = trace.get_tracer("tinyserve", tracer_provider=provider)
        # perf_counter times -> epoch nanoseconds, from one reading of both clocks.
        self._epoch_ns = time.time_ns()
        self._perf = time.perf_counter()

    def ns(self, perf: float) -> int:
        """Epoch nanoseconds of a ``time.perf_counter()`` reading."""
        return self._epoch_ns + int((perf - self._perf) * 1e9)

    # -- the server span (routes.Guard) -------------------------------------------------

    def request(self, route: Route, call: Call, started: float) -> RequestTrace:
        """Start the request's span, its parent read from ``traceparent``, and make it current."""
        from opentelemetry import context as otel_context
        from opentelemetry.propagate import extract

        headers = call.headers
        parent = extract(headers) if "traceparent" in headers else None
        span = self._tracer.start_span(
            f"{route.method} {route.path}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            start_time=self.ns(started),
            attributes={"http.request.method": route.method, "http.route": route.path,
                        "url.path": call.path},
        )  # fmt: skip
        ctx = self._trace.set_span_in_context(span, parent)
        request = RequestTrace(self, span, ctx, started)
        request.token = otel_context.attach(ctx)
        request.var_token = _current.set(request)
        return request

    def current(self) -> RequestTrace | None:
        """The trace of the request this task is serving, if any."""
        return _current.get()

    # -- the steps (classify, Batcher) --------------------------------------------------

    def received(self, started: float, decoded: float, images: int) -> None:
        """'receive' (request start -> classify) and 'decode' (classify -> pixels)."""
        request = _current.get()
        if request is None:
            return
        self.step("receive", request, request.started, started)
        self.step("decode", request, started, decoded, {"tinyserve.images": images})

    def answered(self, at: float) -> None:
        request = _current.get()
        if request is not None:
            request.answered = at

    def batch(self, model: str, items: Sequence[tuple[RequestTrace | None, float]],
              started: float, ended: float, batch_id: int) -> None:  # fmt: skip
        """One batch run: a 'batch' span, and each traced image's 'queue' and 'inference'."""
        traced = [(request, queued) for request, queued in items if request is not None]
        if not traced:
            return
        links = [self._trace.Link(r.span.get_span_context()) for r, _ in traced]
        attributes: dict[str, Any] = {"tinyserve.model": model, "tinyserve.batch_size": len(items),
                      "tinyserve.batch_id": batch_id}  # fmt: skip
        batch = self._tracer.start_span(
            "batch", context=traced[0][0].context, links=links,
            start_time=self.ns(started), attributes=attributes,
        )  # fmt: skip
        batch.end(self.ns(ended))
        for request, queued in traced:
            self.step("queue", request, queued, started, attributes)
            self.step("inference", request, started, ended, attributes)

    def step(self, name: str, request: RequestTrace, start: float, end: float,
              attributes: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        span = self._tracer.start_span(
            name, context=request.context, start_time=self.ns(start), attributes=attributes
        )
        span.end(self.ns(end))


def enable(endpoint: str | None = None, provider: TracerProvider | None = None) -> Tracing:
    """Turn the hooks on, on ``provider``, the process's, or a new OTLP/HTTP one."""
    global tracer
    from opentelemetry import trace

    if provider is None and _is_default_provider(trace.get_tracer_provider()):
        provider = _otlp_provider(endpoint)
        trace.set_tracer_provider(provider)
    tracer = Tracing(provider)
    return tracer


def disable() -> None:
    """Turn the hooks off (spans already made are still exported by their provider)."""
    global tracer
    tracer = None


def _is_default_provider(provider: object) -> bool:
    # Until someone sets one, the API hands out a proxy (or a no-op) provider.
    return type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider")


def _otlp_provider(endpoint: str | None) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Like OTEL_EXPORTER_OTLP_ENDPOINT, the setting is the collector's base URL; without
    # it the exporter reads the OTEL_* variables itself (default http://localhost:4318).
    url = endpoint.rstrip("/") + "/v1/traces" if endpoint else None
    name = os.environ.get("OTEL_SERVICE_NAME") or "tinyserve"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return provider
