"""A live view of running servers: readiness and what their ``/metrics`` changed each round.

Every ``interval`` seconds each server is asked for ``/health/ready`` and ``/metrics`` (the
same scraper as ``tinyserve bench http``); a round's figures are the increase of the counters
and histograms since that server's previous round, so they describe the last interval, not
the server's lifetime. The first round of a server has no rates (nothing to compare with).
Predictions are counted from ``tinyserve_request_seconds``, which only prediction routes
observe, so the monitor's own health checks and scrapes do not inflate requests/s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyserve.bench.client import Connection, Target, build_request
from tinyserve.bench.scrape import (
    RSS,
    Snapshot,
    bucket_quantile,
    cumulative,
    increase,
    scrape,
    server_delta,
)

__all__ = ["MonitorConfig", "Sample", "monitor", "render"]

LATENCY = "tinyserve_request_seconds"
ERRORS = "tinyserve_errors_total"
CPU = "process_cpu_seconds_total"


@dataclass(frozen=True)
class MonitorConfig:
    urls: tuple[str, ...]
    interval: float = 2.0
    count: int = 0  # rounds; 0 = until interrupted
    timeout: float = 5.0
    jsonl: Path | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("give at least one server URL")
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        if self.count < 0:
            raise ValueError("count must be >= 0")


@dataclass(frozen=True)
class Sample:
    """One server in one round (rates and latencies over the last interval; None if unknown)."""

    url: str
    time: float
    ready: bool
    status: str  # "ready", "not ready (503)", or why the server could not be reached
    requests_per_s: float | None = None
    errors_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    batch_mean: float | None = None
    queue_depth: float | None = None
    models: int | None = None
    rss_mb: float | None = None
    cpu_percent: float | None = None
    threads: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


async def _ready(target: Target, timeout: float) -> tuple[bool, str]:
    connection = Connection(target.with_path("/health/ready"))
    try:
        async with asyncio.timeout(timeout):
            status, _ = await connection.request(build_request(connection.target))
    except (OSError, EOFError, TimeoutError, ValueError) as exc:
        return False, f"unreachable: {exc or type(exc).__name__}"
    finally:
        await connection.close()
    return status == 200, "ready" if status == 200 else f"not ready ({status})"


def _gauge(snapshot: Snapshot, name: str) -> float | None:
    values = [v for (sample, _), v in snapshot.items() if sample == name]
    return sum(values) if values else None


def _ms(seconds: float) -> float | None:
    return None if seconds != seconds else round(seconds * 1000, 3)  # NaN: no requests


def summarize(
    url: str, now: float, ready: tuple[bool, str], after: Snapshot | None,
    before: tuple[float, Snapshot] | None,
) -> Sample:  # fmt: skip
    """A ``Sample`` from this round's snapshot and, when there is one, the previous round's."""
    if after is None:
        return Sample(url, round(now, 3), ready[0], ready[1])
    rss = after.get((RSS, ()))
    threads = _gauge(after, "tinyserve_threads")
    loaded = [k for k, v in after.items() if k[0] == "tinyserve_model_loaded" and v == 1]
    fields: dict[str, Any] = {
        "queue_depth": _gauge(after, "tinyserve_queue_depth") or 0.0,
        "models": len(loaded),
        "rss_mb": None if rss is None else round(rss / 2**20, 2),
        "threads": None if threads is None else int(threads),
    }
    if before is not None:
        then, previous = before
        elapsed = max(now - then, 1e-9)
        requests = increase(previous, after, f"{LATENCY}_count").get("", 0.0)
        errors = increase(previous, after, ERRORS).get("", 0.0)
        buckets = cumulative(increase(previous, after, f"{LATENCY}_bucket", "le"))
        cpu = increase(previous, after, CPU).get("")
        batches = server_delta(previous, after).get("batch_size")
        fields.update(
            requests_per_s=round(requests / elapsed, 3),
            errors_per_s=round(errors / elapsed, 3),
            p50_ms=_ms(bucket_quantile(buckets, 0.5)),
            p99_ms=_ms(bucket_quantile(buckets, 0.99)),
            batch_mean=batches["mean"] if batches else None,
            cpu_percent=None if cpu is None else round(100 * cpu / elapsed, 1),
        )
    return Sample(url, round(now, 3), ready[0], ready[1], **fields)


async def monitor(
    config: MonitorConfig, on_round: Callable[[Sequence[Sample]], None]
) -> list[Sample]:
    """Poll every server ``config.count`` times (or forever), calling ``on_round`` after each
    round and appending its samples to ``config.jsonl``; returns the last round."""
    targets = [Target.parse(url, allow_remote=True) for url in config.urls]
    previous: dict[int, tuple[float, Snapshot]] = {}
    samples: list[Sample] = []
    rounds = 0
    while True:
        started = time.monotonic()

        async def one(index: int, target: Target) -> Sample:
            ready, (snapshot, reason) = await asyncio.gather(
                _ready(target, config.timeout), scrape(target, config.timeout)
            )
            now = time.time()
            if snapshot is None and ready[0]:
                ready = (True, f"ready; no metrics: {reason}")
            sample = summarize(target.base_url, now, ready, snapshot, previous.get(index))
            if snapshot is not None:
                previous[index] = (now, snapshot)
            return sample

        samples = list(await asyncio.gather(*(one(i, t) for i, t in enumerate(targets))))
        if config.jsonl is not None:
            with config.jsonl.open("a") as out:
                out.writelines(s.to_json() + "\n" for s in samples)
        on_round(samples)
        rounds += 1
        if config.count and rounds >= config.count:
            return samples
        await asyncio.sleep(max(0.0, config.interval - (time.monotonic() - started)))


def render(samples: Sequence[Sample]) -> Any:
    """A rich table of one round: one row per server."""
    from rich.table import Table

    def show(value: float | int | None, unit: str = "") -> str:
        return "–" if value is None else f"{value:g}{unit}"

    table = Table(title="tinyserve monitor", title_justify="left")
    for column in ("server", "health", "req/s", "err/s", "p50 ms", "p99 ms", "batch",
                   "queue", "models", "RSS MB", "CPU %", "threads"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("server", "health") else "right")
    for s in samples:
        health = f"[green]{s.status}[/]" if s.ready else f"[red]{s.status}[/]"
        table.add_row(
            s.url, health, show(s.requests_per_s), show(s.errors_per_s), show(s.p50_ms),
            show(s.p99_ms), show(s.batch_mean), show(s.queue_depth), show(s.models),
            show(s.rss_mb), show(s.cpu_percent), show(s.threads),
        )  # fmt: skip
    return table
