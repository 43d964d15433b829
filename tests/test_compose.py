"""deploy/compose and deploy/deploy.sh: nginx in front of real servers, and the rollout script."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT
from live_server import Server, free_port, samples

COMPOSE = ROOT / "deploy" / "compose"
DEPLOY = ROOT / "deploy" / "deploy.sh"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make data)")


def local_conf(tmp_path: Path, backends: list[str], port: int) -> Path:
    """deploy/compose/nginx.conf with its upstream pointed at local servers and its paths in
    ``tmp_path``: nothing else changes, so the test runs the shipped file."""
    text = (COMPOSE / "nginx.conf").read_text()
    upstream = "        server tinyserve:8000 max_fails=3 fail_timeout=10s;\n"
    assert upstream in text and "listen 8080;" in text
    servers = "".join(f"        server {b} max_fails=3 fail_timeout=10s;\n" for b in backends)
    text = text.replace(upstream, servers).replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("/tmp/", f"{tmp_path}/")
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    return conf


def nginx(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert NGINX is not None
    command = [NGINX, "-e", "stderr", "-p", str(conf.parent), "-c", str(conf), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=10)


@pytest.fixture
def balancer(tmp_path: Path, serve: Callable[..., Server]) -> Iterator[tuple[str, list[Server]]]:
    servers = [serve(), serve()]
    port = free_port()
    conf = local_conf(tmp_path, [s.url.removeprefix("http://") for s in servers], port)
    check = nginx(conf, "-t")
    assert check.returncode == 0, check.stderr
    assert NGINX is not None
    process = subprocess.Popen(
        [NGINX, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"{url}/nginx/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
    yield url, servers
    process.terminate()
    process.wait(10)


def test_the_compose_file_runs_replicas_behind_nginx() -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    server, balancer = compose["services"]["tinyserve"], compose["services"]["nginx"]
    assert (COMPOSE / server["build"]["context"]).resolve() == ROOT
    assert (ROOT / server["build"]["dockerfile"]).is_file()
    assert server["deploy"]["replicas"] > 1 and "ports" not in server  # only nginx publishes
    assert server["read_only"] is True and balancer["read_only"] is True
    assert all(p.startswith("127.0.0.1:") for p in balancer["ports"])
    assert balancer["depends_on"]["tinyserve"]["condition"] == "service_healthy"
    mounted = {v.split(":")[0]: v.split(":")[1] for v in balancer["volumes"]}
    assert (COMPOSE / "./nginx.conf").resolve() == (COMPOSE / "nginx.conf")
    assert mounted["./nginx.conf"] == "/etc/nginx/nginx.conf"
    env = dict(item.partition("=")[::2] for item in server["environment"])
    drain = float(env["TINYSERVE_DRAIN_TIMEOUT"])
    assert int(server["stop_grace_period"].removesuffix("s")) > drain
    port = balancer["ports"][0].split(":")[-1]
    assert f"listen {port};" in (COMPOSE / "nginx.conf").read_text()


@needs_nginx
def test_nginx_rejects_a_broken_config(tmp_path: Path) -> None:
    conf = local_conf(tmp_path, ["127.0.0.1:1"], free_port())
    conf.write_text(conf.read_text().replace("least_conn;", "least_conn"))
    assert nginx(conf, "-t").returncode != 0


@needs_nginx
def test_nginx_spreads_predictions_over_both_servers(balancer: tuple[str, list[Server]]) -> None:
    url, servers = balancer
    image = samples()[0].read_bytes()
    upstreams = set()
    with httpx.Client() as client:
        for _ in range(20):
            reply = client.post(
                f"{url}/v1/models/fashion-cnn/predict",
                content=image,
                headers={"content-type": "image/png"},
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["label"] == "Ankle boot"
            upstreams.add(reply.headers["x-upstream"])
    assert upstreams == {s.url.removeprefix("http://") for s in servers}
    for server in servers:  # each server counted some of the predictions itself
        metrics = httpx.get(f"{server.url}/metrics").text
        counts = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("tinyserve_request_seconds_count")]  # fmt: skip
        assert sum(counts) >= 1


@needs_nginx
def test_the_deploy_check_passes_through_nginx_and_fails_on_a_dead_url(
    balancer: tuple[str, list[Server]],
) -> None:
    url, _ = balancer
    ok = subprocess.run(["bash", str(DEPLOY), "--check", url], capture_output=True, text=True,
                        timeout=30)  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "smoke test passed: Ankle boot" in ok.stdout
    dead = f"http://127.0.0.1:{free_port()}"
    bad = subprocess.run(["bash", str(DEPLOY), "--check", dead, "--wait-s", "2"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode != 0 and "not ready after 2s" in bad.stderr


def dry_run(*args: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(DEPLOY), "--dry-run", "--tag", "9.9.9", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PATH": os.environ["PATH"]},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_dry_runs_print_build_rollout_wait_smoke_and_rollback() -> None:
    compose = dry_run("--target", "compose", "--replicas", "4")
    assert compose[0].startswith("+ docker build -f ") and "tinyserve:9.9.9" in compose[0]
    assert any("up -d --no-build --wait --scale tinyserve=4" in c for c in compose)
    assert any("/health/ready" in c for c in compose)
    assert any("/v1/models/fashion-cnn/predict" in c and "@" in c for c in compose)
    rollback = compose[compose.index("# if a check fails:") :]
    assert any("docker tag tinyserve:previous tinyserve:current" in c for c in rollback)

    k8s = dry_run("--target", "k8s", "--namespace", "prod")
    assert "+ docker push ghcr.io/example/tinyserve:9.9.9" in k8s
    assert any(c.startswith("+ kubectl apply -k ") and "overlays/production" in c for c in k8s)
    assert any("rollout status deployment/tinyserve" in c for c in k8s)
    assert "+ kubectl -n prod rollout undo deployment/tinyserve" in k8s
    overlay = next(c for c in k8s if c.startswith("+ kubectl apply -k ")).split()[-1]
    assert (Path(overlay) / "kustomization.yaml").is_file()

    blue_green = dry_run("--target", "k8s-blue-green")
    assert "live color: blue; deploying to green" in blue_green
    switch = [c for c in blue_green if "patch service tinyserve" in c]
    assert '"color":"green"' in switch[0] and '"color":"blue"' in switch[1]  # and back
    assert any("rollout status deployment/tinyserve-green" in c for c in blue_green)


def test_the_deploy_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (make data installs it)")
    result = subprocess.run([shellcheck, str(DEPLOY)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
