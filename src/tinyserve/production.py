"""The production layer around ``classify``: cache, deadlines, breaker and fallback, canary
safety net and shadow traffic, for every front door that classifies images.

``classify_request`` is what the REST and V2 handlers call. With no cache, no rollout in any
model's config.toml and no ``X-Request-Timeout`` header, it is ``classify`` itself, plus two
attribute checks and a header lookup. Otherwise, in order:

1. **Deadline.** ``X-Request-Timeout`` (seconds, or ``250ms``) is measured from the request's
   arrival at this step. If the batcher's queue ahead of the images already takes longer
   than what is left, the request is refused at once (504 ``deadline_exceeded``); if it is
   admitted, whatever is left bounds its wait in the queue, so it is never run late.
2. **Breaker.** A model with a ``fallback`` has a circuit breaker. While it is open, the
   fallback answers. A full queue, a failure, or an answer slower than the latency budget
   counts against the primary; enough in a row open the breaker; after ``open_s`` one probe
   request goes to the primary again and closes the breaker if it succeeds.
3. **Cache.** Every image is looked up by its bytes and the fingerprint of the version that
   is to run it (``cache.py``); only the misses are decoded and run.
4. **Canary safety net.** When a canary version, reached through the rollout's ramp, fails a
   request, the failure is recorded (it counts towards a rollback) and the stable version
   answers the same request, so that the client does not see the canary's failure.
5. **Shadow.** A ``shadow`` version receives a copy of the request after the answer is
   ready; its top-1 answers are compared with the primary's and counted, never returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from tinyserve.asgi import Call
from tinyserve.batcher import Ticket
from tinyserve.classify import Results, classify
from tinyserve.context import ServedRunner, ServingContext
from tinyserve.errors import (
    DeadlineExceeded,
    InputError,
    InvalidParameter,
    Overloaded,
    TinyServeError,
)
from tinyserve.registry import LoadedModel
from tinyserve.requests import Upload
from tinyserve.rollout import Breaker, Rollout

__all__ = ["MAX_SHADOW_TASKS", "classify_request", "served_fields", "served_headers"]

log = logging.getLogger("tinyserve")

# Shadow copies in flight at once; more are skipped (and counted) rather than queued, so a
# slow shadow version can never slow the primary down or hold memory without bound.
MAX_SHADOW_TASKS = 32


async def classify_request(
    context: ServingContext,
    call: Call,
    model: LoadedModel,
    uploads: Sequence[Upload],
    top_k: int,
    routed: bool = True,
    ticket: Ticket | None = None,
) -> Results:
    """Classify ``uploads`` on ``model`` through the production layer (see the module).

    ``routed`` is True when no version was pinned by the request, so the rollout chose it;
    ``ticket`` is the request's place in ``model``'s queue (``ServingContext.admit``).
    """
    timeout = call.headers.get("x-request-timeout")
    if timeout is None and context.cache is None and not context.registry.with_rollouts:
        return await classify(ServedRunner(context, model, ticket=ticket), uploads, top_k)
    try:
        return await _classify(context, call, model, uploads, top_k, routed, timeout, ticket)
    finally:
        if ticket is not None:
            ticket.release()  # not queued (a hit, a fallback, an error): the place is free


async def _classify(
    context: ServingContext,
    call: Call,
    model: LoadedModel,
    uploads: Sequence[Upload],
    top_k: int,
    routed: bool,
    timeout: str | None,
    ticket: Ticket | None,
) -> Results:
    started = time.perf_counter()
    deadline = None if timeout is None else started + request_timeout(timeout)
    rollout = context.rollout(model.name) if context.registry.with_rollouts else None
    fallback = _fallback(context, rollout)
    breaker = rollout.breaker if rollout is not None and fallback is not None else None
    if breaker is not None and fallback is not None and not breaker.allow():
        return await _on_fallback(context, model, fallback, uploads, top_k, deadline, "open")
    try:
        results = await _run(context, model, uploads, top_k, deadline, ticket)
    except (InputError, DeadlineExceeded):
        raise  # the request's own fault, or its own deadline: not the model's
    except Overloaded:
        _failed(context, model, breaker)
        if fallback is None:
            raise
        return await _on_fallback(context, model, fallback, uploads, top_k, deadline, "overloaded")
    except Exception:
        seconds = time.perf_counter() - started
        _failed(context, model, breaker)
        if rollout is not None:
            rollout.observe(model.version, seconds, ok=False)
            if routed and rollout.path(model.version) == "canary":
                stable = context.registry.get(model.name, rollout.stable)
                log.warning("canary %s:%d failed a request; the stable version answers it",
                            model.name, model.version)  # fmt: skip
                results = await _run(context, stable, uploads, top_k, deadline)
                _count(context, results, "primary")
                return results
        if fallback is None:
            raise
        return await _on_fallback(context, model, fallback, uploads, top_k, deadline, "failed")
    seconds = time.perf_counter() - started
    if rollout is not None:
        rollout.observe(results.version, seconds, ok=True)
        _count(context, results, rollout.path(results.version))
        if rollout.config.shadow is not None and rollout.config.shadow != results.version:
            _mirror(context, model.name, rollout.config.shadow, uploads, results)
    if breaker is not None:
        if breaker.slow(seconds):
            _failed(context, model, breaker)
        else:
            breaker.success()
            context.production.breaker_state.labels(model.name).set(breaker.state)
    return results


def request_timeout(text: str) -> float:
    """``X-Request-Timeout`` in seconds: ``0.25``, ``250ms`` or ``2s``."""
    raw = text.strip().lower()
    scale = 1.0
    if raw.endswith("ms"):
        raw, scale = raw[:-2], 0.001
    elif raw.endswith("s"):
        raw = raw[:-1]
    try:
        seconds = float(raw) * scale
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise InvalidParameter(
            "X-Request-Timeout must be a positive number of seconds (0.25) or of "
            f"milliseconds (250ms), got {text!r}"
        )
    return seconds


def served_headers(context: ServingContext, results: Results) -> list[tuple[bytes, bytes]] | None:
    """The headers that say how an answer was made: the cache's part, the version that
    answered, the fallback. None on the default path."""
    if context.cache is None and not context.registry.with_rollouts:
        return None
    headers: list[tuple[bytes, bytes]] = []
    if context.cache is not None:
        hit = results.cached == len(results.items) and results.cached > 0
        headers.append((b"x-cache", b"hit" if hit else b"miss"))
    headers.append((b"x-tinyserve-version", f"{results.model}:{results.version}".encode()))
    if results.fallback_from is not None:
        value = f"{results.fallback_from}; reason={results.fallback_reason}"
        headers.append((b"x-tinyserve-fallback", value.encode()))
    return headers


def served_fields(context: ServingContext, results: Results) -> dict[str, object]:
    """Body fields beside the seed's: ``cached`` with a cache, ``fallback`` when one answered."""
    fields: dict[str, object] = {}
    if context.cache is not None:
        fields["cached"] = results.cached == len(results.items) and results.cached > 0
    if results.fallback_from is not None:
        fields["fallback"] = {"from": results.fallback_from, "reason": results.fallback_reason}
    return fields


