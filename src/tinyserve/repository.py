"""The model repository: ``<repo>/<name>/<version>/model.onnx`` with an optional config.toml.

Triton's layout: a folder per model, a numbered folder per version. The highest version is
served unless ``config.toml`` pins one (``version = 1``); ``versions = "all"`` or
``versions = [1, 2]`` makes the server load several versions side by side (requests pick
one with ``?version=N``). A ``[batching]`` table overrides the server's batching settings
for this model (``max_batch_size``, ``max_delay_ms``, ``max_queue``, ``timeout_s``). The
rollout keys (``traffic``, ``sticky``, ``shadow``, ``fallback``, ``[canary]``, ``[breaker]``)
are kept as written; ``rollout.RolloutConfig`` reads them.

A server may also be given one model instead of a repository (``tinyserve serve --model``):
a model folder, or a single .onnx file. ``model_name`` and ``model_files`` describe either.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tinyserve.errors import ConfigError, ModelNotFound

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ROLLOUT_KEYS = ("traffic", "sticky", "shadow", "fallback", "canary", "breaker")


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.toml: which version to serve and server-side settings."""

    version: int | None = None
    versions: str | tuple[int, ...] = ()
    batching: Mapping[str, Any] = field(default_factory=dict)
    rollout: Mapping[str, Any] = field(default_factory=dict)  # see rollout.RolloutConfig

    @classmethod
    def read(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        version = data.get("version")
        if version is not None and (not isinstance(version, int) or version < 1):
            raise ConfigError(f"{path}: version must be a positive integer, got {version!r}")
        versions = data.get("versions", ())
        if versions != "all" and not (
            isinstance(versions, list | tuple)
            and all(isinstance(v, int) and v > 0 for v in versions)
        ):
            raise ConfigError(f'{path}: versions must be "all" or a list of version numbers')
        batching = data.get("batching", {})
        if not isinstance(batching, dict):
            raise ConfigError(f"{path}: [batching] must be a table")
        return cls(
            version=version,
            versions=versions if versions == "all" else tuple(versions),
            batching=batching,
            rollout={key: data[key] for key in ROLLOUT_KEYS if key in data},
        )


@dataclass(frozen=True)
class ModelRef:
    """One version of one model on disk."""

    name: str
    version: int
    path: Path


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"model name {name!r} must start with a letter or digit and use only letters, "
            "digits, '.', '_' and '-'"
        )
    return name


def list_versions(model_dir: Path) -> list[int]:
    """Versions under ``model_dir`` that hold a model file, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.name.isdigit() and int(p.name) > 0 and (p / MODEL_FILE).is_file()
    )


def next_version(model_dir: Path) -> int:
    """The version after every numbered folder already present (empty ones included)."""
    if not model_dir.is_dir():
        return 1
    taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max(taken, default=0) + 1


def version_path(model_dir: Path, version: int) -> Path:
    return model_dir / str(version) / MODEL_FILE


def save_version(model_dir: Path, model: Any, version: int | None = None) -> ModelRef:
    """Write an ``onnx.ModelProto`` as ``model_dir/<version>/model.onnx`` (next free version by
    default), through a temporary file so a reader never sees half a model."""
    import onnx

    version = version or next_version(model_dir)
    path = version_path(model_dir, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(partial))
    partial.replace(path)
    return ModelRef(model_dir.name, version, path)


def resolve(target: str | Path, version: int | None = None) -> ModelRef:
    """Find a model file from a model folder, a ``folder:VERSION`` string or an .onnx path.

    Without ``version`` the folder's pinned version (config.toml) or its highest is used.
    """
    text = str(target)
    if version is None and ":" in text:
        head, _, tail = text.rpartition(":")
        if tail.isdigit():
            text, version = head, int(tail)
    path = Path(text)
    if path.is_file():
        if version is not None:
            raise ConfigError(f"{path} is a model file; a version applies only to a model folder")
        name = path.parent.parent.name if path.parent.name.isdigit() else path.stem
        ver = int(path.parent.name) if path.parent.name.isdigit() else 1
        return ModelRef(name, ver, path)
    versions = list_versions(path)
    if not versions:
        raise ModelNotFound(
            f"{path} is neither an .onnx file nor a model folder with <version>/{MODEL_FILE}"
        )
    chosen = version or ModelConfig.read(path).version or versions[-1]
    if chosen not in versions:
        raise ModelNotFound(
            f"model {path.name!r} has no version {chosen}; available: "
            f"{', '.join(map(str, versions))}"
        )
    return ModelRef(path.name, chosen, version_path(path, chosen))


def model_name(path: Path) -> str:
    """The name one model path is served under: the model folder's (``NAME`` for
    ``NAME/`` and ``NAME/3/model.onnx``), else the file's stem."""
    if path.is_file():
        name = path.parent.parent.name if path.parent.name.isdigit() else path.stem
    else:
        name = path.resolve().name
    return validate_name(name)


def model_files(source: Path) -> tuple[ModelConfig, dict[int, Path]]:
    """A model's config.toml and its model file per version, from its folder or one file.

    A file in a version folder (``NAME/3/model.onnx``) is that version alone, with the
    ``[batching]`` of ``NAME/config.toml``; any other .onnx file is version 1.
    """
    if source.is_file():
        if not (source.parent.name.isdigit() and int(source.parent.name) > 0):
            return ModelConfig(), {1: source}
        version = int(source.parent.name)
        config = replace(ModelConfig.read(source.parent.parent), version=version, versions=())
        return config, {version: source}
    config = ModelConfig.read(source)
    return config, {v: version_path(source, v) for v in list_versions(source)}


def discover(repo: Path) -> dict[str, Path]:
    """Model folders in ``repo`` (those with at least one version), by name."""
    if not repo.is_dir():
        raise ConfigError(f"model repository {repo} does not exist")
    return {
        p.name: p
        for p in sorted(repo.iterdir())
        if p.is_dir() and _NAME.match(p.name) and list_versions(p)
    }
