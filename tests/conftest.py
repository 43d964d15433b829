"""Shared fixtures: a generated image folder, and tiny models trained and exported from it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from tinyserve.datasets import FASHION_MNIST_DIR

if TYPE_CHECKING:
    from tinyserve.training.train import TrainConfig

# s3 / s3_endpoint: moto on loopback; serve: a real `tinyserve serve` process on loopback
pytest_plugins = ["s3_endpoint", "live_server", "redis_server"]  # + redis_server: a real Redis

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = ROOT / "models" / "fashion-cnn"
SAMPLES = ROOT / "samples" / "fashion"

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (make data installs it)",
)

COLORS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (40, 50, 210)}


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG file whose header declares ``width x height`` pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def color_image(name: str, size: tuple[int, int] = (24, 20), seed: int = 1) -> Image.Image:
    """A noisy image of one of the ``COLORS`` classes, like those in the generated folder."""
    noise = np.random.default_rng(seed).integers(-40, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(COLORS[name]) + noise, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, per_class: int = 16, size: tuple[int, int] = (24, 20)) -> Path:
    """Three classes of noisy, coloured images, saved as a mix of PNG and JPEG."""
    for c, name in enumerate(COLORS):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            suffix = ".png" if (i + c) % 2 else ".jpg"
            color_image(name, size, seed=1000 * c + i).save(folder / f"{i:03d}{suffix}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "colors")


def tiny_train_config(out: Path, image_folder: Path, **options: Any) -> TrainConfig:
    """A quick run on the generated colour folder: 16x16 RGB, batch 8, one thread."""
    from tinyserve.training.train import TrainConfig

    settings: dict[str, Any] = dict(
        arch="custom_cnn", epochs=8, batch_size=8, lr=0.05, image_size=16, channels=3,
        val_fraction=0.25, threads=1,
    )  # fmt: skip
    return TrainConfig(out=out, data=str(image_folder), **{**settings, **options})


@pytest.fixture(scope="session")
def train_tiny(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Callable[..., Path]:
    """Factory: train an architecture for a few quick epochs; returns best.pt."""
    from tinyserve.training.train import fit

    def train(arch: str = "custom_cnn", epochs: int = 8, **options: object) -> Path:
        out = tmp_path_factory.mktemp(f"run-{arch}")
        config = tiny_train_config(out, image_folder, arch=arch, epochs=epochs, **options)
        return fit(config, progress=False).best_path

    return train


@pytest.fixture(scope="session")
def tiny_checkpoint(train_tiny: Callable[..., Path]) -> Path:
    return train_tiny()


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A model repository holding ``colors/1/model.onnx`` exported from the tiny checkpoint."""
    from tinyserve.training.export import ExportConfig, ParityBar, export_checkpoint

    repo = tmp_path_factory.mktemp("repo")
    export_checkpoint(
        ExportConfig(tiny_checkpoint, "colors", repo=repo, parity=ParityBar(samples=12))
    )
    return repo


@pytest.fixture
def app_client() -> Iterator[Callable[..., TestClient]]:
    """Factory: a TestClient, lifespan running, for ``create_app(ServerConfig(**options))``."""
    from tinyserve.app import ServerConfig, create_app

    clients: list[TestClient] = []

    def make(**options: Any) -> TestClient:
        client = TestClient(create_app(ServerConfig(**options)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
