"""What a stream writes: MOTChallenge lines, JSON-lines events, annotated frames and video.

MOT lines are ``frame,id,bb_left,bb_top,bb_width,bb_height,conf,class_id,-1,-1`` with frames
counted from 1 and pixels in the source frame's coordinates (``class_id`` is the track's
voted class, -1 until it has one), so motmetrics and TrackEval read the file as it is.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw

from tinyserve.tracking import TrackState
from tinyserve.video_sources import Pixels

_COLORS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def mot_lines(frame: int, tracks: Sequence[TrackState]) -> list[str]:
    """The MOTChallenge lines of one frame's tracks."""
    lines = []
    for t in tracks:
        x1, y1, x2, y2 = (float(v) for v in t.box)
        lines.append(
            f"{frame},{t.id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{t.score:.4f},"
            f"{t.label_id},-1,-1"
        )
    return lines


class MotWriter:
    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("w")

    def write(self, frame: int, tracks: Sequence[TrackState]) -> None:
        for line in mot_lines(frame, tracks):
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


class EventWriter:
    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("w")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def annotate(image: Pixels, tracks: Sequence[TrackState], labels: Sequence[str]) -> Pixels:
    """The RGB frame with each track's box, id and voted label drawn on it."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for t in tracks:
        color = _COLORS[t.id % len(_COLORS)]
        box = [float(v) for v in t.box]
        draw.rectangle(box, outline=color, width=2)
        text = f"#{t.id}"
        if 0 <= t.label_id < len(labels):
            text += f" {labels[t.label_id]} {t.confidence:.0%}"
        draw.rectangle([box[0], box[1] - 12, box[0] + 7 * len(text), box[1]], fill=color)
        draw.text((box[0] + 2, box[1] - 12), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def jpeg(image: Pixels, quality: int = 80) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.getvalue()


class VideoWriter:
    """Annotated frames into an H.264 file (PyAV)."""

    def __init__(self, path: Path, fps: float, width: int, height: int) -> None:
        import av

        self._container = av.open(str(path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=int(round(fps)) or 30)
        self._stream.width, self._stream.height = width - width % 2, height - height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"preset": "veryfast", "crf": "23"}

    def write(self, image: Pixels) -> None:
        import av

        h, w = self._stream.height, self._stream.width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:h, :w]), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
