"""Model sources: a local folder, or ``s3://bucket/prefix`` mirrored into a local cache.

``materialize(source, cache_dir)`` returns a local folder with the repository layout
(``<name>/<version>/model.onnx``) that the rest of tinyserve reads unchanged. For S3 the
prefix is listed and each ``model.onnx`` and ``config.toml`` under it is downloaded once:
a later sync keeps a cached file whose size and ETag still match the listing, downloads a
changed one again, and removes cached files whose object is gone. Each download goes to a
temporary file next to its target, is checked (byte count, and the MD5 when the ETag is
one), and only then renamed into place, so the cache never holds a partial file, and a
failed refresh leaves the previous copy as it was.

When S3 cannot be reached, or answers slowly or with bytes that fail their check,
``materialize`` serves the copy of the last complete sync, if the cache holds one, and says
so in the log; with no such copy it raises the error. Each S3 call gives up after
``S3_CONNECT_TIMEOUT_S``/``S3_READ_TIMEOUT_S`` and ``S3_ATTEMPTS`` attempts, so neither a
dead nor a hung endpoint can hold a start-up for long.

Credentials, region and endpoint come from the standard AWS environment and config files
(``AWS_ENDPOINT_URL`` points at MinIO or another S3-compatible store). Sources are only
ever taken from configuration, never from a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tinyserve.errors import ConfigError, ModelError, ModelNotFound
from tinyserve.repository import CONFIG_FILE, FORMATS, MANIFEST_FILE, MODEL_FILE

log = logging.getLogger("tinyserve")

CACHE_ENV = "TINYSERVE_CACHE_DIR"
# Every format's model file (an IR's weights too), a non-ONNX version's manifest, config.toml.
SYNCED_FILES = frozenset({*FORMATS.values(), "model.bin", MANIFEST_FILE, CONFIG_FILE})
_META_SUFFIX = ".s3.json"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1024 * 1024
_COMPLETE = ".complete.json"  # written after a sync that fetched everything it listed
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 20.0
S3_ATTEMPTS = 3


def default_cache_dir() -> Path:
    """``$TINYSERVE_CACHE_DIR``, else ``tinyserve-cache`` in the system temp dir (Lambda: /tmp)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "tinyserve-cache"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be empty

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @classmethod
    def parse(cls, source: str) -> S3Location:
        rest = source.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise ConfigError(f"{source!r} does not name a valid S3 bucket (s3://BUCKET/PREFIX)")
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ConfigError(f"{source!r}: the prefix may not contain '.' or '..' segments")
        return cls(bucket, "/".join(parts))


@dataclass(frozen=True)
class SyncResult:
    """Where a source landed and what the sync did (keys relative to the prefix)."""

    path: Path
    downloaded: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


def is_remote(source: str | Path) -> bool:
    return str(source).startswith("s3://")


def materialize(source: str | Path, cache_dir: Path | None = None) -> Path:
    """The local folder holding ``source``: a local path as is, S3 synced into the cache, or
    the cache's last complete copy when S3 fails."""
    try:
        return sync(source, cache_dir).path
    except ModelError as exc:
        if not is_remote(source):
            raise
        location = S3Location.parse(str(source))
        root = (cache_dir or default_cache_dir()) / "s3" / location.bucket / location.prefix
        marker = root / _COMPLETE
        if not marker.is_file():
            raise
        log.warning(
            "%s cannot be synced (%s); serving the copy of its last complete sync in %s",
            location.uri, exc.message, root,
        )  # fmt: skip
        return root


def sync(source: str | Path, cache_dir: Path | None = None, into: Path | None = None) -> SyncResult:
    """Mirror ``source`` into ``cache_dir`` (a local path is returned untouched), or into the
    folder ``into`` itself (``tinyserve pull``: model files absent from the source are removed)."""
    if not is_remote(source):
        path = Path(source)
        if not path.exists():
            raise ModelNotFound(f"{path} does not exist")
        return SyncResult(path)
    location = S3Location.parse(str(source))
    root = into or (cache_dir or default_cache_dir()) / "s3" / location.bucket / location.prefix
    root.mkdir(parents=True, exist_ok=True)
    client = _client()
    with _locked(root):
        objects = _list(client, location)
        downloaded, reused = [], []
        for key, (size, etag) in sorted(objects.items()):
            target = root / key
            if _cached(target, size, etag):
                reused.append(key)
                continue
            _download(client, location, key, size, etag, target)
            downloaded.append(key)
        removed = _prune(root, set(objects))
        if into is None:
            _write_atomic(root / _COMPLETE, json.dumps(sorted(objects)))
    if downloaded:
        log.info("%s: downloaded %s into %s", location.uri, ", ".join(downloaded), root)
    return SyncResult(root, tuple(downloaded), tuple(reused), removed)


