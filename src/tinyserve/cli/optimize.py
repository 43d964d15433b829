"""``tinyserve optimize``: distill, prune, export and quantize in one gated run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyserve.cli.options import DataDirOption, build_config, parse_widths
from tinyserve.errors import ModelError


def optimize(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'tinyserve train'.")],
    name: Annotated[str, typer.Option(help="Repository name for the exported versions.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder for the steps and the report.")],
    repo: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    distill: Annotated[
        str | None,
        typer.Option(help="Distill into this student architecture first (default: no)."),
    ] = None,
    distill_widths: Annotated[
        str | None, typer.Option(help="The student's stage widths, e.g. 16,32,64.")
    ] = None,
    distill_epochs: Annotated[int, typer.Option(min=1)] = 10,
    prune: Annotated[
        str | None, typer.Option(help="channels or magnitude (default: no pruning).")
    ] = None,
    prune_ratio: Annotated[
        float, typer.Option(help="Fraction removed: of each layer's channels, or of all weights.")
    ] = 0.5,
    prune_epochs: Annotated[int, typer.Option(min=1, help="Fine-tuning epochs after pruning.")] = 3,
    quantize: Annotated[
        str, typer.Option(help="static, dynamic, fp16, or none to stop after export.")
    ] = "static",
    max_drop: Annotated[
        float, typer.Option(help="Accuracy points any one step may lose against its input.")
    ] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Train steps on the first N images only (quick trials).")
    ] = None,
    data_dir: DataDirOption = None,
    threads: Annotated[int, typer.Option(help="Torch threads; 0 = all cores given.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Distill -> prune -> export -> quantize, each step optional and gated; writes a report
    of every step's size, accuracy and speed to OUT/OPTIMIZE.md and OUT/optimize_report.json."""
    from rich.console import Console
    from rich.markdown import Markdown

    from tinyserve.training.optimize import REPORT_FILE, OptimizeConfig
    from tinyserve.training.optimize import optimize as run

    config = build_config(
        OptimizeConfig,
        checkpoint=checkpoint,
        out=out,
        name=name,
        repo=repo,
        distill_arch=distill,
        distill_widths=parse_widths(distill_widths),
        distill_epochs=distill_epochs,
        prune=prune,
        prune_ratio=prune_ratio,
        prune_epochs=prune_epochs,
        quantize=None if quantize == "none" else quantize,
        max_drop=max_drop,
        batch_size=batch_size,
        max_train_samples=max_train_samples,
        data_dir=data_dir,
        threads=threads,
    )
    report = run(config, progress=progress)
    Console().print(Markdown(report.to_markdown()))
    if not report.passed:
        raise ModelError(
            f"the {report.stopped_at} step failed its gate (see {out / REPORT_FILE}); "
            "the steps before it are kept"
        )
    typer.echo(f"report {out / 'OPTIMIZE.md'}")
