"""Rollouts: traffic split, stickiness, shadow, canary ramp and automatic rollback, the breaker
and its fallback, and request deadlines; as units with an injected clock, and through a real
app (in-process and a ``tinyserve serve`` process) with a slow and a failing model version."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from faulty_models import failing_copy, slow_copy
from tinyserve.errors import ConfigError
from tinyserve.repository import ModelConfig
from tinyserve.rollout import Breaker, BreakerPolicy, CanaryPolicy, Rollout, RolloutConfig

IMAGE = (SAMPLES / "0000_ankle-boot.png").read_bytes()
PNG = {"content-type": "image/png"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def parse(text: str, tmp_path: Path) -> RolloutConfig | None:
    (tmp_path / "config.toml").write_text(text)
    config = ModelConfig.read(tmp_path)
    return RolloutConfig.parse(config.rollout, "config.toml")


# -- configuration ------------------------------------------------------------------------


def test_config_toml_declares_the_rollout(tmp_path: Path) -> None:
    config = parse(
        'traffic = {1 = 90, 2 = 10}\nsticky = "X-User"\nshadow = 3\nfallback = "small:2"\n'
        "[canary]\nversion = 2\nsteps = [10, 50, 100]\n[breaker]\nfailures = 3\n",
        tmp_path,
    )
    assert config is not None
    assert config.traffic == ((1, 90.0), (2, 10.0))
    assert config.sticky == "x-user" and config.shadow == 3 and config.fallback == ("small", 2)
    assert config.canary == CanaryPolicy(2, steps=(10.0, 50.0, 100.0))
    assert config.breaker.failures == 3 and config.versions == {1, 2, 3}
    assert parse("version = 1\n", tmp_path) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("traffic = {1 = -5}", "must be a number >= 0"),
        ("traffic = {x = 5}", "a traffic key must be a version number"),
        ("shadow = 0", "shadow must be a version number"),
        ('fallback = "small:x"', 'fallback must be "model" or "model:version"'),
        ("[canary]\nversion = 2\nsteps = [50, 10]", "steps must rise"),
        ("[canary]\nversion = 2\nspeed = 3", "unknown keys"),
        ("[breaker]\nfailures = 0", "failures must be >= 1"),
    ],
)
def test_a_bad_rollout_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(text, tmp_path)


# -- routing ------------------------------------------------------------------------------


def test_traffic_split_is_within_three_points_of_its_weights() -> None:
    config = RolloutConfig(traffic=((1, 90.0), (2, 10.0)))
    rollout = Rollout("m", config, 1, rng=random.Random(7))
    counts = Counter(rollout.choose(None) for _ in range(2000))
    assert abs(counts[2] / 2000 - 0.10) <= 0.03
    sticky = Counter(rollout.choose(f"user-{i}") for i in range(2000))
    assert abs(sticky[2] / 2000 - 0.10) <= 0.03


def test_a_sticky_user_stays_on_one_version() -> None:
    rollout = Rollout("m", RolloutConfig(traffic=((1, 50.0), (2, 50.0))), 1)
    for user in ("alice", "bob", "carol", "dave"):
        assert len({rollout.choose(user) for _ in range(50)}) == 1
    assert len({rollout.choose(f"u{i}") for i in range(50)}) == 2


# -- the canary ---------------------------------------------------------------------------


def canary(clock: Clock, **policy: object) -> Rollout:
    options: dict[str, object] = {"steps": (5.0, 25.0, 50.0, 100.0), "step_s": 60.0,
                                  "min_requests": 20, "window": 200, **policy}  # fmt: skip
    config = RolloutConfig(canary=CanaryPolicy(2, **options))  # type: ignore[arg-type]
    return Rollout("m", config, 1, clock=clock)


def feed(rollout: Rollout, version: int, n: int, seconds: float, ok: bool = True) -> None:
    for _ in range(n):
        rollout.observe(version, seconds, ok)


def test_a_healthy_canary_ramps_step_by_step_then_is_promoted() -> None:
    clock = Clock()
    rollout = canary(clock)
    assert rollout.weights == [(1, 95.0), (2, 5.0)]
    weights = [rollout.canary_weight]
    for _ in range(3):
        feed(rollout, 1, 30, 0.010)
        feed(rollout, 2, 30, 0.011)
        assert rollout.canary_weight == weights[-1]  # not before step_s has passed
        clock.now += 61
        assert rollout.evaluate() in ("advance", "promote")
        weights.append(rollout.canary_weight)
    assert weights == [5.0, 25.0, 50.0, 100.0]
    assert rollout.state == "promoted" and rollout.weights == [(2, 100.0)]
    assert [d["decision"] for d in rollout.decisions] == ["advance", "advance", "promote"]


def test_a_slow_canary_is_rolled_back_with_its_figures() -> None:
    clock = Clock()
    rollout = canary(clock)
    feed(rollout, 1, 50, 0.010)
    feed(rollout, 2, 30, 0.040)  # p99 40 ms against 10 ms * 1.5 + 2
    assert rollout.state == "rolled_back" and rollout.weights == [(1, 100.0)]
    decision = rollout.decisions[-1]
    assert decision["decision"] == "rollback" and "p99" in decision["reason"]
    assert decision["canary_p99_ms"] == 40.0 and decision["stable_p99_ms"] == 10.0


def test_a_failing_canary_is_rolled_back_and_a_fine_one_is_not() -> None:
    clock = Clock()
    rollout = canary(clock)
    feed(rollout, 1, 50, 0.010)
    feed(rollout, 2, 18, 0.010)
    feed(rollout, 2, 2, 0.010, ok=False)  # 10 % errors against 0 %
    assert rollout.state == "rolled_back"
    assert "error rate" in rollout.decisions[-1]["reason"]
    fine = canary(Clock(), max_error_increase=0.2)
    feed(fine, 1, 50, 0.010)
    feed(fine, 2, 18, 0.010)
    feed(fine, 2, 2, 0.010, ok=False)
    assert fine.state == "ramping"


def test_the_breaker_opens_lets_one_probe_through_and_closes() -> None:
    clock = Clock()
    breaker = Breaker(BreakerPolicy(failures=3, open_s=5), clock)
    for _ in range(2):
        breaker.failure()
    assert breaker.state == Breaker.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == Breaker.OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open again, for another open_s
    assert breaker.state == Breaker.OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == Breaker.CLOSED and breaker.allow()


# -- through the app ----------------------------------------------------------------------


def reason(client: TestClient) -> str | None:
    """Why the fallback answered the next request; None if the primary did."""
    fallback = client.post("/predict", content=IMAGE, headers=PNG).json().get("fallback")
    return None if fallback is None else str(fallback["reason"])


def repo_with(tmp_path: Path, config: str, extra: dict[int, str] | None = None) -> Path:
    """fashion-cnn versions 1 (FP32) and 2 (INT8), plus ``extra``: 3 = "slow" or "failing"."""
    repo = tmp_path / "repo"
    model = repo / "fashion-cnn"
    shutil.copytree(BUNDLED_MODEL, model)
    for version, kind in (extra or {}).items():
        make = slow_copy if kind == "slow" else failing_copy
        make(BUNDLED_MODEL / "1" / "model.onnx", model / str(version) / "model.onnx")
    (model / "config.toml").write_text(config)
    return repo


def versions_of(client: TestClient, n: int, **headers: str) -> Counter[int]:
    answered: Counter[int] = Counter()
    for _ in range(n):
        response = client.post("/predict", content=IMAGE, headers={**PNG, **headers})
        assert response.status_code == 200, response.text
        assert (
            response.headers["x-tinyserve-version"] == f"fashion-cnn:{response.json()['version']}"
        )
        answered[response.json()["version"]] += 1
    return answered


@pytest.mark.slow
def test_the_app_splits_traffic_and_keeps_users_sticky(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = repo_with(tmp_path, 'traffic = {1 = 70, 2 = 30}\nsticky = "x-user"\n')
    client = app_client(repo=repo)
    answered = versions_of(client, 2000)
    # Each unpinned request draws its arm at random: sigma is 1 pt at 2,000, so 5 pt is ~5 sigma.
    assert abs(answered[2] / 2000 - 0.30) <= 0.05, answered
    for user in ("ann", "ben", "cat"):
        assert len(versions_of(client, 10, **{"x-user": user})) == 1
    pinned = client.post("/predict?version=1", content=IMAGE, headers=PNG).json()
    assert pinned["version"] == 1
    info = client.get("/v1/models/fashion-cnn").json()["rollout"]
    assert info["weights"] == {"1": 70.0, "2": 30.0} and info["sticky"] == "x-user"
    metrics = client.get("/metrics").text
    assert 'tinyserve_rollout_weight{model="fashion-cnn",version="2"} 30.0' in metrics


def test_the_shadow_version_is_compared_and_never_answers(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = repo_with(tmp_path, "version = 1\nshadow = 2\n")
    client = app_client(repo=repo)
    samples = sorted(SAMPLES.glob("*.png"))
    for path in samples:
        response = client.post("/predict", content=path.read_bytes(), headers=PNG)
        assert response.json()["version"] == 1
    context = client.app.context  # type: ignore[attr-defined]
    for _ in range(200):
        if sum(context.shadow_counts["fashion-cnn"].values()) == len(samples):
            break
        client.get("/health")  # let the event loop finish the shadow copies
    counts = client.get("/v1/models/fashion-cnn").json()["rollout"]["shadow_results"]
    assert sum(counts.values()) == len(samples)
    assert counts.get("agree", 0) >= len(samples) - 1  # INT8 agrees with FP32 on the samples
    metrics = client.get("/metrics").text
    assert (
        'tinyserve_shadow_requests_total{model="fashion-cnn",outcome="agree",version="2"}'
        in metrics
    )


CANARY = "version = 1\n[canary]\nversion = 3\nsteps = [{first}, 100]\nstep_s = 3600\n" \
         "min_requests = 20\nwindow = 200\n"  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["failing", "slow"])
def test_a_bad_canary_is_rolled_back_and_no_client_request_fails(
    app_client: Callable[..., TestClient], tmp_path: Path, kind: str
) -> None:
    repo = repo_with(tmp_path, CANARY.format(first=30), {3: kind})
    client = app_client(repo=repo)
    answered = versions_of(client, 400)  # every one of them answered 200
    info = client.get("/v1/models/fashion-cnn").json()["rollout"]
    assert info["state"] == "rolled_back", info
    decision = info["canary"]["decisions"][-1]
    assert decision["decision"] == "rollback"
    assert ("error rate" if kind == "failing" else "p99") in decision["reason"]
    if kind == "failing":
        assert answered[3] == 0  # the stable version answered every request the canary failed
    after = versions_of(client, 50)
    assert after == Counter({1: 50})
    metrics = client.get("/metrics").text
    assert 'tinyserve_rollout_rollbacks_total{model="fashion-cnn",version="3"} 1.0' in metrics


def test_the_breaker_sends_requests_to_the_fallback_and_probes_back(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = repo_with(
        tmp_path,
        'version = 3\nfallback = "fashion-cnn:2"\n[breaker]\nfailures = 2\nopen_s = 30\n',
        {3: "failing"},
    )
    client = app_client(repo=repo)
    clock = Clock()
    client.app.context.clock = clock  # type: ignore[attr-defined]
    reasons = []
    for _ in range(5):
        response = client.post("/predict", content=IMAGE, headers=PNG)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["version"] == 2 and body["fallback"]["from"] == "fashion-cnn:3"
        reasons.append(body["fallback"]["reason"])
    assert reasons == ["failed", "failed", "open", "open", "open"]
    assert client.get("/v1/models/fashion-cnn").json()["rollout"]["breaker"] == "open"
    # after open_s, one probe goes to the primary; it still fails, so the breaker reopens
    clock.now += 30
    probe = client.post("/predict", content=IMAGE, headers=PNG).json()
    assert probe["fallback"]["reason"] == "failed"
    assert (
        client.post("/predict", content=IMAGE, headers=PNG).json()["fallback"]["reason"] == "open"
    )
    metrics = client.get("/metrics").text
    assert 'tinyserve_breaker_state{model="fashion-cnn"} 1.0' in metrics
    assert 'reason="open"' in metrics


def test_a_healthy_primary_closes_the_breaker_after_its_probe(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = repo_with(tmp_path, 'version = 1\nfallback = "fashion-cnn:2"\n[breaker]\nfailures = 1\n'
                     "open_s = 10\nlatency_budget_ms = 0.001\n")  # fmt: skip
    client = app_client(repo=repo)
    clock = Clock()
    client.app.context.clock = clock  # type: ignore[attr-defined]
    first = client.post("/predict", content=IMAGE, headers=PNG).json()
    assert first["version"] == 1 and "fallback" not in first  # answered, but over budget
    assert (
        client.post("/predict", content=IMAGE, headers=PNG).json()["fallback"]["reason"] == "open"
    )
    rollout = client.app.context.rollout("fashion-cnn")  # type: ignore[attr-defined]
    rollout.breaker.policy = BreakerPolicy(failures=1, open_s=10)  # the budget lifted
    clock.now += 10
    assert "fallback" not in client.post("/predict", content=IMAGE, headers=PNG).json()
    assert rollout.breaker.state == Breaker.CLOSED


def test_a_deadline_that_cannot_be_met_is_refused_at_once(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    repo = repo_with(tmp_path, "version = 3\n", {3: "slow"})
    client = app_client(repo=repo)
    ok = client.post("/predict", content=IMAGE, headers={**PNG, "x-request-timeout": "5"})
    assert ok.status_code == 200
    refused = client.post("/predict", content=IMAGE, headers={**PNG, "x-request-timeout": "1ms"})
    assert refused.status_code == 504
    assert refused.json()["error"]["code"] == "deadline_exceeded"
    assert "X-Request-Timeout" in refused.json()["error"]["message"]
    bad = client.post("/predict", content=IMAGE, headers={**PNG, "x-request-timeout": "soon"})
    assert bad.status_code == 422
    metrics = client.get("/metrics").text
    assert 'tinyserve_deadline_refusals_total{model="fashion-cnn"} 1.0' in metrics


@pytest.mark.slow
def test_a_real_server_splits_traffic_and_rolls_a_failing_canary_back(
    serve: Callable[..., object], tmp_path: Path
) -> None:
    repo = repo_with(tmp_path, CANARY.format(first=50), {3: "failing"})
    server = serve(repo=repo)
    url = server.url  # type: ignore[attr-defined]
    statuses: Counter[int] = Counter()
    with httpx.Client(timeout=10) as client:
        for _ in range(200):
            response = client.post(f"{url}/predict", content=IMAGE, headers=PNG)
            statuses[response.status_code] += 1
        info = client.get(f"{url}/v1/models/fashion-cnn").json()["rollout"]
    assert statuses == Counter({200: 200})
    assert info["state"] == "rolled_back" and info["weights"] == {"1": 100.0}
    assert "rollout of fashion-cnn version 3: rollback" in server.output()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_real_server_splits_sticks_shadows_and_falls_back(
    serve: Callable[..., object], tmp_path: Path
) -> None:
    split = repo_with(tmp_path / "split", 'traffic = {1 = 80, 2 = 20}\nsticky = "x-user"\n'
                      "shadow = 1\n")  # fmt: skip
    server = serve(repo=split)
    url = server.url  # type: ignore[attr-defined]
    answered: Counter[int] = Counter()
    with httpx.Client(timeout=10) as client:
        for _ in range(2000):
            response = client.post(f"{url}/predict", content=IMAGE, headers=PNG)
            assert response.status_code == 200
            answered[response.json()["version"]] += 1
        assert abs(answered[2] / 2000 - 0.20) <= 0.03, answered
        for user in ("ann", "ben"):
            seen = {
                client.post(
                    f"{url}/predict", content=IMAGE, headers={**PNG, "x-user": user}
                ).json()["version"]
                for _ in range(10)
            }
            assert len(seen) == 1
        info = client.get(f"{url}/v1/models/fashion-cnn").json()["rollout"]
        assert sum(info["shadow_results"].values()) > 0  # version 2's answers, mirrored to 1
        metrics = client.get(f"{url}/metrics").text
        assert (
            'tinyserve_shadow_requests_total{model="fashion-cnn",outcome="agree",version="1"}'
            in metrics
        )

    broken = repo_with(tmp_path / "broken", 'version = 3\nfallback = "fashion-cnn:2"\n'
                       "[breaker]\nfailures = 2\nopen_s = 60\n", {3: "failing"})  # fmt: skip
    server = serve(repo=broken)
    url = server.url  # type: ignore[attr-defined]
    with httpx.Client(timeout=10) as client:
        reasons = []
        for _ in range(4):
            response = client.post(f"{url}/predict", content=IMAGE, headers=PNG)
            assert response.status_code == 200 and response.json()["version"] == 2
            assert response.headers["x-tinyserve-fallback"].startswith("fashion-cnn:3")
            reasons.append(response.json()["fallback"]["reason"])
        assert reasons == ["failed", "failed", "open", "open"]
        assert client.get(f"{url}/v1/models/fashion-cnn").json()["rollout"]["breaker"] == "open"
