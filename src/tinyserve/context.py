"""What every front door of a server shares: models, metrics, decode pool, limits, admission.

One ``ServingContext`` per app. The REST and V2 handlers receive it with each request; its
lifecycle (``start``/``close``) runs in the app's lifespan. ``ServedRunner`` is how
``classify`` reaches a loaded version: decoding inline or in the pool, inference through the
version's batcher.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import io
import logging
import signal
import time
from collections import OrderedDict, defaultdict
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from tinyserve import tracing
from tinyserve.asgi import Call, read_body
from tinyserve.auth import KeyRing
from tinyserve.batcher import Ticket
from tinyserve.cache import ResultCache, open_cache
from tinyserve.classify import Inferred
from tinyserve.errors import (
    ConfigError,
    InputError,
    ModelNotReady,
    RateLimited,
    TinyServeError,
    Unauthorized,
)
from tinyserve.http_errors import ErrorReply, Shape, as_error, error_reply
from tinyserve.imaging import Decoded, Pixels, decode_upload
from tinyserve.manifest import InputSpec
from tinyserve.metrics import Metrics, ProductionMetrics
from tinyserve.peers import Answer, Peers
from tinyserve.registry import LoadedModel, ModelRegistry
from tinyserve.requests import Version, top_k_param
from tinyserve.rollout import Rollout
from tinyserve.settings import ServerConfig

__all__ = ["ServedRunner", "ServingContext", "warm_decoders"]

log = logging.getLogger("tinyserve")

# Clients remembered by the per-IP rate limit; the least recently seen is forgotten first
# (it comes back with a full bucket, which is what a long-idle client would have anyway).
MAX_RATE_CLIENTS = 10_000
# How often each worker of a --workers N server writes its queue depth for the scrapes.
QUEUE_DEPTH_PERIOD_S = 0.5
_T = TypeVar("_T")


class ServingContext:
    """The registry, metrics, decode pool and limits behind every route of one server."""

    def __init__(self, config: ServerConfig, peers: Peers | None = None) -> None:
        self.config = config
        self.peers = peers  # the other workers of a --workers N server, else None
        self.metrics = Metrics()
        self.registry = ModelRegistry(
            config.repo,
            config.engine,
            config.batching,
            self.metrics,
            config.default_model,
            model_path=config.model_path,
            labels_path=config.labels_path,
        )
        self.decode_pool: ThreadPoolExecutor | None = None
        # The production layer (cache, rollouts, fallbacks, deadlines): each off by default,
        # and the default path checks no more than that they are off.
        self.production = ProductionMetrics(self.metrics.registry)
        self.cache: ResultCache | None = open_cache(
            config.cache, config.cache_max_entries, config.cache_max_bytes, config.cache_ttl_s
        )
        self.clock = time.monotonic  # the rollouts' clock; tests replace it
        self._rollouts: dict[str, Rollout] = {}
        self.cache_errors = 0  # the cache's errors already counted in the metrics
        self.shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow_counts: defaultdict[str, dict[str, int]] = defaultdict(dict)
        # API keys, when a key file is given: None keeps the hot path to one attribute check.
        self.keys = KeyRing(config.api_keys) if config.api_keys is not None else None
        if self.keys is not None:
            self.metrics.watch_keys(self.keys.usage)
            log.info("API keys: %d live in %s", len(self.keys), config.api_keys)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sighup = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the decode pool, load and warm every model, and reload them on SIGHUP."""
        self.decode_pool = ThreadPoolExecutor(
            self.config.decode_threads, thread_name_prefix="decode"
        )
        if self.config.trace:  # OpenTelemetry is imported only then
            tracing.enable(self.config.otlp_endpoint)
        loop = asyncio.get_running_loop()
        # Pillow's warm-up and the models' loading (mostly outside the GIL) overlap.
        await asyncio.gather(
            loop.run_in_executor(self.decode_pool, warm_decoders), self.registry.load_all()
        )
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            pass  # not the main thread (tests), or no SIGHUP on this platform
        # What start-up made (modules, sessions, routes) lives as long as the server: moved out
        # of the collector's reach, it is no longer walked by every full collection, whose
        # pauses otherwise set the tail latency under load (p99 at c=64 ~40 -> ~55 ms).
        gc.freeze()
        if self.peers is not None:
            # Each worker's queue depth is a gauge in its own file, which a scrape answered
            # by a sibling reads: keep it current here rather than only when scraped.
            self._spawn(self._publish_queue_depths())
        log.info("ready: %s", ", ".join(self.registry.names) or "no models")

    async def close(self) -> None:
        """Stop reloading, drain every batcher (up to the drain timeout), stop the pool."""
        gc.unfreeze()  # what start-up froze may be garbage now
        if self.config.trace:
            tracing.disable()
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.registry.close(self.config.drain_timeout_s)
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
        for task in [*self._tasks, *self.shadow_tasks]:
            task.cancel()
        if self.cache is not None:
            await self.cache.close()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading models")
        if self.keys is not None:
            try:
                self.reload_keys()
            except TinyServeError as exc:
                log.error("API keys not reloaded, the previous ones stay: %s", exc.message)
        self._spawn(self.registry.reload_all()).add_done_callback(_log_reload)

    def _spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # a task nobody references may be collected before it ends
        task.add_done_callback(self._tasks.discard)
        return task

    def publish_queue_depths(self) -> None:
        """Set ``tinyserve_queue_depth`` from the batchers: requests waiting or in inference."""
        registry = self.registry
        for name in registry.names:
            depth = sum(m.batcher.depth for m in registry.versions(name))
            self.metrics.queue_depth.labels(name).set(depth)

    async def _publish_queue_depths(self) -> None:
        while True:
            self.publish_queue_depths()
            await asyncio.sleep(QUEUE_DEPTH_PERIOD_S)

    async def on_siblings(self, call: Call) -> list[Answer]:
        """Make ``call`` again on every other worker (a reload must reach the whole server);
        nothing when there are none, or when ``call`` itself came from a sibling."""
        peers = self.peers
        if peers is None or peers.is_forwarded(call.headers):
            return []
        query = call.scope.get("query_string", b"").decode("latin-1")
        target = call.path + (f"?{query}" if query else "")
        return await peers.forward(call.method, target, call.headers)

    # -- what a request needs -------------------------------------------------------------

    async def read_body(self, call: Call) -> bytes:
        """The request body, refused (413) over the configured limit."""
        return await read_body(
            call.receive, call.headers.get("content-length"), self.config.max_body_bytes
        )

    def model(self, name: str | None, version: Version, call: Call | None = None) -> LoadedModel:
        """The served version asked for: a number, ``latest``, or None for the default, which
        a model's rollout (traffic split, canary) may choose for ``call``."""
        if version == "latest":
            return self.registry.versions(name or self.registry.default_name)[-1]
        if version is None and call is not None and self.registry.with_rollouts:
            rollout = self.rollout(name or self.registry.default_name)
            if rollout is not None:
                version = rollout.choose(sticky_value(call, rollout.config.sticky))
        return self.registry.get(name, version)

    def rollout(self, name: str) -> Rollout | None:
        """The live rollout of ``name``, rebuilt when its config.toml changes on reload."""
        found = self.registry.rollout(name)
        if found is None:
            self._rollouts.pop(name, None)
            return None
        config, default = found
        current = self._rollouts.get(name)
        if current is None or current.config != config:
            current = Rollout(name, config, default, self.production, self.clock)
            self._rollouts[name] = current
        return current

    async def admit(self, model: LoadedModel) -> tuple[LoadedModel, Ticket]:
        """A place in ``model``'s queue for one request (``Batcher.admit``), taken before its
        body is read; during a reload, in the queue of the version that replaces it."""
        while True:
            try:
                return model, await model.batcher.admit()
            except ModelNotReady:
                live = model.live()
                if live is model:
                    raise
                model = live

    def runner(self, model: LoadedModel) -> ServedRunner:
        return ServedRunner(self, model)

    def top_k(self, query: str | None, body: int | None, num_classes: int) -> int:
        """``top_k`` from the query string, else the body, else the server's default."""
        return top_k_param(query, body, self.config.default_top_k, num_classes)

    async def decode(self, data: bytes, spec: InputSpec) -> Decoded:
        limits = self.config.limits
        if len(data) <= self.config.inline_decode_bytes or self.decode_pool is None:
            # A small image decodes faster than a hop to a thread and back.
            return decode_upload(data, spec, limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, decode_upload, data, spec, limits)

    # -- admission ------------------------------------------------------------------------

    def check_rate(self, client: str | None) -> None:
        """A token bucket per client address, of one second's worth of requests."""
        rate = self.config.rate_limit
        if rate <= 0:
            return
        client = client or "-"
        now = time.monotonic()
        buckets = self._buckets
        tokens, last = buckets.pop(client, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1:
            buckets[client] = (tokens, now)
            raise RateLimited(
                f"more than {rate:g} requests per second from {client}; slow down",
                retry_after=(1 - tokens) / rate,
            )
        buckets[client] = (tokens - 1, now)
        if len(buckets) > MAX_RATE_CLIENTS:
            buckets.popitem(last=False)

    def reload_keys(self) -> int:
        """Re-read the API key file: revoked and removed keys stop working now."""
        if self.keys is None:
            raise ConfigError("API keys are off: start the server with --api-keys FILE")
        count = self.keys.reload()
        log.info("API keys reloaded: %d live in %s", count, self.keys.path)
        return count

    def check_key(self, headers: Mapping[str, str], scope: str) -> None:
        """Admit a request whose API key has ``scope``, within its rate limit and quota."""
        assert self.keys is not None
        self.keys.admit(headers.get("authorization"), headers.get("x-api-key"), scope)

    def check_admin(self, headers: Mapping[str, str]) -> None:
        """The admin token, or (when keys are on) an API key with the ``admin`` scope."""
        token = self.config.admin_token
        authorization = headers.get("authorization")
        if self.keys is not None and not (token and _is_bearer(authorization, token)):
            self.check_key(headers, "admin")
            return
        if token is None:
            raise Unauthorized(
                "admin calls are off: start the server with --admin-token "
                "(or TINYSERVE_ADMIN_TOKEN) and send 'Authorization: Bearer <admin token>'"
            )
        if not _is_bearer(authorization, token):
            raise Unauthorized("admin calls need 'Authorization: Bearer <admin token>'")

    def fail(self, exc: BaseException, route: str, shape: Shape = "rest") -> ErrorReply:
        """The answer to ``exc`` on ``route``; a bug is logged with its traceback."""
        error = as_error(exc)
        if error is not exc:
            log.error("unhandled error on %s", route, exc_info=exc)
        self.metrics.count_error(route, error.code)
        return error_reply(error, shape)


class ServedRunner:
    """``classify``'s way to a loaded version: its decoder settings and its batcher.

    After ``infer``, ``model`` is the version that ran: a reload may have put a successor in
    the place of the one the request looked up.
    """

    __slots__ = ("context", "model", "name", "ticket", "timeout_s", "version")

    def __init__(
        self,
        context: ServingContext,
        model: LoadedModel,
        timeout_s: float | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        self.context = context
        self.model = model
        self.name = model.name
        self.version = model.version
        self.timeout_s = timeout_s  # what is left of the request's deadline
        self.ticket = ticket  # the request's admission, given back as its images queue

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def labels(self) -> Sequence[str]:
        return self.model.manifest.labels

    async def decode_all(self, images: Sequence[bytes]) -> list[Decoded | InputError]:
        spec = self.model.manifest.input
        if len(images) == 1:
            try:
                return [await self.context.decode(images[0], spec)]
            except InputError as exc:
                return [exc]
        results = await asyncio.gather(
            *(self.context.decode(data, spec) for data in images), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, InputError):
                raise result
        return results  # type: ignore[return-value]

    async def infer(self, rows: list[Pixels]) -> Inferred:
        # live() just before submitting, with no await in between: see LoadedModel.live.
        model = self.model = self.model.live()
        self.version = model.version
        if len(rows) == 1:
            ticket, self.ticket = self.ticket, None
            row, timing = await model.infer_one(rows[0], self.timeout_s, ticket)
            return Inferred(row[None, :], (timing.queue,), (timing.inference,), timing.inference,
                            model.version, model.manifest.labels)  # fmt: skip
        ticket, self.ticket = self.ticket, None
        outputs = await model.infer_many(rows, self.timeout_s, ticket)
        timings = [t for _, t in outputs]
        return Inferred(
            np.stack([row for row, _ in outputs]),
            [t.queue for t in timings],
            [t.inference for t in timings],
            sum({t.batch_id: t.inference for t in timings}.values()),
            model.version,
            model.manifest.labels,
        )


def sticky_value(call: Call, header: str | None) -> str | None:
    """What keeps one user on one version: the configured header, else the API key."""
    headers = call.headers
    if header is not None:
        return headers.get(header)
    key = headers.get("x-api-key")
    if key is None:
        scheme, _, key = headers.get("authorization", "").partition(" ")
    return key or None


def warm_decoders() -> None:
    """Load the common formats' Pillow plugins and run the decoders once, before the first
    request rather than during it."""
    # Not Image.init(), which imports every plugin (~40). TIFF and MPO are left to the first
    # such upload (Pillow finds them then): the TIFF plugin pulls in fractions and decimal,
    # a tenth of a second of start-up on a slow core.
    from PIL import (  # noqa: F401
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        WebPImagePlugin,
    )

    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, fmt)
        decode_upload(buffer.getvalue(), InputSpec(4, 4, 3, "RGB"))


def _is_bearer(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def _log_reload(task: asyncio.Task[dict[str, str | None]]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("reload failed: %s", exc)
        return
    for name, error in task.result().items():
        if error:
            log.error("reload of %s failed, previous version kept: %s", name, error)
        else:
            log.info("reloaded %s", name)
