"""API keys: the key file, the CLI, and what a server answers with keys on (401, 403, 429),
in process (an injected clock) and as a real ``tinyserve serve`` process."""

from __future__ import annotations

import calendar
import json
import logging
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL, SAMPLES
from live_server import TOKEN, wait_until
from tinyserve import auth
from tinyserve.auth import KeyRing, create_key, read_keys, revoke_key
from tinyserve.cli import app as cli_app
from tinyserve.cli.serve import exposure_warning
from tinyserve.errors import ConfigError, Forbidden, QuotaExceeded, RateLimited, Unauthorized
from tinyserve.settings import RunConfig, ServerConfig

BOOT = next(SAMPLES.glob("*ankle-boot.png")).read_bytes()
ADMIN = "admin-token-for-keys"
RAW = {"content-type": "application/octet-stream"}


class Clock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self, iso: str) -> None:
        self.now = float(calendar.timegm(_parse(iso)))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _parse(iso: str) -> tuple[int, ...]:
    date, _, time_of_day = iso.rstrip("Z").partition("T")
    return (*map(int, date.split("-")), *map(int, (time_of_day or "00:00:00").split(":")))


def bearer(secret: str) -> dict[str, str]:
    return {**RAW, "authorization": f"Bearer {secret}"}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


@pytest.fixture
def keyed(
    app_client: Callable[..., TestClient], key_file: Path
) -> Callable[..., tuple[TestClient, Clock]]:
    """Factory: a server with keys on (whatever ``key_file`` holds) and a hand-moved clock."""

    def make(iso: str = "2025-03-04T12:00:00Z", **options: Any) -> tuple[TestClient, Clock]:
        if not key_file.exists():
            create_key(key_file, "placeholder")
        client = app_client(repo=BUNDLED_MODEL.parent, api_keys=key_file, **options)
        clock = Clock(iso)
        client.app.context.keys.clock = clock  # type: ignore[attr-defined]
        return client, clock

    return make


# -- the key file -------------------------------------------------------------------------


def test_a_created_key_is_stored_only_as_its_hash(key_file: Path) -> None:
    key, secret = create_key(key_file, "alice", ["predict", "admin"], rate=5, quota=100)
    assert secret.startswith(f"tsk_{key.id}_") and len(secret) > 40
    text = key_file.read_text()
    assert secret not in text and secret.split("_", 2)[2] not in text
    assert key.sha256 in text and key.sha256 == auth.hashlib.sha256(secret.encode()).hexdigest()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert read_keys(key_file) == [key]
    assert key.scopes == ("predict", "admin") and key.capacity == 5
    assert [p.name for p in key_file.parent.iterdir()] == ["keys.json"]  # no temp file left


def test_key_file_errors_say_what_is_wrong(key_file: Path) -> None:
    create_key(key_file, "alice")
    with pytest.raises(ConfigError, match="a key named 'alice' exists"):
        create_key(key_file, "alice")
    with pytest.raises(ConfigError, match="scopes must be among predict, admin"):
        create_key(key_file, "bob", ["write"])
    with pytest.raises(ConfigError, match="period must be one of day, month"):
        create_key(key_file, "bob", quota=3, period="week")
    with pytest.raises(ConfigError, match="no live key named 'carol'"):
        revoke_key(key_file, "carol")
    key_file.write_text("{not json")
    with pytest.raises(ConfigError, match=r"API key file .*keys\.json"):
        read_keys(key_file)
    with pytest.raises(ConfigError, match="does not exist; create a key"):
        KeyRing(key_file.parent / "absent.json")


def test_a_revoked_name_can_be_reused(key_file: Path) -> None:
    old, _ = create_key(key_file, "alice")
    assert revoke_key(key_file, old.id).revoked is not None
    new, _ = create_key(key_file, "alice")
    assert new.id != old.id
    assert [k.revoked is None for k in read_keys(key_file)] == [False, True]


