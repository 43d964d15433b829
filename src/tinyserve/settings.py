"""Every server setting, declared once: flag, environment names, type, help and the field it sets.

``SETTINGS`` is the one table. ``tinyserve serve`` builds its options from it, and
``from_env`` reads the same table from the environment (and a ``.env`` file), so the CLI and
the Lambda handler cannot disagree on a name, a unit or a default. A default is not written
in the table: it is the default of the dataclass field the setting fills (``ServerConfig``,
``RunConfig``, and the ``EngineConfig``, ``BatchConfig`` and ``ImageLimits`` inside it), so
``ServerConfig()`` and a bare ``tinyserve serve`` run the same server.

Precedence, highest first: a flag, the environment, the ``.env`` file, the field's default.
Within one source a ``TINYSERVE_*`` name wins over an alias (``NUM_THREADS``, ``TOP_K``...).

    values = resolve({"port": 9000}, os.environ, Path(".env"))   # by setting name
    config = server_config(values, repo=Path("models"))         # ServerConfig
    run = build(RunConfig, values, "run")                        # host, port, log level...
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tinyserve.errors import ConfigError

if TYPE_CHECKING:
    from tinyserve.batcher import BatchConfig
    from tinyserve.engine import EngineConfig
    from tinyserve.imaging import ImageLimits

_C = TypeVar("_C")
MIB = 1024 * 1024
ENV_PREFIX = "TINYSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
BACKENDS = ("uvicorn", "ray")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server can be told; ``tinyserve serve`` fills it from ``SETTINGS``.

    ``model_path`` serves that one model (an .onnx file or a model folder) instead of every
    model in ``repo``; ``labels_path`` replaces the class names of the default model.
    """

    repo: Path = Path("models")
    model_path: Path | None = None
    labels_path: Path | None = None
    default_model: str | None = None
    engine: EngineConfig = field(default_factory=lambda: _owner("engine")())
    batching: BatchConfig = field(default_factory=lambda: _owner("batching")())
    limits: ImageLimits = field(default_factory=lambda: _owner("limits")())
    max_body_bytes: int = 64 * MIB
    max_batch_images: int = 64
    default_top_k: int = 5
    decode_threads: int = 2
    inline_decode_bytes: int = 16 * 1024
    admin_token: str | None = None
    api_keys: Path | None = None  # the key file (tinyserve.auth); None: no API keys
    cors_origins: tuple[str, ...] = ()
    # Video streams (POST /v1/streams, admin token): files only under stream_dir, URLs and
    # devices only when an allow-list prefix names them.
    stream_dir: Path | None = None
    stream_allow: tuple[str, ...] = ()
    max_streams: int = 16
    rate_limit: float = 0.0
    drain_timeout_s: float = 10.0
    access_log: bool = False
    trace: bool = False  # OpenTelemetry spans of the request path (tracing.py)
    otlp_endpoint: str | None = None  # the collector's base URL, e.g. http://otel:4318
    cache: str = "off"  # off, memory, or redis://HOST:PORT/DB (cache.open_cache)
    cache_max_entries: int = 10_000
    cache_max_bytes: int = 64 * MIB
    cache_ttl_s: float = 3600.0
    reports_dir: Path | None = None  # `bench http --report` pages the web page lists

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_batch_images < 1:
            raise ValueError("max_body_bytes and max_batch_images must be positive")
        if self.default_top_k < 1:
            raise ValueError(f"default_top_k must be at least 1, got {self.default_top_k}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, got {self.decode_threads}")
        if self.rate_limit < 0 or self.drain_timeout_s < 0:
            raise ValueError("rate_limit and drain_timeout_s must be >= 0")
        if self.cache_max_entries < 1 or self.cache_max_bytes < 1 or self.cache_ttl_s <= 0:
            raise ValueError("the cache's entries, bytes and TTL must be positive")
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise ValueError("the admin token must be at least 8 characters long")
        if any(not origin or origin != origin.strip() for origin in self.cors_origins):
            raise ValueError(f"CORS origins must be non-empty, got {self.cors_origins}")


