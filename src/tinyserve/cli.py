"""The ``tinyserve`` command line: thin subcommands over the library.

Heavy imports (torch, onnxruntime, uvicorn) happen inside each command, so ``--help`` is fast
and ``serve`` never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import typer

from tinyserve import __version__
from tinyserve.errors import ConfigError, TinyServeError

_T = TypeVar("_T")

app = typer.Typer(
    name="tinyserve",
    help="Train, export, optimize and serve compact image classifiers on CPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tinyserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Train, export, optimize and serve compact image classifiers on CPUs."""


DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="'fashion-mnist' or a folder with one sub-folder of images per class.",
        envvar="TINYSERVE_DATA",
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the Fashion-MNIST IDX files are [default: /usr/share/datasets/fashion-mnist].",
        envvar="TINYSERVE_DATA_DIR",
    ),
]


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Run folder for checkpoints and history.")],
    data: DataOption = "fashion-mnist",
    data_dir: DataDirOption = None,
    arch: Annotated[str, typer.Option(help="Architecture from the registry.")] = "vgg_lite",
    epochs: Annotated[int, typer.Option(min=1)] = 15,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    optimizer: Annotated[str, typer.Option(help="sgd (Nesterov momentum) or adamw.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.1,
    weight_decay: float = 5e-4,
    schedule: Annotated[str, typer.Option(help="onecycle or cosine.")] = "onecycle",
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.0,
    erase_prob: Annotated[float, typer.Option(help="Random-erasing probability.")] = 0.0,
    image_size: Annotated[int, typer.Option(help="Input side for image folders.")] = 64,
    channels: Annotated[int, typer.Option(help="1 (grey) or 3 (RGB) for image folders.")] = 3,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Train on the first N images only (quick trials).")
    ] = None,
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="Torch threads; 0 = all cores given.")] = 0,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 where the CPU has native support), bf16 or fp32.")
    ] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a classifier; writes best.pt, last.pt, history.json and curves.png to OUT."""
    from tinyserve.training.train import TrainConfig, fit

    config = _config(
        TrainConfig,
        out=out,
        data=data,
        data_dir=data_dir,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        label_smoothing=label_smoothing,
        erase_prob=erase_prob,
        image_size=image_size,
        channels=channels,
        max_train_samples=max_train_samples,
        seed=seed,
        threads=threads,
        precision=precision,
        resume=resume,
    )
    result = fit(config, progress=progress)
    typer.echo(
        f"best validation accuracy {result.best_val_acc:.4f} in {result.seconds:.0f}s; "
        f"checkpoint {result.best_path}"
    )


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'tinyserve train'.")],
    name: Annotated[str, typer.Option(help="Model name in the repository.")],
    repo: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    version: Annotated[
        int | None, typer.Option(help="Version number [default: the next free one].")
    ] = None,
    data_dir: DataDirOption = None,
    parity_samples: Annotated[int, typer.Option(help="Real images for the parity check.")] = 512,
    tolerance: Annotated[float, typer.Option(help="Largest |logit diff| accepted.")] = 1e-4,
    opset: int = 17,
    simplify: Annotated[bool, typer.Option(help="Simplify the graph with onnxslim.")] = True,
) -> None:
    """Export a checkpoint to REPO/NAME/VERSION/model.onnx with in-graph preprocessing."""
    from tinyserve.training.export import ExportConfig, ParityBar, export_checkpoint

    config = ExportConfig(
        checkpoint=checkpoint,
        name=name,
        repo=repo,
        version=version,
        data_dir=data_dir,
        parity=_config(ParityBar, samples=parity_samples, max_abs_diff=tolerance),
        opset=opset,
        simplify=simplify,
    )
    result = export_checkpoint(config)
    parity = result.report["parity"]
    typer.echo(
        f"wrote {result.path} ({result.report['bytes'] / 1e6:.2f} MB); parity on "
        f"{parity['samples']} images: max |logit diff| {parity['max_abs_logit_diff']:.1e}, "
        f"top-1 agreement {parity['top1_agreement']:.2%}"
    )


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model folder, FOLDER:VERSION or .onnx file.")],
    data: DataOption = "fashion-mnist",
    data_dir: DataDirOption = None,
    batch_size: int = 256,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads; 0 = all cores.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Folder for report.json and confusion.png.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Accuracy, per-class accuracy, confusion matrix and latency, through ONNX Runtime."""
    from tinyserve.evaluate import EvalConfig, write_confusion_png
    from tinyserve.evaluate import evaluate as run

    config = _config(
        EvalConfig,
        target=model,
        data=data,
        data_dir=data_dir,
        batch_size=batch_size,
        threads=threads,
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


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="Model folder, FOLDER:VERSION or .onnx file.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    top_k: Annotated[int, typer.Option(min=1, help="Classes to show per image.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Classify images with a local model (no server needed)."""
    import orjson

    from tinyserve.predict import predict_files

    results = predict_files(model, images, top_k)
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


def _config(cls: type[_T], **values: object) -> _T:
    """Build a config dataclass, turning its validation errors into one-line CLI errors."""
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def main() -> None:
    """Console entry point: run the app and turn tinyserve errors into one-line messages."""
    try:
        app()
    except TinyServeError as exc:
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
