"""tinyserve against a plain FastAPI app, LitServe and bare ONNX Runtime, on loopback.

Same model file, same image, same load tool (``tinyserve bench http``) and settings for every
server; servers run one after another, in one run. tinyserve is measured with each body
(multipart, raw, V2 binary, JSON) and with ``--workers 2``. Models: the bundled fashion-cnn
as FP32 (``fashion-cnn:1``) and INT8 (``fashion-cnn:2``), both HTTP-bound; a
ResNet-50-shaped network with random weights (``resnet50``, compute-bound, built here, never
committed); EfficientNet-Lite0 from ``tinyserve import efficientnet-lite0``
(``efficientnet-lite0=PATH/TO/MODEL/FOLDER``, a real photo).

    python benchmarks/compare_servers.py --reps 3 --duration 5 --out runs/compare-servers

Writes ``results.json`` and ``results.md``: figures as medians over the repetitions, each
also as a ratio to tinyserve measured in the same run, and the goals of the performance
issue (share of bare ONNX Runtime's best images/s at c=64, V2 against raw, c=1 p50 against
0.4 ms and against the FastAPI app), each with its measured ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_resnet50(out: Path) -> Path:
    """A ResNet-50-shaped tinyserve model (random weights, 224x224 RGB) in ``out/resnet50``."""
    path = out / "resnet50" / "1" / "model.onnx"
    if path.is_file():
        return out
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from resnet50_int8 import SIZE, resnet50

    from tinyserve.manifest import InputSpec, Manifest, write_manifest
    from tinyserve.training.export import to_onnx
    from tinyserve.training.models import ServingModel

    torch.manual_seed(0)
    spec = InputSpec(SIZE, SIZE, 3, "RGB", resize="crop", crop_fraction=0.875)
    model = ServingModel(resnet50(2), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    graph = to_onnx(model, spec)
    write_manifest(graph, Manifest(("a", "b"), spec, {"architecture": "resnet50-random"}))
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(path))
    return out


@contextmanager
def running(
    cmd: list[str], env: dict[str, str], probe: str, body: dict[str, Any]
) -> Iterator[None]:
    """Start a server, wait until ``probe`` answers 200 to ``body``, stop it afterwards."""
    log = open(os.devnull, "w")  # closed in the finally block below
    # A session of its own, so that stopping it stops every worker process it started too
    # (LitServe's inference workers outlive a terminated parent and keep using the CPU).
    process = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=log, stderr=log, cwd=ROOT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {process.returncode}")
            try:
                if httpx.post(probe, timeout=5, **body).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} did not answer in 120 s")
            time.sleep(0.2)
        yield
    finally:
        stop_group(process)
        log.close()


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL whatever is left of it after 30 s."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def load(url: str, image: Path, body: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [
        PY, "-m", "tinyserve", "bench", "http", url, "--image", str(image), "--body", body,
        "--concurrency", args.concurrency, "--warmup", str(args.warmup),
        "--duration", str(args.duration), "--json", "--no-metrics",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return list(json.loads(out.stdout)["steps"])


def bare_ort(model_dir: Path, batch_sizes: str, seconds: float) -> list[dict[str, Any]]:
    cmd = [
        PY, "-m", "tinyserve", "bench", "model", str(model_dir), "--batch-sizes", batch_sizes,
        "--threads", "2", "--seconds", str(seconds), "--json",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return list(json.loads(out.stdout)["results"])


def servers(repo: Path, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = str(repo / name / "1" / "model.onnx")
    threads = {"THREADS": "2"}
    tiny = [PY, "-m", "tinyserve", "serve", "--repo", str(repo), "--log-level", "warning",
            "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
    return [
        {"name": "tinyserve", "body": "multipart", "path": "/infer", "cmd": tiny, "env": {}},
        {"name": "tinyserve (raw)", "body": "raw", "path": "/predict", "cmd": tiny, "env": {}},
        {
            "name": "tinyserve (v2)",
            "body": "v2",
            "path": f"/v2/models/{name}/infer",
            "cmd": tiny,
            "env": {},
        },
        {"name": "tinyserve (json)", "body": "json", "path": "/predict", "cmd": tiny, "env": {}},
        {
            "name": "tinyserve x2 workers (raw)",
            "body": "raw",
            "path": "/predict",
            "cmd": [*tiny, "--workers", "2"],
            "env": {},
        },
        {
            "name": "fastapi",
            "body": "multipart",
            "path": "/infer",
            "cmd": [
                PY,
                "-m",
                "uvicorn",
                "benchmarks.alternatives.fastapi_app:app",
                "--log-level",
                "warning",
                "--workers",
                "1",
            ],  # fmt: skip
            "env": {"MODEL": model, **threads},
        },
        {
            "name": "litserve",
            "body": "json",
            "path": "/predict",
            "cmd": [PY, "benchmarks/alternatives/litserve_app.py"],
            "env": {"MODEL": model, "MAX_BATCH_SIZE": str(args.max_batch_size), **threads},
        },
    ]


def probe_body(kind: str, image: Path) -> dict[str, Any]:
    """httpx arguments of one request as the load tool sends it."""
    from tinyserve.bench.client import encode_body, v2_header

    data = image.read_bytes()
    body, content_type = encode_body(data, image.name, kind)
    headers = {"content-type": content_type}
    if kind == "v2":
        headers["inference-header-content-length"] = str(len(v2_header(len(data) + 4)))
    return {"content": body, "headers": headers}


def run_model(name: str, repo: Path, image: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every server once per repetition, round-robin, and bare ONNX Runtime between them:
    when other work comes and goes on the machine, it spreads over every server alike
    instead of landing on whichever ran at the time."""
    results: dict[str, Any] = {"model": name, "image": str(image), "servers": {}}
    wanted = set(args.servers.split(","))
    chosen = [s for s in servers(repo, name, args) if s["name"] in wanted]
    bare: list[list[dict[str, Any]]] = []
    for rep in range(args.reps):
        for server in chosen:
            port = free_port()
            cmd = list(server["cmd"])
            cmd += [str(port)] if server["name"] == "litserve" else ["--port", str(port)]
            url = f"http://127.0.0.1:{port}{server['path']}"
            print(f"[{name}] rep {rep + 1}/{args.reps}: {server['name']} ...", flush=True)
            with running(cmd, server["env"], url, probe_body(server["body"], image)):
                measured = load(url, image, server["body"], args)
            entry = results["servers"].setdefault(
                server["name"], {"body": server["body"], "reps": []}
            )
            entry["reps"].append(measured)
        bare.append(bare_ort(repo / name, "1,8,32,64", max(2.0, args.duration / 2)))
    # Each batch size's median over the repetitions.
    results["bare_ort"] = [
        {**rows[0], "throughput_ips": statistics.median(r["throughput_ips"] for r in rows),
         "latency_ms": {"p50": statistics.median(r["latency_ms"]["p50"] for r in rows)}}
        for rows in zip(*bare, strict=True)
    ]  # fmt: skip
    return results


