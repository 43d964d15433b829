"""The web page in a real headless Chromium (Debian's), against a real `tinyserve serve`.

One browser and one server for the module. Playwright drives /usr/bin/chromium; it never
downloads a browser. Where Chromium cannot start, the tests skip and say why.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import BUNDLED_MODEL, SAMPLES
from live_server import TOKEN, Server, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
BOOT = SAMPLES / "0000_ankle-boot.png"
# Samples the bundled model classifies right, with the label the page must show.
LABELLED = {"0000_ankle-boot.png": "Ankle boot", "0002_trouser.png": "Trouser",
            "0018_bag.png": "Bag"}  # fmt: skip
TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (make data installs it)")
    with sync_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
        except Exception as exc:  # noqa: BLE001 - whatever stops Chromium, say what it was
            pytest.skip(f"Chromium cannot start here: {exc}")
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ui")
    repo = root / "repo"
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    (repo / "fashion-cnn" / "config.toml").write_text('versions = "all"\n')
    reports = root / "reports"
    reports.mkdir()
    (reports / "load.html").write_text("<!doctype html><title>r</title><h1>Load report</h1>")
    live = Server(repo, "--reports-dir", str(reports))
    yield live
    live.stop()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    outside: list[str] = []
    errors: list[str] = []
    local = (server.url, "blob:" + server.url, "data:")  # thumbnails are blob: URLs
    page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert outside == [], "the page reached outside the server"
    assert errors == [], "the page's scripts failed"


def open_view(page: Any, server: Server, view: str = "classify") -> None:
    page.goto(f"{server.url}/#{view}")
    page.wait_for_selector("body[data-ready=true]")


def test_an_uploaded_sample_shows_its_label_latency_and_version(page: Any, server: Server) -> None:
    open_view(page, server)
    page.set_input_files("#classify-files", [str(SAMPLES / name) for name in LABELLED])
    page.wait_for_selector("#classify-summary:has-text('3 of 3 classified')")
    items = page.locator("#classify-results .result")
    assert items.count() == 3
    for i, (name, label) in enumerate(LABELLED.items()):
        item = items.nth(i)
        assert item.locator(".filename").inner_text() == name
        assert item.locator(".answer .label").inner_text() == label
        assert item.locator(".bars li").count() == 5
        latency = item.locator(".latency").inner_text()
        for stage in ("decode", "queue", "inference", "total"):
            assert f"{stage} " in latency
        assert item.locator(".answered-by").inner_text().startswith("fashion-cnn version 2")
        thumb = item.locator("img.thumb")
        assert thumb.get_attribute("alt") == f"Preview of {name}"
        assert thumb.evaluate("img => img.complete && img.naturalWidth") == 28


def test_a_bad_file_shows_the_servers_error_and_the_rest_of_the_batch_still_runs(
    page: Any, server: Server, tmp_path: Path
) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    expected = httpx.post(f"{server.url}/v1/models/fashion-cnn/predict", content=bad.read_bytes())
    error = expected.json()["error"]
    open_view(page, server)
    page.set_input_files("#classify-files", [str(bad), str(BOOT)])
    page.wait_for_selector("#classify-summary:has-text('1 of 2 classified, 1 failed')")
    failed = page.locator("#classify-results .result.failed")
    assert failed.locator(".filename").inner_text() == "notes.png"
    assert failed.locator(".error").inner_text() == (
        f"{expected.status_code} {error['code']}: {error['message']}"
    )
    done = page.locator("#classify-results .result.done")
    assert done.locator(".answer .label").inner_text() == "Ankle boot"


def test_one_image_against_two_versions_side_by_side(page: Any, server: Server) -> None:
    open_view(page, server, "compare")
    page.select_option("#compare-a", "1")
    page.select_option("#compare-b", "2")
    page.set_input_files("#compare-file", str(BOOT))
    agreement = page.wait_for_selector("#compare-agreement")
    assert agreement.inner_text().startswith("Agree: both say Ankle boot.")
    for version in ("1", "2"):
        side = page.locator(f"#compare-results .side[data-version='{version}']")
        assert side.locator("h3").inner_text() == f"Version {version}"
        assert side.locator(".answer .label").inner_text() == "Ankle boot"
        assert "inference" in side.locator(".latency").inner_text()


def test_the_dashboard_counter_rises_while_a_client_sends_requests(
    page: Any, server: Server
) -> None:
    open_view(page, server, "dashboard")
    wait_until(lambda: page.inner_text("#dash-total") != "–")
    start = shown(page, "#dash-total")
    stop = threading.Event()
    sent: list[int] = []

    def client() -> None:
        body = BOOT.read_bytes()
        with httpx.Client(base_url=server.url) as http:
            while not stop.is_set():
                sent.append(http.post("/predict", content=body).status_code)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        # The page's own polling must bring the new figures, without a reload.
        wait_until(lambda: shown(page, "#dash-total") > start and shown(page, "#dash-rps") > 0)
        first = shown(page, "#dash-total")
        wait_until(lambda: shown(page, "#dash-total") > first)
    finally:
        stop.set()
        thread.join(10)
    assert sent and set(sent) == {200}
    assert page.locator("#chart-rps svg path").count() == 1
    assert "fashion-cnn version 2" in page.inner_text("#dash-models")
    assert shown(page, "#dash-total") <= start + len(sent) + 1


def shown(page: Any, selector: str) -> float:
    """A number the page shows, as a number ("1,234" -> 1234)."""
    return float(page.inner_text(selector).replace(",", ""))


def open_file_chooser_with_space(page: Any) -> Any:
    """The file chooser that Space on the focused file input opens.

    On a loaded machine headless Chromium has, now and then, opened no chooser for the first
    press; the key is pressed again (up to three times, the focus checked each time).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):
        assert page.evaluate("document.activeElement.id") == "classify-files"
        try:
            with page.expect_file_chooser(timeout=TIMEOUT_MS // 2) as chooser:
                page.keyboard.press("Space")
            return chooser.value
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def test_the_classify_form_works_from_the_keyboard(page: Any, server: Server) -> None:
    open_view(page, server)
    focused = []
    for _ in range(30):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
        if focused[-1] == "classify-model":
            break
    assert focused[-1] == "classify-model", focused
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "classify-version"
    page.keyboard.press("ArrowDown")  # "default" -> the highest version, 2
    page.keyboard.press("ArrowDown")  # -> version 1
    assert page.input_value("#classify-version") == "1"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "classify-topk"
    page.keyboard.press("Control+A")
    page.keyboard.type("3")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "classify-files"
    open_file_chooser_with_space(page).set_files(str(BOOT))
    page.wait_for_selector("#classify-summary:has-text('1 of 1 classified')")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "classify-submit"
    page.evaluate("document.getElementById('classify-summary').textContent = ''")
    page.keyboard.press("Enter")  # runs the same file again
    page.wait_for_selector("#classify-summary:has-text('1 of 1 classified')")
    item = page.locator("#classify-results .result.done")
    assert item.locator(".bars li").count() == 3
    assert item.locator(".answered-by").inner_text().startswith("fashion-cnn version 1")


def test_admin_actions_ask_for_the_token_and_never_store_it(page: Any, server: Server) -> None:
    open_view(page, server, "models")
    card = page.locator(".model[data-model='fashion-cnn']")
    card.locator(".version[data-version='1']").wait_for()
    assert "static-int8-qdq" in card.locator(".version[data-version='2']").inner_text()
    card.locator("button", has_text="Reload").click()
    page.fill("#token-input", TOKEN)
    page.click("#token-ok")
    card.locator("[role=status]", has_text="Reload: done.").wait_for()
    stored = page.evaluate(
        "JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})"
    )
    assert TOKEN not in stored


def test_bench_reports_open_from_the_page(page: Any, server: Server) -> None:
    open_view(page, server, "reports")
    page.click("#reports-list a:text-is('load.html')")
    frame = page.frame_locator("#report-frame")
    assert frame.locator("h1").inner_text() == "Load report"


@pytest.mark.parametrize("view", ["classify", "compare", "models", "dashboard", "reports"])
def test_every_view_fits_a_phone_screen(browser: Any, server: Server, view: str) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        open_view(page, server, view)
        if view == "classify":
            page.set_input_files("#classify-files", str(BOOT))
            page.wait_for_selector("#classify-results .result.done")
        wait_until(lambda: page.evaluate("document.documentElement.scrollWidth") > 0)
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        assert page.locator(f"#view-{view}").is_visible()
    finally:
        context.close()
