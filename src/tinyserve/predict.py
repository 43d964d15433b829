"""Classify image files with a local model, in process (``tinyserve predict``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve.datasets import IMAGE_SUFFIXES
from tinyserve.engine import Engine, EngineConfig, softmax, top_predictions
from tinyserve.errors import ConfigError, InputError
from tinyserve.imaging import Pixels, load_image
from tinyserve.repository import resolve

CHUNK = 64


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
    """One result per image: ``{"image", "predictions", "error"}``, in the input order."""
    ref = resolve(model)
    engine = Engine(ref.path, EngineConfig(warmup_runs=0))
    files = expand_images(paths)
    results: list[dict[str, Any]] = [
        {
            "image": str(p),
            "model": ref.name,
            "version": ref.version,
            "predictions": None,
            "error": None,
        }
        for p in files
    ]
    decoded: list[tuple[int, Pixels]] = []
    for i, path in enumerate(files):
        try:
            decoded.append((i, load_image(path, engine.manifest.input)))
        except (InputError, OSError) as exc:
            code = getattr(exc, "code", "io_error")
            results[i]["error"] = {"code": code, "message": str(exc)}
    for start in range(0, len(decoded), CHUNK):
        chunk = decoded[start : start + CHUNK]
        batch = np.stack([pixels for _, pixels in chunk])
        ranked = top_predictions(softmax(engine.infer(batch)), engine.labels, top_k)
        for (i, _), preds in zip(chunk, ranked, strict=True):
            results[i]["predictions"] = [asdict(p) for p in preds]
    return results
