"""Reading a scenes dataset (what ``tinyserve data scenes`` wrote, see ``scenes``).

``read_gt`` reads a sequence's MOTChallenge ground truth; ``load_train_frames`` and
``load_test_frames`` give frames at a model's input size with their boxes in source
pixels, for training, the quantize gate and ``tinyserve bench video``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from tinyserve.errors import DatasetError


def read_gt(path: Path) -> dict[int, list[tuple[int, int, float, float, float, float, float]]]:
    """A MOT ground-truth file as ``{frame: [(track, class, left, top, w, h, visibility)]}``."""
    rows: dict[int, list[tuple[int, int, float, float, float, float, float]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        f, t, x, y, w, h, _conf, c, vis = line.split(",")[:9]
        rows.setdefault(int(f), []).append(
            (int(t), int(c), float(x), float(y), float(w), float(h), float(vis))
        )
    return rows


@dataclass(frozen=True)
class LabelledFrames:
    """Frames at a model's input size with their boxes in source pixels.

    ``ignored[i]`` are the boxes of frame i left mostly hidden (visibility under the bar):
    a detection on one of them is neither a hit nor a false alarm.
    """

    images: npt.NDArray[np.uint8]
    boxes: list[npt.NDArray[np.float32]]
    ignored: list[npt.NDArray[np.float32]]
    width: int  # source frame size
    height: int


def load_train_frames(
    root: Path, width: int, height: int, min_visibility: float = 0.3, limit: int | None = None
) -> LabelledFrames:
    """The training frames of ``root`` (``tinyserve data scenes --out``) resized to the input."""
    labels_path = root / "train" / "labels.json"
    if not labels_path.is_file():
        raise DatasetError(
            f"{labels_path} not found; generate scenes with 'tinyserve data scenes --out {root}'"
        )
    meta = json.loads(labels_path.read_text())
    entries = meta["frames"][:limit]
    images = np.empty((len(entries), height, width, 3), dtype=np.uint8)
    boxes, ignored = [], []
    for i, entry in enumerate(entries):
        with Image.open(root / "train" / "images" / entry["file"]) as img:
            resized = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            images[i] = np.asarray(resized)
        b = np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4)
        vis = np.asarray(entry["visibility"], dtype=np.float32)
        boxes.append(b[vis >= min_visibility])
        ignored.append(b[vis < min_visibility])
    return LabelledFrames(images, boxes, ignored, int(meta["width"]), int(meta["height"]))


def load_test_frames(
    root: Path,
    width: int,
    height: int,
    max_frames: int | None = None,
    min_visibility: float = 0.3,
    every: int = 1,
) -> LabelledFrames:
    """Frames of the test videos of ``root`` (every ``every``-th), decoded with PyAV and
    resized to the input, with their ground truth."""
    import av

    from tinyserve.video_sources import configure_decoding, detector_pixels

    sequences = sorted(p for p in (root / "test").glob("*/video.mp4"))
    if not sequences:
        raise DatasetError(f"no test videos under {root / 'test'}; run 'tinyserve data scenes'")
    images, boxes, ignored = [], [], []
    size = (0, 0)
    for video in sequences:
        truth = read_gt(video.parent / "gt" / "gt.txt")
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            configure_decoding(stream)
            for number, frame in enumerate(container.decode(stream), start=1):
                if (number - 1) % every:
                    continue
                size = (frame.width, frame.height)
                images.append(detector_pixels(frame, width, height))
                rows = truth.get(number, [])
                xyxy = np.array(
                    [(x, y, x + w, y + h) for _, _, x, y, w, h, _ in rows], dtype=np.float32
                ).reshape(-1, 4)
                xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, frame.width)
                xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, frame.height)
                vis = np.array([r[6] for r in rows], dtype=np.float32)
                boxes.append(xyxy[vis >= min_visibility])
                ignored.append(xyxy[vis < min_visibility])
                if max_frames is not None and len(images) >= max_frames:
                    break
        if max_frames is not None and len(images) >= max_frames:
            break
    return LabelledFrames(np.stack(images), boxes, ignored, size[0], size[1])
