"""Ray Serve: the repository on a real two-node Ray cluster on loopback (two `ray start`
processes on this machine, one CPU each), answering as `tinyserve serve` does; replicas on both
nodes, autoscaling under load, a killed replica replaced with no failed request, and a model
update rolled out without downtime. One cluster for the module; the tests run in order."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

import test_seed_clients as seed
from conftest import BUNDLED_MODEL, SAMPLES
from live_server import free_port
from tinyserve.engine import EngineConfig
from tinyserve.ray_serve import REPLICA_HEADER, RETRIES, model_for
from tinyserve.settings import RunConfig, ServerConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

RAY = Path(sys.executable).parent / "ray"  # the CLI of the Ray beside this interpreter
BOOT = (SAMPLES / "0000_ankle-boot.png").read_bytes()
RAW = {"content-type": "image/png"}
AUTOSCALING = {"upscale_delay_s": 1, "downscale_delay_s": 600, "look_back_period_s": 2,
               "metrics_interval_s": 0.5}  # fmt: skip


def test_model_for_picks_the_named_model_else_the_default() -> None:
    names = ["a", "b"]
    assert model_for("/v1/models/b/predict", names, "a") == "b"
    assert model_for("/v2/models/b/versions/1/infer", names, "a") == "b"
    assert model_for("/admin/models/b/reload", names, "a") == "b"
    assert model_for("/v1/models/nope/predict", names, "a") == "a"  # answers its 404
    assert model_for("/v2/models/stats", names, "a") == "a"
    assert model_for("/health", names, None) == "a"
    assert model_for("/health", [], None) is None


class Cluster:
    """`ray start --head` and a second `ray start --address` node, each in its own group."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.groups: list[int] = []
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
                  "--object-store-memory", str(80 * 1024 * 1024)]  # fmt: skip
        self._start(["--head", "--port", str(self.port), "--include-dashboard=false",
                     "--ray-client-server-port", str(free_port()), "--temp-dir", str(root),
                     *common])  # fmt: skip
        self._start(["--address", self.address, *common])

    def _start(self, args: list[str]) -> None:
        process = subprocess.Popen(
            [str(RAY), "start", *args], env=self.env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.groups.append(process.pid)
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            raise RuntimeError(f"ray start {args[0]} failed:\n{output}")

    def stop(self) -> None:
        # Only this cluster's processes: each `ray start` and what it started share a group.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in self.groups:
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)


@pytest.fixture(scope="module")
def repo() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="tinyserve-ray-"))
    model = root / "fashion-cnn"
    model.mkdir()
    for version in ("1", "2"):
        (model / version).symlink_to(BUNDLED_MODEL / version, target_is_directory=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


CONFIG = ServerConfig(engine=EngineConfig(intra_op_threads=1), decode_threads=1)
RUN = RunConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1, replica_cpus=1)


@pytest.fixture(scope="module")
def ray_url(repo: Path) -> Iterator[str]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from tinyserve.ray_serve import APP_NAME, build_app

    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    cluster = Cluster(temp)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(repo, CONFIG, RUN, AUTOSCALING), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.stop()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def client(ray_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_url, timeout=60) as http:
        yield http


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["tinyserve"].deployments["models"]
    return int(status.replica_states.get("RUNNING", 0))


