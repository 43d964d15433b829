"""The web page at ``/``: classify, compare versions, models, live dashboard, reports, streams.

The page is static HTML, CSS and JavaScript that ship inside the package (``web/``) and run
on the public JSON API, so every thing it shows can also be fetched with curl. Besides the
files themselves it needs three small read-only answers the API has no place for: what the
server offers the page (``/ui/config``: whether admin calls are on, whether a reports folder
is set), the files beside a model version (``/ui/models/{model}/{version}``: size and the
export, quantization and accuracy reports), and the ``bench http --report`` pages found in
the configured reports folder (``/ui/reports``).

Like ``apidocs``, files are looked up by name in an index built once, so a name can never
reach a file outside ``web/``; each is read on its first request and then kept in memory.
A report is looked up under the reports folder and refused unless it resolves inside it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson

from tinyserve import __version__
from tinyserve.asgi import Call, Reply, json_reply
from tinyserve.context import ServingContext
from tinyserve.repository import model_bytes
from tinyserve.requests import version_param
from tinyserve.routes import Route

__all__ = ["WEB_ROUTES", "asset_names", "report_files"]

WEB = Path(__file__).with_name("web")
_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}
# The page's files never reach outside the server, nor can they be framed by another site.
_PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
        b"style-src 'self'; script-src 'self'; connect-src 'self'; frame-src 'self'; "
        b"frame-ancestors 'self'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-cache"),
]
_REPORT_SUFFIXES = (".json", ".md")  # beside a model version: export/quantize/accuracy reports
MAX_REPORT_BYTES = 1024 * 1024  # a larger file beside a model is listed, not inlined
MAX_BENCH_REPORTS = 500


# -- the page and its files ----------------------------------------------------------------


async def index(context: ServingContext, call: Call) -> Reply:
    """The page itself."""
    return Reply(200, _read(WEB / "index.html"), _PAGE_HEADERS, _TYPES[".html"])


async def asset(context: ServingContext, call: Call) -> Reply:
    name = call.path_params["name"]
    path = _index().get(name)
    if path is None:
        return _not_found(f"the page has no file {name!r}")
    return Reply(200, _read(path), _PAGE_HEADERS, _TYPES[path.suffix])


def asset_names() -> list[str]:
    """Every name under ``/ui/assets/``, sorted."""
    return sorted(_index())


@cache
def _index() -> dict[str, Path]:
    return {p.name: p for p in sorted(WEB.iterdir()) if p.is_file() and p.suffix in _TYPES}


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()


# -- what the page asks of the server ------------------------------------------------------


async def config(context: ServingContext, call: Call) -> Reply:
    """What this server offers the page."""
    registry = context.registry
    return json_reply(
        {
            "service": "tinyserve",
            "version": __version__,
            "admin": context.config.admin_token is not None,
            "reports": context.config.reports_dir is not None,
            "default_model": registry.default_name if registry.names else None,
            "max_batch_images": context.config.max_batch_images,
            "max_body_bytes": context.config.max_body_bytes,
        }
    )


async def model_files(context: ServingContext, call: Call) -> Reply:
    """A served version's file size and the reports beside it (export, quantize, accuracy)."""
    name = call.path_params["model"]
    version = version_param(call.path_params["version"])
    model = context.model(name, version)
    folder = model.path.parent if model.path.is_file() else model.path
    files: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if not path.is_file():
            continue
        size = path.stat().st_size
        files.append({"name": path.name, "bytes": size})
        if path.suffix in _REPORT_SUFFIXES and size <= MAX_REPORT_BYTES:
            text = path.read_text("utf-8", "replace")
            try:
                reports[path.name] = orjson.loads(text) if path.suffix == ".json" else text
            except orjson.JSONDecodeError:
                reports[path.name] = text
    return json_reply(
        {
            "model": model.name,
            "version": model.version,
            "bytes": model_bytes(model.path) if model.path.is_file() else None,
            "files": files,
            "reports": reports,
        }
    )


# -- bench reports -------------------------------------------------------------------------


async def list_reports(context: ServingContext, call: Call) -> Reply:
    folder = context.config.reports_dir
    found = report_files(folder) if folder is not None else []
    return json_reply(
        {
            "folder": str(folder) if folder is not None else None,
            "reports": [
                {"name": name, "bytes": path.stat().st_size, "modified": path.stat().st_mtime}
                for name, path in found
            ],
        }
    )


async def report(context: ServingContext, call: Call) -> Reply:
    folder = context.config.reports_dir
    name = call.path_params["name"]
    path = _report_path(folder, name) if folder is not None else None
    if path is None:
        return _not_found(f"no bench report {name!r} in the reports folder")
    return Reply(200, path.read_bytes(), [(b"cache-control", b"no-cache")], _TYPES[".html"])


def report_files(folder: Path) -> list[tuple[str, Path]]:
    """The HTML reports under ``folder`` (any depth), newest first, by their relative name."""
    if not folder.is_dir():
        return []
    paths = [p for p in folder.rglob("*.html") if p.is_file()]
    paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [(p.relative_to(folder).as_posix(), p) for p in paths[:MAX_BENCH_REPORTS]]


def _report_path(folder: Path, name: str) -> Path | None:
    if not name.endswith(".html") or "\\" in name or "\0" in name:
        return None
    root = folder.resolve()
    path = (root / name).resolve()
    # resolve() follows links and "..": what is left must still be inside the folder.
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def _not_found(message: str) -> Reply:
    return json_reply({"error": {"code": "not_found", "message": message}}, 404)


# -- the table -----------------------------------------------------------------------------

_HTML: dict[str, Any] = {"tag": "page", "response_type": "text/html"}
_JSON: dict[str, Any] = {"tag": "page"}

WEB_ROUTES: tuple[Route, ...] = (
    Route("GET", "/", index, "The web page: classify, compare, models, dashboard", **_HTML),
    Route("GET", "/ui/assets/{name}", asset, "A file of the web page", "page",
          response_type="application/octet-stream", statuses=(404,)),
    Route("GET", "/ui/config", config, "What this server offers the web page", **_JSON),
    Route("GET", "/ui/models/{model}/{version}", model_files,
          "A model version's file size and the reports beside it", statuses=(404, 422), **_JSON),
    Route("GET", "/ui/reports", list_reports, "The bench reports in the reports folder",
          **_JSON),
    Route("GET", "/ui/reports/{name:path}", report, "One bench report", statuses=(404,),
          **_HTML),
)  # fmt: skip
