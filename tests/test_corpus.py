"""The bad-input corpus: tests/corpus/cases.toml, each case one request and its answer.

Most cases go to the app in process; those marked ``live`` are written over a raw socket to
a real ``tinyserve serve`` (uvicorn), for what only a real HTTP server sees: oversized
headers, slow clients, bodies that disagree with their Content-Length. After every case the
server must still classify a good image.
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from live_server import Server

CORPUS = Path(__file__).resolve().parent / "corpus"
sys.path.insert(0, str(CORPUS))
import generate  # noqa: E402  (tests/corpus/generate.py: the bodies)

pytestmark = pytest.mark.reliability
CASES: list[dict[str, Any]] = tomllib.loads((CORPUS / "cases.toml").read_text())["case"]
TOKEN = "corpus-admin-token"
BOOT = next(SAMPLES.glob("*ankle-boot.png")).read_bytes()
# The live server's limits on slow and oversized requests, kept short so the cases are quick;
# a client waits several times the server's timeout for its answer, so a loaded machine
# delays the 408 without losing it.
CLIENT_TIMEOUT_S = 2.0
SECONDS_PER_CASE = 12.0
LIVE_ARGS = ("--max-body-mb", "4", "--client-timeout", str(CLIENT_TIMEOUT_S))


def ids(cases: list[dict[str, Any]]) -> list[str]:
    return [c["id"] for c in cases]


IN_PROCESS = [c for c in CASES if "live" not in c]
LIVE = [c for c in CASES if "live" in c]


def test_the_corpus_is_large_and_its_files_are_what_the_generator_makes() -> None:
    assert len(CASES) >= 60
    assert len(set(ids(CASES))) == len(CASES), "case ids must be unique"
    for case in IN_PROCESS:
        assert "body" not in case or case["body"] in generate.MAKERS, case["id"]
    for path in sorted(generate.FILES.glob("*.bin")):
        assert generate.MAKERS[path.stem]() == path.read_bytes(), f"regenerate {path.name}"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from tinyserve.app import ServerConfig, create_app

    repo = tmp_path_factory.mktemp("corpus-repo")
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    config = ServerConfig(repo=repo, admin_token=TOKEN, max_body_bytes=4 * 1024 * 1024)
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        yield client


def expand(path: str) -> str:
    return re.sub(r"\$\{zeros:(\d+)\}", lambda m: "0" * int(m.group(1)), path)


# Pillow warns about some damaged files (and past its own 89 M pixels) as it decodes them;
# the server answers them as usual. Warnings are errors in this suite, so they are ignored.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", IN_PROCESS, ids=ids(IN_PROCESS))
def test_case(client: TestClient, case: dict[str, Any]) -> None:
    headers = {k: v.encode("latin-1") for k, v in case.get("headers", {}).items()}
    if "content_type" in case:
        headers["content-type"] = case["content_type"].encode()
    if "body" in case:
        content = generate.make(case["body"])
    else:
        content = case.get("text", "").encode()
    started = time.perf_counter()
    response = client.request(
        case.get("method", "POST"), expand(case["path"]), content=content, headers=headers
    )
    assert time.perf_counter() - started < SECONDS_PER_CASE
    assert response.status_code == case["status"], response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        if "code" in case:
            assert isinstance(error, dict) and error["code"] == case["code"], error
        assert case.get("words", "") in message, message
    elif response.headers["content-type"].startswith("application/json"):
        body = response.json()
        if "filename" in case:
            assert [r["filename"] for r in body["results"]] == [case["filename"]]
        if "failed" in case:
            assert body["failed"] == case["failed"], body
    good = client.post("/predict", content=BOOT, headers={"content-type": "image/png"})
    assert good.status_code == 200 and good.json()["label"] == "Ankle boot"


# -- over a real socket ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("corpus-live-repo")
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    server = Server(repo, *LIVE_ARGS)
    yield server
    server.stop()


def connect(server: Server, timeout: float = SECONDS_PER_CASE) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(timeout)
    return sock


def status_of(sock: socket.socket) -> int | None:
    """The status of the first response on ``sock``; None if it closed or timed out first."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    return int(match.group(1)) if match else None


def big_header(server: Server) -> int | None:
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    return status_of(sock)


def many_headers(server: Server) -> int | None:
    sock = connect(server)
    lines = b"".join(b"X-Header-%d: value\r\n" % i for i in range(10_000))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    return status_of(sock)


def slow_headers(server: Server) -> int | None:
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    return status_of(sock)


def slow_body(server: Server) -> int | None:
    sock = connect(server)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(BOOT) + BOOT[:100])
    return status_of(sock)


def body_past_length(server: Server) -> int | None:
    sock = connect(server)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    sock.sendall(head + b"Content-Length: 10\r\nConnection: close\r\n\r\n" + BOOT)
    return status_of(sock)


def declared_too_large(server: Server) -> int | None:
    sock = connect(server)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    sock.sendall(head + b"Content-Length: 1000000000\r\n\r\n")
    return status_of(sock)


def unicode_path(server: Server) -> int | None:
    sock = connect(server)
    path = "/v1/models/ботинок/predict".encode()
    sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    return status_of(sock)


SENDERS: dict[str, Callable[[Server], int | None]] = {
    f.__name__: f
    for f in (big_header, many_headers, slow_headers, slow_body, body_past_length,
              declared_too_large, unicode_path)
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", LIVE, ids=ids(LIVE))
def test_live_case(live: Server, case: dict[str, Any]) -> None:
    started = time.perf_counter()
    assert SENDERS[case["live"]](live) == case["status"]
    assert time.perf_counter() - started < SECONDS_PER_CASE + 1
    import httpx

    good = httpx.post(f"{live.url}/predict", content=BOOT, headers={"content-type": "image/png"})
    assert good.status_code == 200 and good.json()["label"] == "Ankle boot"
