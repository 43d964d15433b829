"""The production layer's Prometheus collectors: cache, rollouts, shadow, breaker, deadlines.

They live in the server's registry beside ``metrics.Metrics``' (``ServingContext`` makes
both), and count what ``production`` and ``rollout`` decide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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
