"""A compact anchor-free detector and its training: CenterNet-style heatmap, size, offset.

``TinyCenterNet`` is a depthwise-separable backbone to stride 32, a top-down neck back to
stride 4, and one head predicting per output cell a class heatmap (object centres), the
box size (log, in output cells) and the centre's sub-cell offset. There are no anchors and
no learned NMS: a 3x3 max-pool keeps local maxima of the heatmap (``DetectionModel``, which
is also what export writes, so box decoding lives in the graph).

Training reads the frames of ``tinyserve data scenes`` (``train/images`` and
``train/labels.json``), holds them in memory at the training size, and augments with scale
jitter, crops, flips and brightness.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from tinyserve.scene_data import LabelledFrames, load_train_frames
from tinyserve.training.models import Preprocess

STRIDE = 4
CHECKPOINT_FORMAT = "tinyserve-detector-checkpoint/1"


def _dw_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyCenterNet(nn.Module):
    """Backbone (strides 2..32), top-down neck to stride 4, heads: heat, log size, offset."""

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64, 96, 128),
        neck: int = 48,
    ) -> None:
        super().__init__()
        w = list(widths)
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w[0], 3, 2, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(True)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(_dw_block(w[i], w[i + 1], 2), _dw_block(w[i + 1], w[i + 1]))
            for i in range(len(w) - 1)
        )
        self.lateral = nn.ModuleList(nn.Conv2d(c, neck, 1) for c in w[1:])
        self.smooth = _dw_block(neck, neck)
        self.head = nn.Sequential(_dw_block(neck, neck), nn.Conv2d(neck, num_classes + 4, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        last = self.head[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.normal_(last.weight, 0, 0.01)
        nn.init.zeros_(last.bias)
        with torch.no_grad():
            last.bias[:num_classes] = -4.6  # a prior of 1 % objects per cell (focal loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        y = self.lateral[-1](feats[-1])
        for feat, lateral in zip(
            reversed(feats[:-1]), reversed(list(self.lateral)[:-1]), strict=True
        ):
            y = F.interpolate(y, size=feat.shape[-2:], mode="nearest") + lateral(feat)
        return self.head(self.smooth(y))  # type: ignore[no-any-return]


class DetectionModel(nn.Module):
    """uint8 NHWC frames -> ``[N, K, 6]`` detections: x1, y1, x2, y2 (0-1), score, class.

    The in-graph decoding: sigmoid heatmap, 3x3 max-pool peak keeping (the NMS of
    CenterNet), the top ``K`` peaks over every class and cell, then their size and offset.
    """

    def __init__(
        self,
        net: TinyCenterNet,
        mean: Sequence[float],
        std: Sequence[float],
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.net = net
        self.max_detections = max_detections

    def raw(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(pixels))  # type: ignore[no-any-return]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return decode(
            self.raw(pixels),
            self.net.num_classes,
            pixels.shape[1],
            pixels.shape[2],
            self.max_detections,
        )


def decode(out: torch.Tensor, num_classes: int, height: int, width: int, k: int) -> torch.Tensor:
    """Head outputs ``[N, C+4, h, w]`` -> detections ``[N, K, 6]`` in 0-1 coordinates."""
    n, _, h, w = out.shape
    heat = torch.sigmoid(out[:, :num_classes])
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat).to(heat.dtype)
    scores, index = torch.topk(peaks.reshape(n, -1), min(k, num_classes * h * w), dim=1)
    cls = torch.div(index, h * w, rounding_mode="floor")
    cell = index - cls * (h * w)
    ys = torch.div(cell, w, rounding_mode="floor")
    xs = cell - ys * w
    box = out[:, num_classes:].reshape(n, 4, h * w)
    picked = torch.gather(box, 2, cell.unsqueeze(1).expand(n, 4, cell.shape[1]))
    size = torch.exp(picked[:, 0:2].clamp(max=6.0)) * STRIDE
    cx = (xs.to(out.dtype) + picked[:, 2]) * STRIDE
    cy = (ys.to(out.dtype) + picked[:, 3]) * STRIDE
    x1 = (cx - size[:, 0] / 2).clamp(min=0) / width
    y1 = (cy - size[:, 1] / 2).clamp(min=0) / height
    x2 = (cx + size[:, 0] / 2).clamp(max=float(width)) / width
    y2 = (cy + size[:, 1] / 2).clamp(max=float(height)) / height
    return torch.stack([x1, y1, x2, y2, scores, cls.to(out.dtype)], dim=2)


# ---------------------------------------------------------------- data


def load_scene_frames(
    root: Path, width: int, height: int, limit: int | None = None
) -> LabelledFrames:
    """Training frames at ``width`` x ``height``, their boxes scaled to those pixels."""
    frames = load_train_frames(root, width, height, limit=limit)
    sx, sy = width / frames.width, height / frames.height
    scale = np.array([sx, sy, sx, sy], dtype=np.float32)
    return LabelledFrames(
        frames.images,
        [b * scale for b in frames.boxes],
        [b * scale for b in frames.ignored],
        width,
        height,
    )


def targets(
    boxes: Sequence[npt.NDArray[np.float32]], num_classes: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heatmaps ``[N, C, h, w]``, box targets ``[N, 4, h, w]`` and their mask ``[N, 1, h, w]``."""
    n = len(boxes)
    heat = np.zeros((n, num_classes, h, w), dtype=np.float32)
    reg = np.zeros((n, 4, h, w), dtype=np.float32)
    mask = np.zeros((n, 1, h, w), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i, frame_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in frame_boxes / STRIDE:
            bw, bh = x2 - x1, y2 - y1
            if bw < 1 or bh < 1:
                continue
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            if ix < 0 or iy < 0:
                continue
            sigma = max(0.5, min(bw, bh) / 6)
            g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma**2))
            np.maximum(heat[i, 0], g, out=heat[i, 0])
            reg[i, :, iy, ix] = (math.log(bw), math.log(bh), cx - ix, cy - iy)
            mask[i, 0, iy, ix] = 1.0
    return torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(mask)