@dataclass(frozen=True)
class RunConfig:
    """How ``tinyserve serve`` runs the app: where the repository comes from, where to listen."""

    repo: str = "models"  # a folder, or s3://BUCKET/PREFIX synced into cache_dir
    cache_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    backend: str = "uvicorn"  # or "ray": Ray Serve deployments of the repository
    ray_address: str | None = None  # None: RAY_ADDRESS, else a cluster of this machine
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    models_per_replica: int = 4
    replica_cpus: float = 1.0
    allow_anonymous: bool = False  # a non-loopback host without API keys, and no warning
    client_timeout_s: float = 10.0  # for a request's headers, and between reads of its body
    workers: str = "1"  # processes serving the port: a number, or "auto" (cli.workers)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("replicas need 0 <= min_replicas <= max_replicas and max >= 1")
        if self.target_ongoing_requests <= 0 or self.models_per_replica < 1:
            raise ValueError("target_ongoing_requests and models_per_replica must be positive")
        if self.replica_cpus < 0:
            raise ValueError(f"replica_cpus must be >= 0, got {self.replica_cpus}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        if self.client_timeout_s <= 0:
            raise ValueError(f"client_timeout_s must be positive, got {self.client_timeout_s}")
        counted = self.workers.isascii() and self.workers.isdigit() and int(self.workers) >= 1
        if self.workers != "auto" and not counted:
            raise ValueError(f"workers must be a number >= 1 or 'auto', got {self.workers!r}")


def _owner(part: str) -> type[Any]:
    """The dataclass a target's part names: "batching.max_batch_size" is a field of the
    ``BatchConfig`` in ``ServerConfig.batching``; "" is ``ServerConfig``, "run" ``RunConfig``.

    The nested ones are imported on first use: NumPy (engine, imaging) would slow down
    ``tinyserve --help``, and asyncio (batcher) the Lambda handler's cold start by 20-50 ms.
    """
    if part == "engine":
        from tinyserve.engine import EngineConfig

        return EngineConfig
    if part == "batching":
        from tinyserve.batcher import BatchConfig

        return BatchConfig
    if part == "limits":
        from tinyserve.imaging import ImageLimits

        return ImageLimits
    return {"": ServerConfig, "run": RunConfig}[part]


@dataclass(frozen=True)
class Setting:
    """One setting: ``--flag-name``, ``TINYSERVE_FLAG_NAME`` (plus aliases), and its field."""

    name: str
    kind: type[Any]  # int, float, str, bool or Path
    target: str  # the field it fills, "part.field" (see _owner)
    help: str
    panel: str  # the group it is listed under in `serve --help`
    aliases: tuple[str, ...] = ()  # more environment names, e.g. the seed's NUM_THREADS
    unit: int = 1  # the field holds value * unit: the *_mb settings fill byte counts
    many: bool = False  # repeatable flag; comma-separated in the environment
    shown_default: str | None = None  # what --help says when the default is None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def envs(self) -> tuple[str, ...]:
        """Environment names, the one that wins first."""
        return (self.env, *self.aliases)

    @property
    def part(self) -> str:
        return self.target.rpartition(".")[0]

    @property
    def attribute(self) -> str:
        return self.target.rpartition(".")[2]

    @property
    def default(self) -> Any:
        """The target field's default, in this setting's unit."""
        value: Any = getattr(_owner(self.part)(), self.attribute)
        return value / self.unit if self.unit != 1 else value

    def parse(self, text: str, where: str) -> Any:
        """The value of ``text`` read from ``where`` (an environment name), checked."""
        text = text.strip()
        if self.many:
            return tuple(item.strip() for item in text.split(",") if item.strip())
        if self.kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ConfigError(f"{where} must be true or false (1/0, yes/no), got {text!r}")
        if self.kind in (int, float):
            try:
                return self.kind(text)
            except ValueError:
                whole = " (an integer)" if self.kind is int else ""
                raise ConfigError(f"{where} must be a number{whole}, got {text!r}") from None
        return self.kind(text)

    def to_field(self, value: Any) -> Any:
        if self.many:
            return tuple(item.strip() for text in value for item in text.split(",") if item.strip())
        return int(value * self.unit) if self.unit != 1 else value


_MODELS, _BATCHING, _INFERENCE, _LIMITS, _HTTP = "Models", "Batching", "Inference", "Limits", "HTTP"
_CACHE = "Cache"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "repo", str, "run.repo", "Model repository: a folder, or s3://BUCKET/PREFIX synced into "
        "--cache-dir.", _MODELS,
    ),
    Setting(
        "model", Path, "model_path", "Serve this one model (an .onnx file, or a model folder "
        "NAME/<version>/model.onnx) instead of --repo. Its name is the folder's (the file "
        "stem for a loose file), its version the version folder's.", _MODELS,
        aliases=("MODEL_PATH",), shown_default="serve --repo",
    ),
    Setting(
        "labels", Path, "labels_path", "Class names replacing the default model's: one per line, "
        "or a JSON list; as many as the model has classes.", _MODELS, aliases=("LABELS_PATH",),
        shown_default="the model's own",
    ),
    Setting(
        "cache_dir", Path, "run.cache_dir", "Local cache for an s3:// repository.", _MODELS,
        shown_default="<tmp>/tinyserve-cache",
    ),
    Setting(
        "default_model", str, "default_model", "Model behind /predict and /infer.", _MODELS,
        shown_default="the only one",
    ),
    Setting(
        "top_k", int, "default_top_k", "Predictions returned when a request does not say.",
        _MODELS, aliases=("TOP_K",),
    ),
    Setting(
        "max_batch_size", int, "batching.max_batch_size", "Most images per inference batch.",
        _BATCHING,
    ),
    Setting(
        "max_delay_ms", float, "batching.max_delay_ms", "Longest wait for a batch to fill after "
        "its first image (0: take what is queued).", _BATCHING,
    ),
    Setting(
        "learn_batch_size", bool, "batching.learn_batch_size", "Measure each model's images/s "
        "at batch sizes 1, 2, 4 ... --max-batch-size at warm-up, and batch at most to the "
        "smallest size within 5 % of the fastest (for models that slow down in big batches).",
        _BATCHING,
    ),
    Setting(
        "max_queue", int, "batching.max_queue", "Queued images per model before 503.", _BATCHING
    ),
    Setting(
        "max_waiting", int, "batching.max_waiting", "Requests that wait, unread, for a place "
        "in a full queue before more are refused with 503 (before their bodies are read).",
        _BATCHING,
    ),
    Setting("timeout", float, "batching.timeout_s", "Per-request deadline in seconds.", _BATCHING),
    Setting(
        "inline_ms", float, "batching.inline_ms", "Run a lone request on the event loop thread "
        "when the model answers one image within this many ms (skips two thread hand-offs at "
        "low load; 0: never).", _BATCHING,
    ),
    Setting(
        "runtime", str, "engine.runtime", "What runs the models: auto (each version on its "
        "format's runtime: model.onnx on ONNX Runtime, an OpenVINO IR on OpenVINO, "
        "model.tflite on LiteRT), onnxruntime, openvino (reads model.xml, else model.onnx) or "
        "litert. A model's config.toml may set its own (runtime = ...).", _INFERENCE,
    ),
    Setting(
        "provider", str, "engine.provider", "ONNX Runtime execution provider: cpu, openvino "
        "(onnxruntime-openvino), cuda or tensorrt (the gpu extra, onnxruntime-gpu, and an "
        "NVIDIA GPU). A model's config.toml may set its own (provider = ...).", _INFERENCE,
    ),
    Setting(
        "threads", int, "engine.intra_op_threads", "Inference threads of each model (ONNX "
        "Runtime intra-op, OpenVINO, LiteRT); 0 = all cores.", _INFERENCE,
        aliases=("NUM_THREADS",),
    ),
    Setting(
        "spin", bool, "engine.spin", "Let ONNX Runtime threads spin while idle (lower latency "
        "alone, less CPU for everything else).", _INFERENCE,
    ),
    Setting(
        "decode_threads", int, "decode_threads", "Threads decoding large images.", _INFERENCE
    ),
    Setting("max_body_mb", float, "max_body_bytes", "Largest request body.", _LIMITS, unit=MIB),
    Setting("max_image_mb", float, "limits.max_bytes", "Largest single image.", _LIMITS, unit=MIB),
    Setting(
        "max_pixels", int, "limits.max_pixels", "Largest image in pixels (checked before "
        "decoding).", _LIMITS,
    ),
    Setting(
        "client_timeout", float, "run.client_timeout_s", "Seconds a client may take to send "
        "its request headers, or to send more of its body, before it is answered 408 and "
        "disconnected (slowloris).", _LIMITS,
    ),
    Setting(
        "rate_limit", float, "rate_limit", "Requests per second per client IP; 0 = no limit.",
        _LIMITS,
    ),
    Setting("host", str, "run.host", "Address to bind; 0.0.0.0 exposes the server.", _HTTP),
    Setting("port", int, "run.port", "Port to bind.", _HTTP),
    Setting(
        "workers", str, "run.workers", "Processes serving the port, each with its own models "
        "and batchers (one core of Python each); auto: one per core when the models take "
        "under 2 ms per image, else 1. Reloads, /metrics and /stats cover every worker.",
        _HTTP,
    ),
    Setting(
        "admin_token", str, "admin_token", "Enables /admin routes; callers send 'Authorization: "
        "Bearer TOKEN'. At least 8 characters.", _HTTP, shown_default="no /admin routes",
    ),
    Setting(
        "api_keys", Path, "api_keys", "API key file ('tinyserve keys create'): predictions then "
        "need a key with the predict scope, admin routes one with admin (or the admin token). "
        "Re-read on SIGHUP and POST /admin/keys/reload.", _HTTP, shown_default="no keys",
    ),
    Setting(
        "allow_anonymous", bool, "run.allow_anonymous", "Serve a non-loopback --host without "
        "API keys, and without the warning that this is open to anyone.", _HTTP,
    ),
    Setting(
        "stream_dir", Path, "stream_dir", "Folder whose videos POST /v1/streams may open.",
        "Video", shown_default="no file streams",
    ),
    Setting(
        "stream_allow", str, "stream_allow", "URL prefix (rtsp://, http(s)://) or device a "
        "stream may open (repeat, or comma-separate).", "Video", many=True,
        shown_default="none",
    ),
    Setting("max_streams", int, "max_streams", "Most video streams at once.", "Video"),
    Setting(
        "cors_origin", str, "cors_origins", "Allow browser calls from this origin (repeat, or "
        "comma-separate; '*' for any).", _HTTP, many=True, shown_default="no CORS",
    ),
    Setting(
        "drain_timeout", float, "drain_timeout_s", "Seconds to finish in-flight work on shutdown.",
        _HTTP,
    ),
    Setting("access_log", bool, "access_log", "Log one JSON line per request.", _HTTP),
    Setting(
        "cache", str, "cache", "Result cache: off, memory (an LRU in this process) or "
        "redis://HOST:PORT/DB (shared; if Redis is slow or down, requests answer uncached).",
        _CACHE,
    ),
    Setting(
        "cache_entries", int, "cache_max_entries", "Most answers the memory cache holds.", _CACHE
    ),
    Setting(
        "cache_mb", float, "cache_max_bytes", "Most bytes the memory cache holds.", _CACHE,
        unit=MIB,
    ),
    Setting("cache_ttl", float, "cache_ttl_s", "Seconds a Redis cache entry lives.", _CACHE),
    Setting(
        "reports_dir", Path, "reports_dir", "Folder of `bench http --report` HTML pages that "
        "the web page at / lists.", _HTTP, shown_default="none",
    ),
    Setting("log_level", str, "run.log_level", f"One of {', '.join(LOG_LEVELS)}.", _HTTP),
    Setting(
        "trace", bool, "trace", "OpenTelemetry spans of every request (receive, decode, queue, "
        "inference, respond), children of an incoming W3C traceparent.", "Tracing",
    ),
    Setting(
        "otlp_endpoint", str, "otlp_endpoint", "OTLP/HTTP collector the spans go to (base URL, "
        "/v1/traces is added).", "Tracing", aliases=("OTEL_EXPORTER_OTLP_ENDPOINT",),
        shown_default="http://localhost:4318",
    ),
    Setting(
        "backend", str, "run.backend", "uvicorn: serve from this process; ray: deploy the "
        "repository to a Ray cluster as Ray Serve deployments (the ray extra).", "Ray Serve",
    ),
    Setting(
        "ray_address", str, "run.ray_address", "Ray cluster to deploy to (HOST:PORT).",
        "Ray Serve", shown_default="RAY_ADDRESS, else one on this machine",
    ),
    Setting(
        "min_replicas", int, "run.min_replicas", "Fewest model replicas (autoscaling).",
        "Ray Serve",
    ),
    Setting(
        "max_replicas", int, "run.max_replicas", "Most model replicas (autoscaling).", "Ray Serve"
    ),
    Setting(
        "target_ongoing_requests", float, "run.target_ongoing_requests", "Requests in flight per "
        "replica that autoscaling aims for.", "Ray Serve",
    ),
    Setting(
        "models_per_replica", int, "run.models_per_replica", "Models a replica keeps loaded "
        "(multiplexed; the least recently used is unloaded).", "Ray Serve",
    ),
    Setting(
        "replica_cpus", float, "run.replica_cpus", "CPUs Ray reserves for each model replica.",
        "Ray Serve",
    ),
)  # fmt: skip
BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}


