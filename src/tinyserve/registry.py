"""The models a server has loaded: load and warm, look up, hot-swap, drain.

The repository (``repository.py``) says what is on disk; this registry holds what is in
memory: for each model name, the versions being served, each with its engine and batcher.
A reload builds the new version beside the old one, warms it, swaps the dictionary entry in
one step, and only then drains the old batcher, so requests in flight finish on the version
they started on (or, if they had not reached its queue yet, on its successor) and a version
that fails to load never replaces a working one.

Given ``model_path``, the registry serves that one model (a folder or an .onnx file) instead
of the repository; given ``labels_path``, the default model's class names are replaced by the
file's, once their count is checked against the model's outputs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve.batcher import BatchConfig, Batcher, BatchTiming, Ticket
from tinyserve.engine import Engine, EngineConfig, Logits
from tinyserve.errors import ConfigError, ModelError, ModelNotFound, ModelNotReady
from tinyserve.imaging import Pixels
from tinyserve.manifest import Manifest, read_labels
from tinyserve.metrics import Metrics
from tinyserve.repository import ModelConfig, discover, model_files, model_name
from tinyserve.rollout import RolloutConfig

log = logging.getLogger("tinyserve")


@dataclass
class LoadedModel:
    """One served version: its engine, its batcher and when it was loaded."""

    name: str
    version: int
    path: Path
    engine: Engine
    batcher: Batcher
    loaded_at: float = field(default_factory=time.time)
    successor: LoadedModel | None = None  # what a reload put in this version's place
    # The model file's and class names' hash: the result cache's key for this version, so
    # that a reload with another file never finds the answers of the old one.
    fingerprint: str = ""

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest

    def live(self) -> LoadedModel:
        """This version, or what replaced it if a reload retired it meanwhile.

        A request looks its model up before reading and decoding its body; a reload in
        between retires that version. Handlers call this just before submitting, with no
        await in between, so such a request runs on the successor instead of failing.
        """
        model = self
        while model.batcher.closing and model.successor is not None:
            model = model.successor
        if model is not self and model.manifest.input != self.manifest.input:
            raise ModelNotReady(
                f"{self.name} was reloaded with a different input while this request was "
                "being read; send it again"
            )
        return model

    async def infer_one(
        self, pixels: Pixels, timeout_s: float | None = None, ticket: Ticket | None = None
    ) -> tuple[Logits, BatchTiming]:
        return await self.batcher.submit(pixels, timeout_s, ticket)

    async def infer_many(
        self, images: list[Pixels], timeout_s: float | None = None, ticket: Ticket | None = None
    ) -> list[tuple[Logits, BatchTiming]]:
        return await self.batcher.submit_many(images, timeout_s, ticket)

    def describe(self) -> dict[str, Any]:
        spec = self.manifest.input
        return {
            "version": self.version,
            "path": str(self.path),
            "state": "ready",
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.engine.load_seconds, 4),
            "runtime": self.engine.describe(),
            "input": {
                "name": self.engine.input_name,
                "dtype": "uint8",
                "shape": [-1, spec.height, spec.width, spec.channels],
                "color": spec.color,
                "resize": spec.resize,
            },
            "batching": {
                "max_batch_size": self.batcher.config.max_batch_size,
                "max_delay_ms": self.batcher.config.max_delay_ms,
                "max_queue": self.batcher.config.max_queue,
                "timeout_s": self.batcher.config.timeout_s,
                # The largest batch run: max_batch_size, or the best size learned at warm-up.
                "batch_limit": self.batcher.batch_limit,
                "throughput_curve": {str(n): round(v, 1) for n, v in self.batcher.curve.items()},
            },
            "num_classes": self.manifest.num_classes,
            "labels": list(self.manifest.labels),
            "source": dict(self.manifest.source),
        }


@dataclass
class _Entry:
    default: int
    versions: dict[int, LoadedModel]
    rollout: RolloutConfig | None = None
    default_candidate: bool = True


class ModelRegistry:
    """Loaded models by name; the first (or configured) one is the default model."""

    def __init__(
        self,
        repo: Path,
        engine_config: EngineConfig | None = None,
        batch_config: BatchConfig | None = None,
        metrics: Metrics | None = None,
        default_model: str | None = None,
        *,
        model_path: Path | None = None,
        labels_path: Path | None = None,
    ) -> None:
        self.repo = repo
        self.engine_config = engine_config or EngineConfig()
        self.batch_config = batch_config or BatchConfig()
        self.metrics = metrics or Metrics()
        self.model_path = model_path
        self.labels_path = labels_path
        self._default_name = default_model
        self._models: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._labels: tuple[str, tuple[str, ...]] | None = None  # (model, class names)
        # Old batchers draining after a reload: the loop keeps only weak references to
        # tasks, so without this set one could be collected before it finishes.
        self._closing: set[asyncio.Task[None]] = set()
        self.errors: dict[str, str] = {}
        self.ready = False
        self.with_rollouts = False  # any model has a rollout in its config.toml

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    @property
    def default_name(self) -> str:
        if self._default_name is not None:
            return self._default_name
        if len(self._models) == 1:
            return next(iter(self._models))
        if not self._models:
            raise ModelNotReady("no model is loaded")
        # A classifier beside detectors: the seed routes (/predict, /infer) classify. One
        # whose config.toml says default_candidate = false (kept for video tracks) does not
        # count.
        classifiers = [
            name
            for name, entry in self._models.items()
            if entry.versions[entry.default].manifest.task == "classify" and entry.default_candidate
        ]
        if len(classifiers) == 1:
            return classifiers[0]
        raise ModelNotFound(
            f"several models are served ({', '.join(self.names)}); name one in the path "
            "(/v1/models/NAME/predict) or start the server with --default-model"
        )

    def on_disk(self) -> dict[str, Path]:
        """What can be loaded, by name: the repository's model folders, or the one model."""
        if self.model_path is None:
            return discover(self.repo)
        if not self.model_path.exists():
            raise ConfigError(f"the model {self.model_path} (--model, MODEL_PATH) does not exist")
        return {model_name(self.model_path): self.model_path}

    async def load_all(self) -> None:
        """Load every model in the repository; failures are recorded, not raised."""
        folders = self.on_disk()
        where = self.model_path or self.repo
        if self._default_name is not None and self._default_name not in folders:
            raise ConfigError(
                f"--default-model {self._default_name!r} is not in {where} "
                f"(found: {', '.join(folders) or 'nothing'})"
            )
        if self.labels_path is not None:
            relabelled = self._default_name or (next(iter(folders)) if len(folders) == 1 else None)
            if relabelled is None:
                raise ConfigError(
                    f"--labels replaces the class names of one model, but {where} holds "
                    f"several ({', '.join(folders)}); pick one with --default-model"
                )
            self._labels = (relabelled, read_labels(self.labels_path))
        for name in folders:
            try:
                await self.load(name)
            except (ModelError, ConfigError) as exc:
                self.errors[name] = exc.message
                log.error("model %s failed to load: %s", name, exc.message)
        self.ready = True

    def get(self, name: str | None = None, version: int | None = None) -> LoadedModel:
        """The served version of ``name`` (the default model when None)."""
        name = name or self.default_name
        entry = self._models.get(name)
        if entry is None:
            if name in self.errors:
                raise ModelNotReady(f"model {name!r} failed to load: {self.errors[name]}")
            known = ", ".join(self.names) or "none"
            raise ModelNotFound(f"no model named {name!r} is served (served: {known})")
        chosen = entry.default if version is None else version
        loaded = entry.versions.get(chosen)
        if loaded is None:
            served = ", ".join(map(str, sorted(entry.versions)))
            raise ModelNotFound(f"model {name!r} has no served version {chosen} (served: {served})")
        return loaded

    def rollout(self, name: str) -> tuple[RolloutConfig, int] | None:
        """The rollout configuration of ``name`` and its default version, if it has one."""
        entry = self._models.get(name)
        if entry is None or entry.rollout is None:
            return None
        return entry.rollout, entry.default

    def versions(self, name: str) -> list[LoadedModel]:
        self.get(name)  # raises the right error for unknown or failed models
        return [v for _, v in sorted(self._models[name].versions.items())]

    async def load(self, name: str) -> list[LoadedModel]:
        """(Re)load ``name`` from disk; on success swap it in, else keep what was served."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            source = self._source(name)
            config, files = model_files(source)
            if not files:
                raise ModelNotFound(f"{source} holds no <version>/model.onnx (or another format)")
            rollout = RolloutConfig.parse(config.rollout, f"{source}/config.toml")
            wanted = _versions_to_serve(config, sorted(files), source, rollout)
            if rollout is not None and rollout.fallback is not None:
                other, version = rollout.fallback
                if other == name and version in files and version not in wanted:
                    wanted = sorted({*wanted, version})  # a fallback to another version
            default = config.version or max(wanted)
            if rollout is not None and rollout.canary is not None and not config.version:
                # A canary is not the default: unpinned requests reach it through its ramp.
                default = max((v for v in wanted if v != rollout.canary.version), default=default)
            batching = _batch_config(self.batch_config, config.batching, source)
            old = self._models.get(name)
            fresh: dict[int, LoadedModel] = {}
            try:
                engine_config = _engine_config(self.engine_config, config, source)
                for version in wanted:
                    fresh[version] = await self._load_version(
                        name, version, files[version], batching, engine_config
                    )
            except BaseException:
                for loaded in fresh.values():
                    await loaded.batcher.close(0)
                raise
            self._models[name] = _Entry(default, fresh, rollout, config.default_candidate)
            self.with_rollouts = any(e.rollout is not None for e in self._models.values())
            self.errors.pop(name, None)
            for loaded in fresh.values():
                self.metrics.model_loaded.labels(name, str(loaded.version)).set(1)
            self.metrics.model_load_seconds.labels(name).set(fresh[default].engine.load_seconds)
            if old is not None:
                for version, loaded in old.versions.items():
                    loaded.successor = fresh.get(version, fresh[default])
                    if version not in fresh:
                        self.metrics.model_loaded.labels(name, str(version)).set(0)
                    task = asyncio.get_running_loop().create_task(_retire(loaded))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
            log.info("serving %s versions %s (default %d)", name, sorted(fresh), default)
            return list(fresh.values())

    async def unload(self, name: str) -> None:
        entry = self._models.pop(name, None)
        if entry is None:
            raise ModelNotFound(f"no model named {name!r} is served")
        self.with_rollouts = any(e.rollout is not None for e in self._models.values())
        for version, loaded in entry.versions.items():
            self.metrics.model_loaded.labels(name, str(version)).set(0)
            await loaded.batcher.close()

    async def reload_all(self) -> dict[str, str | None]:
        """Reload every model on disk; returns each model's error, or None."""
        results: dict[str, str | None] = {}
        for name in self.on_disk():
            try:
                await self.load(name)
                results[name] = None
            except (ModelError, ConfigError) as exc:
                results[name] = exc.message
        return results

    async def close(self, drain_timeout: float = 10.0) -> None:
        batchers = [v.batcher for e in self._models.values() for v in e.versions.values()]
        await asyncio.gather(*(b.close(drain_timeout) for b in batchers))
        self._models.clear()
        self.ready = False

    def _source(self, name: str) -> Path:
        """The folder (or, for ``--model``, the file) that ``name`` loads from."""
        if self.model_path is None:
            return self.repo / name
        if name != model_name(self.model_path):
            raise ModelNotFound(
                f"only {model_name(self.model_path)!r} is served (from {self.model_path})"
            )
        return self.model_path

    async def _load_version(
        self, name: str, version: int, path: Path, batching: BatchConfig, config: EngineConfig
    ) -> LoadedModel:
        engine = await asyncio.to_thread(Engine, path, config)
        path = engine.path  # the file its runtime reads
        if self._labels is not None and self._labels[0] == name:
            engine.manifest = _relabel(engine.manifest, self._labels[1], self.labels_path, path)
        label = f"{name}:{version}"
        observer = self.metrics.batch_observer(name, version)
        batcher = Batcher(engine.infer, batching, label, observer)
        batcher.start()
        # Warm the inference thread itself: the first run on a new thread is slow.
        pixels = np.zeros(engine.manifest.input.shape, dtype=np.uint8)
        await batcher.warmup(pixels)
        if batching.learn_batch_size:
            size = await batcher.learn_batch_size(pixels)
            curve = ", ".join(f"{n}: {ips:,.0f}" for n, ips in batcher.curve.items())
            log.info("%s batches up to %d (images/s by batch size: %s)", label, size, curve)
        fingerprint = await asyncio.to_thread(_fingerprint, path, engine.manifest.labels)
        return LoadedModel(name, version, path, engine, batcher, fingerprint=fingerprint)


