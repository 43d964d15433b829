"""LitServe serving the same tinyserve model with its own dynamic batching, as a baseline.

Configured as LitServe's documentation recommends for batching on CPU: ``max_batch_size`` and
``batch_timeout`` on the LitAPI, one worker, ``batch``/``unbatch`` over NumPy arrays. Requests
are JSON ``{"image": "<base64>"}``.

    MODEL=models/fashion-cnn/1/model.onnx python benchmarks/alternatives/litserve_app.py 8001
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from typing import Any

import litserve as ls
import numpy as np
from PIL import Image

MODEL = os.environ.get("MODEL", "models/fashion-cnn/1/model.onnx")


class ImageAPI(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("THREADS", "2"))
        self.session = ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels = json.loads(meta["tinyserve.labels"])
        self.spec = json.loads(meta["tinyserve.input"])
        self.input = self.session.get_inputs()[0].name

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads the annotation
        data = base64.b64decode(request["image"])
        image = Image.open(io.BytesIO(data)).convert(self.spec["color"])
        image = image.resize((self.spec["width"], self.spec["height"]), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).reshape(
            self.spec["height"], self.spec["width"], -1
        )

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, logits: np.ndarray) -> dict[str, Any]:
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:5]
        return {
            "predictions": [{"label": self.labels[i], "confidence": float(probs[i])} for i in top]
        }


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8001
    api = ImageAPI(
        max_batch_size=int(os.environ.get("MAX_BATCH_SIZE", "32")),
        batch_timeout=float(os.environ.get("BATCH_TIMEOUT", "0.005")),
    )
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(
        port=port, host="127.0.0.1", generate_client_file=False
    )
