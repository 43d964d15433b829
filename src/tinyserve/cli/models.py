"""Commands on exported models: evaluate (or compare versions), quantize and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyserve.cli.options import DataDirOption, DataOption, build_config
from tinyserve.errors import ConfigError, ModelError


def evaluate(
    model: Annotated[
        str | None, typer.Argument(help="Model folder, FOLDER:VERSION or .onnx file.")
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="Compare every version of this model folder (writes compare.md/.json/.png).",
        ),
    ] = None,
    runtime: Annotated[
        str,
        typer.Option(
            help="Runtime: auto (the version's format), onnxruntime, openvino or litert. With "
            "--compare, comma-separated runtimes for every version, or all (every runtime "
            "that reads a version's files)."
        ),
    ] = "auto",
    torch_rows: Annotated[
        bool,
        typer.Option(
            "--torch",
            help="With --compare: add PyTorch eager and TorchScript rows (the train extra).",
        ),
    ] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="With --torch: the training checkpoint of the first version \\[default: its "
            "ONNX graph rebuilt in PyTorch]."
        ),
    ] = None,
    data: DataOption = "fashion-mnist",
    data_dir: DataDirOption = None,
    batch_size: int = 256,
    threads: Annotated[
        int,
        typer.Option(
            help="Inference threads; 0 = all cores. With --compare: 0 measures 1 and 2 threads."
        ),
    ] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Folder for report.json and confusion.png.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Accuracy, per-class accuracy, confusion matrix and latency, on the model's runtime."""
    if compare is not None:
        runtimes = tuple(r.strip() for r in runtime.split(",") if r.strip())
        options = {"runtimes": runtimes, **({"threads": (threads,)} if threads else {})}
        torch = (torch_rows, checkpoint)
        _compare_versions(compare, data, data_dir, out, json_output, torch, **options)
        return
    if model is None:
        raise ConfigError("give a MODEL to evaluate, or --compare MODEL_DIR")
    from tinyserve.evaluate import EvalConfig, write_confusion_png
    from tinyserve.evaluate import evaluate as run

    config = build_config(
        EvalConfig,
        target=model,
        data=data,
        data_dir=data_dir,
        batch_size=batch_size,
        threads=threads,
        runtime=runtime,
    )
    report = run(config, progress=not json_output)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(report.to_json())
        write_confusion_png(report, out / "confusion.png")
    if json_output:
        typer.echo(report.to_json(), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.model} v{report.version} on {report.dataset}")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for label, acc in report.per_class.items():
        table.add_row(label, f"{acc:.2%}")
    console = Console()
    console.print(table)
    console.print(
        f"top-1 accuracy [bold]{report.accuracy:.2%}[/] on {report.samples:,} images; "
        f"{report.bytes / 1e6:.2f} MB; batch-1 latency p50 {report.latency_ms['p50']:.3f} ms, "
        f"p99 {report.latency_ms['p99']:.3f} ms; {report.throughput_ips:,.0f} images/s "
        f"at batch {batch_size}" + (f"; wrote {out}/report.json and confusion.png" if out else "")
    )


