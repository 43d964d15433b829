"""The serving side must never import torch or the training package."""

from __future__ import annotations

import subprocess
import sys

import pytest

SERVING_MODULES = [
    "tinyserve",
    "tinyserve.errors",
    "tinyserve.manifest",
    "tinyserve.imaging",
    "tinyserve.datasets",
    "tinyserve.repository",
    "tinyserve.engine",
    "tinyserve.evaluate",
    "tinyserve.quantize",
    "tinyserve.compare",
    "tinyserve.predict",
    "tinyserve.metrics",
    "tinyserve.batcher",
    "tinyserve.registry",
    "tinyserve.openapi",
    "tinyserve.app",
    "tinyserve.v2",
    "tinyserve.v2_tensors",
    "tinyserve.sources",
    "tinyserve.serverless",
    "tinyserve.onnx_import",
    "tinyserve.settings",
    "tinyserve.cli",
    "tinyserve.cli.options",
    "tinyserve.cli.train",
    "tinyserve.cli.models",
    "tinyserve.cli.serve",
    "tinyserve.cli.bench",
    "tinyserve.bench.stats",
    "tinyserve.bench.model",
    "tinyserve.bench.client",
    "tinyserve.bench.scrape",
    "tinyserve.bench.loadgen",
    "tinyserve.bench.report",
    "tinyserve.bench.noop",
]


@pytest.mark.parametrize("module", SERVING_MODULES)
def test_serving_module_does_not_import_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('tinyserve.training')]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_pinned() -> None:
    import tinyserve

    assert tinyserve.__all__ == sorted(tinyserve.__all__)
    assert tinyserve.__all__ == [
        "Engine",
        "EngineConfig",
        "ImageLimits",
        "InputSpec",
        "Manifest",
        "TinyServeError",
        "__version__",
        "decode_image",
    ]
    for name in tinyserve.__all__:
        assert getattr(tinyserve, name) is not None
