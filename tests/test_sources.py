"""Model sources: local folders as they are, s3:// prefixes synced into a local cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from conftest import BUNDLED_MODEL, SAMPLES
from s3_endpoint import S3Endpoint
from tinyserve.errors import ConfigError, ModelError, ModelNotFound
from tinyserve.repository import discover, resolve
from tinyserve.sources import S3Location, _client, _download, materialize, sync

MODEL = BUNDLED_MODEL / "1" / "model.onnx"
KEY = "fashion-cnn/1/model.onnx"


def upload_repo(s3: S3Endpoint, prefix: str = "repo") -> str:
    bucket = s3.bucket()
    client = s3.client()
    client.upload_file(str(MODEL), bucket, f"{prefix}/{KEY}")
    client.put_object(Bucket=bucket, Key=f"{prefix}/fashion-cnn/1/REPORT.md", Body=b"# notes")
    client.put_object(Bucket=bucket, Key=f"{prefix}/fashion-cnn/config.toml", Body=b"version = 1\n")
    return bucket


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_location_parsing() -> None:
    assert S3Location.parse("s3://my-bucket/a//b/") == S3Location("my-bucket", "a/b")
    assert S3Location.parse("s3://my-bucket") == S3Location("my-bucket", "")
    assert S3Location.parse("s3://my-bucket/a/b").uri == "s3://my-bucket/a/b"
    for bad in ("s3://", "s3://UPPER/x", "s3://b/../x", "s3://ok-bucket/a/./b"):
        with pytest.raises(ConfigError):
            S3Location.parse(bad)


def test_local_source_is_used_in_place(tmp_path: Path) -> None:
    assert materialize(BUNDLED_MODEL, tmp_path / "cache") == BUNDLED_MODEL
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ModelNotFound):
        materialize(tmp_path / "missing")


def test_sync_downloads_once_then_reuses_the_cache(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = upload_repo(s3)
    cache = tmp_path / "cache"
    first = sync(f"s3://{bucket}/repo", cache)
    assert first.path == cache / "s3" / bucket / "repo"
    assert first.downloaded == ("fashion-cnn/1/model.onnx", "fashion-cnn/config.toml")
    assert [f for f in files(first.path) if not f.startswith(".")] == [
        "fashion-cnn/.config.toml.s3.json",
        "fashion-cnn/1/.model.onnx.s3.json",
        "fashion-cnn/1/model.onnx",
        "fashion-cnn/config.toml",
    ]  # REPORT.md is not needed for serving and is not fetched
    cached = first.path / KEY
    assert cached.read_bytes() == MODEL.read_bytes()
    before = cached.stat()

    second = sync(f"s3://{bucket}/repo", cache)
    assert second.downloaded == ()
    assert set(second.reused) == {KEY, "fashion-cnn/config.toml"}
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert discover(second.path) == {"fashion-cnn": second.path / "fashion-cnn"}
    assert resolve(second.path / "fashion-cnn").path == cached


def test_changed_or_deleted_objects_are_synced(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = upload_repo(s3)
    cache = tmp_path / "cache"
    root = sync(f"s3://{bucket}/repo", cache).path
    s3.client().put_object(Bucket=bucket, Key=f"repo/{KEY}", Body=b"a different model")
    s3.client().delete_object(Bucket=bucket, Key="repo/fashion-cnn/config.toml")

    result = sync(f"s3://{bucket}/repo", cache)
    assert result.downloaded == (KEY,)
    assert result.removed == ("fashion-cnn/config.toml",)
    assert (root / KEY).read_bytes() == b"a different model"
    assert not (root / "fashion-cnn" / "config.toml").exists()
    assert not (root / "fashion-cnn" / ".config.toml.s3.json").exists()


def test_a_tampered_cache_file_is_downloaded_again(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = upload_repo(s3)
    root = sync(f"s3://{bucket}/repo", tmp_path).path
    (root / KEY).write_bytes(b"truncated")
    assert sync(f"s3://{bucket}/repo", tmp_path).downloaded == (KEY,)
    assert (root / KEY).read_bytes() == MODEL.read_bytes()


def test_missing_bucket_or_prefix_is_a_clear_error(s3: S3Endpoint, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="bucket 'no-such-bucket' does not exist"):
        sync("s3://no-such-bucket/repo", tmp_path)
    bucket = upload_repo(s3)
    with pytest.raises(ModelNotFound, match=r"no model.onnx under s3://.*/elsewhere"):
        sync(f"s3://{bucket}/elsewhere", tmp_path)
    assert [f for f in files(tmp_path / "s3") if not f.endswith("/.lock")] == []


def test_keys_cannot_escape_the_cache(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="repo/../../escape/1/model.onnx", Body=b"x")
    with pytest.raises(ModelNotFound):
        sync(f"s3://{bucket}/repo", tmp_path / "cache")
    assert not list(tmp_path.rglob("escape"))


def test_a_failed_download_leaves_no_partial_file(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = upload_repo(s3)
    location = S3Location(bucket, "repo")
    size = MODEL.stat().st_size
    etag = hashlib.md5(MODEL.read_bytes(), usedforsecurity=False).hexdigest()
    target = tmp_path / KEY
    with pytest.raises(ModelError, match="expected"):  # a short or long read
        _download(_client(), location, KEY, size + 1, etag, target)
    assert files(tmp_path) == []
    with pytest.raises(ModelError, match="changed while it was downloaded"):
        _download(_client(), location, KEY, size, "0" * 32, target)
    assert files(tmp_path) == []
    _download(_client(), location, KEY, size, etag, target)
    assert target.read_bytes() == MODEL.read_bytes()


@pytest.mark.slow
def test_serve_from_an_s3_repository(s3: S3Endpoint, tmp_path: Path) -> None:
    from live_server import Server

    bucket = upload_repo(s3)
    server = Server(f"s3://{bucket}/repo", "--cache-dir", str(tmp_path / "cache"))  # type: ignore[arg-type]
    try:
        image = (SAMPLES / "0000_ankle-boot.png").read_bytes()
        response = httpx.post(
            f"{server.url}/v1/models/fashion-cnn/predict",
            content=image,
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"], body["label"]) == ("fashion-cnn", 1, "Ankle boot")
        assert (tmp_path / "cache" / "s3" / bucket / "repo" / KEY).is_file()
    finally:
        assert server.stop() == 0
