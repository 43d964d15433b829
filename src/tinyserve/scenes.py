"""Synthetic multi-object tracking scenes: Fashion-MNIST items moving over backgrounds.

This stands in for camera footage, so that the detector, the tracker and the whole video
pipeline can be trained and scored here with nothing downloaded. Each object is a real
Fashion-MNIST item (the train split for training frames, the test split for test videos),
printed on a dark square card. Cards move along varied trajectories: different speeds,
direction changes, entering and leaving the frame, passing over each other (the later card
occludes the earlier), growing and shrinking. Frames get a slow lighting change, motion blur
along each card's velocity and sensor noise.

What is drawn is what is written: every box of the ground truth is the square a card was
pasted into, in the frame's pixel coordinates, with the share of it left visible.

Outputs (``generate``): ``train/images/*.jpg`` with ``train/labels.json`` (boxes and classes
per frame), and ``test/<sequence>/`` as MOTChallenge sequences: ``video.mp4`` (H.264 through
PyAV), ``gt/gt.txt`` (``frame,id,left,top,width,height,1,class,visibility``, frames from 1),
``seqinfo.ini`` and ``tracks.json`` (each track's class).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from tinyserve.datasets import FASHION_MNIST_CLASSES, ImageDataset, load_fashion_mnist

Frame = npt.NDArray[np.uint8]
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class SceneConfig:
    """How scenes look and move. Sizes are card sides in pixels; speeds in pixels per frame."""

    width: int = 640
    height: int = 480
    fps: int = 30
    min_objects: int = 3
    max_objects: int = 8
    min_size: int = 40
    max_size: int = 112
    max_speed: float = 9.0
    noise: tuple[float, float] = (2.0, 7.0)
    blur: bool = True
    photos: Path | None = None

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64:
            raise ValueError(f"frames must be at least 64x64, got {self.width}x{self.height}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 8 <= self.min_size <= self.max_size <= min(self.width, self.height) // 2:
            raise ValueError("need 8 <= min_size <= max_size <= half the shorter frame side")


@dataclass(frozen=True)
class Box:
    """One object in one frame: its track, class and card square (pixels), and visibility."""

    track: int
    class_id: int
    left: float
    top: float
    size: float
    visibility: float

    def clipped(self, width: int, height: int) -> tuple[float, float, float, float] | None:
        """The part of the box inside the frame as ``(x1, y1, x2, y2)``, or None."""
        x1, y1 = max(self.left, 0.0), max(self.top, 0.0)
        x2 = min(self.left + self.size, float(width))
        y2 = min(self.top + self.size, float(height))
        return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


@dataclass
class _Track:
    id: int
    item: int
    class_id: int
    x: float  # centre
    y: float
    vx: float
    vy: float
    size: float
    growth: float  # relative size change per frame
    turn_every: int
    bounces: bool  # turns back at the frame's edge, or leaves the frame
    age: int = 0
    entered: bool = False


@dataclass
class Scene:
    """One simulated sequence: call ``step`` for each frame."""

    config: SceneConfig
    items: ImageDataset
    rng: np.random.Generator
    background: Frame
    noise_sigma: float
    light_phase: float = 0.0
    light_period: float = 120.0
    light_depth: float = 0.25
    tracks: list[_Track] = field(default_factory=list)
    next_id: int = 1
    frame_index: int = 0
    _noise: list[npt.NDArray[np.float32]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A few noise fields drawn once and picked at random per frame: drawing a fresh
        # 640x480x3 field costs more than the rest of a frame.
        shape = (self.config.height, self.config.width, 3)
        self._noise = [
            self.rng.normal(0.0, self.noise_sigma, shape).astype(np.float32) for _ in range(4)
        ]

    def step(self) -> tuple[Frame, list[Box]]:
        """Advance one frame: the rendered RGB frame and the ground truth of what was drawn."""
        self._spawn()
        frame = self.background.astype(np.float32)
        occupied = np.zeros((self.config.height, self.config.width), dtype=np.int32)
        drawn: list[tuple[_Track, int, int, int, int]] = []
        for order, track in enumerate(self.tracks, start=1):
            size = int(round(track.size))
            left, top = int(round(track.x - size / 2)), int(round(track.y - size / 2))
            if self._paste(frame, occupied, track, left, top, size, order):
                drawn.append((track, order, left, top, size))
        boxes = []
        for track, order, left, top, size in drawn:
            box = Box(track.id, track.class_id, float(left), float(top), float(size), 0.0)
            clip = box.clipped(self.config.width, self.config.height)
            if clip is None:
                continue
            x1, y1, x2, y2 = (int(v) for v in clip)
            visible = int((occupied[y1:y2, x1:x2] == order).sum()) / float(size * size)
            boxes.append(
                Box(track.id, track.class_id, float(left), float(top), float(size), visible)
            )
        gain = 1.0 + self.light_depth * math.sin(
            2 * math.pi * self.frame_index / self.light_period + self.light_phase
        )
        frame *= gain
        frame += self._noise[int(self.rng.integers(len(self._noise)))]
        out = np.clip(frame, 0, 255).astype(np.uint8)
        self._move()
        self.frame_index += 1
        return out, boxes

    def _spawn(self) -> None:
        cfg = self.config
        wanted = self.rng.integers(cfg.min_objects, cfg.max_objects + 1)
        first = self.frame_index == 0
        while len(self.tracks) < cfg.max_objects and (
            len(self.tracks) < cfg.min_objects or (len(self.tracks) < wanted and self._chance(0.05))
        ):
            self.tracks.append(self._new_track(inside=first))

    def _chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def _new_track(self, inside: bool) -> _Track:
        cfg, rng = self.config, self.rng
        item = int(rng.integers(len(self.items)))
        size = float(rng.uniform(cfg.min_size, cfg.max_size * 0.85))
        speed = float(rng.uniform(0.5, cfg.max_speed))
        if inside:
            x = float(rng.uniform(size, cfg.width - size))
            y = float(rng.uniform(size, cfg.height - size))
            angle = float(rng.uniform(0, 2 * math.pi))
        else:  # from just outside an edge, heading inwards
            edge = int(rng.integers(4))
            along_x, along_y = float(rng.uniform(0, cfg.width)), float(rng.uniform(0, cfg.height))
            x = (-size / 2, cfg.width + size / 2, along_x, along_x)[edge]
            y = (along_y, along_y, -size / 2, cfg.height + size / 2)[edge]
            toward = math.atan2(cfg.height / 2 - y, cfg.width / 2 - x)
            angle = toward + float(rng.uniform(-0.6, 0.6))
            speed = max(speed, 2.0)
        track = _Track(
            id=self.next_id,
            item=item,
            class_id=int(self.items.labels[item]),
            x=float(x),
            y=float(y),
            vx=speed * math.cos(angle),
            vy=speed * math.sin(angle),
            size=size,
            growth=float(rng.uniform(-0.006, 0.006)),
            turn_every=int(rng.integers(20, 90)),
            bounces=self._chance(0.5),
            entered=inside,
        )
        self.next_id += 1
        return track

    def _move(self) -> None:
        cfg, rng = self.config, self.rng
        alive = []
        for t in self.tracks:
            t.age += 1
            t.x += t.vx
            t.y += t.vy
            t.size = float(np.clip(t.size * (1 + t.growth), cfg.min_size, cfg.max_size))
            if t.size in (cfg.min_size, cfg.max_size):
                t.growth = -t.growth
            if t.age % t.turn_every == 0:  # a direction change, sometimes a new speed too
                angle = math.atan2(t.vy, t.vx) + float(rng.uniform(-1.2, 1.2))
                speed = math.hypot(t.vx, t.vy) * float(rng.uniform(0.6, 1.5))
                speed = float(np.clip(speed, 0.3, cfg.max_speed))
                t.vx, t.vy = speed * math.cos(angle), speed * math.sin(angle)
            half = t.size / 2
            inside = half <= t.x <= cfg.width - half and half <= t.y <= cfg.height - half
            t.entered = t.entered or inside
            gone = t.x < -half or t.x > cfg.width + half or t.y < -half or t.y > cfg.height + half
            if gone and (t.entered or t.age > 200):
                continue
            if t.entered and t.bounces and not inside:
                if t.x < half or t.x > cfg.width - half:
                    t.vx = -t.vx if (t.x < half) == (t.vx < 0) else t.vx
                if t.y < half or t.y > cfg.height - half:
                    t.vy = -t.vy if (t.y < half) == (t.vy < 0) else t.vy
            alive.append(t)
        self.tracks = alive

    def _paste(
        self,
        frame: npt.NDArray[np.float32],
        occupied: npt.NDArray[np.int32],
        track: _Track,
        left: int,
        top: int,
        size: int,
        order: int,
    ) -> bool:
        height, width = occupied.shape
        x1, y1 = max(left, 0), max(top, 0)
        x2, y2 = min(left + size, width), min(top + size, height)
        if x2 <= x1 or y2 <= y1 or size < 2:
            return False
        card = card_pixels(self.items.images[track.item, :, :, 0], size)
        if self.config.blur:
            card = motion_blur(card, track.vx, track.vy)
        part = card[y1 - top : y2 - top, x1 - left : x2 - left]
        frame[y1:y2, x1:x2] = part[:, :, None]
        occupied[y1:y2, x1:x2] = order
        return True


def card_pixels(item: Frame, size: int) -> npt.NDArray[np.float32]:
    """A 28x28 item scaled to a ``size`` x ``size`` card (the item on its dark ground)."""
    scaled = Image.fromarray(item).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(scaled, dtype=np.float32)


def motion_blur(card: npt.NDArray[np.float32], vx: float, vy: float) -> npt.NDArray[np.float32]:
    """Average the card along its motion over half a frame's travel (exposure time)."""
    length = int(math.hypot(vx, vy) * 0.5)
    if length < 2:
        return card
    out = np.zeros_like(card)
    for i in range(length):
        f = i / (length - 1) - 0.5
        dx, dy = int(round(f * vx * 0.5)), int(round(f * vy * 0.5))
        out += np.roll(card, (dy, dx), axis=(0, 1))
    blurred: npt.NDArray[np.float32] = (out / length).astype(np.float32)
    return blurred


