"""Latency statistics: a log-bucket histogram for long runs, exact percentiles for short ones."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

Seconds = npt.NDArray[np.float64]

HTTP_PERCENTILES = (50.0, 90.0, 99.0, 99.9)
ENGINE_PERCENTILES = (50.0, 95.0, 99.0)


def percentile_key(q: float) -> str:
    """``50.0`` -> ``"p50"``, ``99.9`` -> ``"p99.9"``."""
    return f"p{q:g}"


class LatencyHistogram:
    """Latencies in logarithmic buckets, each ``ratio`` times wider than the one before.

    With the default ratio of 1.02 a reported percentile is within 1% of the true value
    (HdrHistogram's idea with two significant digits, in ~1,000 buckets from 1 µs to 1,000 s).
    Recording is one ``log`` and one list increment, cheap enough for every request.
    """

    def __init__(self, lowest: float = 1e-6, highest: float = 1e3, ratio: float = 1.02) -> None:
        if not 0 < lowest < highest or ratio <= 1:
            raise ValueError("the histogram needs 0 < lowest < highest and ratio > 1")
        self.lowest, self.ratio = lowest, ratio
        self._log_lowest, self._log_ratio = math.log(lowest), math.log(ratio)
        self.counts = [0] * (int(math.log(highest / lowest) / self._log_ratio) + 1)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def record(self, seconds: float) -> None:
        index = int((math.log(max(seconds, self.lowest)) - self._log_lowest) / self._log_ratio)
        self.counts[min(index, len(self.counts) - 1)] += 1
        self.count += 1
        self.total += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        if len(other.counts) != len(self.counts) or other.ratio != self.ratio:
            raise ValueError("only histograms with the same buckets can be merged")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _value(self, index: int) -> float:
        """The geometric middle of bucket ``index``, clamped to what was really seen."""
        middle: float = self.lowest * self.ratio ** (index + 0.5)
        return min(max(middle, self.min), self.max)

    def percentiles(self, qs: Iterable[float]) -> dict[str, float]:
        """Seconds at each percentile in ``qs`` (0-100); empty histograms give NaN."""
        qs = list(qs)
        if not self.count:
            return {percentile_key(q): math.nan for q in qs}
        cumulative = np.cumsum(self.counts)
        out = {}
        for q in qs:
            rank = max(1, math.ceil(q / 100 * self.count))
            out[percentile_key(q)] = self._value(int(np.searchsorted(cumulative, rank)))
        return out

    def summary_ms(self, qs: Sequence[float] = HTTP_PERCENTILES) -> dict[str, float]:
        """Count, min, mean, the percentiles and max, in milliseconds."""
        if not self.count:
            return {"count": 0}
        out: dict[str, float] = {
            "count": self.count,
            "min": round(self.min * 1000, 4),
            "mean": round(self.total / self.count * 1000, 4),
        }
        out.update({k: round(v * 1000, 4) for k, v in self.percentiles(qs).items()})
        out["max"] = round(self.max * 1000, 4)
        return out

    def cdf_ms(self) -> list[tuple[float, float]]:
        """``(latency_ms, fraction at or below)`` at the upper edge of every non-empty bucket."""
        points: list[tuple[float, float]] = []
        seen = 0
        for index, n in enumerate(self.counts):
            if n:
                seen += n
                edge = min(self.lowest * self.ratio ** (index + 1), self.max)
                points.append((round(edge * 1000, 4), round(seen / self.count, 6)))
        return points


def exact_summary_ms(
    seconds: Seconds, qs: Sequence[float] = ENGINE_PERCENTILES
) -> dict[str, float]:
    """Mean, min, percentiles and max of a small sample of durations, in milliseconds."""
    if not len(seconds):
        return {"count": 0}
    ms = seconds * 1000
    out: dict[str, float] = {
        "count": len(ms),
        "min": round(float(ms.min()), 4),
        "mean": round(float(ms.mean()), 4),
    }
    for q, value in zip(qs, np.percentile(ms, list(qs)), strict=True):
        out[percentile_key(q)] = round(float(value), 4)
    out["max"] = round(float(ms.max()), 4)
    return out
