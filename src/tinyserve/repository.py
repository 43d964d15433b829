"""The model repository: ``<repo>/<name>/<version>/model.onnx`` with an optional config.toml.

Triton's layout: a folder per model, a numbered folder per version. The highest version is
served unless ``config.toml`` pins one (``version = 1``); ``versions = "all"`` or
``versions = [1, 2]`` makes the server load several versions side by side (requests pick
one with ``?version=N``). A ``[batching]`` table overrides the server's batching settings
for this model (``max_batch_size``, ``max_delay_ms``, ``max_queue``, ``timeout_s``). The
rollout keys (``traffic``, ``sticky``, ``shadow``, ``fallback``, ``[canary]``, ``[breaker]``)
are kept as written; ``rollout.RolloutConfig`` reads them. ``runtime`` and ``provider``
choose how this model runs (``engine.RUNTIMES``, ``engine.PROVIDERS``), over the server's.

A version folder holds its model in one or more formats (``FORMATS``): ``model.onnx``, an
OpenVINO IR (``model.xml`` + ``model.bin``) or a LiteRT flat buffer (``model.tflite``). A
version without ``model.onnx`` carries its manifest in ``manifest.json`` (see
``manifest.write_sidecar``), which also names the version's own format and file; the runtime
that serves a version picks the file it reads (``engine.select_file``).

A server may also be given one model instead of a repository (``tinyserve serve --model``):
a model folder, or a single model file. ``model_name`` and ``model_files`` describe either.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tinyserve.errors import ConfigError, ModelError, ModelNotFound

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
MANIFEST_FILE = "manifest.json"  # the manifest of a version without model.onnx
# Each format a version may hold, with its file name; the first present is the version's
# own unless manifest.json names another.
FORMATS = {"onnx": MODEL_FILE, "openvino": "model.xml", "litert": "model.tflite"}
SUFFIXES = {".onnx": "onnx", ".xml": "openvino", ".tflite": "litert"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PARTIAL = ".partial-"  # a version being written (staged_version)
ROLLOUT_KEYS = ("traffic", "sticky", "shadow", "fallback", "canary", "breaker")


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.toml: which version to serve and server-side settings."""

    version: int | None = None
    versions: str | tuple[int, ...] = ()
    # The runtime and ONNX Runtime provider of this model (engine.RUNTIMES, PROVIDERS);
    # None: the server's (--runtime, --provider).
    runtime: str | None = None
    provider: str | None = None
    batching: Mapping[str, Any] = field(default_factory=dict)
    rollout: Mapping[str, Any] = field(default_factory=dict)  # see rollout.RolloutConfig
    # false: never the model behind /predict and /infer unless --default-model names it
    # (a classifier kept for video tracks beside the one that answers images).
    default_candidate: bool = True

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
        if not isinstance(data.get("default_candidate", True), bool):
            raise ConfigError(f"{path}: default_candidate must be true or false")
        for key in ("runtime", "provider"):
            if not isinstance(data.get(key, ""), str):
                raise ConfigError(f"{path}: {key} must be a string, got {data[key]!r}")
        return cls(
            version=version,
            versions=versions if versions == "all" else tuple(versions),
            runtime=data.get("runtime"),
            provider=data.get("provider"),
            batching=batching,
            rollout={key: data[key] for key in ROLLOUT_KEYS if key in data},
            default_candidate=data.get("default_candidate", True),
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
        if p.name.isdigit() and int(p.name) > 0 and _holds_model(p)
    )


def _holds_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in FORMATS.values())


def format_of(path: Path) -> str:
    """The format of a model file, from its suffix."""
    found = SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise ModelError(
            f"{path} is not a model file tinyserve reads (.onnx, OpenVINO .xml or LiteRT .tflite)"
        )
    return found


def version_file(folder: Path) -> Path:
    """The model file of a version folder: the one manifest.json names, else the first of
    ``FORMATS`` present (``model.onnx`` when there is one)."""
    sidecar = folder / MANIFEST_FILE
    if sidecar.is_file():
        try:
            named = json.loads(sidecar.read_text()).get("file")
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelError(f"{sidecar} is not a valid manifest: {exc}") from exc
        if isinstance(named, str) and named in FORMATS.values() and (folder / named).is_file():
            return folder / named
    for name in FORMATS.values():
        if (folder / name).is_file():
            return folder / name
    return folder / MODEL_FILE


