"""The web page's server side: its files, what it asks of the server, bench reports, /stats."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from conftest import BUNDLED_MODEL, SAMPLES
from tinyserve import webpage

BOOT = next(SAMPLES.glob("*ankle-boot.png")).read_bytes()
TOKEN = "webpage-token-1"


@pytest.fixture
def two_versions(tmp_path: Path) -> Path:
    """The bundled model with both of its versions served."""
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    (repo / "fashion-cnn" / "config.toml").write_text('versions = "all"\n')
    return repo


@pytest.fixture
def client(app_client: Callable[..., TestClient], two_versions: Path) -> TestClient:
    return app_client(repo=two_versions)


def test_the_page_is_served_at_the_root_with_its_own_files_only(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page = response.text
    referenced = re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', page)
    assert {"/ui/assets/app.js", "/ui/assets/style.css"} <= set(referenced)
    for path in referenced:
        asset = client.get(path)
        assert asset.status_code == 200, path
        assert asset.content


def test_no_file_of_the_page_reaches_outside_the_server() -> None:
    names = webpage.asset_names()
    assert {"app.js", "api.js", "classify.js", "dashboard.js", "models.js", "style.css"} <= set(
        names
    )
    for name in [*names, "index.html"]:
        text = (webpage.WEB / name).read_text()
        # The SVG namespace is a name, not a request.
        found = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text))
        assert found <= {"http://www.w3.org/2000/svg"}, (name, found)
        assert "@import" not in text and "fonts.googleapis" not in text


def test_every_module_the_scripts_import_is_served(client: TestClient) -> None:
    for name in webpage.asset_names():
        if not name.endswith(".js"):
            continue
        source = client.get(f"/ui/assets/{name}")
        assert source.headers["content-type"] == "text/javascript; charset=utf-8"
        for imported in re.findall(r'from "\./([\w.-]+)"', source.text):
            assert client.get(f"/ui/assets/{imported}").status_code == 200, (name, imported)


@pytest.mark.parametrize("name", ["../webpage.py", "..%2Fwebpage.py", "nope.js", "index.htm"])
def test_a_name_that_is_not_a_file_of_the_page_is_404(client: TestClient, name: str) -> None:
    response = client.get(f"/ui/assets/{name}")
    assert response.status_code == 404
    if response.headers["content-type"] == "application/json":
        assert response.json()["error"]["code"] in ("not_found", "http_error")


def test_config_tells_the_page_whether_admin_calls_and_reports_are_on(
    app_client: Callable[..., TestClient], two_versions: Path, tmp_path: Path
) -> None:
    plain = app_client(repo=two_versions).get("/ui/config").json()
    assert plain["admin"] is False and plain["reports"] is False
    assert plain["default_model"] == "fashion-cnn"
    full = app_client(repo=two_versions, admin_token=TOKEN, reports_dir=tmp_path)
    answer = full.get("/ui/config").json()
    assert answer["admin"] is True and answer["reports"] is True
    assert TOKEN not in full.get("/ui/config").text


def test_model_files_give_size_and_reports_of_each_version(client: TestClient) -> None:
    first = client.get("/ui/models/fashion-cnn/1").json()
    assert first["bytes"] == (BUNDLED_MODEL / "1" / "model.onnx").stat().st_size
    assert first["reports"]["export_report.json"]["parity"]["top1_agreement"] == 1.0
    assert "test accuracy" in first["reports"]["REPORT.md"]
    confusion = BUNDLED_MODEL / "1" / "confusion.png"
    assert {"name": "confusion.png", "bytes": confusion.stat().st_size} in first["files"]
    second = client.get("/ui/models/fashion-cnn/2").json()
    gate = second["reports"]["quantize_report.json"]["optimization"]["gate"]
    assert gate["passed"] is True
    assert second["bytes"] < first["bytes"]  # INT8


def test_model_files_of_an_unknown_model_or_version_are_errors(client: TestClient) -> None:
    assert client.get("/ui/models/nope/1").status_code == 404
    assert client.get("/ui/models/fashion-cnn/9").status_code == 404
    assert client.get("/ui/models/fashion-cnn/one").status_code == 422


def write_reports(folder: Path) -> None:
    (folder / "nested").mkdir(parents=True)
    (folder / "a.html").write_text("<html><body>report a</body></html>")
    (folder / "nested" / "b.html").write_text("<html><body>report b</body></html>")
    (folder / "notes.txt").write_text("not a report")


def test_bench_reports_are_listed_and_served_from_the_folder_only(
    app_client: Callable[..., TestClient], two_versions: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "reports"
    write_reports(folder)
    (tmp_path / "secret.html").write_text("outside")
    (folder / "link.html").symlink_to(tmp_path / "secret.html")
    client = app_client(repo=two_versions, reports_dir=folder)
    listed = client.get("/ui/reports").json()
    names = {r["name"] for r in listed["reports"]}
    assert {"a.html", "nested/b.html"} <= names and "notes.txt" not in names
    assert client.get("/ui/reports/a.html").text.endswith("report a</body></html>")
    assert "report b" in client.get("/ui/reports/nested/b.html").text
    for bad in ("../secret.html", "%2E%2E/secret.html", "link.html", "notes.txt", "nope.html"):
        assert client.get(f"/ui/reports/{bad}").status_code == 404, bad


def test_without_a_reports_folder_there_are_no_reports(client: TestClient) -> None:
    assert client.get("/ui/reports").json() == {"folder": None, "reports": []}
    assert client.get("/ui/reports/a.html").status_code == 404


def test_stats_add_what_the_dashboard_draws_and_keep_the_seed_fields(
    client: TestClient,
) -> None:
    for _ in range(3):
        assert client.post("/predict", content=BOOT).status_code == 200
    assert client.post("/predict", content=b"not an image").status_code == 400
    stats = client.get("/stats").json()
    assert stats["total_requests"] == 4 and stats["failed_requests"] == 1
    assert stats["queue_depth"] == {"fashion-cnn": 0}
    assert sum(stats["batch_sizes"].values()) == 3 and stats["batch_sizes"]["1"] == 3
    assert list(stats["batch_sizes"])[:3] == ["1", "2", "3-4"]
    assert stats["requests_by_status"]["400"] == 1 and stats["requests_by_status"]["200"] >= 3
    assert stats["errors_by_code"] == {"invalid_image": 1}
    loaded = {(m["model"], m["version"]) for m in stats["models_loaded"]}
    assert loaded == {("fashion-cnn", "1"), ("fashion-cnn", "2")}


def test_batch_sizes_count_each_batch_once_in_its_bucket() -> None:
    from tinyserve.metrics import Metrics

    metrics = Metrics()
    for model, size in (("a", 1), ("a", 3), ("b", 4), ("b", 8), ("a", 600)):
        metrics.batch_observer(model)(size, [0.0] * size, 0.001)
    sizes = metrics.stats()["batch_sizes"]
    assert sizes["1"] == 1 and sizes["3-4"] == 2 and sizes["5-8"] == 1 and sizes[">512"] == 1
    assert sum(sizes.values()) == 5
