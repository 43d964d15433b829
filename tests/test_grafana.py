"""deploy/grafana: a well-formed dashboard whose panels cover every metric a server exposes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from live_server import Server, samples
from observability import check_promql, declared_series, referenced

DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "tinyserve.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
EXPRESSIONS = {
    f"p{p['id']}_{t['refId']}": t["expr"] for p in PANELS for t in p["targets"]
}  # fmt: skip


def test_the_dashboard_has_grafanas_shape() -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in DASHBOARD, key
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        grid: dict[str, Any] = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in PANELS:
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"] for t in panel["targets"])


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    substituted = {
        k: e.replace("$__rate_interval", "1m").replace("$job", ".+") for k, e in EXPRESSIONS.items()
    }
    check_promql(substituted, tmp_path)


def test_the_queries_name_real_metrics() -> None:
    names = referenced(EXPRESSIONS.values())
    assert names <= declared_series(), names - declared_series()


def test_every_exposed_metric_family_is_on_the_dashboard(serve: Callable[..., Server]) -> None:
    server = serve()
    reply = httpx.post(
        f"{server.url}/v1/models/fashion-cnn/predict",
        content=samples()[0].read_bytes(),
        headers={"content-type": "image/png"},
    )
    assert reply.status_code == 200, reply.text
    httpx.post(f"{server.url}/v1/models/fashion-cnn/predict", content=b"not an image")
    text = httpx.get(f"{server.url}/metrics").text
    # `<name>_created` (a counter's or histogram's start time) parses as a family of its own
    families = {
        f.name for f in text_string_to_metric_families(text) if not f.name.endswith("_created")
    }
    assert {"tinyserve_request_seconds", "process_resident_memory_bytes"} <= families
    everything = " ".join(EXPRESSIONS.values())
    missing = sorted(f for f in families if f not in everything)
    assert missing == [], f"add panels for {missing}"