# -- steps --------------------------------------------------------------------------------


async def _run(
    context: ServingContext,
    model: LoadedModel,
    uploads: Sequence[Upload],
    top_k: int,
    deadline: float | None,
    ticket: Ticket | None = None,
) -> Results:
    runner = ServedRunner(context, model, ticket=ticket)
    if deadline is not None:
        left = deadline - time.perf_counter()
        wait = model.batcher.estimated_wait_s(len(uploads))
        if left <= 0 or wait > left:
            context.production.deadline_refusals.labels(model.name).inc()
            raise DeadlineExceeded(
                f"{model.name}:{model.version} needs about {wait * 1000:.1f} ms for this "
                f"request and {max(0.0, left) * 1000:.1f} ms of its X-Request-Timeout are "
                "left; refused without running it (retry with a longer timeout, or later)"
            )
        runner.timeout_s = left
    cache = context.cache
    results = await classify(runner, uploads, min(top_k, model.manifest.num_classes), cache)
    if cache is not None:
        production = context.production
        production.cache.labels("hit").inc(results.cached)
        production.cache.labels("miss").inc(len(uploads) - results.cached)
        errors = cache.stats.errors
        if errors != context.cache_errors:
            production.cache.labels("error").inc(errors - context.cache_errors)
            context.cache_errors = errors
    return results


