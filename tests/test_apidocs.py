"""The API docs pages and their assets: nothing from another host, no file outside the assets."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser

import pytest

from tinyserve.apidocs import asset, asset_names, redoc_html, swagger_html

PREFIX = "/docs/assets"
PAGES: dict[str, Callable[[str, str], str]] = {"swagger": swagger_html, "redoc": redoc_html}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v]


def links(page: str) -> list[str]:
    parser = _Links()
    parser.feed(page)
    return parser.urls


@pytest.mark.parametrize("page", PAGES.values(), ids=PAGES.keys())
def test_pages_name_no_other_host(page: Callable[[str, str], str]) -> None:
    html = page("/openapi.json", PREFIX)
    assert re.findall(r"https?://", html) == []
    assert all(not url.startswith("//") for url in links(html))


@pytest.mark.parametrize("page", PAGES.values(), ids=PAGES.keys())
def test_every_referenced_asset_resolves(page: Callable[[str, str], str]) -> None:
    urls = links(page("/openapi.json", PREFIX + "/"))
    assert "/openapi.json" in urls
    assets = [url for url in urls if url != "/openapi.json"]
    assert any(url.endswith(".js") for url in assets)
    for url in assets:
        assert url.startswith(PREFIX + "/"), url
        found = asset(url.removeprefix(PREFIX + "/"))
        assert found is not None, url
        assert found[0], url


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-ui.css", "text/css"),
        ("redoc.standalone.js", "text/javascript"),
        ("favicon-32x32.png", "image/png"),
    ],
)
def test_assets_have_their_content_type(name: str, kind: str) -> None:
    found = asset(name)
    assert found is not None and found[1].startswith(kind)
    assert name in asset_names()


def test_assets_are_read_once() -> None:
    first, second = asset("redoc.standalone.js"), asset("redoc.standalone.js")
    assert first is not None and second is not None
    assert first[0] is second[0]


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../__init__.py",
        "../../apps.py",
        "../redoc/bundles/redoc.standalone.js",
        "bundles/redoc.standalone.js",
        "swagger-ui-dist/swagger-ui.css",
        "./swagger-ui.css",
        "swagger-ui.css/",
        "%2e%2e/__init__.py",
        "/etc/passwd",
        "LICENSE",
        "oauth2-redirect.html",
    ],
)
def test_names_outside_the_asset_folders_are_refused(name: str) -> None:
    assert asset(name) is None


def test_urls_are_escaped() -> None:
    hostile = '/openapi.json?"></script><script>alert(1)</script>'
    for page in PAGES.values():
        html = page(hostile, PREFIX)
        assert "<script>alert(1)" not in html
        assert html.count("</script>") == html.count("<script")


def test_serving_assets_does_not_import_django() -> None:
    code = (
        "import sys\n"
        "from tinyserve import apidocs\n"
        "apidocs.swagger_html('/openapi.json', '/a'); apidocs.asset('swagger-ui-bundle.js')\n"
        "print(any(m == 'django' or m.startswith('drf_spectacular') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
