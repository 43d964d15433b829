"""Adaptive detector selection: the most accurate detector whose measured cost fits the budget.

At start every candidate (each version of the detector: FP32 and INT8, at each input size)
is timed on this machine, in batches as the shared batcher will run it. The frame budget is
the share of the machine given to the detector (``headroom``; the rest decodes, tracks and
classifies) divided by the frames per second asked for: ``streams x fps``. The default share,
0.35, is what the detector takes of a frame's work in this pipeline on 640x480 video (about
2.6 of 7.5 core-ms, see ``benchmarks/RESULTS.md``); a larger one over-commits the machine,
since Python's share of each frame runs on one core at a time. The most accurate
candidate (mAP@0.5 from its manifest: the quantize gate's for INT8, the export's otherwise)
whose cost fits is chosen; when none fits, the fastest. In file mode there is no frame budget,
so the most accurate one runs.

While streams run, ``observe`` is given their frame and drop counts; when more than
``max_drop_rate`` of the frames since the last decision were dropped, the next cheaper
candidate takes over (a drop means the machine is slower than measured, or busier). Every
decision and its reason is logged and kept in ``describe()`` (and so in ``/metrics``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tinyserve.manifest import Manifest
from tinyserve.video_pipeline import DetectorHandle
from tinyserve.video_sources import Pixels

log = logging.getLogger("tinyserve.video")
DETECTOR_SHARE = 0.35  # the detector's share of a frame's work (see the module docstring)
InferFn = Callable[[Pixels], object]


@dataclass(frozen=True)
class Candidate:
    handle: DetectorHandle
    cost_s: float  # measured seconds per frame, batched

    def describe(self) -> dict[str, object]:
        return {
            "model": self.handle.key,
            "precision": self.handle.precision,
            "input": f"{self.handle.spec.width}x{self.handle.spec.height}",
            "map50": None if math.isnan(self.handle.accuracy) else self.handle.accuracy,
            "ms_per_frame": round(self.cost_s * 1000, 3),
        }


def accuracy_of(manifest: Manifest) -> float:
    """A detector's mAP@0.5 as its manifest records it, on one scale for every candidate.

    An export records its mAP@0.5 at its own input size (``map50``); a quantized version
    keeps its parent's and adds the change its quantize gate measured.
    """
    value = manifest.source.get("map50", manifest.source.get("val_map50"))
    if value is None:
        return float("nan")
    optimization = manifest.source.get("optimization")
    if isinstance(optimization, dict) and isinstance(optimization.get("gate"), dict):
        return float(value) + float(optimization["gate"].get("accuracy_delta_pt", 0.0)) / 100
    return float(value)


def precision_of(manifest: Manifest) -> str:
    optimization = manifest.source.get("optimization")
    if isinstance(optimization, dict) and optimization.get("mode"):
        return "fp16" if optimization["mode"] == "fp16" else "int8"
    return "fp32"


def measure(infer: InferFn, shape: tuple[int, int, int], batch: int = 4, runs: int = 5) -> float:
    """Median seconds per frame of ``infer`` on batches of ``batch`` frames (after a warm-up)."""
    frames = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
    infer(frames)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        infer(frames)
        times.append((time.perf_counter() - started) / batch)
    return float(np.median(times))


def choose(
    candidates: Sequence[Candidate],
    streams: int,
    fps: float | None,
    headroom: float = DETECTOR_SHARE,
) -> tuple[Candidate, str]:
    """The candidate to run and why."""
    if not candidates:
        raise ValueError("no detector to choose from")
    by_accuracy = sorted(candidates, key=lambda c: (-_accuracy(c), c.cost_s))
    if not fps:
        best = by_accuracy[0]
        return best, f"file mode, no frame budget: the most accurate ({_fmt(best)})"
    budget = headroom / (streams * fps)
    for candidate in by_accuracy:
        if candidate.cost_s <= budget:
            return candidate, (
                f"the most accurate that fits the budget of {budget * 1000:.2f} ms/frame "
                f"({streams} streams x {fps:g} FPS, {headroom:.0%} of the machine): "
                f"{_fmt(candidate)}"
            )
    fastest = min(candidates, key=lambda c: c.cost_s)
    return fastest, (
        f"none fits the budget of {budget * 1000:.2f} ms/frame ({streams} streams x {fps:g} "
        f"FPS); the fastest: {_fmt(fastest)}"
    )


def _accuracy(c: Candidate) -> float:
    return -1.0 if math.isnan(c.handle.accuracy) else c.handle.accuracy


def _fmt(c: Candidate) -> str:
    acc = "" if math.isnan(c.handle.accuracy) else f", mAP@0.5 {c.handle.accuracy:.3f}"
    return f"{c.handle.describe} at {c.cost_s * 1000:.2f} ms/frame{acc}"


class Selector:
    """Holds the chosen detector for every stream and re-decides when frames are dropped."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        streams: int = 1,
        fps: float | None = None,
        headroom: float = DETECTOR_SHARE,
        max_drop_rate: float = 0.01,
        on_change: Callable[[Candidate, str], None] | None = None,
    ) -> None:
        self.candidates = list(candidates)
        self.streams, self.fps, self.headroom = streams, fps, headroom
        self.max_drop_rate = max_drop_rate
        self.on_change = on_change
        self.history: list[dict[str, object]] = []
        self._seen = (0, 0)  # frames and drops at the last decision
        chosen, reason = choose(self.candidates, streams, fps, headroom)
        self._set(chosen, reason)

    def _set(self, chosen: Candidate, reason: str) -> None:
        self.chosen, self.reason = chosen, reason
        self.history.append({"at": time.time(), "model": chosen.handle.key, "reason": reason})
        log.info("detector %s: %s", chosen.handle.describe, reason)
        if self.on_change is not None:
            self.on_change(chosen, reason)

    def current(self) -> DetectorHandle:
        return self.chosen.handle

    def for_size(self, width: int, height: int) -> DetectorHandle:
        """The chosen detector, or (for frames decoded before a switch) one of their size."""
        spec = self.chosen.handle.spec
        if (spec.width, spec.height) == (width, height):
            return self.chosen.handle
        for c in self.candidates:
            if (c.handle.spec.width, c.handle.spec.height) == (width, height):
                return c.handle
        return self.chosen.handle

    @property
    def size(self) -> tuple[int, int]:
        return self.chosen.handle.spec.width, self.chosen.handle.spec.height

    def resize(self, streams: int) -> None:
        """The number of streams changed: decide again for the new budget."""
        if streams != self.streams and streams > 0:
            self.streams = streams
            chosen, reason = choose(self.candidates, streams, self.fps, self.headroom)
            if chosen is not self.chosen:
                self._set(chosen, reason)

    def observe(self, frames: int, dropped: int) -> bool:
        """Totals over all streams; steps down to a cheaper detector when drops appear."""
        new_frames = frames - self._seen[0]
        new_drops = dropped - self._seen[1]
        if new_frames + new_drops < 30:
            return False
        self._seen = (frames, dropped)
        rate = new_drops / max(new_frames + new_drops, 1)
        if rate <= self.max_drop_rate:
            return False
        cheaper = [c for c in self.candidates if c.cost_s < self.chosen.cost_s * 0.95]
        if not cheaper:
            return False
        step = max(cheaper, key=lambda c: (_accuracy(c), -c.cost_s))
        self._set(
            step,
            f"{rate:.1%} of frames dropped at {self.chosen.handle.describe}; stepping down to "
            f"{_fmt(step)}",
        )
        return True

    def describe(self) -> dict[str, object]:
        return {
            "chosen": self.chosen.describe(),
            "reason": self.reason,
            "streams": self.streams,
            "fps": self.fps,
            "candidates": [c.describe() for c in self.candidates],
            "history": self.history[-20:],
        }
