"""``tinyserve serve --workers N``: N complete servers on one port, and their supervisor.

One Python process runs all of a server's Python (HTTP parsing, request handling, decoding)
on one core, whatever ONNX Runtime's threads do. N workers are N such processes, each with
its own engine, batcher and event loop, behind one port:

- the supervisor (this process) binds the port once, to fail early when it is taken and to
  learn the port of ``--port 0``; each worker then listens on its own ``SO_REUSEPORT`` socket
  on that port, and the kernel spreads the connections over them evenly (a shared listening
  socket leaves the spread to whichever process wakes first: measured in
  benchmarks/RESULTS.md);
- the supervisor makes a private folder (mode 0700) for the workers' Unix sockets
  (``tinyserve.peers``: a reload or ``/stats`` reaches every worker) and for Prometheus'
  multiprocess files (``PROMETHEUS_MULTIPROC_DIR``: ``/metrics`` adds up every worker's
  counts), and removes it when the server stops;
- SIGHUP reloads every worker; SIGTERM or SIGINT drains every worker (up to
  ``--drain-timeout``), then the supervisor exits 0. A worker that dies is replaced; one that
  keeps dying at start stops the server with exit status 1.

ONNX Runtime's threads are shared out: with ``--threads 0`` (all cores) each of N workers
gets cores // N (at least one), so N workers never oversubscribe the cores.

``--workers auto`` picks N from the cores and the models' measured cost (``auto_workers``).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from tinyserve.errors import ConfigError
from tinyserve.peers import Peers
from tinyserve.settings import RunConfig, ServerConfig

__all__ = ["auto_workers", "run_server", "serve_uvicorn", "single_image_ms", "usable_cores"]

log = logging.getLogger("tinyserve")

# A worker that exits this soon after it started has failed at start (a port, a model
# file); this many such failures in a row stop the server instead of restarting forever.
_FAST_EXIT_S = 10.0
_FAST_EXITS = 3
# Above this one-image inference time, the model, not the HTTP path, sets the throughput:
# one worker with every core's ONNX Runtime threads is as fast as several (see auto_workers).
_HTTP_BOUND_MS = 2.0
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(config: ServerConfig, cores: int | None = None) -> int:
    """How many workers ``--workers auto`` starts: one per core for a model whose one image
    takes under 2 ms (the HTTP path, about 0.35 ms of Python per request, is then a large share
    of the work, and it runs on one core per process), else one.

    The cost is measured here, on a one-image run of each served model's latest version
    after a warm-up, so the rule follows the machine at hand.
    """
    cores = usable_cores() if cores is None else cores
    if cores <= 1:
        return 1
    slowest = max(single_image_ms(path) for path in _served_files(config))
    chosen = cores if slowest < _HTTP_BOUND_MS else 1
    log.info("--workers auto: %d (%d cores; slowest model %.2f ms per image)",
             chosen, cores, slowest)  # fmt: skip
    return chosen


def single_image_ms(path: Path) -> float:
    """Median milliseconds of a one-image run of the model at ``path`` on one thread."""
    import numpy as np

    from tinyserve.bench.model import time_calls
    from tinyserve.engine import Engine, EngineConfig

    engine = Engine(path, EngineConfig(intra_op_threads=1, warmup_runs=0))
    pixels = np.zeros((1, *engine.manifest.input.shape), dtype=np.uint8)
    seconds = time_calls(lambda _: engine.infer(pixels), warmup=3, min_runs=5, max_runs=50,
                         budget_s=0.2)  # fmt: skip
    return float(np.median(seconds)) * 1000


def _served_files(config: ServerConfig) -> list[Path]:
    """The latest version's file of each model the server would serve."""
    from tinyserve.repository import discover, model_files

    if config.model_path is not None:
        sources = [config.model_path]
    else:
        sources = list(discover(config.repo).values())
    files = []
    for source in sources:
        _, versions = model_files(source)
        if versions:
            files.append(versions[max(versions)])
    if not files:
        raise ConfigError(f"--workers auto found no model to measure in {config.repo}")
    return files


def run_server(app_config: ServerConfig, run: RunConfig) -> int:
    """Serve with ``run.workers`` workers (1: this process serves); the exit status."""
    workers = auto_workers(app_config) if run.workers == "auto" else int(run.workers)
    if workers == 1:
        serve_uvicorn(app_config, run)
        return 0
    return _Supervisor(_shared_threads(app_config, workers), run, workers).run()


