"""API keys: a file of hashed keys, each with scopes, a rate limit and a quota.

A key is ``tsk_<id>_<secret>``: ``id`` (8 hex digits) names it the way a user name does and is
not secret; ``secret`` is 32 random URL-safe bytes' worth of text from ``secrets``. The key
file holds only the SHA-256 of each whole key, beside its name, scopes, limits and dates:

    {"keys": [{"id": "3f9a2b1c", "name": "alice", "sha256": "<64 hex digits>",
               "scopes": ["predict"], "rate": 10.0, "burst": 20, "quota": 10000,
               "period": "day", "created": "2025-01-01T00:00:00Z", "revoked": null}]}

Checking a key is a dictionary lookup by id and one ``hmac.compare_digest`` of digests; an
unknown id is compared against a dummy digest, so a wrong id and a wrong secret cost the
same. A plain hash is enough (no salt, no slow KDF): the secret is 256 random bits, not a
password anyone could guess from a dictionary.

Usage lives in memory, per server process: each key's token bucket (``rate`` requests/s,
``burst`` at once) and its quota count for the current UTC day or month. ``reload`` re-reads
the file (SIGHUP, ``POST /admin/keys/reload``) and keeps the usage of every key still in it,
so a reload neither resets a quota nor forgives a burst; a restart does both.

The file is written whole, to a temporary file renamed over the old one, so a server reading
it never sees half a file. Nothing here logs a key or a digest, and no error message repeats
the key a request sent.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyserve.errors import ConfigError, Forbidden, QuotaExceeded, RateLimited, Unauthorized

__all__ = [
    "PERIODS",
    "PREFIX",
    "SCOPES",
    "ApiKey",
    "KeyRing",
    "KeyUsage",
    "create_key",
    "read_keys",
    "revoke_key",
    "write_keys",
]

PREFIX = "tsk_"
SCOPES = ("predict", "admin")
PERIODS = ("day", "month")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID = re.compile(r"[0-9a-f]{8}")
_DUMMY = hashlib.sha256(b"no such key").digest()
_HOW = "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


@dataclass(frozen=True)
class ApiKey:
    """One key as the file holds it: never the key itself, only its SHA-256."""

    id: str
    name: str
    sha256: str
    scopes: tuple[str, ...] = ("predict",)
    rate: float = 0.0  # requests per second; 0 = no limit
    burst: int = 0  # requests at once; 0 = one second's worth (at least 1)
    quota: int = 0  # requests per period; 0 = no quota
    period: str = "day"
    created: str = ""
    revoked: str | None = None

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.id):
            raise ValueError(f"key id must be 8 hex digits, got {self.id!r}")
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"key name must be 1-64 letters, digits, '.', '_' or '-', got {self.name!r}"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"key {self.name!r}: sha256 must be 64 hex digits")
        unknown = sorted(set(self.scopes) - set(SCOPES))
        if not self.scopes or unknown:
            raise ValueError(f"key scopes must be among {', '.join(SCOPES)}, got {self.scopes}")
        if self.rate < 0 or self.burst < 0 or self.quota < 0:
            raise ValueError(f"key {self.name!r}: rate, burst and quota must be >= 0")
        if self.period not in PERIODS:
            raise ValueError(f"key period must be one of {', '.join(PERIODS)}")

    @property
    def capacity(self) -> float:
        """The most requests the bucket holds."""
        return float(self.burst or max(1, math.ceil(self.rate)))

    @classmethod
    def from_json(cls, data: Any) -> ApiKey:
        if not isinstance(data, dict):
            raise ValueError("each key must be a JSON object")
        fields = {**data, "scopes": tuple(data.get("scopes", ("predict",)))}
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scopes": list(self.scopes)}


def read_keys(path: Path) -> list[ApiKey]:
    """Every key of the file at ``path``, revoked ones included; a missing file has none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError('the file must be a JSON object {"keys": [...]}')
        keys = [ApiKey.from_json(item) for item in data["keys"]]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"API key file {path}: {exc}") from None
    ids = [k.id for k in keys]
    names = [k.name for k in keys if k.revoked is None]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise ConfigError(f"API key file {path}: key ids, and the names of live keys, repeat")
    return keys


