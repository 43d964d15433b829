"""``tinyserve bench http``: an asyncio load generator for one HTTP endpoint.

Two kinds of step, each a warm-up followed by a measured window:

* closed loop at concurrency ``c``: ``c`` connections each send a request, wait for the
  answer and send the next. Throughput is what the server sustains at that concurrency.
* open loop at rate ``r``: requests are scheduled every ``1/r`` seconds whatever happens, and
  a pool of connections sends them. Latency is measured from each request's *scheduled*
  time, so a request that waits for a free connection (because the server is slow) has that
  wait counted: the "coordinated omission" of closed-loop tools is not hidden.

Latency percentiles cover 2xx answers recorded in a log-bucket histogram; every other
outcome (status code, ``timeout``, ``connection``, ``protocol``) is counted under
``errors``. Each step and the whole run are bounded in time.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyserve.bench.client import (
    BODY_KINDS,
    Connection,
    ProtocolError,
    Target,
    image_request,
)
from tinyserve.bench.scrape import Snapshot, scrape, server_delta
from tinyserve.bench.stats import LatencyHistogram
from tinyserve.errors import ConfigError

Outcome = int | str
_TIMELINE_SLOTS = 20
_SCRAPE_TIMEOUT = 5.0
_EARLY = 0.0005  # how early the open-loop dispatcher may send a request
_PROBE_TIMEOUT = 30.0  # a cold server may answer its first request slowly
_RECONNECT_PAUSE = 0.01  # after a refused connection, so a dead server is not hammered


@dataclass(frozen=True)
class LoadConfig:
    """A load run: closed-loop steps at each ``concurrency``, then open-loop steps at each
    ``rates`` value, each ``warmup_s`` + ``duration_s`` long."""

    url: str
    image: Path
    body: str = "raw"
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    rates: tuple[float, ...] = ()
    connections: int = 64
    warmup_s: float = 2.0
    duration_s: float = 10.0
    timeout_s: float = 10.0
    metrics: bool = True
    allow_remote: bool = False
    uvloop: bool = True
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (an API key, say)

    def __post_init__(self) -> None:
        if self.body not in BODY_KINDS:
            raise ValueError(f"body must be one of {', '.join(BODY_KINDS)}, got {self.body!r}")
        if not self.concurrency and not self.rates:
            raise ValueError("give at least one concurrency or one rate")
        if any(not 1 <= c <= 4096 for c in self.concurrency):
            raise ValueError("concurrency must be between 1 and 4096")
        if any(not 0 < r <= 1_000_000 for r in self.rates):
            raise ValueError("rates must be in (0, 1000000] requests/s")
        if not 1 <= self.connections <= 4096:
            raise ValueError("connections must be between 1 and 4096")
        if not 0 <= self.warmup_s <= 600 or not 0 < self.duration_s <= 3600:
            raise ValueError("warm-up must be in [0, 600] s and duration in (0, 3600] s")
        if not 0 < self.timeout_s <= 600:
            raise ValueError("timeout must be in (0, 600] s")
        Target.parse(self.url, self.allow_remote)  # refuse a bad or remote URL up front

    @property
    def target(self) -> Target:
        return Target.parse(self.url, self.allow_remote)

    def step_cap_s(self, open_loop: bool) -> float:
        """Longest a step may take: its window, then the requests in flight (and, in an open
        loop, a backlog drained for at most another ``duration_s``)."""
        drain = max(self.timeout_s, self.duration_s) if open_loop else self.timeout_s
        return self.warmup_s + self.duration_s + drain + 1.0

    @property
    def hard_cap_s(self) -> float:
        """Longest the whole run may take, probe and scrapes included."""
        steps = len(self.concurrency) * self.step_cap_s(False)
        steps += len(self.rates) * self.step_cap_s(True)
        scrapes = 2 * len(self.concurrency + self.rates) + 1
        return steps + max(self.timeout_s, _PROBE_TIMEOUT) + scrapes * _SCRAPE_TIMEOUT


@dataclass
class StepReport:
    """The figures of one step; ``latency_ms`` and ``cdf_ms`` cover 2xx answers only.

    ``requests`` (and ``sent_rps``) counts the requests started (closed loop) or scheduled
    (open loop) inside the window, each followed to its end; ``achieved_rps`` and ``ok_rps``
    count the answers (any status, 2xx) that arrived inside the window.
    """

    mode: str
    concurrency: int
    rate: float | None
    duration_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    statuses: dict[str, int]
    sent_rps: float
    achieved_rps: float
    ok_rps: float
    latency_ms: dict[str, float]
    cdf_ms: list[tuple[float, float]]
    timeline: list[dict[str, float]]
    unfinished: int
    client_cpu: float
    dispatch_lag_ms: float | None = None
    server: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        if self.mode == "open":
            return f"rate {self.rate:g}/s"
        return f"c={self.concurrency}"


@dataclass
class LoadReport:
    url: str
    body: str
    image: str
    request_bytes: int
    warmup_s: float
    duration_s: float
    timeout_s: float
    started: str
    python: str
    event_loop: str
    server_metrics: str
    steps: list[StepReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for step, raw in zip(self.steps, data["steps"], strict=True):
            raw["name"] = step.name
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def run_load(config: LoadConfig, progress: Callable[[str], None] | None = None) -> LoadReport:
    """Run every step of ``config`` against its target and collect the figures."""
    factory = _loop_factory(config.uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_run(config, progress))


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            return None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None


async def _run(config: LoadConfig, progress: Callable[[str], None] | None) -> LoadReport:
    target = config.target
    request = image_request(target, config.image, config.body, config.headers)
    report = LoadReport(
        url=target.url,
        body=config.body,
        image=str(config.image),
        request_bytes=len(request),
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        timeout_s=config.timeout_s,
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        python=platform.python_version(),
        event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        server_metrics="not requested",
    )
    try:
        async with asyncio.timeout(config.hard_cap_s):
            await _probe(target, request, max(config.timeout_s, _PROBE_TIMEOUT))
            metrics = False
            if config.metrics:
                snapshot, reason = await scrape(target, _SCRAPE_TIMEOUT)
                metrics = snapshot is not None
                report.server_metrics = target.base_url + "/metrics" if metrics else reason
            for concurrency in config.concurrency:
                if progress:
                    progress(f"closed loop, concurrency {concurrency}")
                step = _Step(config, target, request, metrics)
                report.steps.append(await step.closed(concurrency))
            for rate in config.rates:
                if progress:
                    progress(f"open loop, {rate:g} requests/s")
                step = _Step(config, target, request, metrics)
                report.steps.append(await step.open(rate))
    except TimeoutError as exc:
        raise ConfigError(
            f"the run exceeded its hard time limit of {config.hard_cap_s:.0f} s"
        ) from exc
    return report


async def _probe(target: Target, request: bytes, timeout: float) -> None:
    """One request before any load, to fail fast on a wrong address, path or body."""
    connection = Connection(target)
    try:
        async with asyncio.timeout(timeout):
            status, body = await connection.request(request)
    except TimeoutError as exc:  # before OSError, its base class
        raise ConfigError(f"{target.url} did not answer within {timeout:g} s") from exc
    except (OSError, EOFError) as exc:
        raise ConfigError(
            f"cannot reach {target.url} ({_reason(exc)}); is the server running?"
        ) from exc
    except ProtocolError as exc:
        raise ConfigError(f"{target.url} does not speak HTTP/1.1: {exc}") from exc
    finally:
        await connection.close()
    if 400 <= status < 500 and status != 429:
        text = body[:200].decode("utf-8", "replace")
        raise ConfigError(
            f"{target.url} answered {status} to a probe request ({text}); check the URL and --body"
        )


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


async def _send(connection: Connection, request: bytes, timeout: float) -> Outcome:
    try:
        async with asyncio.timeout(timeout):
            status, _ = await connection.request(request)
        return status
    except TimeoutError:
        return "timeout"
    except ProtocolError:
        return "protocol"
    except (OSError, EOFError):  # refused, reset, closed mid-response
        return "connection"


class _Recorder:
    """Outcomes of the requests that started (or were scheduled) inside the window."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.histogram = LatencyHistogram()
        self.outcomes: Counter[Outcome] = Counter()
        self.unfinished = 0
        self.done_in_window = 0
        self.ok_done_in_window = 0
        self._slot = (end - start) / _TIMELINE_SLOTS
        self._slot_count = [0] * _TIMELINE_SLOTS
        self._slot_sum = [0.0] * _TIMELINE_SLOTS
        self._slot_max = [0.0] * _TIMELINE_SLOTS

    def in_window(self, started: float) -> bool:
        return self.start <= started < self.end

    def record(self, started: float, latency: float, outcome: Outcome) -> None:
        ok = isinstance(outcome, int) and 200 <= outcome < 300
        if self.start <= started + latency < self.end:
            self.done_in_window += 1
            self.ok_done_in_window += ok
        if not self.start <= started < self.end:
            return
        self.outcomes[outcome] += 1
        if ok:
            self.histogram.record(latency)
            slot = min(int((started - self.start) / self._slot), _TIMELINE_SLOTS - 1)
            self._slot_count[slot] += 1
            self._slot_sum[slot] += latency
            if latency > self._slot_max[slot]:
                self._slot_max[slot] = latency

    def timeline(self) -> list[dict[str, float]]:
        """Mean and max 2xx latency by start time, in ``_TIMELINE_SLOTS`` slices of the window."""
        return [
            {
                "start_s": round(i * self._slot, 4),
                "ok": n,
                "mean_ms": round(total / n * 1000, 4) if n else 0.0,
                "max_ms": round(peak * 1000, 4),
            }
            for i, (n, total, peak) in enumerate(
                zip(self._slot_count, self._slot_sum, self._slot_max, strict=True)
            )
        ]


