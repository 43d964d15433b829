"""Training batches and augmentation on uint8 NHWC tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

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
    """Batch augmentation on uint8 NHWC tensors: shifted crop, horizontal flip, erasing."""

    pad: int = 2
    flip: bool = True
    erase_prob: float = 0.0

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