def _fingerprint(path: Path, labels: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    weights = path.with_suffix(".bin")  # an OpenVINO IR's
    for part in (path, weights) if path.suffix == ".xml" and weights.is_file() else (path,):
        with part.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    digest.update("\0".join(labels).encode())
    return digest.hexdigest()


def _relabel(
    manifest: Manifest, labels: tuple[str, ...], labels_path: Path | None, model: Path
) -> Manifest:
    if len(labels) != manifest.num_classes:
        raise ConfigError(
            f"{labels_path} has {len(labels)} class names but {model} has "
            f"{manifest.num_classes} classes; give one name per class, in class-index order"
        )
    return replace(manifest, labels=labels).with_source(labels_file=str(labels_path))


def _versions_to_serve(
    config: ModelConfig, available: list[int], folder: Path, rollout: RolloutConfig | None
) -> list[int]:
    if rollout is not None:
        missing = sorted(rollout.versions - set(available))
        if missing:
            raise ModelNotFound(
                f"{folder}/config.toml routes requests to versions {missing}, which do not exist"
            )
        served = set(_versions_to_serve(config, available, folder, None))
        return sorted(served | rollout.versions)
    if isinstance(config.versions, str):  # "all"
        return available
    if config.versions:
        missing = sorted(set(config.versions) - set(available))
        if missing:
            raise ModelNotFound(f"{folder}/config.toml lists versions {missing} that do not exist")
        return sorted(config.versions)
    chosen = config.version or available[-1]
    if chosen not in available:
        raise ModelNotFound(f"{folder}/config.toml pins version {chosen}, which does not exist")
    return [chosen]


def _engine_config(base: EngineConfig, config: ModelConfig, folder: Path) -> EngineConfig:
    """The server's engine settings with this model's own runtime and provider, if any."""
    try:
        return replace(
            base,
            runtime=config.runtime or base.runtime,
            provider=config.provider or base.provider,
        )
    except ValueError as exc:
        raise ConfigError(f"{folder}/config.toml: {exc}") from exc


def _batch_config(base: BatchConfig, overrides: Mapping[str, Any], folder: Path) -> BatchConfig:
    known = {f.name for f in fields(BatchConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"{folder}/config.toml [batching] has unknown keys {unknown}; known: {sorted(known)}"
        )
    try:
        return replace(base, **overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{folder}/config.toml [batching]: {exc}") from exc


async def _retire(loaded: LoadedModel) -> None:
    """Drain and close a replaced version, then give what its session held back to the
    system: glibc keeps freed memory for reuse, and each reload's session (weights and
    ONNX Runtime's arena) would otherwise leave the server a little larger."""
    await loaded.batcher.close()
    del loaded  # the last reference once its requests are answered
    await asyncio.sleep(0)
    await asyncio.to_thread(release_freed_memory)


def release_freed_memory() -> bool:
    """``malloc_trim(0)`` where the C library is glibc: freed heap pages go back to the
    system. False elsewhere (nothing to do)."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


@functools.cache
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
