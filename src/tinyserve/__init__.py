"""tinyserve: train, export, optimize and serve compact image classifiers on CPUs.

Importing the package loads nothing heavy; the names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Engine": "tinyserve.engine",
    "EngineConfig": "tinyserve.engine",
    "ImageLimits": "tinyserve.imaging",
    "InputSpec": "tinyserve.manifest",
    "Manifest": "tinyserve.manifest",
    "TinyServeError": "tinyserve.errors",
    "decode_image": "tinyserve.imaging",
}

__all__ = [
    "Engine",
    "EngineConfig",
    "ImageLimits",
    "InputSpec",
    "Manifest",
    "TinyServeError",
    "__version__",
    "decode_image",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tinyserve' has no attribute {name!r}")