def serve_uvicorn(
    config: ServerConfig,
    run: RunConfig,
    peers: Peers | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Run one server (the app over uvicorn with tinyserve's bounded protocol) until a
    signal drains it."""
    import uvicorn

    from tinyserve.app import create_app
    from tinyserve.cli.protocol import bounded_protocol

    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found; a no-op
    # handler here makes a drained shutdown exit 0, as process managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    app = create_app(config, peers)
    options: dict[str, Any] = {
        "host": run.host,
        "port": run.port,
        "loop": "auto",
        "http": bounded_protocol(run.client_timeout_s, app.refusal),  # 431, 408, early 503
        "ws": "none",  # no WebSocket routes; spares importing a WebSocket implementation
        "access_log": False,
        "log_level": run.log_level,
        "timeout_graceful_shutdown": int(config.drain_timeout_s) or None,
        "server_header": False,
    }
    if sockets is None:
        uvicorn.run(app, **options)  # exits with uvicorn's status when the start fails
        return
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: the start failed, and uvicorn has logged why


def _shared_threads(config: ServerConfig, workers: int) -> ServerConfig:
    if config.engine.intra_op_threads != 0:
        return config
    threads = max(1, usable_cores() // workers)
    return dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, intra_op_threads=threads)
    )


def _bind(host: str, port: int) -> socket.socket:
    """A socket on ``host:port`` that the workers' own sockets can share (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def _worker(config: ServerConfig, run: RunConfig, peers: Peers) -> None:
    """One worker process: its TCP socket on the shared port, its Unix socket, the server."""
    prefix = f"%(asctime)s %(levelname)s [worker {peers.index}]"
    logging.basicConfig(level=run.log_level.upper(), format=f"{prefix} %(message)s")
    # Until the server takes SIGHUP over (a reload), one forwarded during start-up must not
    # end the process, which is what SIGHUP does by default.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Bound, not listening: the server listens once its models are loaded, and until then the
    # kernel hands new connections to the workers that are (none lands in a loading one's
    # backlog, at start or when a worker is replaced).
    tcp = _bind(run.host, run.port)
    path = peers.socket_path(peers.index)
    path.unlink(missing_ok=True)  # a replaced worker's socket
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private.bind(str(path))
    # Listening from now on: a sibling's call waits in the backlog until this worker serves
    # (a reload then finds it loading the newest models anyway), instead of being refused.
    private.listen(64)
    serve_uvicorn(config, run, peers, [tcp, private])


class _Supervisor:
    """Starts the workers, forwards signals to them, replaces the ones that die."""

    def __init__(self, config: ServerConfig, run: RunConfig, workers: int) -> None:
        self.config = config
        self.run_config = run
        self.count = workers
        self.stopping = False
        self.exit_status = 0
        self._hangup = False
        self._context = multiprocessing.get_context("spawn")  # no copied event loop or locks

    def run(self) -> int:
        logging.basicConfig(level=self.run_config.log_level.upper(), format=_LOG_FORMAT)
        reserved = _bind(self.run_config.host, self.run_config.port)  # not listening
        port = reserved.getsockname()[1]
        self.run_config = dataclasses.replace(self.run_config, port=port)
        folder = Path(tempfile.mkdtemp(prefix="tinyserve-"))  # mode 0700
        metrics = folder / "metrics"
        metrics.mkdir()
        previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)  # the spawned workers inherit it
        secret = secrets.token_hex(16)
        self.peers = [Peers(folder, i, self.count, secret) for i in range(self.count)]
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}  # fmt: skip
        try:
            log.info("serving http://%s:%d with %d workers (threads per worker: %s)",
                     self.run_config.host, port, self.count,
                     self.config.engine.intra_op_threads)  # fmt: skip
            processes = {i: self._start(i) for i in range(self.count)}
            self._watch(processes, metrics)
            self._drain(processes)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            reserved.close()
            if previous is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
            shutil.rmtree(folder, ignore_errors=True)
        return self.exit_status

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._hangup = True
        else:
            self.stopping = True

    def _start(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=_worker,
            args=(self.config, self.run_config, self.peers[index]),
            name=f"tinyserve-worker-{index}",
        )
        process.start()
        process.started_at = time.monotonic()  # type: ignore[attr-defined]
        return process

    def _watch(self, processes: dict[int, BaseProcess], metrics: Path) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        fast_exits = dict.fromkeys(processes, 0)
        while not self.stopping:
            if self._hangup:
                self._hangup = False
                log.info("SIGHUP: reloading every worker")
                for process in processes.values():
                    _signal(process, signal.SIGHUP)
            wait([p.sentinel for p in processes.values()], timeout=0.2)
            for index, process in list(processes.items()):
                if process.is_alive() or self.stopping:
                    continue
                mark_process_dead(process.pid, str(metrics))  # type: ignore[no-untyped-call]
                lived = time.monotonic() - process.started_at  # type: ignore[attr-defined]
                fast_exits[index] = fast_exits[index] + 1 if lived < _FAST_EXIT_S else 0
                if fast_exits[index] >= _FAST_EXITS:
                    log.error("worker %d exited %d times at start (status %s); stopping",
                              index, _FAST_EXITS, process.exitcode)  # fmt: skip
                    self.exit_status, self.stopping = 1, True
                    break
                log.error("worker %d exited with status %s; starting a new one",
                          index, process.exitcode)  # fmt: skip
                processes[index] = self._start(index)

    def _drain(self, processes: dict[int, BaseProcess]) -> None:
        for process in processes.values():
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout_s + 10.0
        for index, process in processes.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %d did not stop after draining; killing it", index)
                process.kill()
                process.join()
                self.exit_status = 1
            elif process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                self.exit_status = self.exit_status or 1


def _signal(process: BaseProcess, signum: int) -> None:
    if process.pid is not None and process.is_alive():
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass
