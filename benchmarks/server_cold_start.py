"""Server cold start and memory: ``tinyserve serve`` spawn -> first successful prediction.

Each run starts a fresh ``tinyserve serve`` process on a free loopback port and sends the
sample image to ``/predict`` every 2 ms (connection refused until the port is bound, 503 until
the models are warm) until one answer is 200. Then it sends ``--requests`` more, one at a
time, and reads the server's resident memory (VmRSS) and its peak (VmHWM) from /proc before
stopping it with SIGTERM.

    python benchmarks/server_cold_start.py --runs 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def predict(port: int, image: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/predict", image, {"content-type": "image/png"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def memory_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def one_run(repo: Path, image: bytes, requests: int, extra: list[str]) -> dict[str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "tinyserve", "serve", "--repo", str(repo), "--port", str(port),
           "--log-level", "warning", *extra]  # fmt: skip
    log = tempfile.TemporaryFile()  # closed in the finally block below
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited: {log.read().decode()[-2000:]}")
            try:
                if predict(port, image) == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() - started > 60:
                raise RuntimeError("no successful prediction within 60 s")
            time.sleep(0.002)
        cold = time.perf_counter() - started
        for _ in range(requests):
            if predict(port, image) != 200:
                raise RuntimeError("a prediction failed after start-up")
        rss, peak = memory_mb(process.pid)
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    return {"cold_start_s": cold, "rss_mb": rss, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--image", type=Path, default=ROOT / "samples/fashion/0000_ankle-boot.png")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000, help="Requests after start-up.")
    parser.add_argument("--json", action="store_true")
    args, extra = parser.parse_known_args()  # anything else goes to `tinyserve serve`
    image = args.image.read_bytes()
    runs = [one_run(args.repo, image, args.requests, extra) for _ in range(args.runs)]
    cold = sorted(r["cold_start_s"] for r in runs)
    summary = {
        "runs": len(runs),
        "cold_start_s": {
            "min": round(cold[0], 3),
            "p50": round(statistics.median(cold), 3),
            "max": round(cold[-1], 3),
        },
        "rss_mb_after_requests": round(statistics.median(r["rss_mb"] for r in runs), 1),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "requests_after_start": args.requests,
    }
    if args.json:
        print(json.dumps({"summary": summary, "runs": runs}, indent=1))
        return
    c = summary["cold_start_s"]
    print(f"cold start over {len(runs)} runs: min {c['min']:.3f} s, p50 {c['p50']:.3f} s, "
          f"max {c['max']:.3f} s")  # fmt: skip
    print(f"RSS after {args.requests} requests: {summary['rss_mb_after_requests']} MB "
          f"(peak {summary['peak_rss_mb']} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
