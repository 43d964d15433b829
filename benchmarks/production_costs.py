"""What each production feature costs on the prediction path, measured in one run.

    python benchmarks/production_costs.py [--before SRC] [--rounds 4]

Starts one ``tinyserve serve`` per configuration (every feature off, ``--cache memory``,
``--api-keys``, a traffic rollout; with ``--before``, also the tree at SRC, e.g. a
``git worktree`` of an older commit) and loads each in turn, the order reversed every other
round, with ``tinyserve bench http --concurrency 64``. For each it reports the server
process's CPU time per request (from /proc, so less sensitive to a busy machine than
throughput), the medians and their ratio to "off".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "samples" / "fashion" / "0000_ankle-boot.png"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tinyserve", "serve", "--port", str(port), "--log-level",
         "warning", *args],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"tinyserve serve {' '.join(args)} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a source tree (its src/) to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    options = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tinyserve-costs-"))
    keys = tmp / "keys.json"
    created = subprocess.run(
        [sys.executable, "-m", "tinyserve", "keys", "create", "bench", "--file", str(keys),
         "--rate", "1000000", "--burst", "1000000", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = json.loads(created.stdout)["key"]
    split = tmp / "split"
    shutil.copytree(ROOT / "models" / "fashion-cnn", split / "fashion-cnn")
    (split / "fashion-cnn" / "config.toml").write_text("traffic = {2 = 100}\n")
    base = ["--repo", str(ROOT / "models"), "--default-model", "fashion-cnn"]
    configs: dict[str, tuple[list[str], dict[str, str], list[str]]] = {
        "off": (base, {}, []),
        "cache memory (hits)": ([*base, "--cache", "memory"], {}, []),
        "api keys": ([*base, "--api-keys", str(keys)], {},
                     ["--header", f"Authorization: Bearer {key}"]),
        "traffic = {2 = 100}": (["--repo", str(split)], {}, []),
    }  # fmt: skip
    if options.before is not None:
        configs = {"before": (base, {"PYTHONPATH": str(options.before / "src")}, []), **configs}
    servers = {name: start(args, env) for name, (args, env, _) in configs.items()}
    per_request: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for round_ in range(options.rounds):
            names = list(configs) if round_ % 2 == 0 else list(reversed(configs))
            for name in names:
                process, url = servers[name]
                before = cpu_seconds(process.pid)
                out = subprocess.run(
                    [sys.executable, "-m", "tinyserve", "bench", "http", f"{url}/predict",
                     "--image", str(IMAGE), "--concurrency", "64", "--warmup", "0.5",
                     "--duration", str(options.duration), "--no-metrics", "--json",
                     *configs[name][2]],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                used = cpu_seconds(process.pid) - before
                step = json.loads(out)["steps"][0]
                if step["ok"] != step["requests"]:
                    raise RuntimeError(f"{name}: {step['statuses']}")
                per_request[name].append(used / step["requests"] * 1e6)
    finally:
        for process, _ in servers.values():
            process.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    off = statistics.median(per_request["off"])
    print("| server | server CPU per request, µs (each round) | median | vs off |")
    print("|---|---|---:|---:|")
    for name, values in per_request.items():
        median = statistics.median(values)
        rounds = " / ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {rounds} | {median:.0f} | {median / off:.2f} |")


if __name__ == "__main__":
    main()
