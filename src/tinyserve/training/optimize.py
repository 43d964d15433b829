"""One command from a trained checkpoint to a served, smaller model: distill, prune, export,
quantize, each step optional and each one gated.

The steps run in that order, each on the previous one's result:

``distill``   a smaller student learns from the checkpoint (``training.distill``);
``prune``     channels (a narrower network) or magnitude (zeros) with fine-tuning;
``export``    ONNX with the in-graph preprocessing, parity-checked against PyTorch;
``quantize``  INT8 (static or dynamic) or FP16 through ``tinyserve quantize``'s gate.

Every step is measured the same way on the test set (size, deflated size, accuracy, batch-1
latency and batch-256 throughput through ONNX Runtime) and must keep its accuracy within
``max_drop`` points of its input; the first step that misses stops the pipeline, and the
report says which one and why. The exported and quantized models become versions of
``repo/name``; the report goes to ``out/optimize_report.json`` and ``out/OPTIMIZE.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyserve.quantize import MODES, AgreementBar, QuantizeConfig, quantize
from tinyserve.training.distill import DistillConfig, distill
from tinyserve.training.export import ExportConfig, export_checkpoint
from tinyserve.training.prune import (
    Measured,
    PruneConfig,
    input_spec,
    measure,
    measure_file,
    prune_checkpoint,
    test_set,
)
from tinyserve.training.sparsity import SparsityConfig, sparsify_checkpoint
from tinyserve.training.train import build_from_checkpoint, finetune_config, load_checkpoint

REPORT_FILE = "optimize_report.json"
PRUNE_METHODS = ("channels", "magnitude")


@dataclass(frozen=True)
class OptimizeConfig:
    """The pipeline from ``checkpoint``: every step with ``None`` is skipped."""

    checkpoint: Path
    out: Path
    name: str
    repo: Path = Path("models")
    distill_arch: str | None = None
    distill_widths: tuple[int, ...] | None = None
    distill_epochs: int = 10
    prune: str | None = None  # "channels" or "magnitude"
    prune_ratio: float = 0.5
    prune_epochs: int = 3
    quantize: str | None = "static"
    max_drop: float = 1.0  # accuracy points a step may lose against its input
    batch_size: int = 128
    max_train_samples: int | None = None
    data_dir: Path | None = None
    threads: int = 0
    latency_runs: int = 300

    def __post_init__(self) -> None:
        if self.prune is not None and self.prune not in PRUNE_METHODS:
            raise ValueError(f"prune must be one of {PRUNE_METHODS} or None, got {self.prune!r}")
        if self.quantize is not None and self.quantize not in MODES:
            raise ValueError(f"quantize must be one of {MODES} or None, got {self.quantize!r}")
        if self.max_drop < 0:
            raise ValueError(f"max_drop must be >= 0 points, got {self.max_drop}")
        if self.distill_epochs < 1 or self.prune_epochs < 1 or self.latency_runs < 1:
            raise ValueError("epochs and latency_runs must be at least 1")


@dataclass(frozen=True)
class Step:
    """One step's result: what it made, how it measures, and whether it passed its gate."""

    name: str
    artifact: str
    measured: Measured
    accuracy_delta_pt: float  # against the step's input
    passed: bool
    seconds: float
    note: str = ""


@dataclass
class OptimizeReport:
    steps: list[Step] = field(default_factory=list)
    stopped_at: str | None = None  # the step whose gate failed

    @property
    def passed(self) -> bool:
        return self.stopped_at is None

    def to_json(self) -> str:
        plain = {"steps": [asdict(s) for s in self.steps], "stopped_at": self.stopped_at}
        return json.dumps(plain, indent=2) + "\n"

    def to_markdown(self) -> str:
        head = "| step | artifact | params | zeros | MB | deflated MB | test acc | Δ pt | "
        head += "p50 ms | p99 ms | img/s b256 | gate |\n"
        lines = [head + "| --- " * 12 + "|"]
        for s in self.steps:
            m = s.measured
            lines.append(
                f"| {s.name} | `{s.artifact}` | {m.parameters:,} | {m.weight_sparsity:.0%} | "
                f"{m.onnx_bytes / 1e6:.3f} | {m.compressed_bytes / 1e6:.3f} | "
                f"{m.test_accuracy:.2%} | {s.accuracy_delta_pt:+.2f} | {m.latency_ms['p50']:.3f} | "
                f"{m.latency_ms['p99']:.3f} | {m.throughput_ips:,.0f} | "
                f"{'passed' if s.passed else 'failed'}{': ' + s.note if s.note else ''} |"
            )
        return "\n".join(lines) + "\n"