class Load:
    """Requests from ``workers`` threads until stopped: every status and answering replica."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.replicas: Counter[str] = Counter()
        self.versions: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work) for _ in range(workers)]

    def _work(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                try:
                    response = http.post(f"{self.url}/predict", content=BOOT, headers=RAW)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                self.statuses[response.status_code] += 1
                self.replicas[response.headers.get(REPLICA_HEADER.decode(), "?")] += 1
                if response.status_code == 200:
                    self.versions.append((time.monotonic(), response.json()["version"]))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200) + len(self.errors)


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


# -- the same answers as `tinyserve serve` ------------------------------------------------

SEED_CASES = [
    seed.test_seed_001_predict_answers_class_id_class_name_confidence,
    seed.test_seed_001_predict_answers_inference_time_ms,
    seed.test_seed_001_predict_without_image_answers_400_with_error,
    seed.test_seed_001_batch_answers_batch_predictions_in_order,
    seed.test_seed_001_batch_answers_counts_and_times,
    seed.test_seed_001_model_info,
    seed.test_seed_002_health,
    seed.test_seed_001_health_answers_timestamp_service_version,
    seed.test_seed_002_infer_answers_label_confidence_and_time,
    seed.test_seed_002_batch_answers_counts_and_total_time,
    seed.test_seed_002_batch_results_keep_upload_order_and_filenames,
    seed.test_seed_002_batch_failed_result_has_error_and_no_predictions,
    seed.test_seed_002_metrics_as_json,
]


@pytest.mark.parametrize("case", SEED_CASES, ids=lambda case: case.__name__[5:])
def test_seed_clients_work_unchanged(client: httpx.Client, case: Callable[[Any], None]) -> None:
    case(client)


TIMING = {"latency_ms", "inference_time_ms", "total_time_ms", "total_inference_time_ms",
          "average_time_per_image_ms", "timestamp", "uptime_seconds", "loaded_at",
          "load_seconds", "path", "model_path"}  # fmt: skip


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


EXACT = [
    ("POST", "/predict", {"json": {"image": seed.b64(BOOT), "top_k": 3}}),
    ("POST", "/v1/models/fashion-cnn/predict?version=1", {"content": BOOT, "headers": RAW}),
    ("POST", "/infer/batch", {"files": seed.UPLOADS}),
    ("POST", "/v1/models/nope/predict", {"content": BOOT, "headers": RAW}),
    ("POST", "/predict", {"content": b"not an image", "headers": RAW}),
    ("GET", "/v1/models", {}),
    ("GET", "/v1/models/fashion-cnn", {}),
    ("GET", "/v2/models/fashion-cnn", {}),
    ("GET", "/v2/models/fashion-cnn/ready", {}),
    (
        "POST",
        "/v2/models/fashion-cnn/infer",
        {
            "json": {
                "inputs": [
                    {"name": "image", "shape": [1], "datatype": "BYTES", "data": [seed.b64(BOOT)]}
                ]
            }
        },
    ),  # fmt: skip
    ("GET", "/nowhere", {}),
]


@pytest.mark.parametrize(
    ("method", "path", "options"), EXACT, ids=[f"{m} {p}" for m, p, _ in EXACT]
)
def test_answers_are_those_of_tinyserve_serve(
    client: httpx.Client, repo: Path, method: str, path: str, options: dict[str, Any]
) -> None:
    with TestClient(create_local(repo)) as local:
        expected = local.request(method, path, **options)
    got = client.request(method, path, **options)
    assert got.status_code == expected.status_code, got.text
    assert got.headers["content-type"] == expected.headers["content-type"]
    if expected.headers["content-type"].startswith("application/json"):
        assert without_timing(got.json()) == without_timing(expected.json())
    else:
        assert got.content == expected.content


def create_local(repo: Path) -> Any:
    from dataclasses import replace

    from tinyserve.app import create_app

    return create_app(replace(CONFIG, repo=repo))


# -- scaling, spreading, failure, update --------------------------------------------------


def test_load_scales_the_models_from_one_replica_to_two(ray_url: str) -> None:
    assert running_replicas() == 1
    with Load(ray_url, workers=4) as load:
        scaled = wait_for(lambda: running_replicas() == 2, 60)
    assert scaled, f"still {running_replicas()} replica(s)"
    assert load.failed == 0, (load.statuses, load.errors[:3])


def test_requests_are_spread_over_replicas_on_both_nodes(ray_url: str) -> None:
    import ray

    assert wait_for(lambda: running_replicas() == 2, 30)
    with Load(ray_url, workers=4) as load:
        time.sleep(4)
    assert load.failed == 0, (load.statuses, load.errors[:3])
    busy = {where: n for where, n in load.replicas.items() if n >= 3}
    nodes = {where.split("@")[1] for where in busy}
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(busy) == 2 and nodes == alive and len(alive) == 2, load.replicas


def test_a_killed_replica_is_replaced_and_no_request_fails(ray_url: str) -> None:
    import ray

    assert wait_for(lambda: running_replicas() == 2, 30)
    with Load(ray_url, workers=4) as load:
        wait_for(lambda: len(load.replicas) >= 2, 10)
        victim = max(load.replicas, key=lambda where: load.replicas[where]).split("@")[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        before = dict(load.replicas)
        replaced = wait_for(
            lambda: running_replicas() == 2 and len(set(load.replicas) - set(before)) >= 1, 60
        )
        time.sleep(1)
    # The ingress sends a request again (up to RETRIES times) when its replica dies under it:
    # clients see no failure at all.
    assert replaced, (running_replicas(), load.replicas)
    assert load.failed == 0, (RETRIES, load.statuses, load.errors[:3])
    assert sum(load.statuses.values()) > 20


def test_a_new_model_version_rolls_out_without_downtime(ray_url: str, repo: Path) -> None:
    from ray import serve

    from tinyserve.ray_serve import APP_NAME, build_app

    (repo / "fashion-cnn" / "3").symlink_to(BUNDLED_MODEL / "1", target_is_directory=True)
    with Load(ray_url, workers=4) as load:
        time.sleep(1)
        serve.run(build_app(repo, CONFIG, RUN, AUTOSCALING), name=APP_NAME, route_prefix="/")
        deployed = time.monotonic()
        on_three = wait_for(lambda: bool(load.versions) and load.versions[-1][1] == 3, 30)
        time.sleep(2)
    assert on_three
    assert load.failed == 0, (load.statuses, load.errors[:3])
    versions = [v for _, v in load.versions]
    assert versions[0] == 2 and 3 in versions
    # serve.run returns once every replica has its new config, and so has reloaded.
    late = [v for at, v in load.versions if at > deployed + 0.5]
    assert late and set(late) == {3}, Counter(late)
