"""Prometheus collectors and the ``/stats`` JSON summary.

Every server gets its own ``CollectorRegistry`` so that several apps (tests, reloads) never
share or double-register collectors.

Several workers (``tinyserve serve --workers N``) count in Prometheus' multiprocess mode: the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start, each worker's counters,
histograms and gauges live in memory-mapped files there, and a scrape answered by any worker
adds up every worker's files. The collectors that read a process rather than count
(``process_*``, ``python_gc_*``, ``tinyserve_threads``, API keys, streams) describe the worker
that answered. ``/stats`` adds up the workers' ``snapshot()``s (``merge_stats``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["PROMETHEUS_CONTENT_TYPE", "InferenceStats", "Metrics", "merge_stats", "summarize"]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STAGES = ("decode", "queue", "inference", "total")


@dataclass
class InferenceStats:
    """What one model version's batcher has run, for the V2 statistics (times in ns).

    ``queue_ns`` and ``compute_infer_ns`` sum over images: each image waited its own time and
    spent its batch's inference time. ``batches`` maps a batch size to ``[count, ns]``.
    """

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    queue_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_count: int = 0
    compute_output_ns: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)


class Metrics:
    """The server's collectors, plus a rolling window of request latencies for ``/stats``."""

    def __init__(self, window: int = 10_000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The process (RSS, CPU, open files, threads), GC and platform families, as the default
        # registry has them: the collectors are stateless readers, so sharing them is safe.
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            self.registry.register(collector)
        self.requests = Counter(
            "tinyserve_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "tinyserve_errors",
            "Error answers by route and error code ('internal' counts bugs).",
            ["route", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "tinyserve_request_seconds",
            "Time from request arrival to response, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "tinyserve_stage_seconds",
            "Per-image time in each stage: decode, queue wait, inference, total.",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tinyserve_batch_size",
            "Images per inference batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tinyserve_queue_depth",
            "Requests waiting for or in inference.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",  # the workers' queues together
        )
        self.model_loaded = Gauge(
            "tinyserve_model_loaded",
            "1 for each model version currently served.",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="livemax",  # served if any live worker serves it
        )
        self.model_load_seconds = Gauge(
            "tinyserve_model_load_seconds",
            "Time the served version took to load and warm up.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        # A collector, not a Gauge: in multiprocess mode a gauge's value is what was last
        # written to its file, and a thread count must be read when scraped.
        self.registry.register(_Threads())
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.started = time.time()
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._total = 0
        self._failed = 0
        self._latency_sum = 0.0
        self._per_model: dict[str, list[float]] = {}
        self._versions: dict[tuple[str, str], InferenceStats] = {}
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._error_children: dict[tuple[str, str], Any] = {}
        self._stage_children: dict[str, tuple[Any, ...]] = {}
        # Requests waiting for or in inference, by model; the app sets it (the batchers
        # live in the registry, above this module).
        self.queue_probe: Callable[[], Mapping[str, int]] | None = None

    def observe_request(self, route: str, status: int, seconds: float, model: str | None) -> None:
        """Record one finished prediction request (health and metrics scrapes are not counted)."""
        children = self._request_children.get((route, status))
        if children is None:  # label lookups cost more than the observation; keep the children
            children = (
                self.requests.labels(route, str(status)),
                self.request_seconds.labels(route),
            )
            self._request_children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        with self._lock:
            self._total += 1
            self._latency_sum += seconds
            self._latencies.append(seconds)
            if status >= 400:
                self._failed += 1
            if model is not None:
                counts = self._per_model.setdefault(model, [0, 0, 0.0, 0.0])
                counts[0] += 1
                counts[1] += status >= 400
                counts[2] += seconds
                counts[3] += seconds if status >= 400 else 0.0

    def count_error(self, route: str, code: str) -> None:
        """Count an error answer by its code."""
        child = self._error_children.get((route, code))
        if child is None:  # routes are the table's paths and codes the error classes': few
            child = self._error_children[(route, code)] = self.errors.labels(route, code)
        child.inc()

    def count_request(self, route: str, status: int) -> None:
        """Count a request that is not a prediction (health, metadata...)."""
        self.requests.labels(route, str(status)).inc()

    def observe_stages(self, model: str, decode: float, queue: float, inference: float,
                       total: float) -> None:  # fmt: skip
        children = self._stage_children.get(model)
        if children is None:
            children = tuple(self.stage_seconds.labels(model, stage) for stage in STAGES)
            self._stage_children[model] = children
        for child, seconds in zip(children, (decode, queue, inference, total), strict=True):
            child.observe(seconds)

    def batch_observer(self, model: str, version: int | None = None) -> Any:
        """A callback for ``Batcher(observer=...)`` that records batch sizes (and, given a
        version, that version's ``InferenceStats``)."""
        histogram = self.batch_size.labels(model)
        key = (model, str(version))

        def observe(size: int, waits: Sequence[float], inference: float) -> None:
            histogram.observe(size)
            if version is None:
                return
            ns = round(inference * 1e9)
            with self._lock:
                stats = self._versions.setdefault(key, InferenceStats())
                stats.inference_count += size
                stats.execution_count += 1
                stats.last_inference_ms = int(time.time() * 1000)
                stats.queue_ns += round(sum(waits) * 1e9)
                stats.compute_infer_ns += ns * size
                bucket = stats.batches.setdefault(size, [0, 0])
                bucket[0] += 1
                bucket[1] += ns

        return observe

    def observe_output(self, model: str, version: int, seconds: float) -> None:
        """Time one V2 request spent turning logits into its outputs."""
        with self._lock:
            stats = self._versions.setdefault((model, str(version)), InferenceStats())
            stats.compute_output_count += 1
            stats.compute_output_ns += round(seconds * 1e9)

    def inference_stats(self, model: str, version: int) -> InferenceStats:
        """A copy of one version's counters (zeros before its first batch)."""
        with self._lock:
            stats = self._versions.get((model, str(version)), InferenceStats())
            return replace(stats, batches={k: list(v) for k, v in stats.batches.items()})

    def request_totals(self, model: str) -> tuple[int, int, float, float]:
        """Requests to ``model`` (all routes and versions): total, failed, and the seconds
        spent in successful and in failed ones."""
        with self._lock:
            n, bad, seconds, bad_seconds = self._per_model.get(model, [0, 0, 0.0, 0.0])
        return int(n), int(bad), seconds - bad_seconds, bad_seconds

    def stage_totals(self, model: str, stage: str) -> tuple[int, float]:
        """Count and summed seconds of one ``tinyserve_stage_seconds`` series."""
        count, total = 0, 0.0
        for family in self.stage_seconds.collect():
            for sample in family.samples:
                if sample.labels.get("model") != model or sample.labels.get("stage") != stage:
                    continue
                if sample.name.endswith("_count"):
                    count = int(sample.value)
                elif sample.name.endswith("_sum"):
                    total = sample.value
        return count, total

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        return generate_latest(_Workers(self.registry, self.multiprocess_dir))

    def watch_keys(self, usage: Callable[[], Iterable[tuple[str, Mapping[str, int], int]]]) -> None:
        """Export each API key's usage, read from ``usage`` at every scrape: the key's name
        (never the key), its requests by outcome, and those counted in its quota period."""
        self.registry.register(_KeyUsage(usage))

    def stats(self) -> dict[str, Any]:
        """The ``/stats`` summary (seed field names) with a per-model breakdown."""
        return summarize(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """What ``/stats`` is computed from, as JSON values: what a worker sends its siblings."""
        with self._lock:
            snapshot: dict[str, Any] = {
                "pid": os.getpid(),
                "started": self.started,
                "total": self._total,
                "failed": self._failed,
                "latency_sum": self._latency_sum,
                "latencies": list(self._latencies),
                "per_model": {k: list(v) for k, v in self._per_model.items()},
            }
        # In multiprocess mode these read this worker's own values (its children's mmap
        # files); the merge adds the siblings'.
        snapshot.update(
            queue_depth=dict(self.queue_probe()) if self.queue_probe is not None else {},
            batch_sizes=self._batch_sizes(),
            requests_by_status=self._by_status(),
            errors_by_code=self._errors_by_code(),
            models_loaded=self._models_loaded(),
        )
        return snapshot

    def _batch_sizes(self) -> dict[str, int]:
        """Batches run so far by size bucket ("1", "2", "3-4", ... ">512"), all models."""
        counts = dict.fromkeys(_bucket_names(), 0)
        for family in self.batch_size.collect():
            previous: dict[str, float] = {}
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    continue
                model = sample.labels["model"]
                below = previous.get(model, 0.0)
                le = sample.labels["le"]
                name = _BUCKET_NAMES.get(le, _OVER)
                counts[name] += int(sample.value - below)
                previous[model] = sample.value
        return counts

    def _by_status(self) -> dict[str, int]:
        """Requests answered by status code, every route."""
        totals: dict[str, int] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    totals[status] = totals.get(status, 0) + int(sample.value)
        return dict(sorted(totals.items()))

    def _errors_by_code(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for family in self.errors.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    code = sample.labels["code"]
                    totals[code] = totals.get(code, 0) + int(sample.value)
        return dict(sorted(totals.items()))

    def _models_loaded(self) -> list[dict[str, str]]:
        return [
            {"model": sample.labels["model"], "version": sample.labels["version"]}
            for family in self.model_loaded.collect()
            for sample in family.samples
            if sample.value == 1
        ]


def merge_stats(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One snapshot of several workers: counts added up, latency windows joined, the
    earliest start kept (so requests per second are the whole server's), and each worker's
    own request count under ``workers``."""
    per_model: dict[str, list[float]] = {}
    queue: dict[str, int] = {}
    sums: dict[str, dict[str, int]] = {"batch_sizes": {}, "requests_by_status": {},
                                       "errors_by_code": {}}  # fmt: skip
    loaded: dict[tuple[str, str], dict[str, str]] = {}
    for part in snapshots:
        for name, counts in part["per_model"].items():
            into = per_model.setdefault(name, [0, 0, 0.0, 0.0])
            for i, value in enumerate(counts):
                into[i] += value
        for name, depth in part["queue_depth"].items():
            queue[name] = queue.get(name, 0) + depth
        for key, totals in sums.items():
            for name, count in part[key].items():
                totals[name] = totals.get(name, 0) + count
        for entry in part["models_loaded"]:
            loaded[entry["model"], entry["version"]] = entry
    workers = [
        {"worker": part.get("worker", i), "pid": part["pid"], "total_requests": part["total"]}
        for i, part in enumerate(snapshots)
    ]
    return {
        "started": min(part["started"] for part in snapshots),
        "total": sum(part["total"] for part in snapshots),
        "failed": sum(part["failed"] for part in snapshots),
        "latency_sum": sum(part["latency_sum"] for part in snapshots),
        "latencies": [x for part in snapshots for x in part["latencies"]],
        "per_model": per_model,
        "queue_depth": queue,
        **{key: dict(sorted(totals.items())) for key, totals in sums.items()},
        "models_loaded": [loaded[key] for key in sorted(loaded)],
        "workers": sorted(workers, key=lambda entry: entry["worker"]),
    }


def summarize(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/stats`` answer of one snapshot (one worker's, or ``merge_stats``' of several)."""
    total, failed = snapshot["total"], snapshot["failed"]
    latency_sum = snapshot["latency_sum"]
    latencies = np.asarray(snapshot["latencies"], dtype=np.float64)
    uptime = time.time() - snapshot["started"]
    if len(latencies):
        p50, p95, p99 = (float(x) * 1000 for x in np.percentile(latencies, [50, 95, 99]))
    else:
        p50 = p95 = p99 = 0.0
    summary = {
        "uptime_seconds": round(uptime, 3),
        "total_requests": total,
        "successful_requests": total - failed,
        "failed_requests": failed,
        "success_rate": round(100.0 * (total - failed) / total, 3) if total else 100.0,
        "average_latency_ms": round(1000 * latency_sum / total, 3) if total else 0.0,
        "p50_latency_ms": round(p50, 3),
        "p95_latency_ms": round(p95, 3),
        "p99_latency_ms": round(p99, 3),
        "requests_per_second": round(total / uptime, 3) if uptime > 0 else 0.0,
        "latency_window": len(latencies),
        "models": {
            name: {
                "total_requests": int(n),
                "failed_requests": int(bad),
                "average_latency_ms": round(1000 * s / n, 3) if n else 0.0,
            }
            for name, (n, bad, s, _) in snapshot["per_model"].items()
        },
        # For live views (the web page's dashboard); added after the seed's fields.
        "queue_depth": dict(snapshot["queue_depth"]),
        "batch_sizes": dict(snapshot["batch_sizes"]),
        "requests_by_status": dict(snapshot["requests_by_status"]),
        "errors_by_code": dict(snapshot["errors_by_code"]),
        "models_loaded": list(snapshot["models_loaded"]),
    }
    if "workers" in snapshot:
        summary["workers"] = snapshot["workers"]
    return summary


class _Threads:
    """``tinyserve_threads``: the process's OS threads, counted when scraped."""

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "tinyserve_threads",
            "OS threads of the server process (event loop, pools, ONNX Runtime).",
            value=_thread_count(),
        )


class _Workers:
    """A scrape of several workers: every worker's counters, histograms and gauges added up
    from their files, then this worker's own readers (process, threads, keys, streams)."""

    def __init__(self, registry: CollectorRegistry, directory: str) -> None:
        self.registry = registry
        self.directory = directory

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        shared = list(MultiProcessCollector(None, self.directory).collect())  # type: ignore[no-untyped-call]
        names = {family.name for family in shared}
        yield from shared
        # This worker's file-backed families are in ``shared`` already (under their names).
        yield from (family for family in self.registry.collect() if family.name not in names)


def _bucket_names() -> list[str]:
    return [*_BUCKET_NAMES.values(), _OVER]


# The batch-size histogram's upper bounds as prometheus_client writes them ("4.0"), named
# by the sizes each bucket holds: "1", "2", "3-4", "5-8"...
_BUCKET_NAMES = {
    f"{float(upper)}": str(upper) if upper <= lower + 1 else f"{lower + 1}-{upper}"
    for lower, upper in zip((0, *_BATCH_BUCKETS), _BATCH_BUCKETS, strict=False)
}
_OVER = f">{_BATCH_BUCKETS[-1]}"


class _KeyUsage:
    """A collector over the server's API keys: the counts live with the keys (``auth``)."""

    def __init__(self, usage: Callable[[], Iterable[tuple[str, Mapping[str, int], int]]]) -> None:
        self.usage = usage

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        requests = CounterMetricFamily(
            "tinyserve_api_key_requests",
            "Requests by API key name and outcome (admitted, forbidden, rate_limited, "
            "quota_exceeded).",
            labels=["key", "outcome"],
        )
        quota = GaugeMetricFamily(
            "tinyserve_api_key_quota_used",
            "Requests counted against each API key's quota in its current day or month.",
            labels=["key"],
        )
        for name, outcomes, used in self.usage():
            for outcome, count in outcomes.items():
                requests.add_metric([name, outcome], count)
            quota.add_metric([name], used)
        return [requests, quota]


def _thread_count() -> float:
    """Every thread of the process on Linux (ONNX Runtime's too); Python's own elsewhere."""
    try:
        return float(len(os.listdir("/proc/self/task")))
    except OSError:
        return float(threading.active_count())


class ProductionMetrics:
    """The production layer's collectors (cache, rollouts, shadow, breaker, deadlines), in
    the server's registry beside ``Metrics``'."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cache = Counter(
            "tinyserve_cache_requests",
            "Result cache lookups by result: hit, miss, or error (Redis slow or down).",
            ["result"],
            registry=registry,
        )
        self.version_requests = Counter(
            "tinyserve_version_requests",
            "Requests answered by each model version, and by which path: primary, canary, "
            "fallback.",
            ["model", "version", "path"],
            registry=registry,
        )
        self.rollout_weight = Gauge(
            "tinyserve_rollout_weight",
            "Share of a model's unpinned requests (percent) each version receives.",
            ["model", "version"],
            registry=registry,
        )
        self.rollout_decisions = Counter(
            "tinyserve_rollout_decisions",
            "Canary decisions: advance, promote, rollback.",
            ["model", "version", "decision"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "tinyserve_rollout_rollbacks",
            "Canaries rolled back automatically.",
            ["model", "version"],
            registry=registry,
        )
        self.shadow = Counter(
            "tinyserve_shadow_requests",
            "Mirrored requests by outcome: agree, disagree (top-1), error, skipped.",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "tinyserve_breaker_state",
            "A model's circuit breaker: 0 closed, 1 open (fallback answers), 2 half-open.",
            ["model"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "tinyserve_fallback_requests",
            "Requests a fallback model answered, by why: open, overloaded, failed.",
            ["model", "fallback", "reason"],
            registry=registry,
        )
        self.deadline_refusals = Counter(
            "tinyserve_deadline_refusals",
            "Requests refused at once because their X-Request-Timeout could not be met.",
            ["model"],
            registry=registry,
        )