def test_an_unknown_key_costs_the_same_compare_as_a_wrong_one(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, secret = create_key(key_file, "alice")
    ring = KeyRing(key_file)
    compared: list[tuple[bytes, bytes]] = []

    def compare(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    for presented in ("tsk_00000000_" + "x" * 43, secret[:-1] + "!", "not-even-a-key"):
        with pytest.raises(Unauthorized, match="unknown or revoked"):
            ring.admit(f"Bearer {presented}", None, "predict")
    assert len(compared) == 3 and all(len(a) == len(b) == 32 for a, b in compared)
    assert ring.admit(None, secret, "predict") == key


def test_a_key_may_use_only_its_scopes(key_file: Path) -> None:
    _, secret = create_key(key_file, "ops", ["admin"])
    ring = KeyRing(key_file)
    with pytest.raises(Forbidden, match="needs the 'predict' scope, and the key has admin"):
        ring.admit(f"Bearer {secret}", None, "predict")
    assert ring.admit(f"bearer {secret}", None, "admin").name == "ops"
    with pytest.raises(Unauthorized, match="needs an API key"):
        ring.admit("Basic dXNlcjpwYXNz", None, "admin")


def test_rate_limit_refills_at_the_key_rate(key_file: Path) -> None:
    _, secret = create_key(key_file, "alice", rate=2, burst=3)
    clock = Clock("2025-01-01T00:00:00Z")
    ring = KeyRing(key_file, clock)
    for _ in range(3):
        ring.admit(None, secret, "predict")
    with pytest.raises(RateLimited) as caught:
        ring.admit(None, secret, "predict")
    assert not isinstance(caught.value, QuotaExceeded)
    assert caught.value.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    ring.admit(None, secret, "predict")
    with pytest.raises(RateLimited):
        ring.admit(None, secret, "predict")
    clock.advance(10)  # refills up to the burst, no further
    for _ in range(3):
        ring.admit(None, secret, "predict")
    with pytest.raises(RateLimited):
        ring.admit(None, secret, "predict")


def test_a_monthly_quota_resets_on_the_first_of_the_next_month(key_file: Path) -> None:
    _, secret = create_key(key_file, "alice", quota=2, period="month")
    clock = Clock("2025-12-31T23:59:00Z")
    ring = KeyRing(key_file, clock)
    ring.admit(None, secret, "predict")
    ring.admit(None, secret, "predict")
    with pytest.raises(QuotaExceeded, match="resets at 2026-01-01T00:00:00Z") as caught:
        ring.admit(None, secret, "predict")
    assert caught.value.retry_after == pytest.approx(60)
    clock.advance(60)
    ring.admit(None, secret, "predict")
    assert ring.usage() == [
        ("alice", {"admitted": 3, "forbidden": 0, "rate_limited": 0, "quota_exceeded": 1}, 1)
    ]


def test_reload_keeps_the_usage_of_the_keys_that_stay(key_file: Path) -> None:
    _, alice = create_key(key_file, "alice", quota=2)
    _, bob = create_key(key_file, "bob")
    ring = KeyRing(key_file, Clock("2025-01-01T10:00:00Z"))
    ring.admit(None, alice, "predict")
    ring.admit(None, alice, "predict")
    ring.admit(None, bob, "predict")
    revoke_key(key_file, "bob")
    ring.admit(None, bob, "predict")  # still live: the server has not re-read the file
    assert ring.reload() == 1
    with pytest.raises(Unauthorized):
        ring.admit(None, bob, "predict")
    with pytest.raises(QuotaExceeded):  # the reload did not forgive alice's quota
        ring.admit(None, alice, "predict")


# -- a server with keys on, in process ----------------------------------------------------


def test_keys_are_off_by_default(app_client: Callable[..., TestClient]) -> None:
    client = app_client(repo=BUNDLED_MODEL.parent)
    assert client.app.context.keys is None  # type: ignore[attr-defined]
    assert client.post("/predict", content=BOOT, headers=RAW).status_code == 200


def test_predictions_need_a_key_with_the_predict_scope(
    keyed: Callable[..., tuple[TestClient, Clock]], key_file: Path
) -> None:
    _, predict = create_key(key_file, "alice")
    _, admin_only = create_key(key_file, "ops", ["admin"])
    client, _ = keyed()
    answer = client.post("/predict", content=BOOT, headers=RAW)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert answer.json()["error"]["code"] == "unauthorized"
    assert "X-API-Key" in answer.json()["error"]["message"]
    wrong = client.post("/predict", content=BOOT, headers=bearer(predict[:-2] + "zz"))
    assert wrong.status_code == 401 and predict[:-2] not in wrong.text
    forbidden = client.post("/predict", content=BOOT, headers=bearer(admin_only))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert client.post("/predict", content=BOOT, headers=bearer(predict)).status_code == 200
    by_header = client.post("/infer", content=BOOT, headers={**RAW, "x-api-key": predict})
    assert by_header.status_code == 200
    v2 = "/v2/models/fashion-cnn/infer"
    assert client.post(v2, json={"inputs": []}).status_code == 401
    assert client.post(v2, json={"inputs": []}, headers={"x-api-key": predict}).status_code == 400


def test_health_metrics_docs_and_model_listing_stay_open(
    keyed: Callable[..., tuple[TestClient, Clock]],
) -> None:
    client, _ = keyed()
    for path in ("/health", "/health/ready", "/metrics", "/stats", "/docs", "/openapi.json",
                 "/v1/models", "/v1/models/fashion-cnn", "/v2/models/fashion-cnn"):  # fmt: skip
        assert client.get(path).status_code == 200, path


def test_over_the_rate_limit_answers_429_with_retry_after(
    keyed: Callable[..., tuple[TestClient, Clock]], key_file: Path
) -> None:
    _, secret = create_key(key_file, "alice", rate=0.5, burst=2)
    client, clock = keyed()
    for _ in range(2):
        assert client.post("/predict", content=BOOT, headers=bearer(secret)).status_code == 200
    limited = client.post("/predict", content=BOOT, headers=bearer(secret))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    assert limited.json()["error"]["code"] == "rate_limited"
    clock.advance(2)
    assert client.post("/predict", content=BOOT, headers=bearer(secret)).status_code == 200


def test_over_the_quota_answers_429_saying_when_it_resets(
    keyed: Callable[..., tuple[TestClient, Clock]], key_file: Path
) -> None:
    _, secret = create_key(key_file, "alice", quota=2)
    client, clock = keyed("2025-03-04T23:58:00Z")
    for _ in range(2):
        assert client.post("/predict", content=BOOT, headers=bearer(secret)).status_code == 200
    over = client.post("/predict", content=BOOT, headers=bearer(secret))
    assert over.status_code == 429 and over.headers["retry-after"] == "120"
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "quota of 2 requests per day" in error["message"]
    assert "resets at 2025-03-05T00:00:00Z" in error["message"]
    clock.advance(119)
    assert client.post("/predict", content=BOOT, headers=bearer(secret)).status_code == 429
    clock.advance(1)  # midnight UTC: a new day, a new quota
    assert client.post("/predict", content=BOOT, headers=bearer(secret)).status_code == 200


def test_the_per_ip_rate_limit_still_applies_with_keys(
    keyed: Callable[..., tuple[TestClient, Clock]], key_file: Path
) -> None:
    _, secret = create_key(key_file, "alice")
    client, _ = keyed(rate_limit=2)
    codes = [client.post("/predict", content=BOOT, headers=bearer(secret)).status_code
             for _ in range(4)]  # fmt: skip
    assert codes[:2] == [200, 200] and 429 in codes[2:]


def test_admin_routes_take_the_admin_token_or_a_key_with_the_admin_scope(
    keyed: Callable[..., tuple[TestClient, Clock]], key_file: Path
) -> None:
    _, predict = create_key(key_file, "alice")
    _, admin = create_key(key_file, "ops", ["admin"])
    client, _ = keyed(admin_token=ADMIN)
    assert client.post("/admin/keys/reload").status_code == 401
    assert client.post("/admin/keys/reload", headers=bearer(predict)).status_code == 403
    assert client.post("/admin/keys/reload", headers=bearer(ADMIN)).json() == {
        "message": "API keys reloaded", "keys": 2,
    }  # fmt: skip
    assert client.post("/admin/keys/reload", headers={"x-api-key": admin}).status_code == 200
    assert client.post("/admin/reload", headers=bearer(admin)).status_code == 200  # a model


def test_admin_reload_without_keys_says_how_to_turn_them_on(
    app_client: Callable[..., TestClient],
) -> None:
    client = app_client(repo=BUNDLED_MODEL.parent, admin_token=ADMIN)
    answer = client.post("/admin/keys/reload", headers=bearer(ADMIN))
    assert answer.status_code == 400 and "--api-keys FILE" in answer.json()["error"]["message"]


def test_revocation_takes_effect_on_the_admin_reload(
    keyed: Callable[..., tuple[TestClient, Clock]], key_file: Path
) -> None:
    _, secret = create_key(key_file, "alice")
    client, _ = keyed(admin_token=ADMIN)
    assert client.post("/predict", content=BOOT, headers=bearer(secret)).status_code == 200
    revoke_key(key_file, "alice")
    assert client.post("/predict", content=BOOT, headers=bearer(secret)).status_code == 200
    assert client.post("/admin/keys/reload", headers=bearer(ADMIN)).status_code == 200
    refused = client.post("/predict", content=BOOT, headers=bearer(secret))
    assert refused.status_code == 401 and "unknown or revoked" in refused.text


def test_usage_per_key_is_in_metrics_by_name(
    keyed: Callable[..., tuple[TestClient, Clock]], key_file: Path
) -> None:
    key, secret = create_key(key_file, "alice", quota=2)
    _, ops = create_key(key_file, "ops", ["admin"])
    client, _ = keyed()
    for _ in range(3):
        client.post("/predict", content=BOOT, headers=bearer(secret))
    client.post("/predict", content=BOOT, headers=bearer(ops))
    text = client.get("/metrics").text
    assert 'tinyserve_api_key_requests_total{key="alice",outcome="admitted"} 2.0' in text
    assert 'tinyserve_api_key_requests_total{key="alice",outcome="quota_exceeded"} 1.0' in text
    assert 'tinyserve_api_key_requests_total{key="ops",outcome="forbidden"} 1.0' in text
    assert 'tinyserve_api_key_quota_used{key="alice"} 2.0' in text
    assert secret not in text and key.sha256 not in text and key.id not in text


def test_no_key_nor_hash_reaches_the_log(
    keyed: Callable[..., tuple[TestClient, Clock]],
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key, secret = create_key(key_file, "alice", rate=1, burst=1, quota=3)
    with caplog.at_level(logging.DEBUG):
        client, _ = keyed(admin_token=ADMIN, access_log=True)
        bodies = [client.post("/predict", content=BOOT, headers=bearer(s)).text
                  for s in (secret, secret, secret[:-1] + "?", "", secret)]  # fmt: skip
        bodies.append(client.post("/admin/keys/reload", headers=bearer(secret)).text)
        bodies.append(client.post("/admin/keys/reload", headers=bearer(ADMIN)).text)
        revoke_key(key_file, "alice")
        client.post("/admin/keys/reload", headers=bearer(ADMIN))
        bodies.append(client.post("/predict", content=BOOT, headers=bearer(secret)).text)
    logged = caplog.text
    assert "API keys" in logged and "alice" not in bodies[0]
    for text in (logged, *bodies):
        assert secret not in text and secret.split("_", 2)[2] not in text
        assert key.sha256 not in text


# -- the command line and the non-loopback warning ----------------------------------------


def test_keys_cli_creates_lists_and_revokes(key_file: Path) -> None:
    runner = CliRunner()
    env = {"TINYSERVE_API_KEYS": str(key_file)}
    created = runner.invoke(
        cli_app, ["keys", "create", "alice", "--rate", "5", "--quota", "1000", "--json"], env=env
    )
    assert created.exit_code == 0, created.output
    made = json.loads(created.stdout)
    secret = made["key"]
    assert secret.startswith("tsk_") and made["name"] == "alice" and "sha256" not in made
    plain = runner.invoke(cli_app, ["keys", "create", "ops", "--scope", "admin", "-f",
                                    str(key_file)])  # fmt: skip
    assert plain.exit_code == 0 and plain.stdout.startswith("tsk_")
    assert "shown only now" in plain.stderr
    listed = runner.invoke(cli_app, ["keys", "list", "--json"], env=env)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["scopes"], r["quota"]) for r in rows] == [
        ("alice", ["predict"], 1000), ("ops", ["admin"], 0),
    ]  # fmt: skip
    table = runner.invoke(cli_app, ["keys", "list"], env={**env, "COLUMNS": "200"}).stdout
    assert "alice" in table and "1000/day" in table
    hashes = [k.sha256 for k in read_keys(key_file)]
    for output in (listed.stdout, table):
        assert secret not in output and not any(h in output for h in hashes)
    revoked = runner.invoke(cli_app, ["keys", "revoke", "alice"], env=env)
    assert revoked.exit_code == 0 and "SIGHUP" in revoked.stdout
    live = runner.invoke(cli_app, ["keys", "list", "--json"], env=env).stdout
    assert [json.loads(line)["name"] for line in live.splitlines()] == ["ops"]
    everything = runner.invoke(cli_app, ["keys", "list", "--all", "--json"], env=env).stdout
    assert len(everything.splitlines()) == 2


@pytest.mark.parametrize(
    ("host", "keys", "anonymous", "warned"),
    [("127.0.0.1", False, False, False), ("localhost", False, False, False),
     ("::1", False, False, False), ("0.0.0.0", False, False, True),
     ("0.0.0.0", True, False, False), ("0.0.0.0", False, True, False),
     ("10.1.2.3", False, False, True)],
)  # fmt: skip
def test_a_non_loopback_host_without_keys_is_warned_of(
    host: str, keys: bool, anonymous: bool, warned: bool
) -> None:
    config = ServerConfig(api_keys=Path("keys.json") if keys else None)
    warning = exposure_warning(config, RunConfig(host=host, allow_anonymous=anonymous))
    assert (warning is not None) == warned
    if warning is not None:
        assert host in warning and "--api-keys FILE" in warning and "--allow-anonymous" in warning


@pytest.mark.parametrize(("args", "warned"), [([], True), (["--allow-anonymous"], False)])
def test_serve_warns_when_it_binds_every_address_without_keys(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    args: list[str],
    warned: bool,
) -> None:
    import uvicorn

    ran: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: ran.append(options["host"]))
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # leave pytest's handlers alone
    monkeypatch.delenv("TINYSERVE_API_KEYS", raising=False)
    command = ["serve", "--repo", str(BUNDLED_MODEL.parent), "--host", "0.0.0.0", *args]
    with caplog.at_level(logging.WARNING, logger="tinyserve"):
        result = CliRunner().invoke(cli_app, command)
    assert result.exit_code == 0, result.output
    assert ran == ["0.0.0.0"]
    assert ("serving 0.0.0.0:8000 without API keys" in caplog.text) == warned


