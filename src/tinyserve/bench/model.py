"""``tinyserve bench model``: latency, throughput and memory per batch size and thread count,
on each runtime and provider asked for (``--provider cpu,cuda`` puts them side by side), with
no HTTP in the way.

Each (threads, batch size) step warms up, then times whole ``session.run`` calls until a time
budget is spent (at least ``min_runs``, at most ``max_runs``), feeding different images on each
run. Peak RSS is the kernel's high-water mark (``VmHWM``), reset before each step where Linux
allows it, so each step reports its own peak rather than the process's.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve.bench.stats import exact_summary_ms
from tinyserve.engine import Engine, EngineConfig, available_cores
from tinyserve.errors import ConfigError
from tinyserve.imaging import Pixels, load_image
from tinyserve.manifest import InputSpec
from tinyserve.repository import model_bytes, resolve

_POOL_BYTES = 64 * 1024 * 1024  # distinct input images kept in memory per step
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ModelBenchConfig:
    """What ``bench model`` measures. ``seconds`` is the measuring budget of each step."""

    target: str
    batch_sizes: tuple[int, ...] = (1, 8, 32, 256)
    threads: tuple[int, ...] = (1, 2)
    warmup_runs: int = 5
    min_runs: int = 10
    max_runs: int = 10_000
    seconds: float = 2.0
    images: Path | None = None
    seed: int = 0
    runtime: str = "auto"  # engine.RUNTIMES
    providers: tuple[str, ...] = ("cpu",)  # engine.PROVIDERS, measured one after the other

    def __post_init__(self) -> None:
        if not self.providers:
            raise ValueError("give at least one provider")
        if not self.batch_sizes or any(b < 1 or b > 65_536 for b in self.batch_sizes):
            raise ValueError("batch sizes must be between 1 and 65536")
        if not self.threads or any(t < 1 or t > 1024 for t in self.threads):
            raise ValueError("thread counts must be between 1 and 1024")
        if self.warmup_runs < 0 or not 1 <= self.min_runs <= self.max_runs:
            raise ValueError("need warmup_runs >= 0 and 1 <= min_runs <= max_runs")
        if not 0 < self.seconds <= 600:
            raise ValueError(f"seconds per step must be in (0, 600], got {self.seconds}")


@dataclass
class StepResult:
    provider: str
    threads: int
    batch_size: int
    runs: int
    latency_ms: dict[str, float]
    per_image_ms: float
    throughput_ips: float
    peak_rss_mb: float


@dataclass
class ModelBenchReport:
    model: str
    version: int
    path: str
    bytes: int
    input_shape: list[int]
    data: str
    cores: int
    onnxruntime: str
    python: str
    peak_rss_scope: str
    baseline_rss_mb: float
    load: dict[str, dict[str, float]] = field(default_factory=dict)
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)  # by provider
    results: list[StepResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def bench_model(
    config: ModelBenchConfig, progress: Callable[[str], None] | None = None
) -> ModelBenchReport:
    """Run every (threads, batch size) step of ``config`` and collect the figures."""
    import onnxruntime

    ref = resolve(config.target)
    for provider in config.providers:  # a provider without its device fails before any step
        engine = Engine(ref.path, _engine_config(config, provider, 1, warmup_runs=0))
        del engine
    scope = "step" if reset_peak_rss() else "process"
    report = ModelBenchReport(
        model=ref.name,
        version=ref.version,
        path=str(ref.path),
        bytes=model_bytes(ref.path),
        input_shape=[],
        data="",
        cores=available_cores(),
        onnxruntime=onnxruntime.__version__,
        python=platform.python_version(),
        peak_rss_scope=scope,
        baseline_rss_mb=_mb(current_rss_bytes()),
    )
    pool: Pixels | None = None
    for provider, threads in ((p, t) for p in config.providers for t in config.threads):
        if progress:
            progress(f"loading {ref.name} v{ref.version} on {provider}, {threads} thread(s)")
        reset_peak_rss()
        started = time.perf_counter()
        engine = Engine(ref.path, _engine_config(config, provider, threads))
        key = str(threads) if len(config.providers) == 1 else f"{provider}/{threads}"
        report.load[key] = {
            "seconds": round(time.perf_counter() - started, 4),
            "peak_rss_mb": _mb(peak_rss_bytes()),
        }
        report.runtimes[provider] = engine.describe()
        spec = engine.manifest.input
        if pool is None:
            pool, report.data = _input_pool(spec, config, max(config.batch_sizes))
            report.input_shape = list(spec.shape)
        for batch_size in config.batch_sizes:
            if progress:
                progress(f"{provider}, threads {threads}, batch {batch_size}")
            report.results.append(_measure(engine, pool, provider, threads, batch_size, config))
        del engine
    return report


def _engine_config(
    config: ModelBenchConfig, provider: str, threads: int, warmup_runs: int = 1
) -> EngineConfig:
    # A lone measuring loop: spinning threads pick up each run sooner (servers do not spin).
    try:
        return EngineConfig(
            intra_op_threads=threads,
            warmup_runs=warmup_runs,
            spin=True,
            runtime=config.runtime,
            provider=provider,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _measure(
    engine: Engine,
    pool: Pixels,
    provider: str,
    threads: int,
    batch_size: int,
    config: ModelBenchConfig,
) -> StepResult:
    starts = max(len(pool) - batch_size + 1, 1)

    def run(i: int) -> None:
        offset = (i * batch_size) % starts
        engine.infer(pool[offset : offset + batch_size])

    reset_peak_rss()
    seconds = time_calls(
        run,
        warmup=config.warmup_runs,
        min_runs=config.min_runs,
        max_runs=config.max_runs,
        budget_s=config.seconds,
    )
    latency = exact_summary_ms(seconds)
    return StepResult(
        provider=provider,
        threads=threads,
        batch_size=batch_size,
        runs=len(seconds),
        latency_ms=latency,
        per_image_ms=round(latency["mean"] / batch_size, 5),
        throughput_ips=round(batch_size * len(seconds) / float(seconds.sum()), 2),
        peak_rss_mb=_mb(peak_rss_bytes()),
    )


def time_calls(
    call: Callable[[int], object],
    *,
    warmup: int,
    min_runs: int,
    max_runs: int,
    budget_s: float,
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Seconds taken by ``call(i)`` for i = 0, 1, … after ``warmup`` untimed calls.

    Stops after ``max_runs`` calls, or once ``budget_s`` has been spent and at least
    ``min_runs`` calls are timed.
    """
    for i in range(warmup):
        call(i)
    times = np.empty(max_runs, dtype=np.float64)
    deadline = time.perf_counter() + budget_s
    n = 0
    while n < max_runs and (n < min_runs or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        call(warmup + n)
        times[n] = time.perf_counter() - t0
        n += 1
    return times[:n]


def _input_pool(spec: InputSpec, config: ModelBenchConfig, largest: int) -> tuple[Pixels, str]:
    """Distinct images to feed: decoded from ``config.images``, or seeded random pixels.

    Enough that consecutive runs see different data (up to ``_POOL_BYTES``), never fewer
    than the largest batch.
    """
    image_bytes = int(np.prod(spec.shape))
    size = max(largest, min(4 * largest, _POOL_BYTES // image_bytes))
    if config.images is None:
        rng = np.random.default_rng(config.seed)
        return rng.integers(0, 256, (size, *spec.shape), dtype=np.uint8), "random pixels"
    files = _image_files(config.images)
    decoded = np.stack([load_image(f, spec) for f in files[:size]])
    reps = -(-size // len(decoded))
    return np.ascontiguousarray(np.tile(decoded, (reps, 1, 1, 1))[:size]), (
        f"{len(decoded)} images from {config.images}"
    )


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if files:
            return files
    raise ConfigError(f"{path} is neither an image file nor a folder containing images")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset (or since the process started)."""
    status = _proc_status("VmHWM")
    if status is not None:
        return status
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    status = _proc_status("VmRSS")
    return status if status is not None else peak_rss_bytes()


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mb(n: int) -> float:
    return round(n / 2**20, 2)