def write_keys(path: Path, keys: Sequence[ApiKey]) -> None:
    """Replace the file at ``path`` with ``keys`` in one rename (owner-only permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"keys": [k.to_json() for k in keys]}, indent=2) + "\n"
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def create_key(
    path: Path,
    name: str,
    scopes: Iterable[str] = ("predict",),
    rate: float = 0.0,
    burst: int = 0,
    quota: int = 0,
    period: str = "day",
) -> tuple[ApiKey, str]:
    """Add a key named ``name`` to the file; returns it and the key itself (shown only now)."""
    keys = read_keys(path)
    if any(k.name == name and k.revoked is None for k in keys):
        raise ConfigError(f"a key named {name!r} exists; revoke it first or choose another name")
    taken = {k.id for k in keys}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    secret = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    try:
        key = ApiKey(key_id, name, _digest(secret).hex(), tuple(dict.fromkeys(scopes)), rate,
                     burst, quota, period, created=_iso(time.time()))  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    write_keys(path, [*keys, key])
    return key, secret


def revoke_key(path: Path, name_or_id: str) -> ApiKey:
    """Mark the live key named (or with the id) ``name_or_id`` revoked; returns it."""
    keys = read_keys(path)
    for i, key in enumerate(keys):
        if key.revoked is None and name_or_id in (key.name, key.id):
            keys[i] = revoked = ApiKey(**{**asdict(key), "revoked": _iso(time.time())})
            write_keys(path, keys)
            return revoked
    raise ConfigError(f"no live key named {name_or_id!r} in {path}")


# -- the server side ----------------------------------------------------------------------


@dataclass
class KeyUsage:
    """What one key has done since the server started (or since the key appeared)."""

    tokens: float
    updated: float
    period: tuple[int, ...] = ()  # (year, month[, day]) the quota count belongs to
    used: int = 0  # requests counted against the quota in ``period``
    outcomes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("admitted", "forbidden", "rate_limited", "quota_exceeded"), 0
        )
    )


class KeyRing:
    """The live keys of one server and their usage: ``admit`` lets a request in or raises."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock  # seconds since the epoch (UTC): the quota periods follow it
        self._keys: dict[str, tuple[ApiKey, bytes]] = {}
        self._usage: dict[str, KeyUsage] = {}
        self.reload()

    def __len__(self) -> int:
        return len(self._keys)

    def reload(self) -> int:
        """Re-read the file; keys gone or revoked stop working at once. Returns the count."""
        if not self.path.is_file():
            raise ConfigError(
                f"API key file {self.path} does not exist; create a key with "
                f"'tinyserve keys create NAME --file {self.path}'"
            )
        live = [k for k in read_keys(self.path) if k.revoked is None]
        now = self.clock()
        self._keys = {k.id: (k, bytes.fromhex(k.sha256)) for k in live}
        self._usage = {k.id: self._usage.get(k.id) or KeyUsage(k.capacity, now) for k in live}
        return len(live)

    def admit(self, authorization: str | None, x_api_key: str | None, scope: str) -> ApiKey:
        """The key a request sent, if it may use ``scope`` now; counts it against its limits."""
        presented = _presented(authorization, x_api_key)
        if presented is None:
            raise Unauthorized(f"this server needs an API key: {_HOW}")
        key_id = presented[len(PREFIX) : len(PREFIX) + 8] if presented.startswith(PREFIX) else ""
        found = self._keys.get(key_id)
        digest = _digest(presented)
        if not hmac.compare_digest(digest, found[1] if found else _DUMMY) or found is None:
            raise Unauthorized(f"the API key is unknown or revoked; {_HOW}")
        key = found[0]
        usage = self._usage[key.id]
        if scope not in key.scopes:
            usage.outcomes["forbidden"] += 1
            raise Forbidden(
                f"the API key {key.name!r} may not call this route: it needs the {scope!r} "
                f"scope, and the key has {', '.join(key.scopes)}"
            )
        now = self.clock()
        if key.quota:
            period, resets = _period(now, key.period)
            if usage.period != period:
                usage.period, usage.used = period, 0
            if usage.used >= key.quota:
                usage.outcomes["quota_exceeded"] += 1
                raise QuotaExceeded(
                    f"the API key {key.name!r} has used its quota of {key.quota} requests per "
                    f"{key.period}; it resets at {_iso(resets)}",
                    retry_after=resets - now,
                )
        if key.rate:
            capacity = key.capacity
            tokens = min(capacity, usage.tokens + max(0.0, now - usage.updated) * key.rate)
            usage.updated = now
            if tokens < 1:
                usage.tokens = tokens
                usage.outcomes["rate_limited"] += 1
                raise RateLimited(
                    f"the API key {key.name!r} is limited to {key.rate:g} requests per second "
                    f"(bursts of {capacity:g}); slow down",
                    retry_after=(1 - tokens) / key.rate,
                )
            usage.tokens = tokens - 1
        usage.used += 1
        usage.outcomes["admitted"] += 1
        return key

    def usage(self) -> list[tuple[str, dict[str, int], int]]:
        """Per live key: its name, requests by outcome, requests counted in this quota period."""
        now = self.clock()
        rows = []
        for key_id, (key, _) in self._keys.items():
            usage = self._usage[key_id]
            current = usage.period == _period(now, key.period)[0]
            rows.append((key.name, dict(usage.outcomes), usage.used if current else 0))
        return rows


def _presented(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return given.strip()
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _period(now: float, period: str) -> tuple[tuple[int, ...], float]:
    """The UTC day or month holding ``now``, and when the next one starts (epoch seconds)."""
    t = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return (t.tm_year, t.tm_mon, t.tm_mday), float(start + 86400)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return (t.tm_year, t.tm_mon), float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