# -- a real server ------------------------------------------------------------------------


def test_live_server_with_keys_and_revocation_on_sighup(
    serve: Callable[..., Any], key_file: Path
) -> None:
    key, secret = create_key(key_file, "alice", quota=100)
    _, other = create_key(key_file, "bob")
    server = serve("--access-log", "--log-level", "debug",
                   env={"TINYSERVE_API_KEYS": str(key_file)})  # fmt: skip
    url = f"{server.url}/predict"
    assert httpx.post(url, content=BOOT, headers=RAW).status_code == 401
    assert httpx.post(url, content=BOOT, headers=bearer(secret)).status_code == 200
    assert httpx.post(url, content=BOOT, headers={**RAW, "x-api-key": other}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    revoke_key(key_file, "alice")
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: httpx.post(url, content=BOOT, headers=bearer(secret)).status_code == 401)
    assert httpx.post(url, content=BOOT, headers=bearer(other)).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'tinyserve_api_key_requests_total{key="bob",outcome="admitted"} 2.0' in metrics
    output = server.output_with("SIGHUP", "API keys reloaded: 1 live")
    assert "SIGHUP" in output and "API keys reloaded: 1 live" in output
    assert secret not in output and key.sha256 not in output


def test_live_server_logs_no_key_and_revokes_on_admin_reload(
    serve: Callable[..., Any], key_file: Path
) -> None:
    key, secret = create_key(key_file, "alice")
    server = serve("--access-log", "--log-level", "debug",
                   env={"TINYSERVE_API_KEYS": str(key_file)})  # fmt: skip
    url = f"{server.url}/predict"
    assert httpx.post(url, content=BOOT, headers=bearer(secret)).status_code == 200
    subprocess.run([sys.executable, "-m", "tinyserve", "keys", "revoke", "alice", "--file",
                    str(key_file)], check=True, capture_output=True, timeout=60)  # fmt: skip
    reload = httpx.post(f"{server.url}/admin/keys/reload", headers=bearer(TOKEN))
    assert reload.status_code == 200 and reload.json()["keys"] == 0
    assert httpx.post(url, content=BOOT, headers=bearer(secret)).status_code == 401
    output = server.output_with("API keys reloaded: 0 live", '"status":401')
    assert "API keys reloaded: 0 live" in output and '"status":401' in output
    assert secret not in output and secret.split("_", 2)[2] not in output
    assert key.sha256 not in output


def test_bench_http_sends_the_key_in_a_header(serve: Callable[..., Any], key_file: Path) -> None:
    _, secret = create_key(key_file, "bench")
    server = serve(env={"TINYSERVE_API_KEYS": str(key_file)})
    image = str(next(SAMPLES.glob("*ankle-boot.png")))
    args = ["bench", "http", f"{server.url}/predict", "--image", image, "--concurrency", "1",
            "--warmup", "0", "--duration", "0.3", "--no-metrics", "--json"]  # fmt: skip
    runner = CliRunner()
    refused = runner.invoke(cli_app, args)
    assert refused.exit_code != 0 and "answered 401" in str(refused.exception)
    done = runner.invoke(cli_app, [*args, "--header", f"X-API-Key: {secret}"])
    assert done.exit_code == 0, done.output
    step = json.loads(done.stdout)["steps"][0]
    assert step["ok"] > 0 and set(step["statuses"]) == {"200"}
    assert runner.invoke(cli_app, [*args, "--header", "no colon"]).exit_code != 0
