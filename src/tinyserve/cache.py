"""The result cache: an image's logits, found again by a hash of its bytes and of the model.

A key is the BLAKE2b digest of the image's bytes and of the served version's fingerprint (a
hash of its model file and class names, see ``registry.LoadedModel.fingerprint``). A reload
that changes the file, or another version, has another fingerprint, so it never finds an
answer that an older model gave. The value is what ranking needs: the image's shape as
uploaded and its logits row, so one entry serves every ``top_k`` and every front door.

Two backends, both behind ``ResultCache``:

- ``MemoryCache``: an LRU in this process, bounded in entries and in bytes.
- ``RedisCache``: a shared Redis (``redis://host:port/db``), through the redis client's
  asyncio API. A cache must never make an answer fail or wait: each call has a short
  timeout, writes are not awaited by the request, and after an error Redis is left alone
  for a few seconds, while requests run uncached.

``open_cache("memory" | "redis://..." | "off")`` builds one from the server's setting.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tinyserve.errors import ConfigError

__all__ = [
    "CacheStats",
    "Cached",
    "MemoryCache",
    "RedisCache",
    "ResultCache",
    "cache_key",
    "open_cache",
]

log = logging.getLogger("tinyserve")

_SHAPE = struct.Struct("<3I")


@dataclass(frozen=True, slots=True)
class Cached:
    """What one image's answer needs again: its shape as uploaded, and its logits."""

    image_shape: tuple[int, int, int]
    logits: npt.NDArray[np.float32]

    def encode(self) -> bytes:
        return _SHAPE.pack(*self.image_shape) + self.logits.astype("<f4", copy=False).tobytes()

    @classmethod
    def decode(cls, data: bytes) -> Cached | None:
        """The entry in ``data``, or None if it is not one (a foreign or damaged value)."""
        if len(data) < _SHAPE.size or (len(data) - _SHAPE.size) % 4:
            return None
        shape = _SHAPE.unpack_from(data)
        logits = np.frombuffer(data, "<f4", offset=_SHAPE.size).astype(np.float32)
        return cls((shape[0], shape[1], shape[2]), logits)


def cache_key(image: bytes, fingerprint: str) -> bytes:
    """The key of ``image``'s answer from the version whose fingerprint is given."""
    digest = hashlib.blake2b(image, digest_size=20, key=fingerprint.encode()[:64])
    return b"tinyserve:r1:" + digest.hexdigest().encode()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0


class ResultCache(Protocol):
    """Where answers are kept. ``get`` never raises; ``put`` never makes its caller wait."""

    backend: str
    stats: CacheStats

    async def get(self, key: bytes) -> Cached | None: ...

    def put(self, key: bytes, value: Cached) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class MemoryCache:
    """An LRU in this process, holding at most ``max_entries`` values and ``max_bytes``."""

    backend = "memory"

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ConfigError("the cache needs room for at least one entry and one byte")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0

    async def get(self, key: bytes) -> Cached | None:
        data = self._entries.get(key)
        if data is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return Cached.decode(data)

    def put(self, key: bytes, value: Cached) -> None:
        data = value.encode()
        size = len(key) + len(data)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(key) + len(old)
        self._entries[key] = data
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            gone, value_bytes = self._entries.popitem(last=False)
            self._bytes -= len(gone) + len(value_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "entries": len(self), "bytes": self._bytes,
                "max_entries": self.max_entries, "max_bytes": self.max_bytes}  # fmt: skip

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisCache:
    """A shared Redis. Slow or down, it is skipped: requests answer uncached, never fail.

    Each call waits at most ``timeout_s``. After a failure the cache stays away from Redis
    for ``retry_s`` (a request must not pay a connection timeout while Redis is down), then
    tries again on the next request. Entries expire after ``ttl_s``.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: float = 3600.0,
        timeout_s: float = 0.1,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise ConfigError(
                "--cache redis://... needs the redis client: pip install 'tinyserve[redis]'"
            ) from exc
        self.url = url
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.clock = clock
        self.stats = CacheStats()
        self._client: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._down_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()
        self.max_pending_writes = 256

    @property
    def available(self) -> bool:
        return self.clock() >= self._down_until

    async def get(self, key: bytes) -> Cached | None:
        if not self.available:
            self.stats.misses += 1
            return None
        try:
            data = await asyncio.wait_for(self._client.get(key), self.timeout_s)
        except Exception as exc:  # anything Redis does wrong means "not cached"
            self._failed("read", exc)
            self.stats.misses += 1
            return None
        found = Cached.decode(data) if isinstance(data, bytes) else None
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    def put(self, key: bytes, value: Cached) -> None:
        if not self.available or len(self._writes) >= self.max_pending_writes:
            return  # a slow Redis sheds writes rather than piling them up
        task = asyncio.get_running_loop().create_task(self._write(key, value.encode()))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: bytes, data: bytes) -> None:
        try:
            await asyncio.wait_for(self._client.set(key, data, px=self.ttl_ms), self.timeout_s)
        except Exception as exc:
            self._failed("write", exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        if self.available:  # log once per outage, not once per request
            log.warning(
                "the Redis cache failed a %s (%s: %s); answering uncached for %gs",
                what, type(exc).__name__, exc, self.retry_s,
            )  # fmt: skip
        self._down_until = self.clock() + self.retry_s

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "url": _without_password(self.url),
                "available": self.available}  # fmt: skip

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        try:
            await self._client.aclose()
        except Exception:  # closing a client whose server is gone
            pass


def open_cache(spec: str, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024,
               ttl_s: float = 3600.0) -> ResultCache | None:  # fmt: skip
    """The cache a ``--cache`` value names: ``off``, ``memory`` or ``redis://...``."""
    spec = spec.strip()
    if spec in ("", "off", "none"):
        return None
    if spec == "memory":
        return MemoryCache(max_entries, max_bytes)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache(spec, ttl_s)
    raise ConfigError(f"--cache must be off, memory or redis://HOST:PORT/DB, got {spec!r}")


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user + ':***' if user else '***'}@{host}"