class _Step:
    """One warm-up + measured window, closed or open loop, with optional server scrapes."""

    def __init__(self, config: LoadConfig, target: Target, request: bytes, metrics: bool) -> None:
        self.config, self.target, self.request, self.metrics = config, target, request, metrics
        self.t0 = time.perf_counter()
        window_start = self.t0 + config.warmup_s
        self.recorder = _Recorder(window_start, window_start + config.duration_s)
        self.connections: list[Connection] = []

    async def closed(self, concurrency: int) -> StepReport:
        recorder, end = self.recorder, self.recorder.end

        async def worker(connection: Connection) -> None:
            started = 0.0
            try:
                while (started := time.perf_counter()) < end:
                    outcome = await _send(connection, self.request, self.config.timeout_s)
                    recorder.record(started, time.perf_counter() - started, outcome)
                    started = 0.0
                    if outcome == "connection":
                        await asyncio.sleep(_RECONNECT_PAUSE)
            except asyncio.CancelledError:
                recorder.unfinished += recorder.in_window(started)
                raise

        workers = [worker(self._connection()) for _ in range(concurrency)]
        return await self._measure("closed", concurrency, None, workers, None)

    async def open(self, rate: float) -> StepReport:
        recorder, t0 = self.recorder, self.t0
        # Sends scheduled at t0 + i / rate, i = 0, 1, … up to the end of the window.
        total = math.ceil((self.config.warmup_s + self.config.duration_s) * rate - 1e-9)
        queue: asyncio.Queue[float | None] = asyncio.Queue()
        lag = [0.0]
        workers_n = self.config.connections

        async def dispatch() -> None:
            # Event-loop timers are good to about a millisecond, and sleeping for less spins
            # the CPU. So the dispatcher wakes at most every _EARLY seconds and sends what is
            # due by then: a late request counts from its scheduled time, one sent up to
            # _EARLY early counts from when it was sent, so no latency is ever hidden.
            i = 0
            while i < total:
                now = time.perf_counter()
                due = t0 + i / rate
                if due > now + _EARLY:
                    await asyncio.sleep(due - now)
                    continue
                if due >= recorder.start:  # warm-up includes opening the connections
                    lag[0] = max(lag[0], now - due)
                while i < total and (scheduled := t0 + i / rate) <= now + _EARLY:
                    queue.put_nowait(min(scheduled, now))
                    i += 1
            for _ in range(workers_n):
                queue.put_nowait(None)

        async def worker(connection: Connection) -> None:
            scheduled = 0.0
            try:
                while (item := await queue.get()) is not None:
                    scheduled = item
                    outcome = await _send(connection, self.request, self.config.timeout_s)
                    recorder.record(scheduled, time.perf_counter() - scheduled, outcome)
                    scheduled = 0.0
            except asyncio.CancelledError:
                recorder.unfinished += recorder.in_window(scheduled)
                raise

        def backlog() -> int:
            left = 0
            while not queue.empty():
                item = queue.get_nowait()
                left += item is not None and recorder.in_window(item)
            return left

        tasks = [dispatch(), *(worker(self._connection()) for _ in range(workers_n))]
        report = await self._measure("open", workers_n, rate, tasks, backlog)
        report.dispatch_lag_ms = round(lag[0] * 1000, 3)
        return report

    def _connection(self) -> Connection:
        connection = Connection(self.target)
        self.connections.append(connection)
        return connection

    async def _measure(
        self,
        mode: str,
        concurrency: int,
        rate: float | None,
        coroutines: Sequence[Awaitable[None]],
        backlog: Callable[[], int] | None,
    ) -> StepReport:
        recorder = self.recorder
        scrapes = (
            [asyncio.create_task(self._scrape_at(t)) for t in (recorder.start, recorder.end)]
            if self.metrics
            else []
        )
        cpu0 = time.process_time()
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        try:
            async with asyncio.timeout(self.config.step_cap_s(mode == "open")):
                await asyncio.gather(*tasks)
        except TimeoutError:
            await _cancel(tasks)
            recorder.unfinished += backlog() if backlog else 0
        finally:
            await _cancel(tasks)
            await asyncio.gather(*(c.close() for c in self.connections))
        cpu = (time.process_time() - cpu0) / max(time.perf_counter() - self.t0, 1e-9)
        server = None
        if scrapes:
            before, after = await scrapes[0], await scrapes[1]
            if before is not None and after is not None:
                server = server_delta(before, after)
        return self._report(mode, concurrency, rate, cpu, server)

    async def _scrape_at(self, when: float) -> Snapshot | None:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        snapshot, _ = await scrape(self.target, _SCRAPE_TIMEOUT)
        return snapshot

    def _report(
        self,
        mode: str,
        concurrency: int,
        rate: float | None,
        cpu: float,
        server: dict[str, Any] | None,
    ) -> StepReport:
        recorder, duration = self.recorder, self.config.duration_s
        outcomes = {str(k): v for k, v in sorted(recorder.outcomes.items(), key=_outcome_order)}
        ok = recorder.histogram.count
        requests = sum(recorder.outcomes.values())
        errors = {k: v for k, v in outcomes.items() if not (k.isdigit() and 200 <= int(k) < 300)}
        if recorder.unfinished:
            errors["unfinished"] = recorder.unfinished
        return StepReport(
            mode=mode,
            concurrency=concurrency,
            rate=rate,
            duration_s=duration,
            requests=requests,
            ok=ok,
            errors=errors,
            statuses=outcomes,
            sent_rps=round(requests / duration, 2),
            achieved_rps=round(recorder.done_in_window / duration, 2),
            ok_rps=round(recorder.ok_done_in_window / duration, 2),
            latency_ms=recorder.histogram.summary_ms(),
            cdf_ms=recorder.histogram.cdf_ms(),
            timeline=recorder.timeline(),
            unfinished=recorder.unfinished,
            client_cpu=round(cpu, 3),
            server=server,
        )


def _outcome_order(item: tuple[Outcome, int]) -> tuple[int, str]:
    key = item[0]
    return (0, f"{key:03d}") if isinstance(key, int) else (1, key)


async def _cancel(tasks: Sequence[asyncio.Future[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
