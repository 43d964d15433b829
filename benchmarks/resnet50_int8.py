"""INT8 versus FP32 throughput on a compute-heavy network: a ResNet-50-shaped model.

The bundled Fashion-MNIST model is too small for INT8 to matter (its batch-1 latency is
dominated by per-operator overhead), so this script builds a ResNet-50 (bottleneck blocks
3-4-6-3, 224x224x3 input, random weights: only the arithmetic matters here), exports it
through tinyserve's own export path (uint8 NHWC input, preprocessing in the graph), quantizes
it with ``tinyserve.quantize`` (static INT8, QDQ, per-channel, MinMax on noise images), and
measures both through ``tinyserve.engine`` at batch 32. Nothing it writes is committed.

    .venv/bin/python benchmarks/resnet50_int8.py --out runs/resnet50-int8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tinyserve.compare import throughput
from tinyserve.engine import Engine, EngineConfig
from tinyserve.manifest import InputSpec, Manifest, write_manifest
from tinyserve.quantize import AgreementBar, Calibration, QuantizeConfig, quantize
from tinyserve.repository import version_path
from tinyserve.training.export import to_onnx
from tinyserve.training.models import ServingModel

SIZE = 224


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet50(num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    c_in = 64
    for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        for b in range(blocks):
            layers.append(Bottleneck(c_in, width, 2 if b == 0 and i > 0 else 1))
            c_in = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    # Zero-init the last BN of each block (as torchvision offers) so activations stay bounded.
    for block in net.modules():
        if isinstance(block, Bottleneck):
            nn.init.zeros_(block.body[-1].weight)
            nn.init.normal_(block.body[-1].bias, 0, 0.1)
    return net.eval()


def noise_folder(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/resnet50-int8"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="images per throughput run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calibration-samples", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = InputSpec(SIZE, SIZE, 3, "RGB")
    model = ServingModel(resnet50(2), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    model_dir = args.out / "repo" / "resnet50"
    path = version_path(model_dir, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = to_onnx(model, spec)
    write_manifest(graph, Manifest(("a", "b"), spec, {"architecture": "resnet50-random"}))
    import onnx

    onnx.save(graph, str(path))
    data = noise_folder(args.out / "noise", per_class=24)
    result = quantize(
        QuantizeConfig(
            model_dir,
            mode="static",
            data=str(data),
            calibration=Calibration(samples=args.calibration_samples),
            bar=AgreementBar(max_accuracy_drop=100.0),  # random weights: accuracy is moot
            force=True,
        )
    )
    assert result.path is not None
    images = np.random.default_rng(1).integers(0, 256, (args.batch_size, SIZE, SIZE, 3), np.uint8)
    rows = []
    for threads in args.threads:
        rates = {}
        for name, p in (("fp32", path), ("int8", result.path)):
            engine = Engine(p, EngineConfig(intra_op_threads=threads, warmup_runs=1))
            rates[name] = throughput(engine, images, args.batch_size, args.images)
        rows.append({"threads": threads, **rates, "speedup": rates["int8"] / rates["fp32"]})
        print(
            f"{threads} thread(s), batch {args.batch_size}: FP32 {rates['fp32']:.1f} img/s, "
            f"INT8 {rates['int8']:.1f} img/s, x{rates['int8'] / rates['fp32']:.2f}",
            flush=True,
        )
    report = {
        "fp32_bytes": path.stat().st_size,
        "int8_bytes": result.path.stat().st_size,
        "top1_agreement_on_noise": result.gate.agreement,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    (args.out / "resnet50_int8.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
