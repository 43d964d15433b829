"""What several command families share: the dataset options and the config builder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import typer

from tinyserve.errors import ConfigError

_T = TypeVar("_T")

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
        help="Where the Fashion-MNIST IDX files are "
        "\\[default: /usr/share/datasets/fashion-mnist].",
        envvar="TINYSERVE_DATA_DIR",
    ),
]


def build_config(cls: type[_T], **values: object) -> _T:
    """Build a config dataclass, turning its validation errors into one-line CLI errors."""
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def parse_widths(text: str | None) -> tuple[int, ...] | None:
    """Stage widths from "32,64,112" (None stays None: the architecture's default)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--widths takes comma-separated integers, e.g. 32,64,112; got {text!r}"
        ) from None
