"""Read the server's Prometheus ``/metrics`` around a load step and summarise what changed.

The server exposes (DESIGN §5) ``tinyserve_batch_size`` (histogram; label model),
``tinyserve_stage_seconds`` (histogram; labels model, stage = decode|queue|inference|total) and
``tinyserve_requests_total`` (counter; labels route, status). A step's figures are the deltas
of their ``_bucket``/``_sum``/``_count`` samples between a scrape before and one after it.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tinyserve.bench.client import Connection, Target, build_request

BATCH = "tinyserve_batch_size"
STAGES = "tinyserve_stage_seconds"
REQUESTS = "tinyserve_requests_total"
RSS = "process_resident_memory_bytes"

Labels = tuple[tuple[str, str], ...]
Snapshot = dict[tuple[str, Labels], float]


def parse_metrics(text: str) -> Snapshot:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    snapshot: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                snapshot[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return snapshot


async def scrape(target: Target, timeout: float = 5.0) -> tuple[Snapshot | None, str]:
    """Fetch and parse ``/metrics`` at the target's base URL: ``(snapshot, "")`` on success,
    ``(None, reason)`` when the server has no usable metrics."""
    connection = Connection(target.with_path("/metrics"))
    try:
        async with asyncio.timeout(timeout):
            status, body = await connection.request(build_request(connection.target))
    except (OSError, EOFError, TimeoutError, ValueError) as exc:
        return None, f"cannot fetch {connection.target.url}: {exc or type(exc).__name__}"
    finally:
        await connection.close()
    if status != 200:
        return None, f"{connection.target.url} answered {status}"
    try:
        return parse_metrics(body.decode("utf-8", "replace")), ""
    except ValueError as exc:
        return None, f"{connection.target.url} is not Prometheus text: {exc}"


def increase(
    before: Snapshot, after: Snapshot, name: str, group_by: str | None = None, **match: str
) -> dict[str, float]:
    """Increase of ``name`` summed over series matching ``match``, grouped by a label."""
    out: dict[str, float] = defaultdict(float)
    for (sample, labels), value in after.items():
        if sample != name:
            continue
        labelled = dict(labels)
        if any(labelled.get(k) != v for k, v in match.items()):
            continue
        # A series that appeared during the step (or was reset) counts from zero.
        previous = before.get((sample, labels), 0.0)
        grown = value - previous if value >= previous else value
        out[labelled.get(group_by, "") if group_by else ""] += grown
    return dict(out)


def server_delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What the server did between two snapshots: batch sizes, stage times, request counts."""

    def delta(name: str, group_by: str | None = None, **match: str) -> dict[str, float]:
        return increase(before, after, name, group_by, **match)

    result: dict[str, Any] = {}
    batches = delta(f"{BATCH}_count").get("", 0.0)
    if batches:
        images = delta(f"{BATCH}_sum").get("", 0.0)
        buckets = cumulative(delta(f"{BATCH}_bucket", "le"))
        result["batch_size"] = {
            "batches": int(batches),
            "images": int(images),
            "mean": round(images / batches, 3),
            # No interpolated percentiles: inside a bucket like (0, 1] they would be invented.
            "distribution": _distribution(buckets),
        }
    stages: dict[str, dict[str, float | None]] = {}
    counts = delta(f"{STAGES}_count", "stage")
    sums = delta(f"{STAGES}_sum", "stage")
    for stage, n in sorted(counts.items()):
        if n:
            buckets = cumulative(delta(f"{STAGES}_bucket", "le", stage=stage))
            stages[stage] = {
                "count": int(n),
                "mean_ms": round(sums.get(stage, 0.0) / n * 1000, 4),
                "p50_ms": _finite(bucket_quantile(buckets, 0.5) * 1000),
                "p99_ms": _finite(bucket_quantile(buckets, 0.99) * 1000),
            }
    if stages:
        result["stages"] = stages
    statuses = {k: int(v) for k, v in sorted(delta(REQUESTS, "status").items()) if v}
    if statuses:
        result["requests_by_status"] = statuses
    rss = after.get((RSS, ()))
    if rss is not None:
        result["rss_mb"] = round(rss / 2**20, 2)
    return result


def cumulative(by_le: Mapping[str, float]) -> list[tuple[float, float]]:
    return sorted((float(le), count) for le, count in by_le.items())


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket that holds
    the ``q``-th observation; the highest finite bound if it falls in ``+Inf``."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            inside = count - lower_count
            fraction = (rank - lower_count) / inside if inside else 1.0
            return round(lower_bound + (bound - lower_bound) * fraction, 6)
        lower_bound, lower_count = bound, count
    return lower_bound


def _finite(x: float) -> float | None:
    """JSON has no NaN: an estimate that cannot be made is ``None``."""
    return None if math.isnan(x) else round(x, 4)


def _distribution(buckets: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Per-bucket (not cumulative) counts with readable ranges: ``1``, ``3-4``, ``>512``."""
    out = []
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        n = count - previous_count
        if math.isinf(bound):
            label = f">{previous_bound:g}"
        elif bound.is_integer() and previous_bound.is_integer():
            low = int(previous_bound) + 1
            label = f"{int(bound)}" if low >= bound else f"{low}-{int(bound)}"
        else:
            label = f"({previous_bound:g}, {bound:g}]"
        out.append({"bucket": label, "count": int(n)})
        previous_bound, previous_count = bound, count
    return out