def medians(reps: list[list[dict[str, Any]]]) -> dict[int, dict[str, float]]:
    table: dict[int, dict[str, float]] = {}
    for i, step in enumerate(reps[0]):
        c = int(step["concurrency"])
        rows = [rep[i] for rep in reps]
        table[c] = {
            "rps": statistics.median(r["ok_rps"] for r in rows),
            "p50": statistics.median(r["latency_ms"]["p50"] for r in rows),
            "p99": statistics.median(r["latency_ms"]["p99"] for r in rows),
            "errors": sum(r["requests"] - r["ok"] for r in rows),
        }
    return table


def markdown(all_results: list[dict[str, Any]]) -> str:
    lines = []
    for result in all_results:
        lines.append(f"### {result['model']} ({Path(result['image']).name})\n")
        lines.append(
            "| server | body | c | requests/s | × tinyserve | p50 ms | p99 ms | errors |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|"
        )
        base = medians(result["servers"]["tinyserve"]["reps"])
        for name, data in result["servers"].items():
            for c, row in medians(data["reps"]).items():
                ratio = row["rps"] / base[c]["rps"] if base[c]["rps"] else 0.0
                lines.append(
                    f"| {name} | {data['body']} | {c} | {row['rps']:,.0f} | {ratio:.2f} | "
                    f"{row['p50']:.2f} | {row['p99']:.2f} | {row['errors']} |"
                )
        best_bare = max(row["throughput_ips"] for row in result["bare_ort"])
        share = ", ".join(
            f"c={c}: {row['rps'] / best_bare:.0%}" for c, row in base.items() if best_bare
        )
        lines.append(f"\ntinyserve's requests/s as a share of the best bare-ORT images/s: {share}")
        lines.append("\nBare ONNX Runtime on the same model (2 threads, no HTTP):\n")
        lines.append("| batch | images/s | p50 ms per batch |\n|---:|---:|---:|")
        for row in result["bare_ort"]:
            lines.append(
                f"| {row['batch_size']} | {row['throughput_ips']:,.0f} | "
                f"{row['latency_ms']['p50']:.2f} |"
            )
        lines += ["", *goals(result), ""]
    return "\n".join(lines)


