"""The ``tinyserve`` command line: thin subcommands over the library, one module per family.

``train`` (train, export, import), ``compress`` (prune, distill, qat), ``optimize`` (the one-command
pipeline), ``models`` (evaluate, quantize, predict), ``serve``, ``bench``, ``convert``
(OpenVINO IR, LiteRT), ``keys`` (API keys), ``pull`` (S3 into a folder), ``monitor`` (a live
view of servers), and ``video`` (video, data scenes, bench video).
Heavy imports (torch, onnxruntime, uvicorn) happen inside each command, so ``--help`` is fast
and ``serve`` never imports torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tinyserve import __version__
from tinyserve.cli import (
    bench,
    compress,
    convert,
    keys,
    models,
    monitor,
    optimize,
    pull,
    serve,
    train,
    video,
)
from tinyserve.errors import TinyServeError

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


app.command()(train.train)
app.command()(train.export)
app.command()(models.evaluate)
app.command()(models.predict)
app.command()(serve.serve)
app.command()(models.quantize)
app.command()(compress.prune)
app.command()(compress.distill)
app.command()(compress.qat)
app.command()(optimize.optimize)
app.command("import")(train.import_model)
app.command()(pull.pull)
app.command()(monitor.monitor)
app.command()(video.video)
app.add_typer(video.data_app)
bench.app.command("video")(video.bench_video)
app.add_typer(bench.app)
app.add_typer(keys.app)
app.add_typer(convert.app)


def main() -> None:
    """Console entry point: run the app and turn tinyserve errors into one-line messages."""
    try:
        app()
    except TinyServeError as exc:
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


__all__ = ["app", "main"]
