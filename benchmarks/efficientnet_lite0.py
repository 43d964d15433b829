"""EfficientNet-Lite0 (pretrained ImageNet) through the engine: FP32 and INT8, speed and agreement.

Takes the model made by ``tinyserve import efficientnet-lite0``, quantizes it with the
conversion ``tinyserve quantize`` runs (``tinyserve.quantize.convert``: dynamic INT8, and
static INT8 QDQ per-channel MinMax), and measures every variant through ``tinyserve.engine``
(``tinyserve.bench.model``): batch-1 latency and throughput per batch size and thread count.
Agreement is top-1 of INT8 vs FP32 on the sample photos under several crops and mirrored.

ImageNet itself is not available here, so the static calibration runs on other crops of the
same photos (0.5 and 0.7 of the shorter side) than those the agreement is measured on (0.875
and 1.0): an indication, not an accuracy figure. Nothing it writes is committed.

    tinyserve import efficientnet-lite0 --repo /tmp/zoo --images samples/photos
    .venv/bin/python benchmarks/efficientnet_lite0.py /tmp/zoo/efficientnet-lite0 --out runs/lite0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from unittest import mock

import numpy as np

import tinyserve.quantize as quantize
from tinyserve.bench.model import ModelBenchConfig, bench_model
from tinyserve.engine import Engine, EngineConfig
from tinyserve.imaging import Pixels, load_image
from tinyserve.manifest import InputSpec, read_manifest
from tinyserve.predict import expand_images
from tinyserve.repository import resolve

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION_CROPS = (0.5, 0.7)
AGREEMENT_CROPS = (0.875, 1.0)


def views(photos: list[Path], spec: InputSpec, crops: tuple[float, ...]) -> Pixels:
    """Each photo at each crop fraction, and mirrored."""
    out: list[Pixels] = []
    for fraction in crops:
        cropped = dataclasses.replace(spec, resize="crop", crop_fraction=fraction)
        for photo in photos:
            pixels = load_image(photo, cropped)
            out += [pixels, np.ascontiguousarray(pixels[:, ::-1])]
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder made by tinyserve import")
    parser.add_argument("--photos", type=Path, default=ROOT / "samples" / "photos")
    parser.add_argument("--out", type=Path, default=Path("runs/lite0"))
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    parent = resolve(args.model_dir)
    manifest = read_manifest(parent.path)
    photos = expand_images([args.photos])
    calibration = views(photos, manifest.input, CALIBRATION_CROPS)
    probe = views(photos, manifest.input, AGREEMENT_CROPS)

    args.out.mkdir(parents=True, exist_ok=True)
    variants = {"fp32": parent.path}
    for mode in ("dynamic", "static"):
        target = args.out / mode / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        config = quantize.QuantizeConfig(args.model_dir, mode=mode)
        with mock.patch.object(quantize, "calibration_images", lambda *_: calibration):
            quantize.convert(parent.path, target, manifest, config)
        target.with_name("prepared.onnx").unlink(missing_ok=True)
        variants[mode] = target

    reference = Engine(parent.path, EngineConfig(warmup_runs=0)).infer(probe).argmax(1)
    results: dict[str, dict[str, object]] = {}
    for name, path in variants.items():
        engine = Engine(path, EngineConfig(warmup_runs=0))
        logits = engine.infer(probe)
        top5 = np.argsort(-logits, axis=1)[:, :5]
        results[name] = {
            "bytes": path.stat().st_size,
            "top1_agreement_with_fp32": float((logits.argmax(1) == reference).mean()),
            "probe_images": len(probe),
            "top1": [engine.labels[i] for i in logits.argmax(1)],
            "top5_first_view": {
                p.name: [engine.labels[i] for i in top5[2 * k]] for k, p in enumerate(photos)
            },
        }
        del engine
        bench = bench_model(
            ModelBenchConfig(
                str(path),
                batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                threads=tuple(int(t) for t in args.threads.split(",")),
                seconds=args.seconds,
            )
        )
        results[name]["bench"] = [dataclasses.asdict(step) for step in bench.results]
        for step in bench.results:
            print(
                f"{name:8s} threads {step.threads} batch {step.batch_size:3d}: "
                f"p50 {step.latency_ms['p50']:8.2f} ms  p99 {step.latency_ms['p99']:8.2f} ms  "
                f"{step.throughput_ips:8.1f} img/s"
            )
        print(
            f"{name:8s} {results[name]['bytes'] / 1e6:.2f} MB, top-1 agreement with fp32 "
            f"{results[name]['top1_agreement_with_fp32']:.2%} on {len(probe)} views"
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
