"""Benchmark results for people: rich tables for the terminal, one self-contained HTML file.

The HTML report embeds its plots as base64 PNG and its data as JSON, and refers to nothing
outside itself, so it can be mailed or attached to an issue as one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyserve.bench.loadgen import LoadReport, StepReport
from tinyserve.bench.model import ModelBenchReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.table import Table


def wide_console() -> Console:
    """A console for the wide tables below: 160 columns when output is not a terminal."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def model_table(report: ModelBenchReport) -> Table:
    from rich.table import Table

    runtimes = (
        ", ".join(
            f"{info.get('runtime', 'onnxruntime')} {info.get('version', '')} ({provider})"
            for provider, info in report.runtimes.items()
        )
        or f"ONNX Runtime {report.onnxruntime}"
    )
    table = Table(
        title=f"{report.model} v{report.version}: {runtimes}, {report.cores} core(s), "
        f"{report.data}",
        caption=f"peak RSS per {report.peak_rss_scope}; baseline {report.baseline_rss_mb} MB",
    )
    table.add_column("provider")
    for column in ("threads", "batch", "runs", "p50 ms", "p95 ms", "p99 ms", "ms/image"):
        table.add_column(column, justify="right")
    table.add_column("images/s", justify="right", style="bold")
    table.add_column("peak RSS MB", justify="right")
    for r in report.results:
        table.add_row(
            r.provider,
            str(r.threads),
            str(r.batch_size),
            str(r.runs),
            _num(r.latency_ms["p50"]),
            _num(r.latency_ms["p95"]),
            _num(r.latency_ms["p99"]),
            _num(r.per_image_ms),
            f"{r.throughput_ips:,.0f}",
            f"{r.peak_rss_mb:,.1f}",
        )
    return table


_LOAD_COLUMNS = (
    "step", "requests", "ok/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors",
    "client CPU", "batch mean", "queue ms mean/p99",
)  # fmt: skip


