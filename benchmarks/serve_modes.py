"""One process, ``--workers 2`` and granian, alternating, measured with wrk and by CPU time.

Each round starts every variant in turn on the bundled model (a repository holding only
fashion-cnn): 2 s of warm-up, ``wrk -t1 -c64`` for ``--duration`` seconds with the server's
CPU time (its whole process tree, from /proc) read before and after, then ``wrk -t1 -c1``
for the p50. CPU milliseconds per request are what other work on the cores disturbs least.

    python benchmarks/serve_modes.py --rounds 3 --duration 5

Variants: ``one`` (``tinyserve serve``), ``workers2`` (``--workers 2``), ``granian``
(granian's ASGI server over the same app; not a tinyserve option, see RESULTS.md). Needs
Debian's ``wrk``. A second part counts how 64 new connections spread over two accepting
processes, sharing one listening socket or each with its own ``SO_REUSEPORT`` socket.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LUA = """local f = io.open(os.getenv("BODY_FILE"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "image/png"
"""
GRANIAN_APP = """from pathlib import Path
from tinyserve.app import create_app
from tinyserve.settings import ServerConfig
app = create_app(ServerConfig(repo=Path({repo!r})))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(stat[11]) + int(stat[12])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pending += [int(child) for child in children]
    return total / os.sysconf("SC_CLK_TCK")


def command(variant: str, repo: Path, port: int, work: Path) -> list[str]:
    tiny = [PY, "-m", "tinyserve", "serve", "--repo", str(repo), "--port", str(port),
            "--log-level", "warning"]  # fmt: skip
    if variant == "one":
        return tiny
    if variant == "workers2":
        return [*tiny, "--workers", "2"]
    if variant == "granian":
        (work / "granian_app.py").write_text(GRANIAN_APP.format(repo=str(repo)))
        return [PY, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port",
                str(port), "--loop", "uvloop", "--no-ws", "--log-level", "warning",
                "granian_app:app"]  # fmt: skip
    raise SystemExit(f"unknown variant {variant!r}: one, workers2 or granian")


def wrk(url: str, connections: int, seconds: float, env: dict[str, str]) -> str:
    duration = f"-d{max(1, round(seconds))}s"  # wrk takes whole seconds
    cmd = ["wrk", "-t1", f"-c{connections}", duration, "--latency", "-s", env["LUA"], url]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout


def measure(variant: str, repo: Path, work: Path, duration: float) -> dict[str, Any]:
    port = free_port()
    path = os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "LUA": str(work / "raw.lua"),
           "BODY_FILE": str(ROOT / "samples/fashion/0000_ankle-boot.png")}  # fmt: skip
    process = subprocess.Popen(command(variant, repo, port, work), env=env, cwd=work,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/predict"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{variant} did not become ready")
            time.sleep(0.2)
        wrk(url, 64, 2, env)  # warm-up
        before = tree_cpu_s(process.pid)
        loaded = wrk(url, 64, duration, env)
        cpu = tree_cpu_s(process.pid) - before
        alone = wrk(url, 1, max(2.0, duration * 0.8), env)
    finally:
        process.terminate()
        process.wait(30)
    requests = int(re.search(r"(\d+) requests in", loaded).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", loaded)
    return {
        "variant": variant,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", loaded).group(1)),  # type: ignore[union-attr]
        "cpu_ms_per_request": 1000 * cpu / requests,
        "errors": int(bad.group(1)) if bad else 0,
        "c1_p50_ms": _ms(re.search(r"\s50%\s+(\S+)", alone).group(1)),  # type: ignore[union-attr]
    }


def _ms(text: str) -> float:
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def _count_connections(listener: socket.socket | None, port: int, out: Any) -> None:
    if listener is None:  # a socket of its own on the shared port
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
    listener.setblocking(False)
    count = 0

    async def serve() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal count
            count += 1
            await reader.read(1)
            writer.close()

        server = await asyncio.start_server(handle, sock=listener)
        await asyncio.sleep(3)
        server.close()

    asyncio.run(serve())
    out.put(count)


def spread(reuse_port: bool, connections: int = 64) -> list[int]:
    """How many of ``connections`` new connections each of two processes accepted."""
    context = multiprocessing.get_context("fork")
    base = socket.socket()
    base.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    base.bind(("127.0.0.1", 0))
    port = base.getsockname()[1]
    if not reuse_port:
        base.listen(128)
    out = context.Queue()
    listener = None if reuse_port else base
    processes = [context.Process(target=_count_connections, args=(listener, port, out))
                 for _ in range(2)]  # fmt: skip
    for process in processes:
        process.start()
    time.sleep(1)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    time.sleep(0.5)
    for client in clients:
        client.send(b"x")
        client.close()
    for process in processes:
        process.join()
    base.close()
    return sorted(out.get() for _ in processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--variants", default="one,workers2,granian")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "raw.lua").write_text(LUA)
        repo = work / "repo"
        shutil.copytree(ROOT / "models/fashion-cnn", repo / "fashion-cnn")
        rows: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.rounds):
            for variant in args.variants.split(","):
                row = measure(variant, repo, work, args.duration)
                rows.setdefault(variant, []).append(row)
                print(f"round {round_ + 1}: {row}", flush=True)
    print("\n| variant | c=64 req/s (median) | CPU ms per request | c=1 p50 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    for variant, runs in rows.items():
        print(f"| {variant} | {statistics.median(r['rps'] for r in runs):,.0f} | "
              f"{statistics.median(r['cpu_ms_per_request'] for r in runs):.3f} | "
              f"{statistics.median(r['c1_p50_ms'] for r in runs):.2f} | "
              f"{sum(r['errors'] for r in runs)} |")  # fmt: skip
    for trial in range(3):
        print(f"connections per process, trial {trial + 1}: shared socket {spread(False)}, "
              f"SO_REUSEPORT {spread(True)}")  # fmt: skip


if __name__ == "__main__":
    main()
