"""Write one Fashion-MNIST test image per class to samples/fashion/ as PNG.

The file name carries the test-set index and the true class, e.g. ``0000_ankle-boot.png``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from PIL import Image

from tinyserve.datasets import load_fashion_mnist


def main(out: Path) -> None:
    test = load_fashion_mnist("test")
    out.mkdir(parents=True, exist_ok=True)
    for class_id, label in enumerate(test.classes):
        index = int((test.labels == class_id).argmax())
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        Image.fromarray(test.images[index, :, :, 0]).save(out / f"{index:04d}_{slug}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("samples/fashion"))
