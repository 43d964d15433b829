"""The batching loop, proven against a fake engine (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tinyserve.batcher import BatchConfig, Batcher
from tinyserve.errors import InferenceTimeout, ModelError, ModelNotReady, Overloaded


class FakeEngine:
    """Returns each image's first pixel as its logits row, and records batch sizes."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return batch.reshape(len(batch), -1)[:, :2].astype(np.float32)


def image(value: int) -> np.ndarray:
    return np.full((2, 2, 1), value, dtype=np.uint8)


async def run(batcher: Batcher, values: list[int]) -> list[float]:
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(image(v)) for v in values))
    finally:
        await batcher.close()
    return [float(row[0]) for row, _ in results]


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    engine = FakeEngine(delay=0.01)
    batcher = Batcher(engine, BatchConfig(max_batch_size=8))
    values = list(range(40))
    assert asyncio.run(run(batcher, values)) == values
    assert max(engine.sizes) == 8 and sum(engine.sizes) == 40
    assert len(engine.sizes) < 40
    assert len(engine.threads) == 1  # one inference thread per batcher


def test_max_delay_waits_for_a_batch_to_fill() -> None:
    engine = FakeEngine()

    async def staggered() -> None:
        # Submits 10 ms apart inside a 5 s window: only a stall of seconds could split them.
        batcher = Batcher(engine, BatchConfig(max_batch_size=4, max_delay_ms=5000))
        batcher.start()

        async def late(v: int, after: float) -> None:
            await asyncio.sleep(after)
            await batcher.submit(image(v))

        await asyncio.gather(*(late(v, 0.01 * v) for v in range(4)))
        await batcher.close()

    asyncio.run(staggered())
    assert engine.sizes == [4]


def test_without_delay_a_lone_request_runs_at_once() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, BatchConfig(max_delay_ms=0))
    started = time.perf_counter()
    asyncio.run(run(batcher, [7]))
    assert engine.sizes == [1]
    assert time.perf_counter() - started < 1.0


def test_full_queue_is_refused_at_once() -> None:
    async def scenario() -> list[object]:
        batcher = Batcher(FakeEngine(delay=0.05), BatchConfig(max_batch_size=1, max_queue=2))
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(image(v)) for v in range(6)), return_exceptions=True
        )
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert refused and all("retry" in str(r) for r in refused)
    assert sum(isinstance(r, tuple) for r in results) >= 2


def test_timeout_and_callers_that_leave_are_skipped() -> None:
    engine = FakeEngine(delay=0.2)

    async def scenario() -> None:
        batcher = Batcher(engine, BatchConfig(max_batch_size=1, timeout_s=0.05))
        batcher.start()
        first = asyncio.create_task(batcher.submit(image(1)))  # runs, but too slowly
        gone = asyncio.create_task(batcher.submit(image(2)))  # its caller will leave
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(InferenceTimeout):
            await first
        await batcher.close()

    asyncio.run(scenario())
    assert engine.sizes == [1]  # the cancelled request never reached the engine


def test_a_failing_batch_fails_only_its_requests() -> None:
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros((len(batch), 2), dtype=np.float32)

    async def scenario() -> tuple[object, object]:
        batcher = Batcher(flaky, BatchConfig(max_batch_size=1))
        batcher.start()
        first = await asyncio.gather(batcher.submit(image(1)), return_exceptions=True)
        second = await batcher.submit(image(2))
        await batcher.close()
        return first[0], second

    first, second = asyncio.run(scenario())
    assert isinstance(first, RuntimeError)
    assert isinstance(second, tuple)


def test_output_rows_must_match_inputs() -> None:
    async def scenario() -> None:
        batcher = Batcher(lambda b: np.zeros((1, 2), np.float32), BatchConfig(max_delay_ms=50))
        batcher.start()
        with pytest.raises(ModelError, match="returned 1 outputs for a batch of 3"):
            await asyncio.gather(*(batcher.submit(image(v)) for v in range(3)))
        await batcher.close()

    asyncio.run(scenario())


def test_close_drains_then_refuses() -> None:
    engine = FakeEngine(delay=0.02)

    async def scenario() -> None:
        batcher = Batcher(engine, BatchConfig(max_batch_size=2))
        batcher.start()
        pending = [asyncio.create_task(batcher.submit(image(v))) for v in range(6)]
        await asyncio.sleep(0)
        await batcher.close(drain_timeout=5)
        assert all(task.done() and not task.exception() for task in pending)
        with pytest.raises(ModelNotReady):
            await batcher.submit(image(9))

    asyncio.run(scenario())
    assert sum(engine.sizes) == 6


def _threads_used(engine: FakeEngine, config: BatchConfig) -> tuple[set[str], set[str]]:
    """Threads that ran a lone request, then a burst of concurrent ones, after warm-up."""

    async def scenario() -> tuple[set[str], set[str]]:
        batcher = Batcher(engine, config)
        batcher.start()
        await batcher.warmup(image(0))
        engine.threads.clear()
        await batcher.submit(image(1))
        lone = set(engine.threads)
        engine.threads.clear()
        await asyncio.gather(*(batcher.submit(image(v)) for v in range(16)))
        await batcher.close()
        return lone, set(engine.threads)

    return asyncio.run(scenario())


def test_a_lone_request_to_a_fast_model_runs_on_the_loop_thread() -> None:
    engine = FakeEngine()
    # A bound no warm-up on a busy machine can exceed: what is tested is the choice, not speed.
    lone, burst = _threads_used(engine, BatchConfig(max_batch_size=8, inline_ms=1000))
    assert lone == {threading.main_thread().name}
    # the burst: the first request may run inline, the batches behind it go to the thread
    assert any(name.startswith("infer-") for name in burst) and max(engine.sizes) > 1


