"""Decode + resize of a large JPEG: tinyserve's draft-mode path against plain PIL.

A 4000x3000 JPEG (a photo from samples/photos scaled up, with sensor-like grain added so the
file has a camera-like size; one file per ``--grain`` level, since the entropy-coded size sets
how fast any decoder can go) is turned into 224x224 RGB pixels two ways, one after the other:

- plain PIL: ``Image.open(...).convert("RGB").resize((224, 224))``, i.e. decode every pixel,
  then resize, as a hand-written service does;
- tinyserve: ``decode_image`` with the model's input spec, which asks libjpeg for a reduced
  decode (DCT scaling, "draft mode") no smaller than the resize needs, then resizes.

Reports the median time per image of each and their ratio, and how far apart the two results
are (mean absolute difference per pixel, 0-255), so the speed-up is not bought with a different
picture.

    python benchmarks/large_photo_decode.py --runs 15 --grain 0,3,6
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tinyserve.imaging import ImageLimits, decode_image
from tinyserve.manifest import InputSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = InputSpec(224, 224, 3, "RGB", resize="crop", crop_fraction=0.875)


def make_photo(source: Path, size: tuple[int, int], quality: int, grain: float) -> bytes:
    """``source`` scaled to ``size`` with Gaussian grain (std ``grain``), saved as a JPEG."""
    rng = np.random.default_rng(0)
    image = Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, grain, (size[1], size[0], 3))
    grained = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    grained.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def plain_pil(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    # the same centre crop as the model's spec, so both sides produce the same picture
    width, height = image.size
    scale = max(SPEC.width / width, SPEC.height / height) / SPEC.crop_fraction
    box_w, box_h = SPEC.width / scale, SPEC.height / scale
    left, top = (width - box_w) / 2, (height - box_h) / 2
    box = (left, top, left + box_w, top + box_h)
    resized = image.resize((SPEC.width, SPEC.height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.uint8)


def tinyserve_path(data: bytes) -> np.ndarray:
    return decode_image(data, SPEC, ImageLimits())


def median_ms(fn: object, data: bytes, runs: int) -> float:
    assert callable(fn)
    fn(data)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(data: bytes, runs: int) -> dict[str, float]:
    plain = median_ms(plain_pil, data, runs)
    ours = median_ms(tinyserve_path, data, runs)
    difference = np.abs(
        plain_pil(data).astype(np.int16) - tinyserve_path(data).astype(np.int16)
    ).mean()
    return {
        "bytes": len(data),
        "plain_pil_ms": round(plain, 2),
        "tinyserve_ms": round(ours, 2),
        "speedup": round(plain / ours, 2),
        "mean_abs_pixel_difference": round(float(difference), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "samples/photos/cat.png")
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument(
        "--grain", default="0,3,6", help="Grain levels (std, 0-255), one file each."
    )
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args()

    results = []
    for grain in (float(g) for g in args.grain.split(",")):
        data = make_photo(args.source, (args.width, args.height), args.quality, grain)
        results.append({"grain": grain, **measure(data, args.runs)})
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(
        f"{args.width}x{args.height} JPEG (quality {args.quality}) -> {SPEC.width}x{SPEC.height} "
        f"RGB, centre crop {SPEC.crop_fraction}; median of {args.runs} runs\n"
    )
    print("| grain | file | plain PIL ms | tinyserve ms | speed-up | mean abs pixel diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['grain']:g} | {r['bytes'] / 1e6:.2f} MB | {r['plain_pil_ms']:.1f} | "
            f"{r['tinyserve_ms']:.1f} | {r['speedup']:.1f}x | "
            f"{r['mean_abs_pixel_difference']:.2f} |"
        )


if __name__ == "__main__":
    main()
