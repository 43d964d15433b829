"""Write the KServe CRD schemas that tests/test_k8s.py validates deploy/k8s/kserve against.

Usage: python subset.py UPSTREAM_CRD_DIR  (kserve/kserve's config/crd/full at the commit
named in README.md). Descriptions are dropped; the ServingRuntime schema is otherwise whole.
The InferenceService schema keeps only ``spec.predictor`` without the per-framework shortcut
fields (``sklearn``, ``onnx``... which this runtime does not use) and ``workerSpec``, and no
``status``, so that a vendored copy stays under 100 kB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

FRAMEWORKS = {"huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch", "sklearn",
              "tensorflow", "triton", "xgboost", "workerSpec"}  # fmt: skip


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def schema(crd_file: Path, version: str) -> dict[str, Any]:
    crd = yaml.safe_load(crd_file.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return {
        "group": crd["spec"]["group"],
        "kind": crd["spec"]["names"]["kind"],
        "version": version,
        "openAPIV3Schema": strip(served["schema"]["openAPIV3Schema"]),
    }


def main(upstream: Path) -> None:
    here = Path(__file__).parent
    runtime = schema(upstream / "serving.kserve.io_servingruntimes.yaml", "v1alpha1")
    runtime["openAPIV3Schema"]["properties"].pop("status", None)
    (here / "servingruntime.schema.json").write_text(json.dumps(runtime, sort_keys=True) + "\n")
    isvc = schema(upstream / "serving.kserve.io_inferenceservices.yaml", "v1beta1")
    root = isvc["openAPIV3Schema"]
    root["properties"].pop("status", None)
    spec = root["properties"]["spec"]
    spec["properties"] = {"predictor": spec["properties"]["predictor"]}
    predictor = spec["properties"]["predictor"]["properties"]
    for name in FRAMEWORKS:
        predictor.pop(name)
    (here / "inferenceservice.schema.json").write_text(json.dumps(isvc, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
