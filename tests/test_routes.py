"""The route table: what is served is documented, what is documented is served, and every
route runs behind the same guard (errors, bugs, metrics)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import replace

import pytest
from starlette.routing import Route as StarletteRoute
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from tinyserve import app as app_module
from tinyserve.app import ROUTES, create_app
from tinyserve.asgi import Call, Reply
from tinyserve.context import ServingContext
from tinyserve.routes import Route, path_params
from tinyserve.settings import ServerConfig

TOKEN = "route-table-token"
BOOT = next(SAMPLES.glob("*ankle-boot.png")).read_bytes()
# What a path parameter is filled with when the test calls a documented route.
PARAMS = {"model": "fashion-cnn", "version": "2", "name": "swagger-ui.css", "stream": "none"}


@pytest.fixture
def client(app_client: Callable[..., TestClient]) -> TestClient:
    return app_client(repo=BUNDLED_MODEL.parent, admin_token=TOKEN)


def served_routes() -> set[tuple[str, str]]:
    app = create_app(ServerConfig(repo=BUNDLED_MODEL.parent))
    served = set()
    for route in app.router.routes:
        assert isinstance(route, StarletteRoute)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((method, route.path))
    return served


def test_every_served_route_is_documented_and_every_documented_one_served(
    client: TestClient,
) -> None:
    spec = client.get("/openapi.json").json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    catch_alls = {(r.method, r.path) for r in ROUTES if not r.documented}
    assert catch_alls == {("GET", "/v2/{path:path}"), ("POST", "/v2/{path:path}")}
    unconverted = {(m, re.sub(r"{(\w+):\w+}", r"{\1}", p)) for m, p in served_routes() - catch_alls}
    assert documented == unconverted  # OpenAPI writes Starlette's {name:path} as {name}
    for path, operations in spec["paths"].items():
        names = {p["name"] for op in operations.values() for p in op["parameters"]}
        assert set(path_params(path)) <= names, path


@pytest.mark.parametrize("route", [r for r in ROUTES if r.documented], ids=lambda r: r.path)
def test_each_documented_route_answers_from_its_own_handler(
    client: TestClient, route: Route
) -> None:
    path = re.sub(r"{(\w+)}", lambda m: PARAMS[m.group(1)], route.path)
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/octet-stream"}
    body = BOOT if route.method == "POST" else None
    response = client.request(route.method, path, content=body, headers=headers)
    if response.status_code == 404 and "json" in response.headers.get("content-type", ""):
        assert "no route" not in response.text, f"{route.method} {path} fell through"
    assert response.status_code < 500, response.text


def test_a_bug_answers_500_internal_is_logged_and_counted(
    monkeypatch: pytest.MonkeyPatch,
    app_client: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(context: ServingContext, call: Call) -> Reply:
        raise RuntimeError("secret detail of the bug")

    routes = tuple(replace(r, handler=broken) if r.path == "/stats" else r for r in ROUTES)
    monkeypatch.setattr(app_module, "ROUTES", routes)
    client = app_client(repo=BUNDLED_MODEL.parent)
    with caplog.at_level(logging.ERROR, logger="tinyserve"):
        response = client.get("/stats")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal" and "RuntimeError" in error["message"]
    assert "secret detail" not in response.text
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)
    metrics = client.get("/metrics").text
    assert 'tinyserve_errors_total{code="internal",route="/stats"} 1.0' in metrics
    assert client.post("/predict", content=BOOT).status_code == 200  # still serving


def test_errors_are_counted_by_code(client: TestClient) -> None:
    client.post("/predict", content=b"not an image")
    metrics = client.get("/metrics").text
    assert 'tinyserve_errors_total{code="invalid_image",route="/predict"} 1.0' in metrics


def test_fast_dispatch_and_router_give_the_same_answer(client: TestClient) -> None:
    # A trailing slash misses the fast dispatch and reaches the router's copy of the route.
    fast = client.get("/v1/models/fashion-cnn").json()
    routed = client.get("/v1/models/fashion-cnn/", follow_redirects=True).json()
    assert fast["name"] == routed["name"] == "fashion-cnn"
    assert client.get("/v1/models//predict").status_code == 404
    assert client.get("/predict").status_code == 405


def test_the_rate_limit_remembers_a_bounded_number_of_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tinyserve import context as context_module

    monkeypatch.setattr(context_module, "MAX_RATE_CLIENTS", 50)
    context = ServingContext(ServerConfig(repo=BUNDLED_MODEL.parent, rate_limit=5))
    for i in range(500):
        context.check_rate(f"client-{i}")
    assert len(context._buckets) == 50
    assert "client-499" in context._buckets and "client-0" not in context._buckets
