"""Export a detector checkpoint to a tinyserve ONNX detector, and prove it matches PyTorch.

As for classifiers: a uint8 NHWC frame in, preprocessing in the graph; here box decoding and
peak suppression too (``detect.DetectionModel``), so the file outputs the ``[N, K, 6]``
detections of ``detection.py``. The manifest declares ``task = "detect"`` and the output
contract. Every export runs ``onnx.checker`` and compares ONNX Runtime with PyTorch on real
scene frames at the exported size.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from tinyserve import __version__
from tinyserve.detection import DETECTIONS_LAYOUT, detect_all, score_detections
from tinyserve.engine import Engine, EngineConfig
from tinyserve.errors import ModelError
from tinyserve.manifest import InputSpec, Manifest, write_manifest
from tinyserve.repository import save_version, validate_name
from tinyserve.scene_data import LabelledFrames, load_test_frames
from tinyserve.training.detect import (
    DetectionModel,
    build_detector,
    load_detector_checkpoint,
    load_scene_frames,
)
from tinyserve.training.export import to_onnx

INPUT_NAME = "frames"
OUTPUT_NAME = "detections"


@dataclass(frozen=True)
class DetectExportConfig:
    checkpoint: Path
    name: str
    data: Path  # scene frames for the parity check (tinyserve data scenes --out)
    width: int = 320
    height: int = 240
    repo: Path = Path("models")
    version: int | None = None
    max_detections: int = 100
    parity_frames: int = 64
    val_frames: int = 200  # the training run's validation frames come first
    parity_tolerance: float = 1e-4
    opset: int = 17

    def __post_init__(self) -> None:
        if self.width % 16 or self.height % 16:
            raise ValueError(f"input size must be a multiple of 16, got {self.width}x{self.height}")


def output_contract(max_detections: int) -> dict[str, Any]:
    return {
        OUTPUT_NAME: {
            "shape": ["N", max_detections, len(DETECTIONS_LAYOUT)],
            "layout": list(DETECTIONS_LAYOUT),
            "coordinates": "fractions of the input width and height",
            "order": "score descending, padded with score 0",
        },
        "max_detections": max_detections,
    }


def export_detector(config: DetectExportConfig) -> tuple[Path, dict[str, Any]]:
    """Write ``repo/name/<version>/model.onnx`` at ``width`` x ``height`` once parity holds."""
    import onnx
    import onnxslim

    validate_name(config.name)
    started = time.perf_counter()
    state = load_detector_checkpoint(config.checkpoint)
    model = build_detector(state, config.max_detections)
    meta = state["meta"]
    spec = InputSpec(config.height, config.width, 3, "RGB", "stretch")
    frames = load_scene_frames(
        config.data, config.width, config.height, limit=config.parity_frames
    ).images
    onnx_model = onnxslim.slim(to_onnx(model, spec, config.opset, INPUT_NAME, OUTPUT_NAME))
    onnx.checker.check_model(onnx_model, full_check=True)
    manifest = Manifest(
        labels=tuple(meta["labels"]),
        input=spec,
        source={
            "architecture": meta["arch"],
            "dataset": meta["dataset"],
            "run_id": meta["run_id"],
            "epoch": meta["epoch"],
            "val_map50": round(float(meta["val_map50"]), 6),
            "val_map50_95": round(float(meta["val_map50_95"]), 6),
            "train_size": meta["train_size"],
            "mean": meta["mean"],
            "std": meta["std"],
            "parameters": meta["parameters"],
            "checkpoint_sha256": hashlib.sha256(config.checkpoint.read_bytes()).hexdigest(),
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tinyserve_version": __version__,
        },
        task="detect",
        outputs=output_contract(config.max_detections),
    )
    write_manifest(onnx_model, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        onnx.save(onnx_model, str(candidate))
        parity = check_parity(model, candidate, frames, config.parity_tolerance)
        engine = Engine(candidate, EngineConfig(warmup_runs=0))
        held_out = _held_out(config)
        found = detect_all(engine.infer, held_out.images, held_out.width, held_out.height)
        accuracy = score_detections(found, held_out.boxes, held_out.ignored)
    # mAP@0.5 at this input size, on the frames the quantize gate scores its candidates on
    write_manifest(onnx_model, manifest.with_source(parity=parity, **accuracy))
    saved = save_version(config.repo / config.name, onnx_model, config.version)
    report = {
        "model": config.name,
        "version": saved.version,
        "path": str(saved.path),
        "bytes": saved.path.stat().st_size,
        "input": [config.height, config.width],
        "parity": parity,
        **accuracy,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (saved.path.parent / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return saved.path, report


def _held_out(config: DetectExportConfig) -> LabelledFrames:
    """The test videos (every third frame, as the quantize gate reads them) when the scenes
    folder has them, else the training run's validation frames (in input pixels)."""
    if any((config.data / "test").glob("*/video.mp4")):
        return load_test_frames(config.data, config.width, config.height, every=3)
    return load_scene_frames(config.data, config.width, config.height, limit=config.val_frames)


def check_parity(
    model: DetectionModel, path: Path, frames: npt.NDArray[np.uint8], tolerance: float
) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on ``frames``; raises when they differ beyond ``tolerance``.

    The top-K scores (those above 0.1) must agree rank by rank. Boxes and classes are
    compared for detections whose score stands apart from every other one in the frame
    (more than ``tolerance``): peaks of equal score may come out of TopK in either order,
    so their rows may swap.
    """
    engine = Engine(path, EngineConfig(warmup_runs=0))
    with torch.no_grad():
        expected = model(torch.from_numpy(frames)).numpy()
    got = np.concatenate([engine.infer(frames[i : i + 16]) for i in range(0, len(frames), 16)])
    # Rank by rank, over the detections worth reporting: below 0.1 a flat heatmap (an
    # untrained or empty region) has plateaus where either side's max-pool may keep a
    # different cell of equal score.
    want, have = expected[:, :, 4], got[:, :, 4]
    worth = (want >= 0.1) | (have >= 0.1)
    score_diff = float(np.abs(want - have)[worth].max(initial=0.0))
    compared, box_diff = 0, 0.0
    for want, have in zip(expected, got, strict=True):
        gaps = np.abs(want[:, None, 4] - want[None, :, 4]) + np.eye(len(want)) * 1e9
        apart = gaps.min(axis=1) > tolerance
        diff = np.abs(want[apart, None, :4] - have[None, :, :4]).max(axis=2)
        diff[want[apart, None, 5] != have[None, :, 5]] = np.inf
        diff[np.abs(want[apart, None, 4] - have[None, :, 4]) > tolerance] = np.inf
        if len(diff):
            compared += len(diff)
            box_diff = max(box_diff, float(diff.min(axis=1).max()))
    result = {
        "frames": len(frames),
        "max_abs_score_diff": score_diff,
        "boxes_compared": compared,
        "max_abs_box_diff": box_diff,
        "tolerance": tolerance,
    }
    if score_diff > tolerance or box_diff > tolerance:
        raise ModelError(
            f"ONNX Runtime disagrees with PyTorch on the detector over {len(frames)} frames: "
            f"max |score diff| {score_diff:.2e}, max |box diff| {box_diff:.2e} on {compared} "
            f"boxes (limit {tolerance:.0e})"
        )
    return result
