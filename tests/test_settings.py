"""The settings table: one definition per setting, read by the CLI, the environment and Lambda."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from starlette.testclient import TestClient
from typer.testing import CliRunner

from conftest import BUNDLED_MODEL, SAMPLES
from tinyserve.cli import app
from tinyserve.cli import serve as serve_module
from tinyserve.engine import EngineConfig
from tinyserve.errors import ConfigError
from tinyserve.registry import ModelRegistry
from tinyserve.serverless import HandlerConfig
from tinyserve.settings import BY_NAME, SETTINGS, RunConfig, ServerConfig, from_env, resolve

MODEL_FILE = BUNDLED_MODEL / "2" / "model.onnx"
BOOT = (SAMPLES / "0000_ankle-boot.png").read_bytes()
# The flags `tinyserve serve` has always had; scripts, tests and docs use them.
EXISTING_FLAGS = (
    "--repo --cache-dir --host --port --default-model --max-batch-size --max-delay-ms "
    "--max-queue --timeout --inline-ms --threads --spin --decode-threads --max-body-mb "
    "--max-image-mb --max-pixels --admin-token --rate-limit --drain-timeout --access-log "
    "--log-level"
).split()


def serve_help() -> str:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


def config_for(
    *args: str, env: dict[str, str] | None = None, env_file: Path | None = None
) -> tuple[ServerConfig, RunConfig]:
    """What `tinyserve serve ARGS` would serve: the command parses ARGS, stops before
    starting uvicorn, and its flags go through serve_config with ``env`` and ``env_file``."""
    given: dict[str, Any] = {}

    def capture(flags: dict[str, Any]) -> None:
        given.update(flags)
        raise typer.Exit(0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_module, "serve_config", capture)
        result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 0, result.output
    return serve_module.serve_config(given, env or {}, env_file)


def test_each_setting_is_defined_once() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    envs = [e for s in SETTINGS for e in s.envs]
    assert len(envs) == len(set(envs))
    targets = [s.target for s in SETTINGS]
    assert len(targets) == len(set(targets))
    for setting in SETTINGS:
        assert setting.env == "TINYSERVE_" + setting.name.upper()
        setting.default  # noqa: B018 - the target is a real field


def test_serve_help_lists_every_setting_from_the_table() -> None:
    text = re.sub(r"[│\s]+", " ", serve_help())
    for setting in SETTINGS:
        assert setting.flag in text
        for env in setting.envs:
            assert env in text
        if setting.shown_default is None and setting.default is not None:
            shown = setting.default
            if isinstance(shown, bool):
                shown = setting.flag[2:] if shown else f"no-{setting.flag[2:]}"
            assert f"[default: {shown}]" in text, setting.name
    for flag in EXISTING_FLAGS:
        assert f" {flag} " in text
    # A few pinned by value, so a wrong table cannot pass by agreeing with itself.
    assert "--max-batch-size <int> Most images per inference batch." in text
    assert "[env var: TINYSERVE_MAX_BATCH_SIZE] [default: 32]" in text
    assert "[env var: TINYSERVE_THREADS, NUM_THREADS] [default: 0]" in text
    assert "[env var: TINYSERVE_TOP_K, TOP_K] [default: 5]" in text
    assert "[env var: TINYSERVE_MODEL, MODEL_PATH]" in text
    assert "[env var: TINYSERVE_LABELS, LABELS_PATH]" in text
    assert "[default: no-spin]" in text
    assert "At least 8 characters." in text
    assert "--cors-origin" in text and "--top-k" in text and "--model" in text


def test_library_and_command_line_defaults_agree(tmp_path: Path) -> None:
    config, run = config_for("--repo", str(tmp_path))
    assert config == dataclasses.replace(ServerConfig(), repo=tmp_path)
    assert config.engine.spin is False and EngineConfig().spin is False
    assert run == RunConfig(repo=str(tmp_path))
    assert (run.host, run.port, run.log_level) == ("127.0.0.1", 8000, "info")
    assert BY_NAME["max_batch_size"].default == config.batching.max_batch_size == 32
    assert BY_NAME["max_body_mb"].default == 64


def test_flags_fill_the_config(tmp_path: Path) -> None:
    config, run = config_for(
        "--repo", str(tmp_path), "--max-batch-size", "8", "--max-image-mb", "1.5",
        "--threads", "3", "--spin", "--cors-origin", "https://a.example",
        "--cors-origin", "https://b.example,https://c.example", "--top-k", "2", "--port", "9001",
    )  # fmt: skip
    assert config.batching.max_batch_size == 8
    assert config.limits.max_bytes == int(1.5 * 1024 * 1024)
    assert (config.engine.intra_op_threads, config.engine.spin) == (3, True)
    assert config.cors_origins == ("https://a.example", "https://b.example", "https://c.example")
    assert (config.default_top_k, run.port) == (2, 9001)


def test_precedence_flag_then_environment_then_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("TINYSERVE_MAX_QUEUE=7\nTINYSERVE_PORT=7000\nTINYSERVE_TIMEOUT=3\n")
    env = {"TINYSERVE_PORT": "8100", "TINYSERVE_TIMEOUT": "4"}
    config, run = config_for("--repo", str(tmp_path), "--timeout", "5", env=env, env_file=env_file)
    assert config.batching.timeout_s == 5  # flag over environment and .env
    assert run.port == 8100  # environment over .env
    assert config.batching.max_queue == 7  # .env over the default
    assert config.batching.max_batch_size == 32  # the default
    assert (
        config_for("--repo", str(tmp_path), env_file=tmp_path / "absent")[0]
        == config_for("--repo", str(tmp_path))[0]
    )


def test_seed_aliases_and_tinyserve_names_win(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    seed = {
        "MODEL_PATH": str(MODEL_FILE),
        "LABELS_PATH": str(labels),
        "TOP_K": "2",
        "NUM_THREADS": "3",
    }
    config, _ = config_for(env=seed)
    assert (config.model_path, config.labels_path) == (MODEL_FILE, labels)
    assert (config.default_top_k, config.engine.intra_op_threads) == (2, 3)
    both = {**seed, "TINYSERVE_TOP_K": "4", "TINYSERVE_THREADS": "1"}
    config, _ = config_for(env=both)
    assert (config.default_top_k, config.engine.intra_op_threads) == (4, 1)
    # A source's precedence comes first: the environment's alias beats the .env file's name.
    env_file = tmp_path / ".env"
    env_file.write_text("TINYSERVE_TOP_K=4\nNUM_THREADS=2\n")
    values = resolve({}, {"TOP_K": "3"}, env_file)
    assert values == {"top_k": 3, "threads": 2}


def test_env_values_are_checked_and_name_their_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NUM_THREADS must be a number"):
        from_env({"NUM_THREADS": "many"})
    with pytest.raises(ConfigError, match="TINYSERVE_SPIN must be true or false"):
        from_env({"TINYSERVE_SPIN": "maybe"})
    env_file = tmp_path / ".env"
    env_file.write_text("TINYSERVE_PORT=http\n")
    with pytest.raises(ConfigError, match=r"TINYSERVE_PORT in .*\.env must be a number"):
        from_env({}, env_file)
    assert from_env({"TINYSERVE_SPIN": "yes", "TINYSERVE_ADMIN_TOKEN": ""}) == {"spin": True}
    with pytest.raises(ConfigError, match="at least 8 characters"):
        config_for("--repo", str(tmp_path), "--admin-token", "short")
    with pytest.raises(ConfigError, match="does not exist"):
        config_for("--repo", str(tmp_path / "absent"))


def test_handler_config_reads_the_same_settings() -> None:
    base = {"TINYSERVE_MODEL_URI": "s3://b/p"}
    handler, server = HandlerConfig.from_env(base), ServerConfig()
    assert handler.default_top_k == server.default_top_k
    assert handler.threads == server.engine.intra_op_threads
    assert handler.limits == server.limits
    seed = HandlerConfig.from_env({**base, "TOP_K": "3", "NUM_THREADS": "2"})
    assert (seed.default_top_k, seed.threads) == (3, 2)
    env = {**base, "TINYSERVE_MAX_IMAGE_MB": "2", "TINYSERVE_MAX_PIXELS": "1000"}
    limits = HandlerConfig.from_env(env).limits
    assert (limits.max_bytes, limits.max_pixels) == (2 * 1024 * 1024, 1000)
    assert (
        HandlerConfig.from_env(env).limits
        == config_for("--repo", str(BUNDLED_MODEL.parent), env=env)[0].limits
    )


def relabel(tmp_path: Path, count: int = 10) -> Path:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"class {i}" for i in range(count)]))
    return labels


def test_model_path_and_labels_path_serve_one_relabelled_model(tmp_path: Path) -> None:
    from tinyserve.app import create_app

    env = {"MODEL_PATH": str(MODEL_FILE), "LABELS_PATH": str(relabel(tmp_path)), "TOP_K": "2"}
    config, _ = config_for("--repo", str(tmp_path / "not-used"), env=env)
    with TestClient(create_app(config)) as client:
        response = client.post("/predict", content=BOOT, headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"]) == ("fashion-cnn", 2)
        assert body["label"] == "class 9"  # ankle boot is class 9 of Fashion-MNIST
        assert len(body["predictions"]) == 2
        names = [m["name"] for m in client.get("/v1/models").json()["models"]]
        assert names == ["fashion-cnn"]


def test_registry_serves_one_file_and_checks_the_labels(tmp_path: Path) -> None:
    loose = tmp_path / "shoes.onnx"
    loose.symlink_to(MODEL_FILE)

    async def served(model: Path, labels: Path) -> tuple[list[str], tuple[str, ...], str]:
        registry = ModelRegistry(tmp_path, model_path=model, labels_path=labels)
        await registry.load_all()
        try:
            if registry.errors:
                return registry.names, (), next(iter(registry.errors.values()))
            loaded = registry.get()
            return registry.names, loaded.manifest.labels, f"v{loaded.version}"
        finally:
            await registry.close(0)

    names, labels, version = asyncio.run(served(loose, relabel(tmp_path)))
    assert (names, labels[9], version) == (["shoes"], "class 9", "v1")
    _, _, error = asyncio.run(served(MODEL_FILE, relabel(tmp_path, 3)))
    assert "has 3 class names but" in error and "10 classes" in error