def textured_background(rng: np.random.Generator, width: int, height: int) -> Frame:
    """Coloured low-frequency noise with stripes or blobs: a busy but plausible scene."""
    layers = []
    for cells in (4, 12, 40):
        coarse = rng.uniform(0, 1, (cells * height // width + 2, cells + 2, 3)).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        layers.append(np.asarray(img, dtype=np.float32))
    base = 0.55 * layers[0] + 0.3 * layers[1] + 0.15 * layers[2]
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle, period = rng.uniform(0, math.pi), rng.uniform(12, 60)
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        base += 25.0 * stripes[:, :, None]
    lo, hi = rng.uniform(30, 90), rng.uniform(150, 230)
    base = lo + (base - base.min()) / max(float(np.ptp(base)), 1e-3) * (hi - lo)
    texture: Frame = np.clip(base, 0, 255).astype(np.uint8)
    return texture


def photo_background(path: Path, rng: np.random.Generator, width: int, height: int) -> Frame:
    """A random crop of a photo, scaled to cover the frame, sometimes mirrored."""
    with Image.open(path) as img:
        photo = img.convert("RGB")
    scale = max(width / photo.width, height / photo.height) * float(rng.uniform(1.0, 1.4))
    photo = photo.resize((math.ceil(photo.width * scale), math.ceil(photo.height * scale)))
    x = int(rng.integers(0, photo.width - width + 1))
    y = int(rng.integers(0, photo.height - height + 1))
    crop = np.asarray(photo.crop((x, y, x + width, y + height)), dtype=np.uint8)
    mirrored: Frame = np.ascontiguousarray(crop[:, ::-1])
    return mirrored if rng.random() < 0.5 else crop


def new_scene(config: SceneConfig, items: ImageDataset, seed: int) -> Scene:
    """A scene with its own background, noise level and lighting drift."""
    rng = np.random.default_rng(seed)
    photos = (
        sorted(p for p in config.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if config.photos is not None and config.photos.is_dir()
        else []
    )
    if photos and rng.random() < 0.4:
        path = photos[int(rng.integers(len(photos)))]
        background = photo_background(path, rng, config.width, config.height)
    else:
        background = textured_background(rng, config.width, config.height)
    return Scene(
        config,
        items,
        rng,
        background,
        noise_sigma=float(rng.uniform(*config.noise)),
        light_phase=float(rng.uniform(0, 2 * math.pi)),
        light_period=float(rng.uniform(60, 240)),
        light_depth=float(rng.uniform(0.05, 0.3)),
    )


def frames(scene: Scene, count: int) -> Iterator[tuple[Frame, list[Box]]]:
    for _ in range(count):
        yield scene.step()


def mot_gt_lines(frame_number: int, boxes: Sequence[Box]) -> list[str]:
    """MOTChallenge ground-truth lines of one frame (``frame_number`` counts from 1)."""
    return [
        f"{frame_number},{b.track},{b.left:.0f},{b.top:.0f},{b.size:.0f},{b.size:.0f},1,"
        f"{b.class_id},{b.visibility:.3f}"
        for b in boxes
    ]


def write_video(path: Path, images: Iterator[Frame], fps: int, crf: int = 20) -> int:
    """Encode RGB frames as H.264 (yuv420p) with PyAV; the number of frames written."""
    import av

    count = 0
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for image in images:
            if count == 0:
                stream.height, stream.width = image.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
            count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count


@dataclass(frozen=True)
class GenerateConfig:
    out: Path
    scene: SceneConfig = field(default_factory=SceneConfig)
    train_sequences: int = 300
    train_frames_per_sequence: int = 10
    train_stride: int = 4
    test_sequences: int = 5
    test_frames: int = 300
    seed: int = 0
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.train_sequences < 0 or self.test_sequences < 0 or self.test_frames < 1:
            raise ValueError("sequence counts must be >= 0 and test_frames >= 1")


Progress = Callable[[str, int, int], None]


def generate(config: GenerateConfig, progress: Progress | None = None) -> dict[str, int]:
    """Write the training frames and the test sequences; counts of what was written."""
    report = {"train_frames": 0, "train_boxes": 0, "test_sequences": 0, "test_frames": 0}
    if config.train_sequences:
        train = load_fashion_mnist("train", config.data_dir)
        report.update(write_train_frames(config, train, progress))
    if config.test_sequences:
        test = load_fashion_mnist("test", config.data_dir)
        for index in range(config.test_sequences):
            name = f"scene-{index + 1:02d}"
            seed = config.seed * 1000 + 500 + index
            write_sequence(config.out / "test" / name, config.scene, test, seed, config.test_frames)
            report["test_sequences"] += 1
            report["test_frames"] += config.test_frames
            if progress:
                progress("test", index + 1, config.test_sequences)
    return report


def write_train_frames(
    config: GenerateConfig, items: ImageDataset, progress: Progress | None = None
) -> dict[str, int]:
    """Frames sampled every ``train_stride`` steps of many short scenes, as JPEG + labels."""
    folder = config.out / "train" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    labels: list[dict[str, object]] = []
    boxes_total = 0
    for seq in range(config.train_sequences):
        scene = new_scene(config.scene, items, config.seed * 1000 + seq)
        for _ in range(int(scene.rng.integers(0, 30))):  # start mid-motion
            scene.step()
        for index in range(config.train_frames_per_sequence):
            for _ in range(config.train_stride - 1):
                scene.step()
            image, boxes = scene.step()
            name = f"{seq:04d}-{index:03d}.jpg"
            Image.fromarray(image).save(folder / name, quality=90)
            kept = [b for b in boxes if b.clipped(config.scene.width, config.scene.height)]
            labels.append(
                {
                    "file": name,
                    "boxes": [
                        [round(v, 1) for v in b.clipped(config.scene.width, config.scene.height)]  # type: ignore[union-attr]
                        for b in kept
                    ],
                    "classes": [b.class_id for b in kept],
                    "visibility": [round(b.visibility, 3) for b in kept],
                }
            )
            boxes_total += len(kept)
        if progress:
            progress("train", seq + 1, config.train_sequences)
    meta = {
        "width": config.scene.width,
        "height": config.scene.height,
        "classes": list(FASHION_MNIST_CLASSES),
        "frames": labels,
    }
    (config.out / "train" / "labels.json").write_text(json.dumps(meta))
    return {"train_frames": len(labels), "train_boxes": boxes_total}


def write_sequence(
    folder: Path, config: SceneConfig, items: ImageDataset, seed: int, count: int
) -> None:
    """One MOTChallenge sequence: video.mp4, gt/gt.txt, seqinfo.ini and tracks.json."""
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    scene = new_scene(config, items, seed)
    lines: list[str] = []
    classes: dict[int, int] = {}

    def rendered() -> Iterator[Frame]:
        for number in range(1, count + 1):
            image, boxes = scene.step()
            lines.extend(mot_gt_lines(number, boxes))
            classes.update({b.track: b.class_id for b in boxes})
            yield image

    write_video(folder / "video.mp4", rendered(), config.fps)
    (folder / "gt" / "gt.txt").write_text("".join(line + "\n" for line in lines))
    (folder / "seqinfo.ini").write_text(
        "[Sequence]\n"
        f"name={folder.name}\nimDir=img1\nframeRate={config.fps}\nseqLength={count}\n"
        f"imWidth={config.width}\nimHeight={config.height}\nimExt=.jpg\n"
    )
    tracks = {
        str(t): {"class_id": c, "label": FASHION_MNIST_CLASSES[c]}
        for t, c in sorted(classes.items())
    }
    (folder / "tracks.json").write_text(json.dumps(tracks, indent=1) + "\n")
