"""Schema fuzzing: schemathesis sends what the server's own /openapi.json describes.

Every documented operation (REST, V2, admin, docs, web page) is called with generated
parameters, headers and bodies in each content type it declares (image bytes, multipart,
JSON, V2 binary). The only acceptable answers are the statuses the description lists, and
never a 5xx. Admin operations are called with the right bearer token on every other case
and with a generated (wrong or missing) one otherwise.

``TINYSERVE_FUZZ_EXAMPLES`` sets the examples per operation: 4 by default (CI), 250 in the
reliability run (over 10,000 requests). ``TINYSERVE_FUZZ_REPORT=PATH`` writes the counts
per route family and status as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from conftest import BUNDLED_MODEL
from tinyserve.app import ROUTES, ServerConfig, create_app
from tinyserve.openapi import describe

pytestmark = pytest.mark.reliability
TOKEN = "fuzz-admin-token"
EXAMPLES = int(os.environ.get("TINYSERVE_FUZZ_EXAMPLES", "4"))
LIMITS: dict[str, Any] = {"max_body_bytes": 1_000_000, "max_batch_images": 8}

# (family, status) -> answers; family -> failed checks
ANSWERS: Counter[tuple[str, int]] = Counter()
FAILURES: Counter[str] = Counter()


def family(path: str, method: str) -> str:
    if path.startswith("/admin") or path.startswith("/v2/repository"):
        return "admin"
    if path.startswith("/v2"):
        return "v2"
    if path.startswith(("/docs", "/redoc", "/openapi.json", "/ui")) or path == "/":
        return "docs+page"
    return "rest"


@pytest.fixture(scope="module")
def served_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app under test; its lifespan starts with the first request and ends here."""
    repo = tmp_path_factory.mktemp("fuzz-repo")
    shutil.copytree(BUNDLED_MODEL, repo / "fashion-cnn")
    app = create_app(ServerConfig(repo=repo, admin_token=TOKEN, **LIMITS))
    with asgi.get_client(app) as client:
        served = client.get("/openapi.json").json()
    assert served == DESCRIPTION, "the fuzzer must read what the server serves"
    yield app
    asgi.shutdown_lifespans()  # the app's lifespan: batchers stopped, decode pool closed
    report = os.environ.get("TINYSERVE_FUZZ_REPORT")
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(summary(), indent=2) + "\n")


def summary() -> dict[str, Any]:
    families: dict[str, Any] = {}
    for (name, status), n in sorted(ANSWERS.items()):
        entry = families.setdefault(name, {"requests": 0, "statuses": {}, "failures": 0})
        entry["requests"] += n
        entry["statuses"][str(status)] = n
    for name, n in FAILURES.items():
        families.setdefault(name, {"requests": 0, "statuses": {}, "failures": 0})["failures"] = n
    total = sum(ANSWERS.values())
    server_errors = sum(n for (_, status), n in ANSWERS.items() if status >= 500)
    return {
        "examples_per_operation": EXAMPLES,
        "requests": total,
        "failures": sum(FAILURES.values()),
        "5xx": server_errors,
        "families": families,
    }


# What /openapi.json serves (the fixture checks it), loaded at import: the operations are
# known when tests are collected, and each case is sent to the fixture's app.
DESCRIPTION = describe(ROUTES)
schema = schemathesis.openapi.from_dict(DESCRIPTION)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=EXAMPLES <= 4,  # the CI run sends the same requests every time
    phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing case is reported
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_a_documented_status(case: Any, served_app: Any) -> None:
    path, method = case.operation.path, case.operation.method.upper()
    name = family(path, method)
    headers = dict(case.headers or {})
    if "Authorization" in {p.name for p in case.operation.headers}:
        seen = sum(n for (f, _), n in ANSWERS.items() if f == "admin")
        if seen % 2 == 0:  # every other admin call carries the right token
            headers["Authorization"] = f"Bearer {TOKEN}"
    response = case.call(app=served_app, headers=headers)
    ANSWERS[name, response.status_code] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except Exception:
        FAILURES[name] += 1
        raise


def test_the_description_reaches_every_route() -> None:
    """Each served route is an operation the fuzzer calls, with its bodies' content types."""
    described = DESCRIPTION["paths"]
    for route in ROUTES:
        if not route.documented:
            continue
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)
        operation = described[path][route.method.lower()]
        assert {p["name"] for p in operation["parameters"] if p["in"] == "path"} == set(
            route.params
        )
        if route.method == "POST" and route.body is not None:
            assert operation["requestBody"]["content"], route.path
    infer = described["/v2/models/{model}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    predict = described["/v1/models/{model}/predict"]["post"]
    assert {"image/*", "multipart/form-data", "application/json"} <= set(
        predict["requestBody"]["content"]
    )
