"""Ray Serve deployments of a repository: ``tinyserve serve --backend ray``.

    HTTP -> Ray's proxy -> ingress (picks the model) -> models (autoscaled replicas)
                                                         └ one tinyserve app per loaded model

The ``models`` deployment multiplexes the repository (``serve.multiplexed``): a replica loads
a model the first time a request names it, keeps at most ``models_per_replica`` and unloads the
least recently used, and Ray routes a model's requests to the replicas that have it, so a
hundred models do not each need a resident replica. What a replica holds for a model is
tinyserve's own app (``create_app``) over that model's folder: the same Guard, handlers,
``classify``, registry, engine and batcher as ``tinyserve serve``. The ingress forwards each
HTTP request to it unchanged and sends back its status, headers and body, so every REST and V2
route answers exactly as it does there. Routes about no model (health, metrics, docs, the
model list) are answered by the default model's app, and so describe that model.

A request whose replica dies under it (a crash, a node lost, a scale-down) is sent again,
``RETRIES`` times: predictions have no side effects. A new state of the repository (a version
added) is deployed by running ``build_app`` (or the CLI) again: only the deployments' user
config changes, so the replicas stay up and hot-reload the models they hold (the registry's
swap: load beside, warm, swap, drain), without a request failing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyserve.app import App, create_app
from tinyserve.errors import ModelNotFound, ModelNotReady
from tinyserve.http_errors import error_reply
from tinyserve.repository import discover, model_name
from tinyserve.settings import RunConfig, ServerConfig

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["RETRIES", "Answer", "Forwarded", "build_app", "model_for", "run"]

log = logging.getLogger("tinyserve")

APP_NAME = "tinyserve"
RETRIES = 2  # sends again of a request whose replica died under it
REPLICA_HEADER = b"x-tinyserve-replica"  # which replica answered: "<replica id>@<node id>"
# The routes of the default model; with several models and none named, they answer 404.
_DEFAULT_MODEL_ROUTES = frozenset(
    ("/predict", "/predict/batch", "/infer", "/infer/batch", "/model/info", "/admin/reload")
)
_MODEL_IN_PATH = re.compile(r"/(?:v1/models|v2/models|admin/models|v2/repository/models)/([^/]+)")


@dataclass(frozen=True, slots=True)
class Forwarded:
    """An HTTP request as the ingress hands it to a model replica."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The replica's app's answer: status, headers, body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def model_for(path: str, names: list[str], default: str | None) -> str | None:
    """The model whose replica answers ``path``: the one it names, else the default model."""
    match = _MODEL_IN_PATH.match(path)
    if match is not None and match.group(1) in names:
        return match.group(1)
    return default if default is not None else (names[0] if names else None)


async def run_asgi(app: App, request: Forwarded) -> Answer:
    """``request`` through ``app``, in this process, as an ASGI server would run it."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path,
        "raw_path": request.path.encode(), "query_string": request.query, "root_path": "",
        "headers": request.headers, "client": request.client, "server": None,
    }  # fmt: skip
    answered = asyncio.Event()
    status, headers, chunks = 500, [], []
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await answered.wait()  # the client is there until the answer has left
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    await app(scope, receive, send)  # type: ignore[arg-type]
    answered.set()
    return Answer(status, headers, b"".join(chunks))


def repository_state(config: ServerConfig) -> dict[str, Any]:
    """The models on disk and a digest of their files: a new digest is a model update."""
    folders = _folders(config)
    digest = hashlib.sha256()
    for name, folder in sorted(folders.items()):
        files = [folder] if folder.is_file() else sorted(folder.glob("*/model.*"))
        files += sorted(folder.glob("config.toml")) if folder.is_dir() else []
        for path in files:
            stat = path.stat()
            digest.update(f"{name}:{path.relative_to(folder.parent)}:{stat.st_size}:"
                          f"{stat.st_mtime_ns}\n".encode())  # fmt: skip
    return {"models": sorted(folders), "digest": digest.hexdigest()}


def _folders(config: ServerConfig) -> dict[str, Path]:
    if config.model_path is not None:
        return {model_name(config.model_path): config.model_path}
    return discover(config.repo)


def model_config(config: ServerConfig, name: str) -> ServerConfig:
    """The config of the app serving model ``name`` alone."""
    if config.model_path is not None:
        return config
    labels = config.labels_path if name == config.default_model else None
    return replace(config, model_path=config.repo / name, default_model=None, labels_path=labels)


class _Loaded:
    """One model's app in a replica; Ray calls ``__del__`` when it unloads the model."""

    def __init__(self, app: App, loop: asyncio.AbstractEventLoop) -> None:
        self.app: App | None = app
        self.loop = loop

    def __del__(self) -> None:
        app, self.app = self.app, None
        # Ray runs this in a thread while the replica's loop runs: close the app there.
        if app is not None and self.loop.is_running() and not _in_loop(self.loop):
            future = asyncio.run_coroutine_threadsafe(app.context.close(), self.loop)
            future.result(timeout=app.context.config.drain_timeout_s + 5)


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class ModelReplica:
    """A replica of the ``models`` deployment: tinyserve apps for the models it has loaded."""

    def __init__(self, config: ServerConfig, models_per_replica: int) -> None:
        import ray
        from ray import serve

        self.config = config
        self.apps: dict[str, App] = {}

        async def load(name: str) -> _Loaded:  # a function: Ray keeps its cache on it
            return await self._load(name)

        self.load = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.where = f"{replica}@{ray.get_runtime_context().get_node_id()}".encode()

    async def _load(self, name: str) -> _Loaded:
        app = create_app(model_config(self.config, name))
        await app.context.start()
        self.apps[name] = app
        return _Loaded(app, asyncio.get_running_loop())

    async def reconfigure(self, state: dict[str, Any]) -> None:
        """Ray calls this at start and with each new repository state: the first time, load
        the default model (so every replica can take its requests at once, rather than
        the first one that loaded it); later, reload the models held (a hot swap each)."""
        if not self.apps:
            names = state["models"]
            default = self.config.default_model or (names[0] if len(names) == 1 else None)
            if default is not None:
                await self.load(default)
            return
        for name, app in list(self.apps.items()):
            if app.context.registry.ready:  # closed apps have an empty registry
                errors = await app.context.registry.reload_all()
                log.info("reloaded %s: %s", name, errors)

    async def __call__(self, request: Forwarded) -> Answer:
        from ray import serve

        loaded = await self.load(serve.get_multiplexed_model_id())
        assert loaded.app is not None
        answer = await run_asgi(loaded.app, request)
        answer.headers.append((REPLICA_HEADER, self.where))
        return answer


