"""A real ``tinyserve serve`` process on a free loopback port (the ``serve`` fixture)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import BUNDLED_MODEL, SAMPLES

TOKEN = "reload-token-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, repo: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TINYSERVE_ADMIN_TOKEN": TOKEN, **(env or {})}
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tinyserve", "serve", "--repo", str(repo),
             "--port", str(self.port), "--log-level", "warning", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not become ready in 30 s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def output_with(self, *needles: str, timeout: float = 10.0) -> str:
        """The output once every one of ``needles`` is in it (the server's log lines of a
        request may land a moment after its answer), or as it is after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not all(n in (text := self.output()) for n in needles):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return text

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*args: str, repo: Path | None = None, env: dict[str, str] | None = None) -> Server:
        if repo is None:
            repo = tmp_path / "repo"
            if not repo.exists():
                shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
        server = Server(repo, *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def samples() -> list[Path]:
    return sorted(SAMPLES.glob("*.png"))


def wait_until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)
