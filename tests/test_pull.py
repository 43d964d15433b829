"""``tinyserve pull``: an S3 repository mirrored into a folder that ``serve --repo`` reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL, SAMPLES
from live_server import Server
from s3_endpoint import S3Endpoint
from tinyserve.cli import app
from tinyserve.repository import discover

MODEL = BUNDLED_MODEL / "1" / "model.onnx"


def test_pull_mirrors_the_repository_and_keeps_it_in_step(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    client = s3.client()
    client.upload_file(str(MODEL), bucket, "repo/fashion-cnn/1/model.onnx")
    client.put_object(Bucket=bucket, Key="repo/fashion-cnn/config.toml", Body=b"version = 1\n")
    client.put_object(Bucket=bucket, Key="repo/fashion-cnn/1/REPORT.md", Body=b"# notes")
    dest = tmp_path / "models"
    runner = CliRunner()

    first = runner.invoke(app, ["pull", f"s3://{bucket}/repo", str(dest)])
    assert first.exit_code == 0, first.output
    assert "2 downloaded, 0 unchanged, 0 removed" in first.output
    assert (dest / "fashion-cnn" / "1" / "model.onnx").read_bytes() == MODEL.read_bytes()
    assert not (dest / "fashion-cnn" / "1" / "REPORT.md").exists()
    assert discover(dest) == {"fashion-cnn": dest / "fashion-cnn"}

    # a second pull (a restarted pod on the same volume) downloads nothing; a removed
    # version disappears from the folder
    client.upload_file(str(MODEL), bucket, "repo/fashion-cnn/2/model.onnx")
    client.delete_object(Bucket=bucket, Key="repo/fashion-cnn/1/model.onnx")
    second = runner.invoke(app, ["pull", f"s3://{bucket}/repo", str(dest)])
    assert second.exit_code == 0, second.output
    assert "1 downloaded, 1 unchanged, 1 removed" in second.output
    assert (dest / "fashion-cnn" / "2" / "model.onnx").is_file()
    assert not (dest / "fashion-cnn" / "1" / "model.onnx").exists()


def test_pull_then_serve_the_folder(
    s3: S3Endpoint, tmp_path: Path, serve: Callable[..., Server]
) -> None:
    bucket = s3.bucket()
    s3.client().upload_file(str(MODEL), bucket, "fashion-cnn/1/model.onnx")
    dest = tmp_path / "models"
    result = CliRunner().invoke(app, ["pull", f"s3://{bucket}", str(dest)])
    assert result.exit_code == 0, result.output
    server = serve(repo=dest)
    reply = httpx.post(
        f"{server.url}/v1/models/fashion-cnn/predict",
        content=(SAMPLES / "0000_ankle-boot.png").read_bytes(),
        headers={"content-type": "image/png"},
    )
    assert reply.status_code == 200 and reply.json()["label"] == "Ankle boot", reply.text


def test_pull_refuses_local_sources_and_missing_prefixes(s3: S3Endpoint, tmp_path: Path) -> None:
    runner = CliRunner()
    local = runner.invoke(app, ["pull", str(BUNDLED_MODEL), str(tmp_path / "x")])
    assert local.exit_code != 0 and "not an s3:// URI" in str(local.exception)
    empty = runner.invoke(app, ["pull", f"s3://{s3.bucket()}/nothing", str(tmp_path / "y")])
    assert empty.exit_code != 0 and "no model.onnx under" in str(empty.exception)
