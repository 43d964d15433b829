from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_fashion_mnist, write_image_folder
from tinyserve.datasets import (
    FASHION_MNIST_CLASSES,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    split_dataset,
)
from tinyserve.errors import DatasetError
from tinyserve.manifest import InputSpec


@needs_fashion_mnist
def test_fashion_mnist_from_debian_idx_files() -> None:
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28, 1)
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == np.uint8
    assert train.classes == FASHION_MNIST_CLASSES
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert 0.25 < train.images.mean() / 255 < 0.32  # the dataset's known mean is 0.286


@needs_fashion_mnist
def test_fashion_mnist_validation_split_is_held_out_of_training() -> None:
    train = load_dataset("fashion-mnist", "train")
    val = load_dataset("fashion-mnist", "val")
    assert len(train) + len(val) == 60000
    assert len(val) == 5000
    assert np.bincount(val.labels).tolist() == [500] * 10


def test_missing_dataset_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def _write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(gzip.compress((header + array.tobytes())[: -truncate or None]))


def test_idx_round_trip_and_truncation(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", array)
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), array)
    _write_idx(tmp_path / "short.gz", array, truncate=5)
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "junk.gz").write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(tmp_path / "junk.gz")


def test_image_folder_decodes_to_the_spec(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", per_class=5)
    spec = InputSpec(16, 12, 3, "RGB")
    data = load_image_folder(root, spec)
    assert data.images.shape == (15, 16, 12, 3)
    assert data.classes == ("blue", "green", "red")
    red = data.images[data.labels == 2].mean(axis=(0, 1, 2))
    assert red[0] > 150 and red[2] < 80


def test_image_folder_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", per_class=8)
    data = load_image_folder(root, InputSpec(8, 8, 1, "L"))
    train_a, val_a = split_dataset(data, 0.25, seed=3)
    train_b, val_b = split_dataset(data, 0.25, seed=3)
    assert np.array_equal(val_a.images, val_b.images)
    assert np.bincount(val_a.labels).tolist() == [2, 2, 2]
    assert len(train_a) == 18 and len(train_b) == 18


def test_not_an_image_folder(tmp_path: Path) -> None:
    (tmp_path / "only").mkdir()
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        load_image_folder(tmp_path, InputSpec(8, 8, 3))
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", InputSpec(8, 8, 3))