def detection_loss(
    out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """CenterNet's penalty-reduced focal loss on the heatmap, L1 on size and offset."""
    logits = out[:, :num_classes]
    pred = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    neg_weight = torch.pow(1 - heat, 4)
    pos_loss = torch.log(pred) * torch.pow(1 - pred, 2) * pos
    neg_loss = torch.log(1 - pred) * torch.pow(pred, 2) * neg_weight * (1 - pos)
    count = pos.sum().clamp(min=1.0)
    focal = -(pos_loss.sum() + neg_loss.sum()) / count
    box = out[:, num_classes:]
    n_mask = mask.sum().clamp(min=1.0)
    size = (torch.abs(box[:, :2] - reg[:, :2]) * mask).sum() / n_mask
    offset = (torch.abs(box[:, 2:] - reg[:, 2:]) * mask).sum() / n_mask
    total = focal + size + offset
    return total, {
        "focal": float(focal.detach()),
        "size": float(size.detach()),
        "offset": float(offset.detach()),
    }


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class DetectTrainConfig:
    """One detector training run on scene frames; ``out`` receives best.pt and history.json."""

    out: Path
    data: Path
    width: int = 320
    height: int = 240
    crop_width: int = 256
    crop_height: int = 192
    epochs: int = 12
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    widths: tuple[int, ...] = (16, 32, 64, 96, 128)
    neck: int = 48
    max_frames: int | None = None
    val_frames: int = 200
    seed: int = 0
    threads: int = 0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.crop_width > self.width or self.crop_height > self.height:
            raise ValueError("the crop must fit in the training frame")
        if any(v % 16 for v in (self.width, self.height, self.crop_width, self.crop_height)):
            raise ValueError("frame and crop sizes must be multiples of 16")

    def plain(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class DetectTrainResult:
    best_path: Path
    best_map50: float
    history: list[dict[str, float]]
    seconds: float


def fit_detector(config: DetectTrainConfig, log: Any = print) -> DetectTrainResult:
    """Train ``TinyCenterNet`` on scene frames; keeps the checkpoint of best validation mAP@0.5."""
    from tinyserve.detection import mean_average_precision

    started = time.perf_counter()
    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    frames = load_scene_frames(config.data, config.width, config.height, limit=config.max_frames)
    n_val = min(config.val_frames, len(frames.images) // 5)
    train_idx = np.arange(n_val, len(frames.images))
    val_idx = np.arange(n_val)
    pixels = frames.images[train_idx].reshape(-1, 3).astype(np.float64) / 255.0
    mean = [round(float(x), 6) for x in pixels.mean(0)]
    std = [round(float(x), 6) for x in pixels.std(0)]
    del pixels
    net = TinyCenterNet(1, 3, config.widths, config.neck)
    model = DetectionModel(net, mean, std)
    params = sum(p.numel() for p in net.parameters())
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * steps_per_epoch
    done_steps = 0
    meta = {
        "arch": "tiny_centernet",
        "widths": list(config.widths),
        "neck": config.neck,
        "num_classes": 1,
        "labels": ["object"],
        "mean": mean,
        "std": std,
        "parameters": params,
        "stride": STRIDE,
        "train_size": [config.width, config.height],
        "run_id": uuid.uuid4().hex[:12],
        "dataset": "tinyserve-scenes",
        "train_config": config.plain(),
        "train_frames": len(train_idx),
    }
    config.out.mkdir(parents=True, exist_ok=True)
    best_path = config.out / "best.pt"
    history: list[dict[str, float]] = []
    best = -1.0
    log(f"detector: {params:,} parameters, {len(train_idx)} training frames, {n_val} validation")
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        net.train()
        order = rng.permutation(train_idx)
        sums = {"loss": 0.0, "focal": 0.0, "size": 0.0, "offset": 0.0}
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            images, boxes = augment(frames, batch, config, rng)
            h, w = images.shape[1] // STRIDE, images.shape[2] // STRIDE
            heat, reg, mask = targets(boxes, 1, h, w)
            out = model.raw(torch.from_numpy(images))
            loss, parts = detection_loss(out, heat, reg, mask, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            lr = config.lr * _schedule(done_steps / total_steps, started, config.time_limit_s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            done_steps += 1
            sums["loss"] += float(loss.detach())
            for key, value in parts.items():
                sums[key] += value
            if step % 50 == 0:
                log(
                    f"epoch {epoch + 1} step {step}/{steps_per_epoch} "
                    f"loss {float(loss.detach()):.3f}"
                )
            if config.time_limit_s and time.perf_counter() - started > config.time_limit_s:
                break
        net.eval()
        with torch.no_grad():
            dets = [
                model(torch.from_numpy(frames.images[val_idx[i : i + 32]])).numpy()
                for i in range(0, n_val, 32)
            ]
        scale = np.array([config.width, config.height, config.width, config.height])
        predicted = [
            (d[d[:, 4] > 0.05, :4] * scale, d[d[:, 4] > 0.05, 4]) for d in np.concatenate(dets)
        ]
        truth = [frames.boxes[i] for i in val_idx]
        hidden = [frames.ignored[i] for i in val_idx]
        map50 = mean_average_precision(predicted, truth, (0.5,), hidden)
        map5095 = mean_average_precision(predicted, truth, ignored=hidden)
        stats = {k: v / steps_per_epoch for k, v in sums.items()}
        stats.update(
            epoch=epoch + 1,
            val_map50=map50,
            val_map50_95=map5095,
            seconds=time.perf_counter() - t0,
            lr=lr,
        )
        history.append(stats)
        log(
            f"epoch {epoch + 1}: loss {stats['loss']:.3f} val mAP@0.5 {map50:.4f} "
            f"mAP@0.5:0.95 {map5095:.4f} ({stats['seconds']:.0f}s)"
        )
        if map50 + map5095 > best:
            best = map50 + map5095
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": net.state_dict(),
                "meta": {**meta, "epoch": epoch + 1, "val_map50": map50, "val_map50_95": map5095},
            }
            tmp = best_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(best_path)
        (config.out / "history.json").write_text(
            json.dumps({"meta": meta, "epochs": history}, indent=1)
        )
        if config.time_limit_s and time.perf_counter() - started > config.time_limit_s:
            log("time limit reached")
            break
    best_map = max(h["val_map50"] for h in history)
    return DetectTrainResult(best_path, best_map, history, time.perf_counter() - started)


def _schedule(step_fraction: float, started: float, time_limit_s: float | None) -> float:
    """Warm-up then cosine decay over the run, measured in steps or, if sooner, in time."""
    progress = step_fraction
    if time_limit_s:
        progress = max(progress, (time.perf_counter() - started) / time_limit_s)
    progress = min(progress, 1.0)
    if progress < 0.05:
        return 0.1 + 0.9 * progress / 0.05
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95))


def augment(
    frames: LabelledFrames,
    batch: npt.NDArray[np.int64],
    config: DetectTrainConfig,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.uint8], list[npt.NDArray[np.float32]]]:
    """One batch: a shared random scale, then per frame a random crop, flip and brightness."""
    scale = float(rng.uniform(0.7, 1.15))
    sw = max(config.crop_width, int(config.width * scale))
    sh = max(config.crop_height, int(config.height * scale))
    images = torch.from_numpy(frames.images[batch]).permute(0, 3, 1, 2).float()
    images = F.interpolate(images, size=(sh, sw), mode="bilinear", align_corners=False)
    out = np.empty((len(batch), config.crop_height, config.crop_width, 3), dtype=np.uint8)
    boxes = []
    fx, fy = sw / config.width, sh / config.height
    for j, i in enumerate(batch):
        x0 = int(rng.integers(0, sw - config.crop_width + 1))
        y0 = int(rng.integers(0, sh - config.crop_height + 1))
        crop = images[j, :, y0 : y0 + config.crop_height, x0 : x0 + config.crop_width]
        crop = crop * float(rng.uniform(0.7, 1.3)) + float(rng.uniform(-20, 20))
        pixels = crop.clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
        b = frames.boxes[i] * np.array([fx, fy, fx, fy], dtype=np.float32)
        b -= np.array([x0, y0, x0, y0], dtype=np.float32)
        full = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, config.crop_width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, config.crop_height)
        kept = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) >= 0.4 * np.maximum(full, 1e-6)
        b = b[kept]
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
            b = (
                np.stack(
                    [config.crop_width - b[:, 2], b[:, 1], config.crop_width - b[:, 0], b[:, 3]], 1
                )
                if len(b)
                else b
            )
        out[j] = pixels
        boxes.append(b.astype(np.float32))
    return out, boxes


def load_detector_checkpoint(path: Path) -> dict[str, Any]:
    from tinyserve.errors import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a tinyserve detector checkpoint ({CHECKPOINT_FORMAT})"
        )
    return state


def build_detector(state: dict[str, Any], max_detections: int = 100) -> DetectionModel:
    meta = state["meta"]
    net = TinyCenterNet(meta["num_classes"], 3, tuple(meta["widths"]), meta["neck"])
    net.load_state_dict(state["model"])
    return DetectionModel(net, meta["mean"], meta["std"], max_detections).eval()