def optimize(config: OptimizeConfig, progress: bool = True) -> OptimizeReport:
    """Run the configured steps, gating each; writes the report even when a gate fails."""
    state = load_checkpoint(config.checkpoint)
    meta = state["meta"]
    base = finetune_config(meta, config.out, data_dir=config.data_dir, threads=config.threads)
    test, spec, runs = test_set(meta, base), input_spec(meta), config.latency_runs
    report = OptimizeReport()
    current = config.checkpoint
    network = build_from_checkpoint(state)
    previous = measure(network, test, spec, runs)
    report.steps.append(Step("input", str(current), previous, 0.0, True, 0.0))

    def record(name: str, artifact: Path, measured: Measured, t0: float, note: str = "") -> bool:
        nonlocal previous
        delta = round((measured.test_accuracy - previous.test_accuracy) * 100, 4)
        passed = -delta <= config.max_drop + 1e-9
        if not passed:
            note = note or f"lost {-delta:.2f} pt, more than --max-drop {config.max_drop:g}"
        step = Step(
            name, str(artifact), measured, delta, passed, round(time.perf_counter() - t0, 1), note
        )
        report.steps.append(step)
        previous = measured
        if not passed:
            report.stopped_at = name
        _write(report, config.out)
        return passed

    if config.distill_arch is not None:
        t0 = time.perf_counter()
        student = finetune_config(
            meta,
            config.out / "distill",
            arch=config.distill_arch,
            widths=config.distill_widths,
            epochs=config.distill_epochs,
            batch_size=config.batch_size,
            max_train_samples=config.max_train_samples,
            data_dir=config.data_dir,
            threads=config.threads,
        )
        result = distill(DistillConfig(current, student, baseline=False), progress)
        current = result.student
        tuned = build_from_checkpoint(load_checkpoint(current))
        if not record("distill", current, measure(tuned, test, spec, runs), t0):
            return report

    if config.prune is not None:
        t0 = time.perf_counter()
        common: dict[str, Any] = dict(
            checkpoint=current,
            out=config.out / f"prune-{config.prune}",
            epochs=config.prune_epochs,
            batch_size=config.batch_size,
            max_train_samples=config.max_train_samples,
            data_dir=config.data_dir,
            threads=config.threads,
            latency_runs=runs,
        )
        if config.prune == "channels":
            pruned = prune_checkpoint(PruneConfig(ratio=config.prune_ratio, **common), progress)
            current, after = pruned.checkpoint, pruned.after
        else:
            sparse = sparsify_checkpoint(
                SparsityConfig(sparsity=config.prune_ratio, **common), progress
            )
            current, after = sparse.checkpoint, sparse.after
        if not record("prune", current, after, t0):
            return report

    t0 = time.perf_counter()
    exported = export_checkpoint(
        ExportConfig(current, config.name, repo=config.repo, data_dir=config.data_dir)
    )
    net = build_from_checkpoint(load_checkpoint(current)).net
    parity = exported.report["parity"]
    note = f"parity {parity['max_abs_logit_diff']:.1e}, top-1 {parity['top1_agreement']:.1%}"
    if not record("export", exported.path, measure_file(exported.path, test, runs, net), t0, note):
        return report

    if config.quantize is not None:
        t0 = time.perf_counter()
        q = quantize(
            QuantizeConfig(
                config.repo / config.name,
                mode=config.quantize,
                parent=int(exported.report["version"]),
                data=base.data,
                data_dir=config.data_dir,
                bar=AgreementBar(max_accuracy_drop=config.max_drop),
            ),
            progress,
        )
        if q.path is None:
            gate = q.gate
            report.steps.append(
                Step(
                    "quantize",
                    "(refused)",
                    previous,
                    gate.accuracy_delta_pt,
                    False,
                    round(time.perf_counter() - t0, 1),
                    f"the gate refused it: {gate.accuracy:.2%} against {gate.parent_accuracy:.2%}",
                )
            )
            report.stopped_at = "quantize"
            _write(report, config.out)
            return report
        record("quantize", q.path, measure_file(q.path, test, runs, net), t0, config.quantize)
    return report


def _write(report: OptimizeReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(report.to_json())
    (out / "OPTIMIZE.md").write_text(report.to_markdown())
