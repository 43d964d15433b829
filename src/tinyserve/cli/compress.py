"""Commands that make a trained model smaller or better: prune, qat and distill.

Each starts from a checkpoint of ``tinyserve train`` (or, for ``distill``, a teacher's) and
writes a run folder with a new checkpoint, which ``tinyserve export`` turns into a version.
They need PyTorch (the ``train`` extra), imported inside each command so ``--help`` and the
serving commands stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyserve.cli.options import DataDirOption, DataOption, build_config
from tinyserve.errors import ConfigError


def prune(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'tinyserve train'.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder for the pruned checkpoint.")],
    method: Annotated[
        str,
        typer.Option(
            help="channels (structured: a narrower, faster network) or magnitude (global "
            "unstructured L1: zeros in full-size tensors, which compress but run no faster)."
        ),
    ] = "channels",
    ratio: Annotated[
        float,
        typer.Option(help="Fraction removed: of each layer's channels, or of all weights."),
    ] = 0.5,
    epochs: Annotated[int, typer.Option(min=1, help="Fine-tuning epochs.")] = 3,
    lr: Annotated[float, typer.Option(help="Fine-tuning peak learning rate.")] = 0.02,
    ramp: Annotated[
        float, typer.Option(help="magnitude: share of the fine-tuning that ramps sparsity up.")
    ] = 0.6,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    data_dir: DataDirOption = None,
    threads: Annotated[int, typer.Option(help="Torch threads; 0 = all cores given.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Prune and fine-tune (channels or magnitude); reports size, accuracy and latency."""
    from rich.console import Console
    from rich.table import Table

    from tinyserve.training.prune import Measured

    rows: tuple[tuple[str, Measured], ...]
    if method == "channels":
        from tinyserve.training.prune import PruneConfig, prune_checkpoint

        config = build_config(
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
        title, saved = f"channel pruning {ratio:g} -> widths {result.widths}", result.checkpoint
        rows = (("before", result.before), ("pruned", result.pruned), ("fine-tuned", result.after))
    elif method == "magnitude":
        from tinyserve.training.sparsity import SparsityConfig, sparsify_checkpoint

        sparse_config = build_config(
            SparsityConfig,
            checkpoint=checkpoint,
            out=out,
            sparsity=ratio,
            epochs=epochs,
            lr=lr,
            ramp=ramp,
            batch_size=batch_size,
            data_dir=data_dir,
            threads=threads,
        )
        sparse = sparsify_checkpoint(sparse_config, progress=progress)
        title, saved = f"magnitude pruning to {ratio:.0%} zeros", sparse.checkpoint
        rows = (("before", sparse.before), ("at once", sparse.pruned), ("scheduled", sparse.after))
    else:
        raise ConfigError(f"--method must be channels or magnitude, got {method!r}")

    table = Table(title=title)
    columns = ("", "parameters", "zeros", "ONNX MB", "deflated MB", "test acc", "p50 ms")
    for column in (*columns, "p99 ms", "img/s b256"):
        table.add_column(column, justify="right")
    for name, m in rows:
        table.add_row(
            name,
            f"{m.parameters:,}",
            f"{m.weight_sparsity:.0%}",
            f"{m.onnx_bytes / 1e6:.3f}",
            f"{m.compressed_bytes / 1e6:.3f}",
            f"{m.test_accuracy:.2%}",
            f"{m.latency_ms['p50']:.3f}",
            f"{m.latency_ms['p99']:.3f}",
            f"{m.throughput_ips:,.0f}",
        )
    console = Console()
    console.print(table)
    console.print(f"checkpoint {saved}; export it with 'tinyserve export'")


def qat(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'tinyserve train'.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder for the fine-tuned checkpoint.")],
    epochs: Annotated[int, typer.Option(min=1, help="Fine-tuning epochs.")] = 3,
    lr: Annotated[float, typer.Option(help="Fine-tuning peak learning rate.")] = 0.01,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    reduce_range: Annotated[
        bool, typer.Option(help="7-bit weights, as 'tinyserve quantize' uses by default.")
    ] = True,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Fine-tune on the first N images only (quick trials).")
    ] = None,
    data_dir: DataDirOption = None,
    threads: Annotated[int, typer.Option(help="Torch threads; 0 = all cores given.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Quantization-aware fine-tuning: train under simulated INT8, then export and quantize."""
    from tinyserve.training.qat import QatConfig, qat_finetune

    config = build_config(
        QatConfig,
        checkpoint=checkpoint,
        out=out,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        reduce_range=reduce_range,
        max_train_samples=max_train_samples,
        data_dir=data_dir,
        threads=threads,
    )
    result = qat_finetune(config, progress=progress)
    typer.echo(
        f"validation accuracy under simulated INT8 {result.val_accuracy:.2%} "
        f"({result.quantized_layers} layers); checkpoint {result.checkpoint}; then "
        f"'tinyserve export {result.checkpoint} --name NAME' and "
        f"'tinyserve quantize models/NAME --mode static'"
        + ("" if reduce_range else " --no-reduce-range")
    )


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

    student = build_config(
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
    config = build_config(
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
