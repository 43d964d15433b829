"""One classification pipeline for every front door: decode, infer, rank.

The REST routes, the Open Inference Protocol's BYTES tensors, the Lambda handler and
``tinyserve predict`` all call ``classify``; only the body they read and the shape they answer
differ. What decodes and runs the model is a ``Runner``: the server's runs on a loaded
version's batcher and decode pool (``context.ServedRunner``), and ``EngineRunner`` runs an
``Engine`` directly, in the caller's thread. An image that cannot be decoded fails its own
item, never the others. Given a result cache, images whose answer is cached skip decoding and
inference; only the others go to the runner, and their answers are cached under the version
that ran them.

``classify`` is a coroutine so that the server's runner can wait for its batcher. An
``EngineRunner`` never waits, so ``classify_sync`` drives the coroutine to its end without an
event loop: the Lambda handler and the CLI do not pay for importing asyncio at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from tinyserve import tracing
from tinyserve.cache import Cached, ResultCache, cache_key
from tinyserve.engine import Engine, Logits, Prediction, rank
from tinyserve.errors import InputError
from tinyserve.imaging import DEFAULT_LIMITS, Decoded, ImageLimits, Pixels, decode_upload
from tinyserve.requests import Upload

__all__ = [
    "EngineRunner",
    "Inferred",
    "Item",
    "Results",
    "Runner",
    "classify",
    "classify_sync",
    "prediction_dicts",
]

_T = TypeVar("_T")


@dataclass(slots=True)
class Inferred:
    """Logits for decoded images, and which version ran them, with its labels."""

    logits: Logits  # [N, num_classes], in the order the images were given
    queue_s: Sequence[float]  # each image's wait for its batch
    inference_s: Sequence[float]  # each image's batch run
    batches_s: float  # all distinct batches together
    version: int
    labels: Sequence[str]


class Runner(Protocol):
    """What decodes images for one model and runs it."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int:
        """The version that will run the images, as far as is known before they do."""
        ...

    @property
    def fingerprint(self) -> str:
        """What identifies that version's answers (its file and labels), for the cache."""
        ...

    @property
    def labels(self) -> Sequence[str]: ...

    async def decode_all(self, images: Sequence[bytes]) -> list[Decoded | InputError]:
        """Each image decoded, or the input error that stopped it."""
        ...

    async def infer(self, rows: list[Pixels]) -> Inferred: ...


@dataclass(slots=True)
class Item:
    """One image's result: its predictions, or the error that stopped it."""

    index: int
    filename: str | None
    predictions: list[Prediction] | None = None
    error: InputError | None = None
    image_shape: tuple[int, int, int] | None = None  # [rows, cols, channels] as uploaded
    queue_s: float = 0.0
    inference_s: float = 0.0
    cached: bool = False


@dataclass(slots=True)
class Results:
    """Every image's result, in upload order, with where the time went."""

    model: str
    version: int
    items: list[Item]
    decode_s: float
    queue_s: float  # the longest wait of any image
    inference_s: float  # every batch the images ran in, together
    logits: Logits | None = None  # rows of the images that were decoded, in upload order
    cached: int = 0  # images answered from the cache
    fallback_from: str | None = None  # "model:version" whose fallback answered
    fallback_reason: str | None = None  # open, overloaded or failed

    @property
    def succeeded(self) -> int:
        return sum(item.error is None for item in self.items)


async def classify(
    runner: Runner, uploads: Sequence[Upload], top_k: int, cache: ResultCache | None = None
) -> Results:
    """Classify ``uploads`` with ``runner``: the ``top_k`` classes of each, best first."""
    if cache is not None:
        return await _classify_cached(runner, uploads, top_k, cache)
    started = time.perf_counter()
    decoded = await runner.decode_all([u.data for u in uploads])
    decode_s = time.perf_counter() - started
    if tracing.tracer is not None:
        tracing.tracer.received(started, started + decode_s, len(uploads))
    items = [Item(i, u.filename) for i, u in enumerate(uploads)]
    good: list[int] = []
    for item, result in zip(items, decoded, strict=True):
        if isinstance(result, Decoded):
            item.image_shape = result.source_shape
            good.append(item.index)
        else:
            item.error = result
    if not good:
        return Results(runner.name, runner.version, items, decode_s, 0.0, 0.0)
    rows = [decoded[i].pixels for i in good]  # type: ignore[union-attr]
    inferred = await runner.infer(rows)
    ranked = rank(inferred.logits, inferred.labels, top_k)
    if tracing.tracer is not None:
        tracing.tracer.answered(time.perf_counter())
    for j, i in enumerate(good):
        item = items[i]
        item.predictions = ranked[j]
        item.queue_s = inferred.queue_s[j]
        item.inference_s = inferred.inference_s[j]
    return Results(
        runner.name,
        inferred.version,
        items,
        decode_s,
        max(inferred.queue_s),
        inferred.batches_s,
        inferred.logits,
    )


