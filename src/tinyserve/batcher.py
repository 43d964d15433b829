"""Dynamic batching: one small loop per model version.

Requests enter a bounded ``asyncio.Queue`` as ``(pixels, future)``. One consumer task takes
the first waiting item, then gathers more until ``max_batch_size`` or until ``max_delay_ms``
has passed since the first, skips callers that have gone, stacks the pixels and runs one
inference in the batcher's own thread (ONNX Runtime releases the GIL), then resolves each
future with its row. While a batch runs, new requests queue up, so batches grow with load
even when ``max_delay_ms`` is 0.

Admission comes before any of that: a request first takes a ``Ticket`` (``admit``), before
its body is read or decoded, and gives it back as its images enter the queue. While the
queue's ``max_queue`` places are taken, up to ``max_waiting`` requests wait for one, in
order, costing nothing but an idle coroutine; beyond that a request is refused at once with
``Overloaded``, having cost no more than its headers. So a flood of clients waits or is
turned away cheaply, and never takes the event loop away from the requests being served.

A lone request for a model that runs one image in under ``inline_ms`` runs on the event
loop's own thread instead: at low load the two hand-offs to and from the inference thread
cost more than the inference. The loop is then busy for at most about ``inline_ms``, and
anything that arrives meanwhile forms the next batch, which goes to the thread.

A bigger batch is not always faster per image: on a CPU a large model's activations outgrow
the caches, and EfficientNet-Lite0 runs fewer images per second at batch 32 than at batch 1.
With ``learn_batch_size`` the batcher measures the model's throughput at warm-up, at batch
sizes 1, 2, 4 ... up to ``max_batch_size`` (``learn_batch_size``), and from then on batches at
most to the smallest size within 5 % of the best images per second (``best_batch_size``):
the smaller of two equally fast sizes, since it waits less. ``batch_limit`` is the size used.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tinyserve import tracing
from tinyserve.engine import Logits
from tinyserve.errors import InferenceTimeout, ModelError, ModelNotReady, Overloaded
from tinyserve.imaging import Pixels

InferFn = Callable[[Pixels], Logits]
_NOT_FOR_LOAD = 1 << 30  # the room of a batcher that is not accepting requests at all


@dataclass(frozen=True)
class BatchConfig:
    """Batching and admission settings of one model version."""

    max_batch_size: int = 32
    max_delay_ms: float = 0.0
    max_queue: int = 512
    timeout_s: float = 30.0
    inline_ms: float = 1.0
    max_waiting: int = 2048
    learn_batch_size: bool = False  # measure throughput at warm-up, batch up to the best size

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.inline_ms < 0:
            raise ValueError(f"inline_ms must be >= 0, got {self.inline_ms}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


@dataclass(frozen=True)
class BatchTiming:
    """Where one request's time went inside the batcher, in seconds."""

    queue: float
    inference: float
    batch_size: int
    batch_id: int


BatchObserver = Callable[[int, Sequence[float], float], None]

# Two batch sizes this close in images per second are equally fast; the smaller one wins.
SAME_SPEED = 0.05
# Each size of the throughput curve is timed for about this long (at least _CURVE_RUNS runs).
_CURVE_BUDGET_S = 0.25
_CURVE_RUNS = 3


def curve_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes whose throughput ``learn_batch_size`` measures: 1, 2, 4 ... and the
    largest allowed."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == max_batch_size else [*sizes, max_batch_size]


def best_batch_size(curve: Mapping[int, float], same_speed: float = SAME_SPEED) -> int:
    """The smallest batch size whose images per second are within ``same_speed`` of the
    best in ``curve`` (batch size -> images per second)."""
    if not curve:
        raise ValueError("the throughput curve has no points")
    best = max(curve.values())
    return min(size for size, speed in curve.items() if speed >= (1 - same_speed) * best)


@dataclass
class _Item:
    pixels: Pixels
    future: asyncio.Future[tuple[Logits, BatchTiming]]
    enqueued: float
    trace: tracing.RequestTrace | None = None  # its request's, while tracing is on


class Ticket:
    """A request's place in a batcher's queue, held from admission until its images are
    queued (``release``, which may be called more than once)."""

    __slots__ = ("batcher",)

    def __init__(self, batcher: Batcher) -> None:
        self.batcher: Batcher | None = batcher

    def release(self) -> None:
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            batcher._admitted -= 1
            batcher._wake()