def sibling(path: Path, fmt: str) -> Path | None:
    """The file of format ``fmt`` beside ``path`` (in the same version folder), if any."""
    candidate = path if format_of(path) == fmt else path.with_name(FORMATS[fmt])
    return candidate if candidate.is_file() else None


def model_bytes(path: Path) -> int:
    """Bytes on disk of a model: an OpenVINO IR counts its .bin weights with its .xml."""
    size = path.stat().st_size
    weights = path.with_suffix(".bin")
    if path.suffix.lower() == ".xml" and weights.is_file():
        size += weights.stat().st_size
    return size


def next_version(model_dir: Path) -> int:
    """The version after every numbered folder already present (empty ones included)."""
    if not model_dir.is_dir():
        return 1
    taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max(taken, default=0) + 1


def version_path(model_dir: Path, version: int) -> Path:
    return version_file(model_dir / str(version))


class StagedVersion:
    """A new version being written in a hidden folder beside the versions (see
    ``staged_version``); ``path`` is where its model will be once it is in place."""

    def __init__(self, model_dir: Path, version: int, folder: Path, file: str = MODEL_FILE) -> None:
        self.model_dir = model_dir
        self.version = version
        self.folder = folder
        self.final = model_dir / str(version)
        self.path = self.final / file
        self.size = 0

    def save_model(self, model: Any) -> int:
        """Write an ``onnx.ModelProto`` as the version's model; its size in bytes."""
        import onnx

        target = self.folder / MODEL_FILE
        onnx.save(model, str(target))
        self.size = target.stat().st_size
        return self.size

    def write(self, name: str, text: str) -> None:
        (self.folder / name).write_text(text)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model_dir.name, self.version, self.path)


@contextlib.contextmanager
def staged_version(
    model_dir: Path, version: int | None = None, file: str = MODEL_FILE
) -> Iterator[StagedVersion]:
    """Write a new version (next free one by default) all at once, or not at all.

    Everything goes into ``model_dir/.partial-<version>-<pid>/``, which no reader lists; when
    the block ends, that folder is renamed to ``model_dir/<version>`` in one step. A failure
    (a full disk, a bad model) removes it and says so; a process killed meanwhile leaves only
    the hidden folder, which the next write clears away. So a server never finds half a
    version: either the model and its reports are there, or nothing is. ``file`` is the
    name the version's model will have (one of ``FORMATS``).
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_partials(model_dir)
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if _holds_model(final):
        raise ConfigError(f"{final} already holds a model; choose another version")
    folder = model_dir / f"{_PARTIAL}{version}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    staged = StagedVersion(model_dir, version, folder, file)
    try:
        yield staged
        if final.exists():  # an empty folder left by hand: replaced; anything else: refused
            final.rmdir()
        os.rename(folder, final)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ModelError(
            f"cannot write version {version} of {model_dir}: {exc.strerror or exc}; nothing "
            "was added to the repository"
        ) from exc
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def save_version(model_dir: Path, model: Any, version: int | None = None) -> ModelRef:
    """Write an ``onnx.ModelProto`` as ``model_dir/<version>/model.onnx`` (next free version by
    default), all at once (``staged_version``)."""
    with staged_version(model_dir, version) as staged:
        staged.save_model(model)
    return staged.ref


def save_version_with_report(
    model_dir: Path, model: Any, version: int | None, report_file: str, report: dict[str, Any]
) -> tuple[ModelRef, dict[str, Any]]:
    """Write a model and its JSON report as one new version, all at once (``staged_version``);
    the report gains the version's number, path and size."""
    with staged_version(model_dir, version) as staged:
        size = staged.save_model(model)
        report = {**report, "version": staged.version, "path": str(staged.path), "bytes": size}
        staged.write(report_file, json.dumps(report, indent=2) + "\n")
    return staged.ref, report


def _clear_stale_partials(model_dir: Path) -> None:
    for folder in model_dir.glob(f"{_PARTIAL}*"):
        pid = folder.name.rpartition("-")[2]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(target: str | Path, version: int | None = None) -> ModelRef:
    """Find a model file from a model folder, a ``folder:VERSION`` string or a model file.

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
            f"{path} is neither a model file nor a model folder with <version>/{MODEL_FILE} "
            f"(or {FORMATS['openvino']}, {FORMATS['litert']})"
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
    ``[batching]`` of ``NAME/config.toml``; any other model file is version 1.
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
