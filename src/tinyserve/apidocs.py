"""Swagger UI and ReDoc pages whose scripts and styles tinyserve serves itself, with no CDN.

The built files come from the ``drf-spectacular-sidecar`` wheel, which ships Swagger UI's
``swagger-ui-dist`` and ReDoc's standalone bundle and follows their releases. Its
``__init__`` imports Django, so the package is located with ``find_spec`` (which runs none of
its code) and only its static files are read: Django is installed beside it, never imported.

Assets are named by their file name (``swagger-ui-bundle.js``, ``redoc.standalone.js``…), looked
up in an index of the two asset folders, so a name can never reach a file outside them, and each
file is read on its first request and then kept in memory.
"""

from __future__ import annotations

import html
import importlib.util
import json
from functools import cache
from pathlib import Path

__all__ = ["asset", "asset_names", "redoc_html", "swagger_html"]

_PACKAGE = "drf_spectacular_sidecar"
_FOLDERS = ("swagger-ui-dist", "redoc/bundles")  # under static/drf_spectacular_sidecar/
# A fixed table, not `mimetypes`, whose answers depend on the machine's /etc/mime.types.
_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".map": "application/json",
    ".png": "image/png",
}

_SWAGGER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: {spec}, dom_id: "#ui", deepLinking: true, validatorUrl: null}});
</script>
<noscript>The API description is at <a href="{spec_href}">{spec_href}</a>.</noscript>
</body></html>
"""

_REDOC_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<style>body {{ margin: 0; padding: 0; }}</style>
</head><body><redoc spec-url="{spec_href}"></redoc>
<script src="{assets}/redoc.standalone.js"></script>
<noscript>The API description is at <a href="{spec_href}">{spec_href}</a>.</noscript>
</body></html>
"""


def swagger_html(openapi_url: str, assets_prefix: str, title: str = "tinyserve API") -> str:
    """The Swagger UI page for the description at ``openapi_url``, assets under the prefix."""
    return _SWAGGER_PAGE.format(**_fields(openapi_url, assets_prefix, title))


def redoc_html(openapi_url: str, assets_prefix: str, title: str = "tinyserve API") -> str:
    """The ReDoc page for the description at ``openapi_url``, assets under the prefix."""
    return _REDOC_PAGE.format(**_fields(openapi_url, assets_prefix, title))


def asset(name: str) -> tuple[bytes, str] | None:
    """A static file's bytes and content type, or None for a name that is not an asset."""
    path = _index().get(name)
    if path is None:
        return None
    return _read(path), _TYPES[path.suffix]


def asset_names() -> list[str]:
    """Every name that ``asset`` answers, sorted."""
    return sorted(_index())


def _fields(openapi_url: str, assets_prefix: str, title: str) -> dict[str, str]:
    return {
        "title": html.escape(title),
        "assets": html.escape(assets_prefix.rstrip("/")),
        "spec_href": html.escape(openapi_url),
        # A JSON string inside <script>: no "<" or ">" that could end the element early.
        "spec": json.dumps(openapi_url).replace("<", "\\u003c").replace(">", "\\u003e"),
    }


@cache
def _index() -> dict[str, Path]:
    static = _package_folder() / "static" / _PACKAGE
    files: dict[str, Path] = {}
    for folder in _FOLDERS:
        for path in sorted((static / folder).iterdir()):
            if path.is_file() and path.suffix in _TYPES:
                files.setdefault(path.name, path)
    if not {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"} <= files.keys():
        raise FileNotFoundError(
            f"{static} lacks the Swagger UI or ReDoc files: reinstall drf-spectacular-sidecar"
        )
    return files


def _package_folder() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the API docs need the drf-spectacular-sidecar package (a tinyserve dependency): "
            "pip install drf-spectacular-sidecar",
            name=_PACKAGE,
        )
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _read(path: Path) -> bytes:
    return path.read_bytes()
