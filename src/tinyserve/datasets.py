"""Datasets as in-memory uint8 ``[N, H, W, C]`` arrays, read without torch.

Two sources: Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist``), and any
ImageFolder directory (one sub-folder per class), decoded with the same ``imaging`` code the
server uses, so training sees exactly the pixels serving will see.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tinyserve.errors import DatasetError, InputError
from tinyserve.imaging import Pixels, load_image
from tinyserve.manifest import InputSpec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_INSTALL_HINT = "install it with 'apt-get install -y dataset-fashion-mnist' or pass --data-dir"


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 ``[N, H, W, C]`` with integer labels and class names."""

    images: Pixels
    labels: npt.NDArray[np.int64]
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def spec(self) -> InputSpec:
        _, height, width, channels = self.images.shape
        return InputSpec(height, width, channels, "L" if channels == 1 else "RGB")

    def subset(self, indices: npt.NDArray[np.int64], name: str | None = None) -> ImageDataset:
        return ImageDataset(
            self.images[indices], self.labels[indices], self.classes, name or self.name
        )


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Read an IDX file (optionally gzipped) holding unsigned bytes."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} is truncated: header says {dims} ({expected:,} bytes), "
            f"found {len(raw) - header:,} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path | None = None) -> ImageDataset:
    """Load the Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) split."""
    root = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [root / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetError(
                f"Fashion-MNIST not found: expected {candidates[0]} ; {_INSTALL_HINT}"
            )
        paths.append(found)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST files in {root} do not match each other")
    return ImageDataset(
        images[:, :, :, None].copy(),
        labels.astype(np.int64),
        FASHION_MNIST_CLASSES,
        f"fashion-mnist/{split}",
    )


def load_image_folder(root: Path, spec: InputSpec, progress: bool = False) -> ImageDataset:
    """Decode every image under ``root/<class>/`` to ``spec``; classes are sorted folder names."""
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if len(classes) < 2 or not files:
        raise DatasetError(
            f"{root} is not an image folder: expected one sub-folder per class (at least two) "
            "holding .jpg/.png/.webp images"
        )
    images = np.empty((len(files), *spec.shape), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, (path, index) in enumerate(_track(files, f"decoding {root.name}", progress)):
        try:
            images[i] = load_image(path, spec)
        except (InputError, OSError) as exc:
            raise DatasetError(f"cannot use {path}: {exc}") from exc
        labels[i] = index
    return ImageDataset(images, labels, tuple(classes), root.name)


def is_unlabelled_folder(root: Path) -> bool:
    """A folder holding images directly and no class sub-folders."""
    if not root.is_dir() or any(p.is_dir() for p in root.iterdir()):
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())


def load_unlabelled_folder(root: Path, spec: InputSpec) -> ImageDataset:
    """Every image directly in ``root``, decoded to ``spec``; labels are -1 (unknown)."""
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{root} holds no .jpg/.png/.webp images")
    images = np.empty((len(files), *spec.shape), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            images[i] = load_image(path, spec)
        except (InputError, OSError) as exc:
            raise DatasetError(f"cannot use {path}: {exc}") from exc
    return ImageDataset(images, np.full(len(files), -1, dtype=np.int64), (), root.name)


def split_dataset(
    dataset: ImageDataset, val_fraction: float, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic stratified split into (train, validation)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(dataset.labels):
        members = np.flatnonzero(dataset.labels == label)
        rng.shuffle(members)
        val_parts.append(members[: max(1, round(len(members) * val_fraction))])
    val = np.sort(np.concatenate(val_parts))
    train = np.setdiff1d(np.arange(len(dataset)), val)
    return (
        dataset.subset(train, f"{dataset.name}/train"),
        dataset.subset(val, f"{dataset.name}/val"),
    )


def load_dataset(
    data: str,
    split: str,
    spec: InputSpec | None = None,
    data_dir: Path | None = None,
    val_fraction: float = 1 / 12,
    seed: int = 0,
    progress: bool = False,
) -> ImageDataset:
    """Load ``split`` ("train", "val" or "test") of ``fashion-mnist`` or an ImageFolder path.

    Fashion-MNIST's validation split is held out of its training set; its test split is the
    official 10,000 images. An ImageFolder has no test split: "test" means its validation split.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if data == "fashion-mnist":
        if split == "test":
            return load_fashion_mnist("test", data_dir)
        full = load_fashion_mnist("train", data_dir)
    else:
        full = load_image_folder(Path(data), spec or InputSpec(64, 64, 3, "RGB"), progress)
    train, val = split_dataset(full, val_fraction, seed)
    return train if split == "train" else val


def _track(items: list[tuple[Path, int]], what: str, progress: bool) -> Iterator[tuple[Path, int]]:
    if not progress:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=what)