def predict(
    model: Annotated[
        str, typer.Argument(help="Model folder, FOLDER:VERSION, .onnx file, or server URL.")
    ],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    top_k: Annotated[int, typer.Option(min=1, help="Classes to show per image.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    api_key: Annotated[
        str | None,
        typer.Option(help="API key sent to a server URL.", envvar="TINYSERVE_API_KEY"),
    ] = None,
) -> None:
    """Classify images with a local model, or through a server when MODEL is an http:// URL
    (a 503 or a connection error is retried a few times, with backoff)."""
    import orjson

    from tinyserve.predict import predict_files

    results = predict_files(model, images, top_k, api_key)
    if json_output:
        for item in results:
            typer.echo(orjson.dumps(item).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("image", "label", "confidence", f"top {top_k}"):
        table.add_column(column)
    for item in results:
        if item["error"]:
            table.add_row(item["image"], "[red]error[/]", "", item["error"]["message"])
            continue
        best = item["predictions"][0]
        others = ", ".join(f"{p['label']} {p['confidence']:.1%}" for p in item["predictions"])
        table.add_row(item["image"], best["label"], f"{best['confidence']:.2%}", others)
    Console().print(table)
    if any(item["error"] for item in results):
        raise typer.Exit(1)


def _compare_versions(
    model_dir: Path,
    data: str,
    data_dir: Path | None,
    out: Path | None,
    json_output: bool,
    torch: tuple[bool, Path | None],
    **options: object,
) -> None:
    from tinyserve.compare import Candidate, CompareConfig, compare, write_outputs
    from tinyserve.repository import list_versions, sibling, version_path

    config = build_config(
        CompareConfig, model_dir=model_dir, data=data, data_dir=data_dir, **options
    )
    extra: list[Candidate] = []
    with_torch, checkpoint = torch
    if with_torch:
        try:
            from tinyserve.training.torch_rows import torch_candidates
        except ImportError as exc:
            raise ConfigError(
                f"--torch needs the train extra (pip install 'tinyserve[train]'): {exc}"
            ) from exc
        versions = list_versions(model_dir)
        first = sibling(version_path(model_dir, versions[0]), "onnx") if versions else None
        if first is None:
            raise ConfigError(f"--torch needs an ONNX first version in {model_dir}")
        extra = torch_candidates(first, versions[0], checkpoint)
    comparison = compare(config, progress=not json_output, extra=extra)
    paths = write_outputs(comparison, out or Path("runs") / f"compare-{model_dir.name}")
    if json_output:
        typer.echo(comparison.to_json(), nl=False)
        return
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console()
    console.print(Markdown(paths[0].read_text()))
    console.print(f"wrote {', '.join(map(str, paths))}")


def quantize(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (models/NAME).")],
    mode: Annotated[str, typer.Option(help="dynamic, static (INT8 QDQ) or fp16.")] = "static",
    parent: Annotated[
        int | None, typer.Option(help="Version to quantize \\[default: the served one].")
    ] = None,
    data: DataOption = "fashion-mnist",
    data_dir: DataDirOption = None,
    calibration: Annotated[
        str, typer.Option(help="Static calibration: minmax, entropy or percentile.")
    ] = "minmax",
    calibration_samples: Annotated[
        int, typer.Option(help="Training images used for calibration.")
    ] = 512,
    calib_data: Annotated[
        str | None,
        typer.Option(help="Calibrate on the training split of this data \\[default: --data]."),
    ] = None,
    percentile: Annotated[float, typer.Option(help="Percentile for --calibration percentile.")] = (
        99.999
    ),
    per_channel: Annotated[bool, typer.Option(help="Per-channel weight scales.")] = True,
    reduce_range: Annotated[
        bool,
        typer.Option(
            "--reduce-range/--full-range",
            help="7-bit weights, exact on every x86 CPU; full 8-bit ones lose accuracy on CPUs "
            "without VNNI (AVX2 only).",
        ),
    ] = True,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="Largest accuracy loss against the parent, in points.")
    ] = 1.0,
    min_agreement: Annotated[
        float, typer.Option(help="Smallest top-1 agreement with the parent (0-1).")
    ] = 0.0,
    force: Annotated[bool, typer.Option(help="Write the model even if it misses the bar.")] = (
        False
    ),
) -> None:
    """Quantize a model with ONNX Runtime and add it as the next version if it passes the bar."""
    from tinyserve.quantize import AgreementBar, Calibration, QuantizeConfig
    from tinyserve.quantize import quantize as run

    config = build_config(
        QuantizeConfig,
        model_dir=model_dir,
        mode=mode,
        parent=parent,
        data=data,
        data_dir=data_dir,
        calibration=build_config(
            Calibration,
            method=calibration,
            samples=calibration_samples,
            data=calib_data,
            percentile=percentile,
        ),
        per_channel=per_channel,
        reduce_range=reduce_range,
        bar=build_config(
            AgreementBar, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement
        ),
        force=force,
    )
    result = run(config, progress=True)
    gate = result.gate
    summary = (
        f"{result.report['optimization']['method']}: accuracy {gate.accuracy:.2%} "
        f"({gate.accuracy_delta_pt:+.2f} pt vs v{result.report['parent']['version']}), "
        f"top-1 agreement {gate.agreement:.2%} on {gate.samples:,} images; "
        f"{result.report['candidate_bytes'] / 1e6:.3f} MB "
        f"({result.report['candidate_bytes'] / result.report['parent']['bytes']:.0%} of parent)"
    )
    if result.path is None:
        raise ModelError(
            f"{summary} - misses the bar (at most {gate.max_accuracy_drop:g} pt lost, agreement "
            f">= {gate.min_agreement:.2%}); not written (use --force to keep it anyway)"
        )
    note = "" if gate.passed else " (forced past the bar)"
    typer.echo(f"wrote {result.path}{note}; {summary}")