def load_rows(report: LoadReport) -> list[list[str]]:
    """The summary table of a load run, as text cells under ``_LOAD_COLUMNS``."""
    rows = []
    for step in report.steps:
        lat = step.latency_ms
        server = step.server or {}
        batch = server.get("batch_size", {})
        queue = server.get("stages", {}).get("queue", {})
        rows.append(
            [
                step.name,
                f"{step.requests:,}",
                f"{step.ok_rps:,.1f}",
                *(_num(lat.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max")),
                ", ".join(f"{k}: {v:,}" for k, v in step.errors.items()) or "-",
                f"{step.client_cpu:.0%}",
                _num(batch.get("mean")),
                f"{_num(queue.get('mean_ms'))} / {_num(queue.get('p99_ms'))}" if queue else "-",
            ]
        )
    return rows


def load_table(report: LoadReport) -> Table:
    from rich.table import Table

    table = Table(
        title=f"{report.url} ({report.body} body, {report.request_bytes:,} bytes per request)",
        caption=f"{report.duration_s:g} s per step after {report.warmup_s:g} s warm-up; "
        f"latency of 2xx answers; server metrics: {report.server_metrics}",
    )
    for i, column in enumerate(_LOAD_COLUMNS):
        table.add_column(column, justify="left" if i in (0, 8) else "right")
    for row in load_rows(report):
        table.add_row(*row)
    return table


def client_warnings(report: LoadReport) -> list[str]:
    """Signs that the load generator, not the server, limited a step."""
    out = []
    for step in report.steps:
        if step.client_cpu > 0.9:
            out.append(
                f"{step.name}: the load generator used {step.client_cpu:.0%} of a core; "
                "the figures may be limited by the client"
            )
        if step.dispatch_lag_ms is not None and step.dispatch_lag_ms > 50:
            out.append(
                f"{step.name}: requests left up to {step.dispatch_lag_ms:.0f} ms after their "
                "scheduled time (counted in latency); the client could not keep the rate"
            )
    return out


def write_html(report: LoadReport, path: Path) -> None:
    """Write the self-contained HTML report of a load run to ``path``."""
    path.write_text(render_html(report))


def render_html(report: LoadReport) -> str:
    figures = [
        ("Latency distribution (2xx answers)", _cdf_figure(report.steps)),
        ("Throughput", _throughput_figure(report.steps)),
        ("Server batch sizes", _batch_figure(report.steps)),
        ("Open-loop latency over time", _timeline_figure(report.steps)),
    ]
    sections = []
    for title, figure in figures:
        if figure is not None:
            sections.append(
                f"<h2>{html.escape(title)}</h2>\n"
                f'<img alt="{html.escape(title)}" src="data:image/png;base64,{_png(figure)}">'
            )
    if not any(step.server and "batch_size" in step.server for step in report.steps):
        sections.append(
            f"<p>No server batch sizes: {html.escape(report.server_metrics)}.</p>"
            if report.server_metrics != "not requested"
            else "<p>Server metrics were not requested.</p>"
        )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _LOAD_COLUMNS)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in load_rows(report)
    )
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in client_warnings(report))
    meta = (
        f"{html.escape(report.body)} body of {report.request_bytes:,} bytes "
        f"({html.escape(report.image)}); {report.warmup_s:g} s warm-up then "
        f"{report.duration_s:g} s per step; started {html.escape(report.started)}; "
        f"Python {html.escape(report.python)} on {html.escape(report.event_loop)}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>tinyserve bench: {html.escape(report.url)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f0f0f0; }}
td:first-child, td:nth-child(9) {{ text-align: left; }}
img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 1em; overflow: auto; font-size: 0.8em; }}
</style></head><body>
<h1>tinyserve bench: {html.escape(report.url)}</h1>
<p>{meta}</p>
<h2>Summary</h2>
<table><tr>{head}</tr>
{body}
</table>
{f"<ul>{warnings}</ul>" if warnings else ""}
{chr(10).join(sections)}
<h2>Data</h2>
<details><summary>JSON</summary><pre>{html.escape(report.to_json())}</pre></details>
</body></html>
"""


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float = 9.0, height: float = 4.5, columns: int = 1) -> tuple[Figure, Any]:
    # A bare Figure, not pyplot: no global state and no GUI backend.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _cdf_figure(steps: Sequence[StepReport]) -> Figure | None:
    plotted = [s for s in steps if s.cdf_ms]
    if not plotted:
        return None
    figure, (ax,) = _figure()
    for step in plotted:
        xs = [x for x, _ in step.cdf_ms]
        # The last point (fraction 1) has no place on a logit axis: use the plotting
        # position of the slowest answer instead.
        last = 1 - 0.5 / step.ok
        ys = [min(y, last) for _, y in step.cdf_ms]
        ax.step(xs, ys, where="post", label=step.name)
    ax.set_xscale("log")
    ax.set_yscale("logit")
    ticks = [0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999]
    ax.set_yticks(ticks, [f"{100 * t:g}%" for t in ticks])
    ax.yaxis.set_minor_formatter("")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("answers at or below")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return figure


def _throughput_figure(steps: Sequence[StepReport]) -> Figure | None:
    closed = [s for s in steps if s.mode == "closed"]
    opened = [s for s in steps if s.mode == "open"]
    panels = [p for p in (closed, opened) if p]
    if not panels:
        return None
    figure, axes = _figure(columns=len(panels))
    for ax, group in zip(axes, panels, strict=True):
        is_open = group is opened
        xs = [(s.rate or 0.0) if is_open else float(s.concurrency) for s in group]
        ax.plot(xs, [s.ok_rps for s in group], "o-", color="tab:blue", label="2xx answers/s")
        if is_open:
            ax.plot([0.0, max(xs)], [0.0, max(xs)], ":", color="grey", label="offered")
            ax.set_xlim(left=0)
            ax.set_xlabel("offered rate (requests/s)")
        else:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(int(x)) for x in xs])
            ax.set_xlabel("concurrency (connections)")
        ax.set_ylabel("throughput (requests/s)")
        ax.set_ylim(bottom=0)
        twin = ax.twinx()
        p99 = [_nan(s.latency_ms.get("p99")) for s in group]
        twin.plot(xs, p99, "s--", color="tab:red", label="p99 latency")
        twin.set_ylabel("p99 latency (ms)", color="tab:red")
        twin.set_ylim(bottom=0)
        lines, labels = ax.get_legend_handles_labels()
        more_lines, more_labels = twin.get_legend_handles_labels()
        ax.legend(lines + more_lines, labels + more_labels, loc="upper left")
        ax.grid(True, alpha=0.3)
    return figure


def _batch_figure(steps: Sequence[StepReport]) -> Figure | None:
    found = [(s, s.server["batch_size"]) for s in steps if s.server and "batch_size" in s.server]
    if not found:
        return None
    labels = _ordered(b["bucket"] for _, batch in found for b in batch["distribution"])
    used = {b["bucket"] for _, batch in found for b in batch["distribution"] if b["count"]}
    labels = labels[: max((i + 1 for i, label in enumerate(labels) if label in used), default=1)]
    figure, (ax,) = _figure()
    width = 0.8 / len(found)
    for i, (step, batch) in enumerate(found):
        counts = {b["bucket"]: b["count"] for b in batch["distribution"]}
        fractions = [counts.get(label, 0) / batch["batches"] for label in labels]
        positions = [j + (i - (len(found) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(positions, fractions, width, label=f"{step.name} (mean {batch['mean']:.3g})")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("images per inference batch")
    ax.set_ylabel("fraction of batches")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return figure


def _timeline_figure(steps: Sequence[StepReport]) -> Figure | None:
    opened = [s for s in steps if s.mode == "open" and s.ok]
    if not opened:
        return None
    figure, (ax,) = _figure(height=3.5)
    for step in opened:
        points = [p for p in step.timeline if p["ok"]]
        ax.plot([p["start_s"] for p in points], [p["mean_ms"] for p in points], "o-",
                label=step.name)  # fmt: skip
    ax.set_xlabel("scheduled send time within the window (s)")
    ax.set_ylabel("mean latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return figure


def _ordered(labels: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.2f}"
