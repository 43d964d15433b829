"""Classify image files with a local model in process, or through a running server."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tinyserve.classify import EngineRunner, classify_sync, prediction_dicts
from tinyserve.datasets import IMAGE_SUFFIXES
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ConfigError, RemoteError
from tinyserve.repository import resolve
from tinyserve.requests import Upload


def expand_images(paths: Iterable[Path]) -> list[Path]:
    """Files as given, and the image files inside any folder (sorted, recursive)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path} does not exist")
    if not found:
        raise ConfigError("no image files given")
    return found


def predict_files(
    model: str, paths: Iterable[Path], top_k: int = 5, api_key: str | None = None
) -> list[dict[str, Any]]:
    """One result per image: ``{"image", "predictions", "error"}``, in the input order.

    ``model`` is a model folder, ``FOLDER:VERSION`` or .onnx file (run in process), or the
    URL of a server (``http://host:port`` for its default model, or
    ``http://host:port/v1/models/NAME``), which ``api_key`` is sent to.
    """
    if model.startswith(("http://", "https://")):
        return predict_remote(model, expand_images(paths), top_k, api_key)
    ref = resolve(model)
    runner = EngineRunner(Engine(ref.path, EngineConfig(warmup_runs=0)), ref.name, ref.version)
    files = expand_images(paths)
    results: list[dict[str, Any]] = []
    uploads: list[Upload] = []
    for path in files:
        item: dict[str, Any] = {"image": str(path), "model": ref.name, "version": ref.version,
                                "predictions": None, "error": None}  # fmt: skip
        try:
            uploads.append(Upload(str(path), path.read_bytes()))
        except OSError as exc:
            item["error"] = {"code": "io_error", "message": str(exc)}
        results.append(item)
    readable = [r for r in results if r["error"] is None]
    classified = classify_sync(runner, uploads, top_k)
    for result, done in zip(readable, classified.items, strict=True):
        if done.error is not None:
            result["error"] = {"code": done.error.code, "message": done.error.message}
        else:
            assert done.predictions is not None
            result["predictions"] = prediction_dicts(done.predictions)
    return results


def predict_remote(
    url: str, files: list[Path], top_k: int, api_key: str | None = None, retries: int = 3
) -> list[dict[str, Any]]:
    """POST each image's bytes to a tinyserve server (``tinyserve.client``: 503s and
    connection errors are retried with backoff, ``retries`` times at most)."""
    from tinyserve.client import Client

    results: list[dict[str, Any]] = []
    with Client(url, api_key=api_key, retries=retries, timeout=60.0) as client:
        for path in files:
            item: dict[str, Any] = {"image": str(path), "predictions": None, "error": None}
            try:
                body = client.predict(path.read_bytes(), top_k)
            except RemoteError as exc:
                if exc.status is None:
                    raise  # no server to answer the other images either
                item["error"] = {"code": exc.code, "message": exc.message}
            else:
                item.update(model=body["model"], version=body["version"])
                item["predictions"] = [
                    {k: p[k] for k in ("label", "class_id", "confidence")}
                    for p in body["predictions"]
                ]
            results.append(item)
    return results