class Batcher:
    """Collects single-image requests into batches for one ``infer`` function."""

    def __init__(
        self,
        infer: InferFn,
        config: BatchConfig | None = None,
        name: str = "model",
        observer: BatchObserver | None = None,
    ) -> None:
        self.infer = infer
        self.config = config or BatchConfig()
        self.name = name
        self.observer = observer
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._inflight = 0
        self._admitted = 0  # tickets out: admitted requests whose images are not queued yet
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closing = False
        self._batches = 0
        self._single_s = float("inf")  # recent time of a one-image inference, in seconds
        self._batch_s = 0.0  # recent time of one batch, in seconds (for wait estimates)
        self.batch_limit = self.config.max_batch_size  # learn_batch_size may lower it
        self.curve: dict[int, float] = {}  # batch size -> images/s, once learned

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._inflight

    @property
    def waiting(self) -> int:
        """Requests waiting for admission."""
        return len(self._waiting)

    @property
    def room(self) -> int:
        """How many more requests ``admit`` would take now without refusing one: the free
        places of the queue (none while others wait) plus the free places to wait."""
        if self._closing or self._queue is None:
            return _NOT_FOR_LOAD  # admit's own answer (not ready) is not a refusal for load
        config = self.config
        free = 0 if self._waiting else config.max_queue - self._inflight - self._admitted
        return max(0, free) + max(0, config.max_waiting - len(self._waiting))

    @property
    def saturated(self) -> bool:
        """Whether ``admit`` would refuse a request now."""
        return self.room == 0

    def refusal(self) -> Overloaded:
        """The error refusing a request while the model is ``saturated``."""
        return Overloaded(
            f"{self.name} has {self.config.max_queue} requests queued and "
            f"{len(self._waiting)} waiting; retry shortly",
            retry_after=1.0,
        )

    async def admit(self) -> Ticket:
        """A place in the queue for one request, once there is one (see the module)."""
        if self._closing or self._queue is None:
            raise ModelNotReady(f"{self.name} is not accepting requests")
        if not self._waiting and self._inflight + self._admitted < self.config.max_queue:
            self._admitted += 1
            return Ticket(self)
        if len(self._waiting) >= self.config.max_waiting:
            raise self.refusal()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        timeout = self.config.timeout_s
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return Ticket(self)  # let in just as the time ran out
            raise Overloaded(
                f"{self.name}: no room in the queue within {timeout:g}s; retry later"
            ) from None
        except BaseException:  # the caller went away
            if future.done() and not future.cancelled() and future.exception() is None:
                Ticket(self).release()
            raise
        return Ticket(self)

    def _wake(self) -> None:
        """Let waiting requests in, oldest first, while the queue has room."""
        waiting = self._waiting
        while waiting and self._inflight + self._admitted < self.config.max_queue:
            future = waiting.popleft()
            if not future.done():
                self._admitted += 1
                future.set_result(None)

    @property
    def closing(self) -> bool:
        """True once ``close`` has begun: new requests are refused."""
        return self._closing

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue(self.config.max_queue)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher-{self.name}"
            )

    async def warmup(self, pixels: Pixels, runs: int = 2) -> None:
        """Run ``pixels`` through the inference thread, outside the metrics."""
        loop = asyncio.get_running_loop()
        for _ in range(runs):
            started = time.perf_counter()
            await loop.run_in_executor(self._thread, self.infer, pixels[None])
            self._single_s = time.perf_counter() - started  # the last (warmest) run counts
        self._batch_s = self._single_s

    async def learn_batch_size(self, pixels: Pixels) -> int:
        """Measure images per second at each of ``curve_sizes`` on the inference thread and
        batch at most to ``best_batch_size`` of them from now on; the size chosen."""
        loop = asyncio.get_running_loop()
        curve: dict[int, float] = {}
        for size in curve_sizes(self.config.max_batch_size):
            batch = np.repeat(pixels[None], size, axis=0)
            await loop.run_in_executor(self._thread, self.infer, batch)  # untimed: allocations
            runs, spent = 0, 0.0
            while runs < _CURVE_RUNS or spent < _CURVE_BUDGET_S:
                started = time.perf_counter()
                await loop.run_in_executor(self._thread, self.infer, batch)
                spent += time.perf_counter() - started
                runs += 1
            curve[size] = size * runs / spent
        self.curve = curve
        self.batch_limit = best_batch_size(curve)
        return self.batch_limit

    def estimated_wait_s(self, images: int = 1) -> float:
        """About how long ``images`` more would take from now: the batches queued ahead of
        them and their own, at the recent time per batch."""
        batches = -(-(self._inflight + images) // self.batch_limit)
        return batches * self._batch_s

    async def submit(
        self, pixels: Pixels, timeout_s: float | None = None, ticket: Ticket | None = None
    ) -> tuple[Logits, BatchTiming]:
        """Logits row for one image, once its batch has run (within ``timeout_s``, or the
        configured timeout). A ``ticket`` from ``admit`` is given back once it is queued."""
        future = self._enqueue(pixels)
        if ticket is not None:
            ticket.release()
        return await self._wait(future, timeout_s)

    async def submit_many(
        self,
        images: Sequence[Pixels],
        timeout_s: float | None = None,
        ticket: Ticket | None = None,
    ) -> list[tuple[Logits, BatchTiming]]:
        """Enqueue several images at once (they share batches) and wait for all of them."""
        if len(images) > self.config.max_queue:
            raise Overloaded(
                f"{len(images)} images exceed the queue of {self.config.max_queue} for "
                f"{self.name}; send smaller batches"
            )
        futures = [self._enqueue(p) for p in images]
        if ticket is not None:
            ticket.release()
        return list(await asyncio.gather(*(self._wait(f, timeout_s) for f in futures)))

    def _enqueue(self, pixels: Pixels) -> asyncio.Future[tuple[Logits, BatchTiming]]:
        if self._queue is None or self._closing:
            raise ModelNotReady(f"{self.name} is not accepting requests")
        future: asyncio.Future[tuple[Logits, BatchTiming]] = (
            asyncio.get_running_loop().create_future()
        )
        try:
            trace = None if tracing.tracer is None else tracing.tracer.current()
            self._queue.put_nowait(_Item(pixels, future, time.perf_counter(), trace))
        except asyncio.QueueFull:
            raise Overloaded(
                f"{self.name} has {self.config.max_queue} requests queued; retry shortly",
                retry_after=1.0,
            ) from None
        self._inflight += 1
        return future

    async def _wait(
        self, future: asyncio.Future[tuple[Logits, BatchTiming]], timeout_s: float | None = None
    ) -> tuple[Logits, BatchTiming]:
        # On timeout the future fails; when the caller goes away it is cancelled. Either way
        # it is done, and the batching loop skips it if its batch has not run yet, so a
        # request past its deadline is never run late.
        timeout = (
            self.config.timeout_s if timeout_s is None else min(timeout_s, self.config.timeout_s)
        )
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future[tuple[Logits, BatchTiming]], timeout: float) -> None:
        if not future.done():
            message = f"{self.name} did not answer within {timeout:g}s"
            future.set_exception(InferenceTimeout(message))

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        max_delay = self.config.max_delay_ms / 1000
        while True:
            items = [await queue.get()]
            max_size = self.batch_limit  # read per batch: learning may lower it after start
            deadline = loop.time() + max_delay
            while len(items) < max_size:
                if queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        items.append(await asyncio.wait_for(queue.get(), remaining))
                    except TimeoutError:
                        break
                else:
                    items.append(queue.get_nowait())
            live = [item for item in items if not item.future.done()]
            self._inflight -= len(items) - len(live)
            if self._waiting:
                self._wake()
            if live:
                await self._run_batch(loop, live)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        started = time.perf_counter()
        inline = len(items) == 1 and self._single_s * 1000 <= self.config.inline_ms
        try:
            batch = np.stack([item.pixels for item in items])
            if inline:
                logits = self.infer(batch)
            else:
                logits = await loop.run_in_executor(self._thread, self.infer, batch)
            if len(logits) != len(items):
                raise ModelError(
                    f"{self.name} returned {len(logits)} outputs for a batch of {len(items)}"
                )
        except Exception as exc:  # one failed batch fails its own requests only
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            self._inflight -= len(items)
            if self._waiting:
                self._wake()
            return
        inference = time.perf_counter() - started
        self._batch_s = 0.8 * self._batch_s + 0.2 * inference if self._batch_s else inference
        if len(items) == 1:
            self._single_s = 0.8 * self._single_s + 0.2 * inference if inline else inference
        self._batches += 1
        waits = [started - item.enqueued for item in items]
        for item, row, wait in zip(items, logits, waits, strict=True):
            if not item.future.done():
                timing = BatchTiming(wait, inference, len(items), self._batches)
                item.future.set_result((row, timing))
        self._inflight -= len(items)
        if self._waiting:
            self._wake()
        if self.observer is not None:
            self.observer(len(items), waits, inference)
        if tracing.tracer is not None:
            traces = [(item.trace, item.enqueued) for item in items]
            tracing.tracer.batch(self.name, traces, started, started + inference, self._batches)

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop intake, let queued requests finish (up to ``drain_timeout``), then stop."""
        self._closing = True
        while self._waiting:  # admitted nowhere: they go to the successor, or fail
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ModelNotReady(f"{self.name} is shutting down; retry"))
        deadline = time.monotonic() + drain_timeout
        while self._inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(ModelNotReady(f"{self.name} was shut down"))
        self._thread.shutdown(wait=True)
