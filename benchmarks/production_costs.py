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
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from reliability import IMAGE, ROOT, Server


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
    models, base = ROOT / "models", ["--default-model", "fashion-cnn"]
    configs: dict[str, tuple[Path, list[str], dict[str, str], list[str]]] = {
        "off": (models, base, {}, []),
        "cache memory (hits)": (models, [*base, "--cache", "memory"], {}, []),
        "api keys": (models, [*base, "--api-keys", str(keys)], {},
                     ["--header", f"Authorization: Bearer {key}"]),
        "traffic = {2 = 100}": (split, [], {}, []),
    }  # fmt: skip
    if options.before is not None:
        before_env = {"PYTHONPATH": str(options.before / "src")}
        configs = {"before": (models, base, before_env, []), **configs}
    servers = {name: Server(repo, *args, env=env) for name, (repo, args, env, _) in configs.items()}
    per_request: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for round_ in range(options.rounds):
            names = list(configs) if round_ % 2 == 0 else list(reversed(configs))
            for name in names:
                server = servers[name]
                before = server.cpu_seconds()
                out = subprocess.run(
                    [sys.executable, "-m", "tinyserve", "bench", "http", f"{server.url}/predict",
                     "--image", str(IMAGE), "--concurrency", "64", "--warmup", "0.5",
                     "--duration", str(options.duration), "--no-metrics", "--json",
                     *configs[name][3]],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                used = server.cpu_seconds() - before
                step = json.loads(out)["steps"][0]
                if step["ok"] != step["requests"]:
                    raise RuntimeError(f"{name}: {step['statuses']}")
                per_request[name].append(used / step["requests"] * 1e6)
    finally:
        for server in servers.values():
            server.stop()
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
