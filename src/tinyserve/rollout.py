"""Rollouts: which version answers an unpinned request, and what happens when one goes wrong.

A model's ``config.toml`` may declare, beside ``version``/``versions``/``[batching]``::

    traffic = {1 = 90, 2 = 10}       # weights of the versions that share unpinned requests
    sticky = "x-user-id"              # keep a user on one version by this header (default:
                                      # by API key, when the request carries one)
    shadow = 3                        # mirror requests to version 3: compared, never returned
    fallback = "fashion-cnn-small"    # "name" or "name:version"; answers while the breaker
                                      # of this model is open

    [canary]                          # ramp a new version up, step by step
    version = 2
    steps = [5, 25, 50, 100]          # percent of unpinned requests, in order
    step_s = 60                       # least time on a step
    min_requests = 50                 # least requests per version before any decision
    window = 500                      # the latest requests per version that count
    max_error_increase = 0.02         # canary error rate minus stable's
    max_p99_ratio = 1.5               # canary p99 over stable p99 ...
    p99_slack_ms = 2.0                # ... plus this much

    [breaker]                         # only with a fallback
    failures = 5                      # consecutive failures that open it
    open_s = 10                       # how long the fallback answers before a probe
    latency_budget_ms = 250           # slower answers count as failures

Every version named is loaded beside the default one. A request with ``?version=N`` (or a V2
path with a version) is never rerouted. ``Rollout`` is one model's state, rebuilt only when
its configuration changes; decisions take their time from an injected clock, so tests can
replay a ramp and a rollback exactly.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tinyserve.errors import ConfigError
from tinyserve.metrics import ProductionMetrics
from tinyserve.repository import ROLLOUT_KEYS

__all__ = [
    "Breaker",
    "BreakerPolicy",
    "CanaryPolicy",
    "Rollout",
    "RolloutConfig",
]

log = logging.getLogger("tinyserve")

Clock = Callable[[], float]


@dataclass(frozen=True)
class CanaryPolicy:
    version: int
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    step_s: float = 60.0
    min_requests: int = 50
    window: int = 500
    max_error_increase: float = 0.02
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 2.0

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < s <= 100 for s in self.steps):
            raise ValueError("steps must be percentages in (0, 100]")
        if list(self.steps) != sorted(self.steps):
            raise ValueError("steps must rise")
        if self.step_s < 0 or self.min_requests < 1 or self.window < self.min_requests:
            raise ValueError("step_s >= 0, min_requests >= 1 and window >= min_requests")
        if self.max_p99_ratio < 1 or self.max_error_increase < 0 or self.p99_slack_ms < 0:
            raise ValueError("max_p99_ratio >= 1, max_error_increase and p99_slack_ms >= 0")


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int = 5
    open_s: float = 10.0
    latency_budget_ms: float | None = None

    def __post_init__(self) -> None:
        if self.failures < 1 or self.open_s <= 0:
            raise ValueError("failures must be >= 1 and open_s > 0")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError("latency_budget_ms must be positive")


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout part of one model's config.toml."""

    traffic: tuple[tuple[int, float], ...] = ()
    sticky: str | None = None  # a header name, lower case
    shadow: int | None = None
    fallback: tuple[str, int | None] | None = None
    canary: CanaryPolicy | None = None
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)

    @property
    def versions(self) -> set[int]:
        """Versions this configuration routes to, which must be loaded."""
        named = {v for v, _ in self.traffic}
        if self.shadow is not None:
            named.add(self.shadow)
        if self.canary is not None:
            named.add(self.canary.version)
        return named

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str) -> RolloutConfig | None:
        """The rollout keys of a parsed config.toml, or None when it has none."""
        if not any(key in data for key in ROLLOUT_KEYS):
            return None
        try:
            return cls(
                traffic=_traffic(data.get("traffic", {})),
                sticky=_sticky(data.get("sticky")),
                shadow=_version(data.get("shadow"), "shadow"),
                fallback=_fallback(data.get("fallback")),
                canary=_table(CanaryPolicy, data.get("canary"), "canary"),
                breaker=_table(BreakerPolicy, data.get("breaker", {}), "breaker")
                or BreakerPolicy(),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc


class Breaker:
    """A circuit breaker: closed, open (the fallback answers), half-open (one probe)."""

    CLOSED, OPEN, HALF_OPEN = 0, 1, 2
    NAMES = ("closed", "open", "half-open")

    def __init__(self, policy: BreakerPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May this request go to the primary? (In half-open state, one at a time may.)"""
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and self.clock() - self.opened_at >= self.policy.open_s:
            self.state = self.HALF_OPEN
            self._probing = False
        if self.state == self.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        self.state = self.CLOSED

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state == self.HALF_OPEN or self.failures >= self.policy.failures:
            if self.state != self.OPEN:
                self.opened_at = self.clock()
            self.state = self.OPEN

    def slow(self, seconds: float) -> bool:
        budget = self.policy.latency_budget_ms
        return budget is not None and seconds * 1000 > budget


class _Window:
    """The latest requests of one version: (seconds, ok)."""

    def __init__(self, size: int) -> None:
        self.items: deque[tuple[float, bool]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.items)

    def error_rate(self) -> float:
        return sum(not ok for _, ok in self.items) / max(1, len(self.items))

    def p99_ms(self) -> float:
        times = sorted(seconds for seconds, ok in self.items if ok)
        if not times:
            return 0.0
        return times[min(len(times) - 1, int(0.99 * len(times)))] * 1000


class Rollout:
    """One model's live rollout: the current weights, the canary's state, the breaker."""

    def __init__(
        self,
        model: str,
        config: RolloutConfig,
        default_version: int,
        metrics: ProductionMetrics | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.breaker = Breaker(config.breaker, clock)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=20)
        canary = config.canary
        if canary is None:
            self.stable = default_version
            self.state = "split" if config.traffic else "fixed"
        else:
            others = [v for v, _ in config.traffic if v != canary.version]
            self.stable = others[0] if others else default_version
            if self.stable == canary.version:
                raise ConfigError(
                    f"{model}: the canary version {canary.version} is also the stable one; "
                    "set version = <stable> in config.toml"
                )
            self.state = "ramping"
        self.step = 0
        self.step_started = clock()
        self._windows: dict[int, _Window] = {}
        self._seen = 0
        self._set_weights()

    # -- routing --------------------------------------------------------------------------

    def choose(self, sticky: str | None) -> int:
        """The version for one unpinned request; the same ``sticky`` value, the same one."""
        weights = self.weights
        if len(weights) == 1:
            return weights[0][0]
        total = sum(w for _, w in weights)
        if sticky:
            digest = hashlib.blake2b(f"{self.model}\0{sticky}".encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64 * total
        else:
            point = self.rng.random() * total
        for version, weight in weights:
            point -= weight
            if point < 0:
                return version
        return weights[-1][0]

    def path(self, version: int) -> str:
        canary = self.config.canary
        return "canary" if canary is not None and version == canary.version else "primary"

    # -- what happened --------------------------------------------------------------------

    def observe(self, version: int, seconds: float, ok: bool) -> None:
        """Record one answer of ``version``; a ramping canary may then advance or roll back."""
        canary = self.config.canary
        if canary is None or self.state != "ramping":
            return
        window = self._windows.get(version)
        if window is None:
            window = self._windows[version] = _Window(canary.window)
        window.items.append((seconds, ok))
        self._seen += 1
        if version == canary.version and (not ok or self._seen % 10 == 0):
            self.evaluate()

    def evaluate(self) -> str | None:
        """Advance, promote or roll back the canary, if its figures say so; the decision."""
        canary = self.config.canary
        if canary is None or self.state != "ramping":
            return None
        new = self._windows.get(canary.version, _Window(1))
        old = self._windows.get(self.stable, _Window(1))
        if len(new) < canary.min_requests:
            return None
        figures = {
            "canary_requests": len(new),
            "stable_requests": len(old),
            "canary_error_rate": round(new.error_rate(), 4),
            "stable_error_rate": round(old.error_rate(), 4),
            "canary_p99_ms": round(new.p99_ms(), 3),
            "stable_p99_ms": round(old.p99_ms(), 3),
        }
        compared = len(old) >= canary.min_requests
        if compared:
            errors = new.error_rate() - old.error_rate() > canary.max_error_increase
            limit = old.p99_ms() * canary.max_p99_ratio + canary.p99_slack_ms
            slow = new.p99_ms() > limit
            if errors or slow:
                why = "error rate" if errors else "p99 latency"
                return self._decide("rollback", f"{why} over the stable version's", figures)
        if self.clock() - self.step_started < canary.step_s:
            return None
        if not compared and self.step < len(canary.steps) - 1:
            return None  # too little stable traffic to compare with yet
        if self.step + 1 >= len(canary.steps) or canary.steps[self.step + 1] >= 100:
            return self._decide("promote", "healthy on every step", figures)
        return self._decide("advance", "healthy on this step", figures)

    def _decide(self, decision: str, why: str, figures: dict[str, Any]) -> str:
        canary = self.config.canary
        assert canary is not None
        if decision == "rollback":
            self.state = "rolled_back"
        elif decision == "promote":
            self.state = "promoted"
        else:
            self.step += 1
            self.step_started = self.clock()
            self._windows.clear()
        self._set_weights()
        record = {"decision": decision, "reason": why, "at": time.time(),
                  "weight": self.canary_weight, **figures}  # fmt: skip
        self.decisions.append(record)
        log.warning(
            "rollout of %s version %d: %s (%s); canary %.1f%% errors, p99 %.1f ms over %d "
            "requests; stable %.1f%%, p99 %.1f ms over %d; canary weight now %g%%",
            self.model, canary.version, decision, why,
            figures["canary_error_rate"] * 100, figures["canary_p99_ms"],
            figures["canary_requests"], figures["stable_error_rate"] * 100,
            figures["stable_p99_ms"], figures["stable_requests"], self.canary_weight,
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.rollout_decisions.labels(self.model, str(canary.version), decision).inc()
            if decision == "rollback":
                self.metrics.rollbacks.labels(self.model, str(canary.version)).inc()
        return decision

    # -- state ----------------------------------------------------------------------------

    @property
    def canary_weight(self) -> float:
        canary = self.config.canary
        if canary is None:
            return 0.0
        return {"promoted": 100.0, "rolled_back": 0.0}.get(self.state, canary.steps[self.step])

    def _set_weights(self) -> None:
        canary = self.config.canary
        if canary is not None:
            share = self.canary_weight
            pairs = [(self.stable, 100.0 - share), (canary.version, share)]
        elif self.config.traffic:
            pairs = list(self.config.traffic)
        else:
            pairs = [(self.stable, 100.0)]
        self.weights = [(v, w) for v, w in pairs if w > 0] or [(self.stable, 100.0)]
        if self.metrics is not None:
            for version, weight in pairs:
                self.metrics.rollout_weight.labels(self.model, str(version)).set(weight)

    def describe(self) -> dict[str, Any]:
        config = self.config
        info: dict[str, Any] = {
            "state": self.state,
            "weights": {str(v): w for v, w in self.weights},
            "sticky": config.sticky or "api key",
            "shadow": config.shadow,
            "breaker": Breaker.NAMES[self.breaker.state],
        }
        if config.fallback is not None:
            name, version = config.fallback
            info["fallback"] = name if version is None else f"{name}:{version}"
        if config.canary is not None:
            info["canary"] = {
                "version": config.canary.version,
                "stable": self.stable,
                "step": self.step,
                "steps": list(config.canary.steps),
                "weight": self.canary_weight,
                "decisions": list(self.decisions),
            }
        return info


def _traffic(raw: Any) -> tuple[tuple[int, float], ...]:
    if not isinstance(raw, Mapping):
        raise ValueError("traffic must be a table of version = weight, e.g. {1 = 90, 2 = 10}")
    pairs: list[tuple[int, float]] = []
    for key, weight in raw.items():
        version = _version(int(key) if str(key).isdigit() else key, "a traffic key")
        assert version is not None
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"the traffic weight of version {key} must be a number >= 0")
        pairs.append((version, float(weight)))
    if raw and not sum(w for _, w in pairs) > 0:
        raise ValueError("traffic weights must not all be 0")
    return tuple(sorted(pairs))


def _version(raw: Any, what: str) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise ValueError(f"{what} must be a version number, got {raw!r}")
    return raw


def _sticky(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError('sticky must name a request header, e.g. sticky = "x-user-id"')
    return raw.strip().lower()


def _fallback(raw: Any) -> tuple[str, int | None] | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        raise ValueError('fallback must be "model" or "model:version"')
    name, _, version = raw.partition(":")
    if version and not version.isdigit():
        raise ValueError(f'fallback must be "model" or "model:version", got {raw!r}')
    return name, int(version) if version else None


def _table(kind: type[Any], raw: Any, what: str) -> Any:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"[{what}] must be a table")
    known = set(kind.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"[{what}] has unknown keys {unknown}; known: {sorted(known)}")
    values = dict(raw)
    if "steps" in values:
        values["steps"] = tuple(float(s) for s in values["steps"])
    return kind(**values)