def from_env(
    environ: Mapping[str, str] = os.environ,
    env_file: Path | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The settings given in ``environ`` or ``env_file`` (a .env file, if it exists), by name.

    Only what is set comes back: an empty variable counts as unset, and a missing one leaves
    the field's default in place when the result is built into a config.
    """
    dotenv = _read_env_file(env_file) if env_file is not None else {}
    chosen = SETTINGS if names is None else tuple(BY_NAME[n] for n in names)
    values: dict[str, Any] = {}
    for setting in chosen:
        for source, where in ((environ, ""), (dotenv, f" in {env_file}")):
            env = next((e for e in setting.envs if source.get(e, "").strip()), None)
            if env is not None:
                values[setting.name] = setting.parse(source[env], env + where)
                break
    return values


def resolve(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    env_file: Path | None = Path(".env"),
) -> dict[str, Any]:
    """Settings by name: each flag given (not None), else the environment, else ``env_file``."""
    given = {name: value for name, value in flags.items() if value not in (None, [], ())}
    unknown = sorted(set(given) - set(BY_NAME))
    if unknown:
        raise LookupError(f"no settings named {unknown}")
    values = from_env(environ, env_file)
    values.update(
        (name, tuple(value) if BY_NAME[name].many else value) for name, value in given.items()
    )
    return values


def build(cls: type[_C], values: Mapping[str, Any], part: str, **fields: Any) -> _C:
    """``cls`` from the ``values`` whose setting targets ``part``, plus ``fields``; its own
    defaults for the rest. A value the dataclass rejects becomes a ``ConfigError``."""
    for name, value in values.items():
        setting = BY_NAME[name]
        if setting.part == part:
            fields.setdefault(setting.attribute, setting.to_field(value))
    try:
        return cls(**fields)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def server_config(values: Mapping[str, Any], **fields: Any) -> ServerConfig:
    """The ``ServerConfig`` those settings describe; ``fields`` (e.g. ``repo``) are set as given."""
    for part in ("engine", "batching", "limits"):
        if any(BY_NAME[name].part == part for name in values):
            fields.setdefault(part, build(_owner(part), values, part))
    return build(ServerConfig, values, "", **fields)


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {key: value for key, value in dotenv_values(path).items() if value is not None}


__all__ = [
    "BY_NAME",
    "SETTINGS",
    "RunConfig",
    "ServerConfig",
    "Setting",
    "build",
    "from_env",
    "resolve",
    "server_config",
]
