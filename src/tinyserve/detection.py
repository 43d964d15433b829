"""Detections: the detector output contract, boxes in source pixels, and mean average precision.

A tinyserve detector (``tinyserve.task = "detect"`` in its manifest) outputs one float32
tensor ``[N, K, 6]`` per batch: ``x1, y1, x2, y2`` as fractions of the input's width and
height, then ``score`` and ``class``; rows are sorted by score and padded with score 0. So a
detector exported elsewhere fits if it writes the same tensor and the same manifest keys.
Because the server stretches frames to the model input, fractions times the source frame's
size are boxes in the source frame's pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tinyserve.errors import ModelError

DETECTIONS_LAYOUT = ("x1", "y1", "x2", "y2", "score", "class")
COCO_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
Boxes = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Detections:
    """One frame's detections in source pixels: ``boxes`` ``[M, 4]`` xyxy, scores, classes."""

    boxes: Boxes
    scores: npt.NDArray[np.float32]
    classes: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.scores)


def from_output(
    rows: npt.NDArray[np.float32], width: int, height: int, min_score: float
) -> Detections:
    """One frame's ``[K, 6]`` output rows -> detections above ``min_score`` in source pixels."""
    if rows.ndim != 2 or rows.shape[1] != len(DETECTIONS_LAYOUT):
        raise ModelError(
            f"a detector must output [N, K, 6] ({', '.join(DETECTIONS_LAYOUT)}); got rows "
            f"shaped {rows.shape}"
        )
    kept = rows[rows[:, 4] >= min_score]
    boxes = kept[:, :4] * np.array([width, height, width, height], dtype=np.float32)
    return Detections(
        boxes.astype(np.float32), kept[:, 4].astype(np.float32), kept[:, 5].astype(np.int64)
    )


def iou_matrix(a: Boxes, b: Boxes) -> npt.NDArray[np.float64]:
    """Pairwise IoU of xyxy boxes ``a`` ``[M, 4]`` and ``b`` ``[N, 4]``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9))


def average_precision(
    predicted: Sequence[tuple[Boxes, npt.NDArray[np.float32]]],
    truth: Sequence[Boxes],
    threshold: float,
    ignored: Sequence[Boxes] | None = None,
) -> float:
    """COCO-style AP (101-point interpolation) of one class at one IoU threshold.

    ``predicted[i]`` is frame i's ``(boxes, scores)``; ``truth[i]`` its ground-truth boxes.
    Each truth box matches at most one prediction, best scores first (greedy, as COCO). A
    prediction that matches no truth box but overlaps one of ``ignored[i]`` (objects left
    mostly hidden) at ``threshold`` counts neither way.
    """
    total = sum(len(t) for t in truth)
    if total == 0:
        return float("nan")
    scores, hits = [], []
    for i, ((boxes, conf), gt) in enumerate(zip(predicted, truth, strict=True)):
        order = np.argsort(-conf, kind="stable")
        ious = iou_matrix(boxes[order], gt)
        hidden = iou_matrix(boxes[order], ignored[i]) if ignored is not None else None
        taken = np.zeros(len(gt), dtype=bool)
        for j, (row, score) in enumerate(zip(ious, conf[order], strict=True)):
            candidates = np.where(~taken & (row >= threshold), row, -1.0)
            best = int(np.argmax(candidates)) if len(row) else -1
            if best >= 0 and candidates[best] >= 0:
                taken[best] = True
                hits.append(1.0)
            elif hidden is not None and hidden.shape[1] and hidden[j].max() >= threshold:
                continue
            else:
                hits.append(0.0)
            scores.append(float(score))
    if not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.cumsum(np.asarray(hits)[order])
    fp = np.cumsum(1.0 - np.asarray(hits)[order])
    recall = tp / total
    precision = tp / np.maximum(tp + fp, 1e-9)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0, 1, 101)
    at = np.searchsorted(recall, points, side="left")
    return float(np.mean([envelope[i] if i < len(envelope) else 0.0 for i in at]))


def mean_average_precision(
    predicted: Sequence[tuple[Boxes, npt.NDArray[np.float32]]],
    truth: Sequence[Boxes],
    thresholds: Sequence[float] = COCO_THRESHOLDS,
    ignored: Sequence[Boxes] | None = None,
) -> float:
    """AP averaged over IoU ``thresholds`` (mAP@0.5 with ``(0.5,)``, else COCO's 0.5:0.95)."""
    return float(np.mean([average_precision(predicted, truth, t, ignored) for t in thresholds]))


def detect_all(
    infer: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]],
    images: npt.NDArray[np.uint8],
    width: int,
    height: int,
    min_score: float = 0.01,
    batch_size: int = 32,
) -> list[Detections]:
    """Run ``infer`` (a detector's ``[N, K, 6]``) over ``images``; boxes in source pixels."""
    found: list[Detections] = []
    for start in range(0, len(images), batch_size):
        for rows in infer(images[start : start + batch_size]):
            found.append(from_output(np.asarray(rows, np.float32), width, height, min_score))
    return found


def score_detections(
    found: Sequence[Detections], truth: Sequence[Boxes], ignored: Sequence[Boxes] | None = None
) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 of ``found`` against ``truth``."""
    predicted = [(d.boxes, d.scores) for d in found]
    return {
        "map50": round(mean_average_precision(predicted, truth, (0.5,), ignored), 6),
        "map50_95": round(mean_average_precision(predicted, truth, COCO_THRESHOLDS, ignored), 6),
    }
