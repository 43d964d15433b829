"""Classify image files with a local model in process, or through a running server."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tinyserve.classify import EngineRunner, classify_sync, prediction_dicts
from tinyserve.datasets import IMAGE_SUFFIXES
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ConfigError
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


def predict_files(model: str, paths: Iterable[Path], top_k: int = 5) -> list[dict[str, Any]]:
    """One result per image: ``{"image", "predictions", "error"}``, in the input order.

    ``model`` is a model folder, ``FOLDER:VERSION`` or .onnx file (run in process), or the
    URL of a server (``http://host:port`` for its default model, or
    ``http://host:port/v1/models/NAME``).
    """
    if model.startswith(("http://", "https://")):
        return predict_remote(model, expand_images(paths), top_k)
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


def predict_remote(url: str, files: list[Path], top_k: int) -> list[dict[str, Any]]:
    """POST each image's bytes to a tinyserve server."""
    import httpx

    base = url.rstrip("/")
    endpoint = base if base.endswith("/predict") else f"{base}/predict"
    results: list[dict[str, Any]] = []
    with httpx.Client(timeout=60.0) as client:
        for path in files:
            item: dict[str, Any] = {"image": str(path), "predictions": None, "error": None}
            try:
                response = client.post(
                    endpoint,
                    content=path.read_bytes(),
                    params={"top_k": top_k},
                    headers={"content-type": "application/octet-stream"},
                )
            except httpx.HTTPError as exc:
                raise ConfigError(f"cannot reach {endpoint}: {exc}") from exc
            body = _json_or_none(response)
            if response.status_code == 200 and body is not None:
                item.update(model=body["model"], version=body["version"])
                item["predictions"] = [
                    {k: p[k] for k in ("label", "class_id", "confidence")}
                    for p in body["predictions"]
                ]
            else:
                error = (body or {}).get("error") or {}
                item["error"] = {
                    "code": error.get("code", f"http_{response.status_code}"),
                    "message": error.get("message", response.text[:200]),
                }
            results.append(item)
    return results


def _json_or_none(response: Any) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
