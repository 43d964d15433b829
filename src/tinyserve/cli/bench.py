"""``tinyserve bench``: a model on its runtime, or a running server over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from tinyserve.cli.options import build_config
from tinyserve.errors import ConfigError

_N = TypeVar("_N", int, float)

app = typer.Typer(
    name="bench",
    help="Measure a model through ONNX Runtime, or a running server over HTTP.",
    no_args_is_help=True,
)


@app.command("model")
def bench_model(
    model: Annotated[str, typer.Argument(help="Model folder, FOLDER:VERSION or .onnx file.")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,256",
    threads: Annotated[str, typer.Option(help="Comma-separated intra-op thread counts.")] = "1,2",
    seconds: Annotated[float, typer.Option(help="Measuring time per step, after warm-up.")] = 2.0,
    warmup_runs: Annotated[int, typer.Option(help="Untimed runs before each step.")] = 5,
    min_runs: Annotated[int, typer.Option(help="Timed runs per step, at least.")] = 10,
    images: Annotated[
        Path | None, typer.Option(help="Image file or folder to feed instead of random pixels.")
    ] = None,
    runtime: Annotated[
        str, typer.Option(help="auto (the version's own format), onnxruntime, openvino or litert.")
    ] = "auto",
    provider: Annotated[
        str,
        typer.Option(
            help="Comma-separated ONNX Runtime providers, measured side by side: cpu, openvino, "
            "cuda, tensorrt (cuda and tensorrt need the gpu extra and an NVIDIA GPU)."
        ),
    ] = "cpu",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
) -> None:
    """Latency p50/p95/p99, throughput and peak RSS per batch size and thread count (no HTTP),
    on each provider given."""
    from tinyserve.bench.model import ModelBenchConfig
    from tinyserve.bench.model import bench_model as run
    from tinyserve.bench.report import model_table, wide_console

    config = build_config(
        ModelBenchConfig,
        target=model,
        batch_sizes=_numbers(batch_sizes, "--batch-sizes", int),
        threads=_numbers(threads, "--threads", int),
        seconds=seconds,
        warmup_runs=warmup_runs,
        min_runs=min_runs,
        images=images,
        runtime=runtime,
        providers=tuple(p.strip() for p in provider.split(",") if p.strip()),
    )
    steps = len(config.providers) * len(config.threads) * (len(config.batch_sizes) + 1)
    with _progress(steps, enabled=not json_output) as advance:
        report = run(config, progress=advance)
    if out is not None:
        out.write_text(report.to_json())
    if json_output:
        typer.echo(report.to_json(), nl=False)
        return
    wide_console().print(model_table(report))


@app.command("http")
def bench_http(
    url: Annotated[
        str,
        typer.Argument(
            help="Endpoint to load, e.g. http://127.0.0.1:8000/v1/models/fashion-cnn/predict; "
            "'noop' starts a trivial local server to measure the load generator itself."
        ),
    ],
    image: Annotated[Path, typer.Option(help="The image every request sends.")],
    body: Annotated[
        str, typer.Option(help="raw (image bytes), multipart, json (base64) or v2.")
    ] = "raw",
    protocol: Annotated[
        str,
        typer.Option(
            help="rest, or v2: Open Inference Protocol requests (binary BYTES tensor) to a "
            "/v2/models/NAME/infer URL."
        ),
    ] = "rest",
    concurrency: Annotated[
        str | None,
        typer.Option(help="Closed-loop steps: connections (1,8,32,64 if no --rate is given)."),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(help="Open-loop steps: requests/s, latency counted from schedule."),
    ] = None,
    connections: Annotated[int, typer.Option(help="Connections of open-loop steps.")] = 64,
    warmup: Annotated[float, typer.Option(help="Seconds of unmeasured load per step.")] = 2.0,
    duration: Annotated[float, typer.Option(help="Measured seconds per step.")] = 10.0,
    timeout: Annotated[float, typer.Option(help="Seconds before a request counts as failed.")] = (
        10.0
    ),
    metrics: Annotated[
        bool, typer.Option(help="Read the server's /metrics around each step.")
    ] = True,
    allow_remote: Annotated[
        bool, typer.Option(help="Allow a target outside loopback (a server you operate).")
    ] = False,
    header: Annotated[
        list[str] | None,
        typer.Option(
            help="'Name: value' sent with every request, e.g. 'Authorization: Bearer tsk_...' "
            "(repeat for more)."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write a self-contained HTML report (and its JSON).")
    ] = None,
) -> None:
    """Closed-loop and open-loop HTTP load: percentiles, throughput, errors, server batching."""
    from contextlib import nullcontext

    from tinyserve.bench.loadgen import LoadConfig, run_load
    from tinyserve.bench.noop import noop_server
    from tinyserve.bench.report import client_warnings, load_table, wide_console, write_html

    if protocol not in ("rest", "v2"):
        raise ConfigError(f"--protocol must be rest or v2, got {protocol!r}")
    if protocol == "v2":
        body = "v2"
    rates = _numbers(rate, "--rate", float) if rate else ()
    steps = _numbers(concurrency, "--concurrency", int) if concurrency else ()
    if not concurrency and not rates:
        steps = (1, 8, 32, 64)
    noop = url == "noop"
    with noop_server() if noop else nullcontext(url) as target:
        config = build_config(
            LoadConfig,
            url=target,
            image=image,
            body=body,
            concurrency=steps,
            rates=rates,
            connections=connections,
            warmup_s=warmup,
            duration_s=duration,
            timeout_s=timeout,
            metrics=metrics and not noop,
            allow_remote=allow_remote,
            headers=tuple(_header(h) for h in header or ()),
        )
        with _progress(len(steps) + len(rates), enabled=not json_output) as advance:
            result = run_load(config, progress=advance)
    if report is not None:
        write_html(result, report)
        out = out or report.with_suffix(".json")
    if out is not None:
        out.write_text(result.to_json())
    if json_output:
        typer.echo(result.to_json(), nl=False)
        return
    console = wide_console()
    console.print(load_table(result))
    for warning in client_warnings(result):
        console.print(f"[yellow]warning:[/] {warning}")
    if report is not None:
        console.print(f"wrote {report} and {out}")


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or any(c in text for c in "\r\n"):
        raise ConfigError("--header takes 'Name: value' (one header, one line)")
    return name.strip(), value.strip()


def _numbers(text: str, flag: str, kind: Callable[[str], _N]) -> tuple[_N, ...]:
    try:
        return tuple(kind(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ConfigError(f"{flag} takes numbers separated by commas, got {text!r}") from None


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr advanced by each step's description (refreshed only then, so
    no thread competes with what is being measured)."""
    if not enabled:
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), auto_refresh=False, transient=True) as bar:
        task = bar.add_task("starting", total=total)
        started = False

        def advance(description: str) -> None:
            nonlocal started
            bar.update(task, description=description, advance=1 if started else 0)
            started = True
            bar.refresh()

        yield advance
