"""``tinyserve serve``: its options are the settings table (``tinyserve.settings.SETTINGS``).

Each option is made from one ``Setting``: its flag, help panel, environment names and the
default shown in ``--help`` (the default of the config field it fills). Only the flags given
on the command line reach ``serve_config``, which applies the precedence flag > environment
> .env file > default; a test calls it to see what a command line would serve.

Showing those defaults imports the config classes' modules (NumPy with them) when the CLI
starts, about 0.1 s of ``tinyserve --help``; the alternative was writing each default twice.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from tinyserve.errors import ConfigError
from tinyserve.settings import (
    SETTINGS,
    RunConfig,
    ServerConfig,
    Setting,
    build,
    resolve,
    server_config,
)


def serve(context: typer.Context, **params: Any) -> None:
    """Serve every model in REPO, or the one --model, over HTTP with dynamic batching (see /docs).

    Each setting is read from its flag, else its environment variable, else a .env file in
    the working directory, else its default. TINYSERVE_* names win over the other names
    (MODEL_PATH, LABELS_PATH, TOP_K, NUM_THREADS).
    """
    import logging

    from tinyserve.cli.workers import run_server

    given = {n: v for n, v in params.items() if _from_command_line(context, n)}
    config, run = serve_config(given)
    logging.basicConfig(level=run.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    warning = exposure_warning(config, run)
    if warning is not None:
        logging.getLogger("tinyserve").warning(warning)
    if run.backend == "ray":  # Ray Serve deployments on a cluster (the ray extra)
        from tinyserve import ray_serve

        ray_serve.run(config, run)
        return
    status = run_server(config, run)
    if status:
        raise typer.Exit(status)


def serve_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    env_file: Path | None = Path(".env"),
) -> tuple[ServerConfig, RunConfig]:
    """The app's config and how to run it, from ``serve``'s flags, the environment and .env."""
    from tinyserve.sources import is_remote, materialize

    values = resolve(flags, environ, env_file)
    run = build(RunConfig, values, "run")
    repo = materialize(run.repo, run.cache_dir) if is_remote(run.repo) else Path(run.repo)
    config = server_config(values, repo=repo)
    if config.model_path is None and not repo.is_dir():
        raise ConfigError(f"model repository {run.repo} does not exist")
    return config, run


def exposure_warning(config: ServerConfig, run: RunConfig) -> str | None:
    """What to warn of when a server that others can reach takes requests without a key."""
    from tinyserve.bench.client import is_loopback

    if config.api_keys is not None or run.allow_anonymous or is_loopback(run.host):
        return None
    return (
        f"serving {run.host}:{run.port} without API keys: anyone who can reach it can use it. "
        "Pass --api-keys FILE (create keys with 'tinyserve keys create'), or --allow-anonymous "
        "to serve it open on purpose"
    )


def _from_command_line(context: typer.Context, name: str) -> bool:
    # By name: typer has used click's ParameterSource, and now its own copy of it.
    return getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"


def _parameter(setting: Setting) -> inspect.Parameter:
    kind = list[str] if setting.many else setting.kind
    decls = (f"{setting.flag}/--no-{setting.flag[2:]}",) if kind is bool else (setting.flag,)
    default = None if setting.many else setting.default
    option = typer.Option(
        default,
        *decls,
        help=f"{setting.help} \\[env var: {', '.join(setting.envs)}]",
        show_default=setting.shown_default or default is not None,
        rich_help_panel=setting.panel,
    )
    annotation = kind if default is not None else kind | None
    return inspect.Parameter(
        setting.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


# typer reads a command's options from its signature: this one is the settings table.
_CONTEXT = inspect.Parameter(
    "context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
)
serve.__signature__ = inspect.Signature([_CONTEXT, *map(_parameter, SETTINGS)])  # type: ignore[attr-defined]