def goals(result: dict[str, Any]) -> list[str]:
    """The performance goals, each with this run's ratio (None where a server was not run)."""
    runs = {name: medians(data["reps"]) for name, data in result["servers"].items()}
    best_bare = max(row["throughput_ips"] for row in result["bare_ort"])
    heavy = result["model"] in ("resnet50", "efficientnet-lite0")
    share_goal = 0.97 if heavy else (0.50 if result.get("int8") else 0.75)
    top = max(max(table) for table in runs.values())
    lines = ["| goal | measured | ratio | met |", "|---|---:|---:|:---:|"]

    def row(goal: str, measured: str, ratio: float, met: bool) -> None:
        lines.append(f"| {goal} | {measured} | {ratio:.2f} | {'yes' if met else 'no'} |")

    for name in ("tinyserve (raw)", "tinyserve", "tinyserve (v2)", "tinyserve x2 workers (raw)"):
        if name in runs and best_bare:
            rps = max(r["rps"] for r in runs[name].values())
            row(f"{name}: best req/s ≥ {share_goal:.0%} of bare ORT's best "
                f"({best_bare:,.0f} img/s)", f"{rps:,.0f}", rps / best_bare,
                rps >= share_goal * best_bare)  # fmt: skip
    if "tinyserve (v2)" in runs and "tinyserve (raw)" in runs:
        v2, raw = runs["tinyserve (v2)"][top]["rps"], runs["tinyserve (raw)"][top]["rps"]
        row(f"V2 within 10 % of raw at c={top}", f"{v2:,.0f} vs {raw:,.0f}", v2 / raw,
            v2 >= 0.9 * raw)  # fmt: skip
    if 1 in runs.get("tinyserve (raw)", {}):
        p50 = runs["tinyserve (raw)"][1]["p50"]
        if not heavy:
            row("c=1 p50 ≤ 0.4 ms (raw)", f"{p50:.2f} ms", p50 / 0.4, p50 <= 0.4)
        if 1 in runs.get("fastapi", {}):
            app = runs["fastapi"][1]["p50"]
            row("c=1 p50 below the FastAPI app's", f"{p50:.2f} vs {app:.2f} ms", p50 / app,
                p50 < app)  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare-servers"))
    parser.add_argument(
        "--models",
        default="fashion-cnn:1,fashion-cnn:2,resnet50",
        help="fashion-cnn[:VERSION], resnet50, efficientnet-lite0=FOLDER; comma-separated.",
    )
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--fashion-version", type=int, default=1, help="1: FP32, 2: INT8 (models/fashion-cnn)."
    )
    parser.add_argument(
        "--servers",
        default="tinyserve,tinyserve (raw),tinyserve (v2),tinyserve (json),"
        "tinyserve x2 workers (raw),fastapi,litserve",
        help="Which servers to run, comma-separated (tinyserve is the reference for ratios).",
    )
    args = parser.parse_args()
    if "tinyserve" not in args.servers.split(","):
        parser.error("--servers must include tinyserve, the reference of every ratio")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.models.split(","):
        name, _, given = spec.partition(":") if "=" not in spec else spec.partition("=")
        if name == "fashion-cnn":
            version = int(given or args.fashion_version)
            # One version alone (as version 1), so every server runs the very same file.
            repo = args.out / f"repo-fashion-v{version}"
            if not (repo / name / "1" / "model.onnx").is_file():
                (repo / name / "1").mkdir(parents=True)
                source = ROOT / f"models/fashion-cnn/{version}/model.onnx"
                shutil.copy(source, repo / name / "1")
            image = ROOT / "samples/fashion/0000_ankle-boot.png"
        elif name == "resnet50":
            repo, image = build_resnet50(args.out / "repo"), ROOT / "samples/photos/cat.png"
        elif name == "efficientnet-lite0" and given:
            repo = args.out / "repo-lite0"
            if not (repo / name / "1" / "model.onnx").is_file():
                (repo / name / "1").mkdir(parents=True)
                source = max(Path(given).glob("*/model.onnx"))  # its latest version
                shutil.copy(source, repo / name / "1")
            image = ROOT / "samples/photos/cat.png"
        else:
            raise SystemExit(
                f"unknown model {spec!r}: fashion-cnn[:VERSION], resnet50 or "
                "efficientnet-lite0=FOLDER (made by 'tinyserve import efficientnet-lite0')"
            )
        result = run_model(name, repo, image, args)
        result["int8"] = name == "fashion-cnn" and version == 2
        result["model"] = spec if name != "efficientnet-lite0" else name
        results.append(result)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
