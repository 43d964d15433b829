"""Cold and warm latency of ``tinyserve.serverless.handler`` with the model in S3 (moto).

Starts moto's S3 server on loopback, uploads a model folder, then runs the handler in fresh
Python processes, as a new Lambda container would:

* cold, empty cache: process start -> first response, the model downloaded from S3;
* cold, cached: the same with the cache left by an earlier container (S3 listed, no download);
* warm: later calls in the same process (p50/p95/p99 over ``--warm-calls``).

Cold figures are wall time from spawning the process to reading its first response, so they
include the interpreter start and every import, as a Lambda init + first invoke does.

    .venv/bin/python benchmarks/serverless_cold_warm.py --runs 10 --warm-calls 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import base64, json, sys, time
from tinyserve.serverless import handler
event = {"body": base64.b64encode(open(sys.argv[1], "rb").read()).decode(),
         "isBase64Encoded": True, "headers": {"content-type": "image/png"}}
first = json.loads(handler(event, None)["body"])
print(json.dumps(first), flush=True)
sys.stdin.readline()  # the parent has taken its cold-start reading
warm = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    body = json.loads(handler(event, None)["body"])
    warm.append(time.perf_counter() - t)
    assert body["label"] == first["label"] and not body["cold_start"]
print(json.dumps({"warm_s": warm}), flush=True)
"""


def one_container(env: dict[str, str], image: Path, warm_calls: int) -> tuple[float, dict, list]:
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(image), str(warm_calls)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    first = json.loads(child.stdout.readline())
    cold = time.perf_counter() - started
    child.stdin.write("\n")
    child.stdin.flush()
    warm = json.loads(child.stdout.readline())["warm_s"]
    child.wait(30)
    if first.get("label") is None:
        raise SystemExit(f"the handler failed: {first}")
    return cold, first, warm


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "fashion-cnn" / "1")
    parser.add_argument("--image", type=Path, default=ROOT / "samples/fashion/0000_ankle-boot.png")
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per cold case")
    parser.add_argument("--warm-calls", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="TINYSERVE_THREADS (Lambda: 1-2)")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
    s3.create_bucket(Bucket="bench-models")
    s3.upload_file(str(args.model / "model.onnx"), "bench-models", "m/fashion-cnn/1/model.onnx")

    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "TINYSERVE_MODEL_URI": "s3://bench-models/m/fashion-cnn",
            "TINYSERVE_THREADS": str(args.threads),
        }
        results: dict[str, list[float]] = {"empty": [], "cached": []}
        loads: dict[str, list[float]] = {"empty": [], "cached": []}
        warm: list[float] = []
        first: dict = {}
        for i in range(args.runs):
            for case in ("empty", "cached"):
                cache = Path(tmp) / f"cache-{i}"  # "empty" fills it, "cached" reuses it
                cold, first, calls = one_container(
                    {**env, "TINYSERVE_CACHE_DIR": str(cache)}, args.image, args.warm_calls
                )
                results[case].append(cold)
                loads[case].append(first["timings"]["model_load_s"])
                warm.extend(calls)
    server.stop()

    print(f"model {args.model}, image {args.image.name} -> {first['label']!r}")
    print(f"{args.runs} fresh processes per cold case; {len(warm)} warm calls in all")
    print("| figure | p50 | p95 | max |")
    print("|---|---:|---:|---:|")
    for case, label in (("empty", "cold start, empty cache"), ("cached", "cold start, cached")):
        v = results[case]
        print(f"| {label}: spawn -> first response (s) | {statistics.median(v):.3f} | "
              f"{pct(v, 95):.3f} | {max(v):.3f} |")  # fmt: skip
        m = loads[case]
        print(f"| {label}: model_load_s | {statistics.median(m):.3f} | {pct(m, 95):.3f} | "
              f"{max(m):.3f} |")  # fmt: skip
    ms = [w * 1000 for w in warm]
    print(f"| warm call (ms) | {pct(ms, 50):.3f} | {pct(ms, 95):.3f} | {max(ms):.3f} |")
    print(f"warm p99 {pct(ms, 99):.3f} ms; preprocess_s {first['timings']['preprocess_s']}, "
          f"inference_s {first['timings']['inference_s']} (first call)")  # fmt: skip


if __name__ == "__main__":
    main()