def forget(path: Path) -> None:
    """Drop a cached file (e.g. a model that failed to load) so the next sync fetches it again."""
    for p in (path, _meta_path(path)):
        p.unlink(missing_ok=True)


def _client() -> Any:
    # botocore rather than boto3: the same credential chain, config files and
    # AWS_ENDPOINT_URL, without boto3's resource layer on the cold-start path.
    try:
        import botocore.session
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError("s3:// sources need boto3: pip install 'tinyserve[s3]'") from None
    from botocore.config import Config

    config = Config(
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
    )
    return botocore.session.get_session().create_client("s3", config=config)


def _list(client: Any, location: S3Location) -> dict[str, tuple[int, str]]:
    """``{relative key: (size, etag)}`` of the model and config files under the prefix."""
    from botocore.exceptions import BotoCoreError, ClientError

    prefix = f"{location.prefix}/" if location.prefix else ""
    found: dict[str, tuple[int, str]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=prefix
        ):
            for item in page.get("Contents", ()):
                relative = item["Key"][len(prefix) :]
                parts = PurePosixPath(relative).parts
                if parts and parts[-1] in SYNCED_FILES and _safe(parts):
                    found["/".join(parts)] = (int(item["Size"]), str(item["ETag"]).strip('"'))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise ModelNotFound(f"S3 bucket {location.bucket!r} does not exist") from None
        raise ModelError(f"cannot list {location.uri}: {code or exc}") from None
    except BotoCoreError as exc:
        raise ModelError(f"cannot reach S3 for {location.uri}: {exc}") from None
    if not any(PurePosixPath(k).name in FORMATS.values() for k in found):
        raise ModelNotFound(
            f"no {MODEL_FILE} under {location.uri} (expected <name>/<version>/{MODEL_FILE} "
            f"for a repository, <version>/{MODEL_FILE} for one model)"
        )
    return found


def _safe(parts: tuple[str, ...]) -> bool:
    # Keys are written below the cache root: nothing may climb out of it.
    return all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def _meta_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_META_SUFFIX}")


def _cached(path: Path, size: int, etag: str) -> bool:
    try:
        meta = json.loads(_meta_path(path).read_text())
        return bool(path.stat().st_size == size and meta == {"size": size, "etag": etag})
    except (OSError, ValueError):
        return False


def _download(
    client: Any, location: S3Location, key: str, size: int, etag: str, target: Path
) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    uri = f"{location.uri}/{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # The old copy stays until the new one is checked: a failed refresh keeps it usable. Its
    # record describes the old object, so a crash after the swap only means one more
    # download next time.
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        full_key = f"{location.prefix}/{key}" if location.prefix else key
        digest, received = hashlib.md5(usedforsecurity=False), 0
        with os.fdopen(fd, "wb") as out:
            try:
                response = client.get_object(Bucket=location.bucket, Key=full_key, IfMatch=etag)
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "412"):
                    raise ModelError(f"{uri} changed while it was downloaded; retry") from None
                raise ModelError(f"cannot download {uri}: {code or exc}") from None
            except BotoCoreError as exc:
                raise ModelError(f"cannot download {uri}: {exc}") from None
            out.flush()
            os.fsync(out.fileno())
        if received != size:
            raise ModelError(f"{uri}: received {received:,} bytes, expected {size:,}")
        encrypted = response.get("SSECustomerAlgorithm") or (
            response.get("ServerSideEncryption") == "aws:kms"
        )
        # A plain ETag is the object's MD5 unless it is multipart or KMS/customer encrypted.
        if _MD5_ETAG.match(etag) and not encrypted and digest.hexdigest() != etag:
            raise ModelError(f"{uri}: the downloaded bytes do not match the object's ETag")
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _write_atomic(_meta_path(target), json.dumps({"size": size, "etag": etag}))


def _write_atomic(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _prune(root: Path, keep: set[str]) -> tuple[str, ...]:
    """Remove cached files whose object is gone, and temporary files of interrupted syncs."""
    removed: list[str] = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        if path.name in SYNCED_FILES and relative not in keep:
            forget(path)
            removed.append(relative)
        elif path.name.endswith(".part"):
            path.unlink(missing_ok=True)
    return tuple(sorted(removed))


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One sync of a cache folder at a time (server workers may start together)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: syncs are still atomic per file
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