class Ingress:
    """The HTTP entry: sends each request to a replica holding its model, and its answer back."""

    def __init__(self, models: DeploymentHandle[Any], config: ServerConfig) -> None:
        self.models = models
        self.config = config
        self.names: list[str] = []
        self.default: str | None = config.default_model

    def reconfigure(self, state: dict[str, Any]) -> None:
        self.names = list(state["models"])
        if self.config.default_model is None:
            self.default = self.names[0] if len(self.names) == 1 else None

    async def __call__(self, request: Request) -> Response:
        from ray.exceptions import RayActorError
        from starlette.responses import Response

        path = request.url.path
        model = model_for(path, self.names, self.default)
        if model is None or (self.default is None and path in _DEFAULT_MODEL_ROUTES):
            answer = self._no_default()
        else:
            client = request.client
            forwarded = Forwarded(
                request.method, path, request.url.query.encode(), list(request.headers.raw),
                await request.body(), (client.host, client.port) if client else None,
            )  # fmt: skip
            handle = self.models.options(multiplexed_model_id=model)
            for attempt in range(RETRIES + 1):
                try:
                    answer = await handle.remote(forwarded)
                    break
                except RayActorError as exc:  # the replica died under the request
                    log.warning("replica lost (%s); attempt %d of %d", exc, attempt + 1,
                                RETRIES + 1)  # fmt: skip
                    if attempt == RETRIES:
                        answer = _answer(ModelNotReady(f"no replica of {model} answered; retry"))
        response = Response(answer.body, answer.status)
        response.raw_headers = [*answer.headers, (b"content-length", b"%d" % len(answer.body))]
        return response

    def _no_default(self) -> Answer:
        if not self.names:
            return _answer(ModelNotReady("no model is loaded"))
        return _answer(ModelNotFound(
            f"several models are served ({', '.join(self.names)}); name one in the path "
            "(/v1/models/NAME/predict) or start the server with --default-model"
        ))  # fmt: skip


def _answer(exc: Exception) -> Answer:
    error = error_reply(exc)
    headers = [(b"content-type", b"application/json"), *error.headers]
    return Answer(error.status, headers, error.body)


def build_app(
    repo: Path | str = "models",
    config: ServerConfig | None = None,
    run: RunConfig | None = None,
    autoscaling: Mapping[str, Any] | None = None,
) -> Application:
    """The Ray Serve application of ``repo``: the ingress over the autoscaled models.

    ``autoscaling`` adds to (or overrides) Ray's autoscaling config, e.g. ``upscale_delay_s``.
    """
    from ray import serve

    config = replace(config or ServerConfig(), repo=Path(repo))
    run = run or RunConfig()
    state = repository_state(config)
    models = serve.deployment(
        name="models",
        autoscaling_config={
            "min_replicas": run.min_replicas,
            "max_replicas": run.max_replicas,
            "target_ongoing_requests": run.target_ongoing_requests,
            **(autoscaling or {}),
        },
        # Enough in flight per replica for its batcher to fill two batches.
        max_ongoing_requests=2 * config.batching.max_batch_size,
        ray_actor_options={"num_cpus": run.replica_cpus},
        user_config=state,
    )(ModelReplica)
    ingress = serve.deployment(
        name="ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
        user_config=state,
    )(Ingress)
    return ingress.bind(models.bind(config, run.models_per_replica), config)


def run(config: ServerConfig, settings: RunConfig) -> None:
    """Deploy to the cluster at ``settings.ray_address`` (or RAY_ADDRESS, or a new local one)
    and serve on ``settings.host:port`` until interrupted; then delete the application."""
    import ray
    from ray import serve

    ray.init(address=settings.ray_address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(config.repo, config, settings), name=APP_NAME, route_prefix="/")
    log.info("serving on http://%s:%d (Ray Serve)", settings.host, settings.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
    ray.shutdown()