async def _classify_cached(
    runner: Runner, uploads: Sequence[Upload], top_k: int, cache: ResultCache
) -> Results:
    fingerprint = runner.fingerprint
    found = [await cache.get(cache_key(u.data, fingerprint)) for u in uploads]
    missed = [i for i, hit in enumerate(found) if hit is None]
    if len(missed) == len(uploads):
        results = await classify(runner, uploads, top_k)
    elif missed:
        results = await classify(runner, [uploads[i] for i in missed], top_k)
        for item, i in zip(results.items, missed, strict=True):
            item.index = i
    else:
        results = Results(runner.name, runner.version, [], 0.0, 0.0, 0.0)
    if results.logits is not None:  # cache what ran, under the version that ran it
        ran = runner.fingerprint
        rows = iter(results.logits)
        for item in results.items:
            if item.error is None and item.image_shape is not None:
                row = next(rows)
                cache.put(cache_key(uploads[item.index].data, ran), Cached(item.image_shape, row))
    if len(missed) == len(uploads):
        return results
    items: list[Item | None] = [None] * len(uploads)
    for item in results.items:
        items[item.index] = item
    rows_by_index: dict[int, Logits] = {}
    if results.logits is not None:
        good = [item.index for item in results.items if item.error is None]
        rows_by_index = dict(zip(good, results.logits, strict=True))
    labels = runner.labels
    for i, hit in enumerate(found):
        if hit is not None:
            ranked = rank(hit.logits[None, :], labels, top_k)[0]
            items[i] = Item(i, uploads[i].filename, ranked, None, hit.image_shape, cached=True)
            rows_by_index[i] = hit.logits
    order = sorted(rows_by_index)
    logits = np.stack([rows_by_index[i] for i in order]) if order else None
    results.items = [item for item in items if item is not None]
    results.logits = logits
    results.cached = len(uploads) - len(missed)
    return results


def prediction_dicts(ranked: Sequence[Prediction]) -> list[dict[str, Any]]:
    """A ranking as every front door answers it (``class_name`` is seed 001's name for
    ``label``)."""
    return [
        {"label": p.label, "class_id": p.class_id, "class_name": p.label,
         "confidence": p.confidence}
        for p in ranked
    ]  # fmt: skip


def classify_sync(runner: EngineRunner, uploads: Sequence[Upload], top_k: int) -> Results:
    """``classify`` in the caller's thread, for a runner that never waits."""
    return _drive(classify(runner, uploads, top_k))


class EngineRunner:
    """Runs an ``Engine`` in the caller's thread, in chunks of at most ``chunk`` images."""

    def __init__(self, engine: Engine, name: str, version: int,
                 limits: ImageLimits = DEFAULT_LIMITS, chunk: int = 64) -> None:  # fmt: skip
        self.engine = engine
        self.name = name
        self.version = version
        self.limits = limits
        self.chunk = chunk
        self.fingerprint = f"{engine.path}"
        self.labels = engine.labels

    async def decode_all(self, images: Sequence[bytes]) -> list[Decoded | InputError]:
        spec = self.engine.manifest.input
        results: list[Decoded | InputError] = []
        for data in images:
            try:
                results.append(decode_upload(data, spec, self.limits))
            except InputError as exc:
                results.append(exc)
        return results

    async def infer(self, rows: list[Pixels]) -> Inferred:
        parts: list[Logits] = []
        times: list[float] = []
        total = 0.0
        for start in range(0, len(rows), self.chunk):
            chunk = rows[start : start + self.chunk]
            began = time.perf_counter()
            parts.append(self.engine.infer(np.stack(chunk)))
            seconds = time.perf_counter() - began
            times += [seconds] * len(chunk)
            total += seconds
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return Inferred(logits, [0.0] * len(rows), times, total, self.version, self.engine.labels)


def _drive(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """The value of a coroutine that finishes without suspending."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the runner waited for something; run classify() in an event loop")
