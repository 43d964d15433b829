"""Training batches and augmentation on uint8 NHWC tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinyserve.datasets import ImageDataset


def batches(
    dataset: ImageDataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 NHWC images, int64 labels)`` tensors."""
    images = torch.from_numpy(dataset.images)
    labels = torch.from_numpy(dataset.labels)
    order = torch.randperm(len(dataset), generator=generator) if shuffle else None
    for start in range(0, len(dataset), batch_size):
        if order is None:
            yield images[start : start + batch_size], labels[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            yield images[index], labels[index]


@dataclass(frozen=True)
class Augment:
    """Batch augmentation on uint8 NHWC tensors: shifted crop, horizontal flip, erasing, and
    what a camera does to an object in a video (``camera_prob``, see ``camera``)."""

    pad: int = 2
    flip: bool = True
    erase_prob: float = 0.0
    camera_prob: float = 0.0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, h, w, _ = images.shape
        if self.pad > 0:
            padded = torch.nn.functional.pad(images, (0, 0, self.pad, self.pad, self.pad, self.pad))
            dy = torch.randint(0, 2 * self.pad + 1, (n, 1), generator=generator)
            dx = torch.randint(0, 2 * self.pad + 1, (n, 1), generator=generator)
            rows = (dy + torch.arange(h))[:, :, None]
            cols = (dx + torch.arange(w))[:, None, :]
            images = padded[torch.arange(n)[:, None, None], rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(2), images)
        if self.erase_prob > 0:
            images = self._erase(images, generator)
        if self.camera_prob > 0:
            apply = torch.rand(n, generator=generator) < self.camera_prob
            if bool(apply.any()):
                images = images.clone()
                images[apply] = camera(images[apply], generator)
        return images.contiguous()

    def _erase(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, h, w, _ = images.shape
        apply = torch.rand(n, generator=generator) < self.erase_prob
        eh = torch.randint(h // 8, h // 2 + 1, (n,), generator=generator)
        ew = torch.randint(w // 8, w // 2 + 1, (n,), generator=generator)
        y0 = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
        x0 = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
        ys = torch.arange(h)[None, :]
        xs = torch.arange(w)[None, :]
        in_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])
        in_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])
        mask = in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None]
        noise = torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8)
        return torch.where(mask[:, :, :, None], noise, images)


def camera(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 NHWC images as a video's track crops show them.

    Each image is shown at 40-112 pixels (one size per call) and shrunk back with an area
    filter, sometimes smoothed (as a video codec does), smeared along a random motion of up
    to 5 pixels, lit 0.7-1.3x (clipped where
    it saturates) and given sensor noise (sigma up to 8). Then its levels are stretched
    to 0-255, as ``tracking.crop_square`` stretches every crop it hands the classifier.
    """
    n, h, w, c = images.shape
    x = images.permute(0, 3, 1, 2).float()
    side = int(torch.randint(40, 113, (1,), generator=generator))
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    if float(torch.rand(1, generator=generator)) < 0.5:  # a codec's smoothing
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    length = int(torch.randint(0, 6, (1,), generator=generator))
    if length >= 2:
        angle = float(torch.rand(1, generator=generator)) * math.pi
        kernel = torch.zeros(length * 2 + 1, length * 2 + 1)
        for t in torch.linspace(-length / 2, length / 2, length):
            kernel[
                int(round(length + float(t) * math.sin(angle))),
                int(round(length + float(t) * math.cos(angle))),
            ] += 1.0
        kernel = (kernel / kernel.sum()).expand(c, 1, -1, -1)
        x = F.conv2d(F.pad(x, (length,) * 4, mode="replicate"), kernel, groups=c)
    gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    sigma = 8.0 * torch.rand(n, 1, 1, 1, generator=generator)
    noise = torch.randn(x.shape, generator=generator) * sigma
    x = (x * gain + noise).clamp(0, 255)
    x = F.interpolate(x, size=(h, w), mode="area")
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    stretch = (high - low) >= 16
    x = torch.where(stretch, (x - low) * 255.0 / (high - low).clamp(min=1.0), x)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
