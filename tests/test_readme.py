"""The README's example answers are what the bundled model really returns.

The figures are read from README.md itself, so editing an example wrongly fails here. INT8
kernels round differently on different x86 CPUs (AVX2, AVX-512 VNNI, AMX), which moves the
served version's confidences in their third decimal: the README shows two, and a confidence
matches within CONFIDENCE_TOLERANCE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from conftest import ROOT
from tinyserve.predict import predict_files

CONFIDENCE_TOLERANCE = 0.02
README = (ROOT / "README.md").read_text()


def console_after(command: str) -> tuple[re.Match[str], list[str]]:
    """The first ``$ `` line matching ``command`` and the output lines up to the next prompt."""
    lines = README.splitlines()
    for index, line in enumerate(lines):
        match = re.fullmatch(command, line)
        if match:
            output = []
            for following in lines[index + 1 :]:
                if following.startswith(("$ ", "```")):
                    break
                output.append(following)
            return match, output
    raise AssertionError(f"README.md has no line matching {command!r}")


def without_elisions(text: str) -> Any:
    """The README's JSON with its ``…`` (fields left out) removed, parsed."""
    return json.loads(text.replace(",…", "").replace("…,", "").replace("…", ""))


def assert_shown(shown: Any, real: Any, where: str = "answer") -> None:
    """Every field the README shows is in the real answer, with the same value.

    Confidences match within CONFIDENCE_TOLERANCE; timings only have to be there.
    """
    if isinstance(shown, dict):
        assert isinstance(real, dict), where
        for key, value in shown.items():
            assert key in real, f"{where} has no {key!r}"
            if key == "latency_ms":
                assert set(value) <= set(real[key]), f"{where}.{key}"
                assert all(real[key][stage] >= 0 for stage in value)
            elif key == "confidence":
                assert real[key] == pytest.approx(value, abs=CONFIDENCE_TOLERANCE), where
            else:
                assert_shown(value, real[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(real, list) and len(real) == len(shown), where
        for index, (one, other) in enumerate(zip(shown, real, strict=True)):
            assert_shown(one, other, f"{where}[{index}]")
    else:
        assert real == shown, f"{where}: README shows {shown!r}, the server says {real!r}"


def test_the_curl_answer_is_what_the_server_says(app_client: Callable[..., TestClient]) -> None:
    serve, _ = console_after(r"\$ tinyserve serve --repo (\S+) &")
    (repo,) = serve.groups()
    match, output = console_after(r"\$ curl --data-binary @(\S+) '(?:https?://)?[^/']*(/[^']+)'")
    image, target = match.groups()
    shown = without_elisions("".join(output))
    assert shown["label"] == shown["predictions"][0]["label"]  # the example agrees with itself

    client = app_client(repo=ROOT / repo)
    # what curl --data-binary sends: the file's bytes as a form body
    headers = {"content-type": "application/x-www-form-urlencoded"}
    response = client.post(target, content=(ROOT / image).read_bytes(), headers=headers)
    assert response.status_code == 200, response.text
    assert_shown(shown, response.json())


def test_the_predict_table_is_what_predict_returns() -> None:
    match, output = console_after(r"\$ tinyserve predict (\S+) (\S+)")
    model, image = match.groups()
    (header,) = [line for line in output if line.startswith("┃")]
    columns = [cell.strip() for cell in header.strip("┃").split("┃")]
    rows = [line for line in output if line.startswith("│")]
    assert len(rows) == 1, "one image, one row (a wrapped row would not read back)"
    table = dict(
        zip(columns, (cell.strip() for cell in rows[0].strip("│").split("│")), strict=True)
    )
    (top_column,) = [c for c in columns if c.startswith("top ")]
    top_k = int(top_column.removeprefix("top "))
    assert table["image"] == image

    (result,) = predict_files(str(ROOT / model), [ROOT / image], top_k=top_k)
    predictions = result["predictions"]
    assert table["label"] == predictions[0]["label"]
    confidence = float(table["confidence"].removesuffix("%")) / 100
    assert confidence == pytest.approx(predictions[0]["confidence"], abs=CONFIDENCE_TOLERANCE)
    ranked = re.findall(r"([^,…]+?) (\d+(?:\.\d+)?)%", table[top_column])
    assert len(ranked) == len(predictions) or (ranked and "…" in table[top_column])
    for (label, percent), real in zip(ranked, predictions, strict=False):
        assert label.strip() == real["label"]
        assert float(percent) / 100 == pytest.approx(
            real["confidence"], abs=CONFIDENCE_TOLERANCE
        ), label