async def _on_fallback(
    context: ServingContext,
    model: LoadedModel,
    fallback: LoadedModel,
    uploads: Sequence[Upload],
    top_k: int,
    deadline: float | None,
    reason: str,
) -> Results:
    results = await _run(context, fallback, uploads, top_k, deadline)
    results.fallback_from = f"{model.name}:{model.version}"
    results.fallback_reason = reason
    context.production.fallbacks.labels(model.name, fallback.name, reason).inc()
    _count(context, results, "fallback")
    return results


def _fallback(context: ServingContext, rollout: Rollout | None) -> LoadedModel | None:
    if rollout is None or rollout.config.fallback is None:
        return None
    name, version = rollout.config.fallback
    try:
        return context.registry.get(name, version)
    except TinyServeError:
        return None  # not served (yet): the primary answers, or fails, on its own


def _failed(context: ServingContext, model: LoadedModel, breaker: Breaker | None) -> None:
    if breaker is None:
        return
    was = breaker.state
    breaker.failure()
    if breaker.state != was:
        log.warning(
            "breaker of %s is %s after %d failures in a row; its fallback answers for %gs",
            model.name, Breaker.NAMES[breaker.state], breaker.failures, breaker.policy.open_s,
        )  # fmt: skip
    context.production.breaker_state.labels(model.name).set(breaker.state)


def _count(context: ServingContext, results: Results, path: str) -> None:
    context.production.version_requests.labels(results.model, str(results.version), path).inc()


def _mirror(
    context: ServingContext,
    name: str,
    version: int,
    uploads: Sequence[Upload],
    primary: Results,
) -> None:
    counter = context.production.shadow
    if len(context.shadow_tasks) >= MAX_SHADOW_TASKS:
        counter.labels(name, str(version), "skipped").inc()
        return
    try:
        shadow = context.registry.get(name, version)
    except TinyServeError:
        counter.labels(name, str(version), "skipped").inc()
        return
    task = asyncio.get_running_loop().create_task(_shadow(context, shadow, uploads, primary))
    context.shadow_tasks.add(task)
    task.add_done_callback(context.shadow_tasks.discard)


async def _shadow(
    context: ServingContext, shadow: LoadedModel, uploads: Sequence[Upload], primary: Results
) -> None:
    counter = context.production.shadow
    label = (shadow.name, str(shadow.version))
    try:
        results = await classify(ServedRunner(context, shadow), uploads, 1)
    except Exception as exc:
        counter.labels(*label, "error").inc()
        log.info("shadow %s:%d failed: %s", shadow.name, shadow.version, exc)
        return
    for mine, theirs in zip(primary.items, results.items, strict=True):
        if mine.predictions is None or theirs.predictions is None:
            outcome = "error" if theirs.error is not None and mine.error is None else "agree"
        else:
            same = mine.predictions[0].class_id == theirs.predictions[0].class_id
            outcome = "agree" if same else "disagree"
        counter.labels(*label, outcome).inc()
        context.shadow_counts[label[0]][outcome] = (
            context.shadow_counts[label[0]].get(outcome, 0) + 1
        )
