"""The reliability suite's figures: soak, overload, rejection cost and recovery, plus the
fault, fuzz, property and corpus test counts, as one Markdown table (``make reliability``).

    python benchmarks/reliability.py                 # the full run (about 20 minutes)
    python benchmarks/reliability.py --quick         # the reduced run CI makes (about 4)
    python benchmarks/reliability.py --before TREE   # refusal cost and open loop: TREE vs this

Every server is a real ``tinyserve serve`` on loopback. Load comes from ``wrk`` (closed loop,
Debian's package; ``make data`` installs it) and from tinyserve's own raw-socket client (the
open-loop and mixed soak traffic). Compare figures only within one run, on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from tinyserve.bench.client import Connection, Target, build_request, image_request  # noqa: E402

IMAGE = ROOT / "samples" / "fashion" / "0000_ankle-boot.png"
TOKEN = "reliability-admin-token"
WATCHED = ("process_resident_memory_bytes", "process_open_fds", "tinyserve_threads")


# -- a server -----------------------------------------------------------------------------


class Server:
    """``tinyserve serve`` on a free loopback port, with the admin token set."""

    def __init__(
        self, repo: Path, *args: str, env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
    ) -> None:  # fmt: skip
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        env = {**os.environ, "TINYSERVE_ADMIN_TOKEN": TOKEN, **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tinyserve", "serve", "--repo", str(repo), "--port",
             str(self.port), "--log-level", "warning", *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited: {self.log.read()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server was not ready within 60 s")

    def figures(self) -> dict[str, float]:
        """RSS, open files and threads, from its own /metrics."""
        found: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            name, _, value = line.partition(" ")
            if name in WATCHED:
                found[name] = float(value)
        return found

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def repo_copy(tmp: Path) -> Path:
    repo = tmp / "repo"
    shutil.copytree(ROOT / "models" / "fashion-cnn", repo / "fashion-cnn")
    return repo


# -- traffic ------------------------------------------------------------------------------


def requests_for(server: Server) -> dict[str, bytes]:
    """One prebuilt request of each kind the soak mixes."""
    rest = Target.parse(f"{server.url}/predict")
    v2 = Target.parse(f"{server.url}/v2/models/fashion-cnn/infer")
    batch = Target.parse(f"{server.url}/v1/models/fashion-cnn/predict/batch")
    image = IMAGE.read_bytes()
    boundary = "reliabilityboundary"
    parts = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + image
            + b"\r\n"
            for i in range(4)
        )
        + f"--{boundary}--\r\n".encode()
    )
    return {
        "rest": image_request(rest, IMAGE, "raw"),
        "v2": image_request(v2, IMAGE, "v2"),
        "batch": build_request(batch, "POST", parts, f"multipart/form-data; boundary={boundary}"),
    }


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)

    def add(self, kind: str, status: str, ms: float) -> None:
        self.statuses[status] += 1
        self.latencies_ms.setdefault(status, []).append(ms)

    def p99(self, status: str) -> float | None:
        values = sorted(self.latencies_ms.get(status, []))
        return round(values[min(len(values) - 1, int(0.99 * len(values)))], 2) if values else None


async def closed_loop(server: Server, seconds: float, connections: int) -> float:
    """Answers per second of the raw REST request with ``connections`` clients."""
    request = requests_for(server)["rest"]
    target = Target.parse(server.url)
    ok = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal ok
        connection = Connection(target)
        while time.monotonic() < stop:
            status, _ = await connection.request(request)
            ok += status == 200
        await connection.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return ok / seconds


async def open_loop(server: Server, seconds: float, rate: float, kinds: list[str],
                    pool: int = 256, reload_every: float = 0.0) -> tuple[Tally, float]:  # fmt: skip
    """Requests at ``rate`` per second, the kinds in turn, each on an idle connection of
    ``pool``; a request with none idle is counted as ``client_busy`` (the client's limit, not
    the server's). Returns the tally and the rate actually sent."""
    prebuilt = requests_for(server)
    target = Target.parse(server.url)
    idle = [Connection(target) for _ in range(pool)]
    tally = Tally()
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def send(kind: str, connection: Connection) -> None:
        started = loop.time()
        try:
            status, _ = await asyncio.wait_for(connection.request(prebuilt[kind]), 30)
            label = str(status)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            connection.abort()
            label = type(exc).__name__
        tally.add(kind, label, (loop.time() - started) * 1000)
        idle.append(connection)

    async def reloads() -> None:
        async with httpx.AsyncClient(timeout=30) as admin:
            while True:
                await asyncio.sleep(reload_every)
                answer = await admin.post(f"{server.url}/admin/reload",
                                          headers={"authorization": f"Bearer {TOKEN}"})  # fmt: skip
                tally.statuses[f"reload {answer.status_code}"] += 1

    reloader = asyncio.ensure_future(reloads()) if reload_every > 0 else None
    started = loop.time()
    sent = 0
    while (now := loop.time()) - started < seconds:
        due = int((now - started) * rate) + 1
        while sent < due:
            kind = kinds[sent % len(kinds)]
            sent += 1
            if not idle:
                tally.statuses["client_busy"] += 1
                continue
            task = loop.create_task(send(kind, idle.pop()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.001)
    elapsed = loop.time() - started
    if reloader is not None:
        reloader.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for connection in idle:
        await connection.close()
    return tally, sent / elapsed


# -- the sections -------------------------------------------------------------------------


def soak(seconds: float, tmp: Path) -> dict[str, Any]:
    """Mixed REST, V2 and batch traffic at 70 % of measured capacity, a hot reload every
    30 s; RSS, open files and threads at the start (after a warm-up) and at the end."""
    server = Server(repo_copy(tmp))
    try:
        capacity = asyncio.run(closed_loop(server, 5, 32))
        rate = 0.7 * capacity / 2  # the mix's requests cost about twice a REST one on average
        # Warm up, reloads included, until the server holds what a steady one holds: the
        # allocator's arenas, ONNX Runtime's, the latency windows of /stats (10,000
        # requests). Its RSS grows by some 15 MB over the first two minutes, then stays flat.
        warmup = max(90.0, seconds / 10)
        asyncio.run(
            open_loop(server, warmup, rate, ["rest", "v2", "batch"], reload_every=warmup / 2)
        )
        start = server.figures()
        tally, sent = asyncio.run(
            # a reload every 30 s (more often in a soak shorter than 90 s)
            open_loop(
                server, seconds, rate, ["rest", "v2", "batch"], reload_every=min(30.0, seconds / 3)
            )  # fmt: skip
        )
        end = server.figures()
    finally:
        server.stop()
    answered = sum(n for s, n in tally.statuses.items() if s.isdigit())
    # A failure is any answer but 200, or none; the client's own limit (client_busy) is not.
    failed = sum(
        n
        for s, n in tally.statuses.items()
        if not s.startswith(("200", "reload 200", "client_busy"))
    )
    return {
        "seconds": seconds, "capacity_rps": round(capacity, 1), "rate_rps": round(rate, 1),
        "sent_rps": round(sent, 1), "answered": answered, "failed": failed,
        "statuses": dict(tally.statuses), "p99_ms": tally.p99("200"), "start": start, "end": end,
        "growth": {k: round(end[k] / start[k] - 1, 4) for k in start if start[k]},
    }  # fmt: skip


WRK_SCRIPT = """
local f = io.open(os.getenv("TINYSERVE_IMAGE"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %.3f %.3f\\n", summary.requests,
    summary.errors.status, summary.errors.timeout + summary.errors.connect + summary.errors.read,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, Any]:
    env = {**os.environ, "TINYSERVE_IMAGE": str(IMAGE)}
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s",
         str(script), url],
        capture_output=True, text=True, env=env, timeout=seconds + 60,
    )  # fmt: skip
    match = re.search(r"RESULT (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+)", result.stdout)
    if match is None:
        raise RuntimeError(f"wrk said: {result.stdout}{result.stderr}")
    requests, rejected, errors = (int(match[i]) for i in (1, 2, 3))
    return {
        "connections": connections, "requests": requests, "rejected": rejected,
        "errors": errors, "good_rps": round((requests - rejected) / seconds, 1),
        "p50_ms": float(match[4]), "p99_ms": float(match[5]),
    }  # fmt: skip


def overload(seconds: float, steps: list[int], tmp: Path) -> dict[str, Any]:
    """Closed-loop goodput past the queue bound, the server's CPU per rejection, RSS, and
    the time back to normal service once the flood stops."""
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    server = Server(repo_copy(tmp))
    try:
        base = wrk(f"{server.url}/predict", 1, 3, script)
        rows = []
        for connections in steps:
            rows.append(wrk(f"{server.url}/predict", connections, seconds, script))
            rows[-1]["rss_mb"] = round(server.figures()["process_resident_memory_bytes"] / 2**20, 1)
            rows[-1]["recovery_s"] = recovery(server, base["p50_ms"])
    finally:
        server.stop()
    return {"baseline_p50_ms": base["p50_ms"], "steps": rows,
            "rejection": refusal_cost(seconds, tmp / "tight")}  # fmt: skip


def refusal_cost(seconds: float, tmp: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What a refusal costs: a server whose queue holds one request and lets none wait,
    under 64 closed-loop connections; its CPU per answer (nearly all of them 503s)."""
    tmp.mkdir(parents=True, exist_ok=True)
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    tight = Server(repo_copy(tmp), "--max-queue", "1", "--max-waiting", "0", env=env)
    try:
        before = tight.cpu_seconds()
        refused = wrk(f"{tight.url}/predict", 64, seconds, script)
        cpu = tight.cpu_seconds() - before
    finally:
        tight.stop()
    answered = refused["requests"]
    return {"requests": answered, "rejected": refused["rejected"], "p99_ms": refused["p99_ms"],
            "cpu_us_per_request": round(cpu / max(1, answered) * 1e6, 1)}  # fmt: skip


def before_and_after(before: Path, rounds: int, seconds: float, tmp: Path) -> str:
    """The refusal cost and the open loop at 5x capacity of the tree at ``before`` and of
    this one, alternated ``rounds`` times in one run; a Markdown table."""
    trees = {"before": {"PYTHONPATH": str(before / "src")}, "now": {"PYTHONPATH": str(SRC)}}
    rows = []
    for round_ in range(rounds):
        for name, env in trees.items():
            where = tmp / f"{name}-{round_}"
            refusal = refusal_cost(4, where / "tight", env)
            open_ = open_loop_overload(seconds, 5, where, env)
            share = open_["good_rps"] / max(1.0, open_["capacity_rps"])
            rows.append(
                f"| {round_ + 1} | {name} | {refusal['cpu_us_per_request']:g} µs | "
                f"{refusal['p99_ms']:g} ms | {open_['capacity_rps']:g} | {open_['good_rps']:g} "
                f"({share:.0%}) | {open_['p99_ok_ms']} / {open_['p99_rejected_ms']} ms |"
            )
            print(rows[-1], flush=True)
    head = [
        f"Before ({before}) and now, {cpu_name()}, {time.strftime('%Y-%m-%d')}; open loop "
        f"{seconds:g} s at 5x capacity, server and load on CPUs of their own.",
        "",
        "| round | tree | server CPU per refusal | refusal p99 | capacity req/s | good "
        "answers/s at 5x | p99 admitted / refused |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    return "\n".join(head + rows)


def recovery(server: Server, baseline_p50_ms: float, limit_s: float = 30.0) -> float | None:
    """Seconds after the flood until three requests in a row answer within 3x the idle p50
    (and at least 5 ms)."""
    started = time.monotonic()
    bound = max(5.0, 3 * baseline_p50_ms) / 1000
    image = IMAGE.read_bytes()
    good = 0
    with httpx.Client(timeout=30) as client:
        while time.monotonic() - started < limit_s:
            began = time.perf_counter()
            response = client.post(f"{server.url}/predict", content=image,
                                   headers={"content-type": "image/png"})  # fmt: skip
            fast = response.status_code == 200 and time.perf_counter() - began <= bound
            good = good + 1 if fast else 0
            if good == 3:
                return round(time.monotonic() - started, 3)
            time.sleep(0.02)
    return None


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(the server's CPUs, the load generator's): the last CPU and the others, or None on
    one CPU. The open loop's generator needs a core of its own at 5x capacity; sharing
    cores, it would take them from the server and the figure would be the generator's."""
    cpus = sorted(os.sched_getaffinity(0))
    return None if len(cpus) < 2 else ({cpus[-1]}, set(cpus[:-1]))


def open_loop_overload(
    seconds: float, factor: float, tmp: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Goodput at ``factor`` times capacity in an open loop, the server and the generator
    on CPUs of their own (``split_cpus``); capacity is measured the same way just before."""
    split = split_cpus()
    server_cpus, load_cpus = split if split is not None else (None, None)
    mine = os.sched_getaffinity(0)
    server = Server(repo_copy(tmp / "open"), env=env, cpus=server_cpus)
    try:
        if load_cpus is not None:
            os.sched_setaffinity(0, load_cpus)
        capacity = asyncio.run(closed_loop(server, 5, 32))
        cpu_before = server.cpu_seconds()
        tally, sent = asyncio.run(
            open_loop(server, seconds, factor * capacity, ["rest"], pool=3000)
        )
        cpu = server.cpu_seconds() - cpu_before
        rss = server.figures()["process_resident_memory_bytes"]
        answered = tally.statuses["200"] + tally.statuses["503"]
        cpu_per_answer = cpu / max(1, answered)
    finally:
        os.sched_setaffinity(0, mine)
        server.stop()
    return {
        "server_cpus": sorted(server_cpus or mine), "load_cpus": sorted(load_cpus or mine),
        "server_cpu_us_per_answer": round(cpu_per_answer * 1e6, 1),
        "capacity_rps": round(capacity, 1), "asked_rps": round(factor * capacity, 1),
        "sent_rps": round(sent, 1), "good_rps": round(tally.statuses["200"] / seconds, 1),
        "rejected": tally.statuses["503"], "statuses": dict(tally.statuses),
        "p99_ok_ms": tally.p99("200"), "p99_rejected_ms": tally.p99("503"),
        "rss_mb": round(rss / 2**20, 1),
    }  # fmt: skip


def pytest_counts(paths: list[str], env: dict[str, str], tmp: Path) -> dict[str, int]:
    report = tmp / f"junit-{len(list(tmp.glob('junit-*')))}.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         *paths],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, timeout=3600,
    )  # fmt: skip
    suite = ElementTree.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    assert suite is not None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


# -- the table ----------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Reliability, {results['cpu']}, {results['mode']} run ({results['date']}).",
        "",
        "| check | cases | failures | 5xx | p99 admitted / rejected | RSS start → end | recovery |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    fuzz = results.get("fuzz")
    if fuzz:
        lines.append(
            f"| schema fuzzing ({fuzz['examples_per_operation']} examples per operation) | "
            f"{fuzz['requests']} | {fuzz['failures']} | {fuzz['5xx']} | | | |"
        )
    for name, counts in results.get("tests", {}).items():
        lines.append(f"| {name} (tests) | {counts['tests']} | "
                     f"{counts['failures'] + counts['errors']} | | | | |")  # fmt: skip
    soak_ = results.get("soak")
    if soak_:
        mb = {k: round(v["process_resident_memory_bytes"] / 2**20, 1)
              for k, v in (("start", soak_["start"]), ("end", soak_["end"]))}  # fmt: skip
        fives = sum(n for s, n in soak_["statuses"].items() if s.startswith("5"))
        lines.append(
            f"| soak {soak_['seconds']:g} s at {soak_['rate_rps']:g} req/s (mixed, reload "
            f"every 30 s) | {soak_['answered']} | {soak_['failed']} | {fives} | "
            f"{soak_['p99_ms']} ms / – | {mb['start']} → {mb['end']} MB (fds "
            f"{soak_['start']['process_open_fds']:g} → {soak_['end']['process_open_fds']:g}, "
            f"threads {soak_['start']['tinyserve_threads']:g} → "
            f"{soak_['end']['tinyserve_threads']:g}) | |"
        )
    over = results.get("overload")
    if over:
        for row in over["steps"]:
            lines.append(
                f"| closed loop, {row['connections']} connections (wrk) | {row['requests']} | "
                f"{row['errors']} | {row['rejected']} (503) | {row['p99_ms']} ms / – | "
                f"{row['rss_mb']} MB after | {row['recovery_s']} s |"
            )
        rej = over["rejection"]
        lines.append(
            f"| refusals (queue 1, no waiting room) | {rej['requests']} | 0 | "
            f"{rej['rejected']} (503) | – / {rej['p99_ms']} ms | "
            f"{rej['cpu_us_per_request']} µs CPU per request | |"
        )
    open_ = results.get("open_loop")
    if open_:
        lines.append(
            f"| open loop, asked {open_['asked_rps']:g} req/s (5x), sent "
            f"{open_['sent_rps']:g} | {sum(open_['statuses'].values())} | | "
            f"{open_['rejected']} (503) | {open_['p99_ok_ms']} / {open_['p99_rejected_ms']} ms | "
            f"{open_['rss_mb']} MB | |"
        )
        share = open_["good_rps"] / max(1.0, open_["capacity_rps"])
        lines += [
            "",
            f"Open loop: {open_['good_rps']:g} good answers/s against a capacity of "
            f"{open_['capacity_rps']:g} ({share:.0%}); server on CPUs {open_['server_cpus']}, "
            f"load on {open_['load_cpus']}; {open_['server_cpu_us_per_answer']:g} µs of server "
            "CPU per answer.",
        ]
    if over:
        good = ", ".join(f"{r['connections']}: {r['good_rps']:g}" for r in over["steps"])
        lines += ["", f"Good answers/s by connections: {good}."]
    return "\n".join(lines)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced run CI makes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reliability")
    parser.add_argument("--skip-tests", action="store_true", help="only the load figures")
    parser.add_argument("--soak-s", type=float, help="soak seconds (600; 120 with --quick)")
    parser.add_argument(
        "--before", type=Path, metavar="TREE", help="only compare the refusal cost and the "
        "open loop with the source tree TREE (its src/), e.g. a git worktree of an older commit",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --before (2)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: make data installs it (apt-get install wrk)")
    if args.before is not None:
        if not (args.before / "src" / "tinyserve").is_dir():
            sys.exit(f"{args.before} has no src/tinyserve: give the root of a tinyserve tree")
        with tempfile.TemporaryDirectory() as tmp_name:
            print(before_and_after(args.before, args.rounds, 15 if args.quick else 60,
                                   Path(tmp_name)))  # fmt: skip
        return
    quick = args.quick
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {  # the soak's figures are printed as soon as they are in
        "cpu": cpu_name(), "mode": "quick" if quick else "full",
        "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_tests:
            # Examples per operation (fuzzing) and per property: 400 reach 10,000+ requests.
            examples = "20" if quick else "400"
            env = {"TINYSERVE_FUZZ_EXAMPLES": examples, "CI": os.environ.get("CI", ""),
                   "TINYSERVE_FUZZ_REPORT": str(args.out / "fuzz.json")}  # fmt: skip
            results["tests"] = {
                "faults": pytest_counts(["tests/test_faults.py"], env, tmp),
                "fuzz, properties and corpus": pytest_counts(
                    [
                        p
                        for p in (
                            "tests/test_fuzz.py",
                            "tests/test_properties.py",
                            "tests/test_corpus.py",
                        )
                        if (ROOT / p).exists()
                    ],
                    env,
                    tmp,
                ),  # fmt: skip
            }
        fuzz = args.out / "fuzz.json"
        if fuzz.is_file():  # written by the fuzzing test (TINYSERVE_FUZZ_REPORT)
            results["fuzz"] = json.loads(fuzz.read_text())
        results["soak"] = soak(args.soak_s or (120 if quick else 600), tmp / "soak")
        results["overload"] = overload(4 if quick else 8, [128, 1000, 2000], tmp / "over")
        results["open_loop"] = open_loop_overload(15 if quick else 60, 5, tmp)
    (args.out / "reliability.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (args.out / "reliability.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