@pytest.mark.parametrize(
    "engine,config",
    [(FakeEngine(delay=0.005), BatchConfig()), (FakeEngine(), BatchConfig(inline_ms=0))],
    ids=["slow-model", "inline-off"],
)
def test_slow_models_and_inline_off_keep_the_inference_thread(
    engine: FakeEngine, config: BatchConfig
) -> None:
    lone, burst = _threads_used(engine, config)
    assert threading.main_thread().name not in lone | burst


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_delay_ms": -1},
        {"max_queue": 0},
        {"timeout_s": 0},
        {"inline_ms": -1},
    ],
)
def test_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BatchConfig(**kwargs)  # type: ignore[arg-type]


async def admitted(batcher: Batcher, value: int, order: list[int]) -> float:
    ticket = await batcher.admit()
    order.append(value)
    row, _ = await batcher.submit(image(value), ticket=ticket)
    return float(row[0])


def test_a_full_queue_lets_requests_wait_in_order_then_refuses_beyond_the_waiting_room() -> None:
    async def scenario() -> None:
        engine = FakeEngine(delay=0.05)
        batcher = Batcher(engine, BatchConfig(max_batch_size=2, max_queue=2, max_waiting=3))
        batcher.start()
        order: list[int] = []
        first = [asyncio.ensure_future(admitted(batcher, v, order)) for v in range(5)]
        await asyncio.sleep(0.01)
        assert (batcher.depth, batcher.waiting) == (2, 3)
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="2 requests queued and 3 waiting"):
            await batcher.admit()  # the waiting room is full: refused at once
        assert time.perf_counter() - started < 0.01
        assert await asyncio.gather(*first) == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert order == [0, 1, 2, 3, 4]  # let in oldest first
        assert (batcher.depth, batcher.waiting, batcher._admitted) == (0, 0, 0)
        await batcher.close()

    asyncio.run(scenario())


def test_a_waiter_that_leaves_or_a_ticket_given_back_unused_frees_its_place() -> None:
    async def scenario() -> None:
        batcher = Batcher(FakeEngine(delay=0.05), BatchConfig(max_queue=1, max_waiting=4))
        batcher.start()
        holder = await batcher.admit()
        leaving = asyncio.ensure_future(batcher.admit())
        staying = asyncio.ensure_future(batcher.admit())
        await asyncio.sleep(0)
        leaving.cancel()
        holder.release()  # e.g. its image failed to decode: never queued
        holder.release()  # a second release changes nothing
        ticket = await asyncio.wait_for(staying, 1)
        assert batcher._admitted == 1
        ticket.release()
        assert batcher._admitted == 0 and batcher.waiting == 0
        waiter_holder = await batcher.admit()
        waiter = asyncio.ensure_future(batcher.admit())
        await asyncio.sleep(0)
        await batcher.close(0)
        with pytest.raises(ModelNotReady, match="shutting down"):
            await waiter
        waiter_holder.release()

    asyncio.run(scenario())


def test_waiting_for_room_is_bounded_by_the_timeout() -> None:
    async def scenario() -> None:
        batcher = Batcher(FakeEngine(), BatchConfig(max_queue=1, timeout_s=0.05))
        batcher.start()
        held = await batcher.admit()
        with pytest.raises(Overloaded, match="no room in the queue within 0.05s"):
            await batcher.admit()
        held.release()
        assert batcher._admitted == 0
        await batcher.close()

    asyncio.run(scenario())


class CacheBoundEngine(FakeEngine):
    """A model of known speed: 10 ms + 1 ms per image up to 4 images, then 10 ms per image
    (its activations no longer fit the cache), so batch 4 gives the most images per second."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        self.delay = 0.010 + (0.001 * n if n <= 4 else 0.010 * n)
        return super().__call__(batch)


def test_the_batcher_learns_the_fastest_batch_size_and_keeps_to_it() -> None:
    engine = CacheBoundEngine()

    async def scenario() -> tuple[int, dict[int, float], list[float]]:
        batcher = Batcher(engine, BatchConfig(max_batch_size=16, learn_batch_size=True))
        batcher.start()
        size = await batcher.learn_batch_size(image(0))
        engine.sizes.clear()
        try:
            rows = await asyncio.gather(*(batcher.submit(image(v)) for v in range(24)))
        finally:
            await batcher.close()
        return size, batcher.curve, [float(row[0]) for row, _ in rows]

    size, curve, values = asyncio.run(scenario())
    assert sorted(curve) == [1, 2, 4, 8, 16]
    assert size == 4
    assert curve[4] > curve[2] > curve[1] and curve[4] > 2 * curve[16]
    assert values == list(range(24))  # batching still gives each request its own row
    assert max(engine.sizes) == 4 and sum(engine.sizes) == 24


def test_best_batch_size_prefers_the_smaller_of_equal_speeds() -> None:
    from tinyserve.batcher import best_batch_size, curve_sizes

    assert curve_sizes(1) == [1]
    assert curve_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert curve_sizes(24) == [1, 2, 4, 8, 16, 24]
    # EfficientNet-Lite0-like: batch 1 is fastest on a CPU.
    assert best_batch_size({1: 126.0, 8: 110.0, 32: 98.0}) == 1
    assert best_batch_size({1: 900.0, 8: 6000.0, 32: 7300.0, 64: 7250.0}) == 32
    assert best_batch_size({1: 100.0, 2: 196.0, 4: 200.0}) == 2  # within 5 % of the best
    with pytest.raises(ValueError, match="no points"):
        best_batch_size({})


def test_without_learning_batches_fill_to_the_maximum() -> None:
    batcher = Batcher(FakeEngine(), BatchConfig(max_batch_size=8))
    assert batcher.batch_limit == 8 and batcher.curve == {}
