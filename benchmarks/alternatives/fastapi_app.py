"""A plain FastAPI image service as seed 002 describes it, used as a baseline.

One uvicorn worker, multipart upload at /infer, PIL + NumPy preprocessing, one
``session.run`` per request, no batching. It serves the same tinyserve model file (uint8 NHWC
input), so preprocessing here is only decode, colour conversion and resize.

    MODEL=models/fashion-cnn/1/model.onnx uvicorn benchmarks.alternatives.fastapi_app:app
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image

MODEL = os.environ.get("MODEL", "models/fashion-cnn/1/model.onnx")
options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("THREADS", "2"))
session = ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
LABELS = json.loads(meta["tinyserve.labels"])
SPEC = json.loads(meta["tinyserve.input"])
INPUT = session.get_inputs()[0].name

app = FastAPI(title="baseline")


def preprocess(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert(SPEC["color"])
    image = image.resize((SPEC["width"], SPEC["height"]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8).reshape(SPEC["height"], SPEC["width"], -1)
    return array[None]


@app.post("/infer")
async def infer(file: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008
    try:
        batch = preprocess(await file.read())
    except Exception as exc:
        raise HTTPException(400, f"invalid image: {exc}") from exc
    logits = session.run(None, {INPUT: batch})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    return {
        "predictions": [{"label": LABELS[i], "confidence": float(probs[i])} for i in top],
    }
