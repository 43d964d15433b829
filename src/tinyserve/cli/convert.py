"""``tinyserve convert``: a repository version as an OpenVINO IR or a LiteRT model, checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyserve.cli.options import DataDirOption, build_config
from tinyserve.errors import ModelError

app = typer.Typer(
    name="convert",
    help="Convert a model version to another format (OpenVINO IR, LiteRT) as a new version.",
    no_args_is_help=True,
)

ModelDirArgument = Annotated[Path, typer.Argument(help="Model folder (models/NAME).")]
ParentOption = Annotated[
    int | None, typer.Option(help="ONNX version to convert \\[default: the served one].")
]
SamplesOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--samples",
        help="Images (files or folders) of the parity check \\[default: samples/fashion].",
    ),
]
ToleranceOption = Annotated[
    float | None,
    typer.Option(
        help="Largest probability difference from the parent on ONNX Runtime \\[default: "
        "1e-4, or 0.05 with --int8]."
    ),
]
DataOption = Annotated[
    str,
    typer.Option(
        help="Also report top-1 agreement on this test set ('none' to skip; skipped when it "
        "does not fit the model)."
    ),
]
ForceOption = Annotated[
    bool, typer.Option(help="Write the version even if it fails the parity check.")
]


@app.command("openvino")
def openvino(
    model_dir: ModelDirArgument,
    parent: ParentOption = None,
    samples: SamplesOption = None,
    tolerance: ToleranceOption = None,
    data: DataOption = "fashion-mnist",
    data_dir: DataDirOption = None,
    force: ForceOption = False,
) -> None:
    """ONNX -> OpenVINO IR (model.xml + model.bin), served by --runtime openvino (or auto)."""
    _run(model_dir, "openvino", parent, samples, tolerance, data, data_dir, force)


@app.command("litert")
def litert(
    model_dir: ModelDirArgument,
    parent: ParentOption = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="INT8 weights (dynamic range, no calibration).")
    ] = False,
    converter_python: Annotated[
        str | None,
        typer.Option(
            help="A Python with litert-torch (its own environment; see docs/backends.md).",
            envvar="TINYSERVE_LITERT_PYTHON",
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Convert the parent's training checkpoint (its PyTorch ServingModel) instead "
            "of its ONNX graph rebuilt in PyTorch; it must be the one the parent was exported "
            "from."
        ),
    ] = None,
    samples: SamplesOption = None,
    tolerance: ToleranceOption = None,
    data: DataOption = "fashion-mnist",
    data_dir: DataDirOption = None,
    force: ForceOption = False,
) -> None:
    """PyTorch -> LiteRT (model.tflite) with litert-torch, from the version's ONNX graph or
    its checkpoint; served by --runtime litert (or auto)."""
    _run(
        model_dir, "litert", parent, samples, tolerance, data, data_dir, force,
        int8=int8, converter_python=converter_python, checkpoint=checkpoint,
    )  # fmt: skip


def _run(
    model_dir: Path,
    target: str,
    parent: int | None,
    samples: list[Path] | None,
    tolerance: float | None,
    data: str,
    data_dir: Path | None,
    force: bool,
    **options: object,
) -> None:
    from rich.console import Console

    from tinyserve.convert import ConvertConfig, convert

    config = build_config(
        ConvertConfig,
        model_dir=model_dir,
        target=target,
        parent=parent,
        samples=tuple(samples) if samples else (Path("samples/fashion"),),
        tolerance=tolerance,
        data=None if data == "none" else data,
        data_dir=data_dir,
        force=force,
        **options,
    )
    with Console(stderr=True).status(f"converting {model_dir} to {target}"):
        result = convert(config)
    parity = result.parity
    agreement = parity.get("agreement")
    summary = (
        f"parity on {parity['samples']} samples: top-1 "
        f"{'identical' if parity['top1_identical'] else 'DIFFERENT'}, largest probability "
        f"difference {parity['max_abs_probability_diff']:.2e} (tolerance {parity['tolerance']:g})"
        + (
            f"; top-1 agreement {agreement['top1_agreement']:.2%} on {agreement['samples']:,} "
            f"{agreement['dataset']} images"
            if agreement
            else ""
        )
    )
    if result.path is None:
        raise ModelError(f"{summary} - fails the parity check; not written (--force keeps it)")
    note = "" if parity["passed"] else " (forced past the parity check)"
    typer.echo(f"wrote {result.path}{note}; {summary}")
