"""The deployment files parse and name things that exist (no Docker engine runs here)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from conftest import ROOT

DEPLOY = ROOT / "deploy"
KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` pairs, with continuation lines joined and comments dropped."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword, args.strip()))
    return result


def check_common(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    assert steps[0][0] == "FROM"
    assert {k for k, _ in steps} <= KEYWORDS, {k for k, _ in steps} - KEYWORDS
    ignored = (dockerfile.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for keyword, args in steps:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignored, f"{source} is excluded from the build context"
        if keyword == "RUN" and "pip install" in args:
            target = re.search(r'"?([^"\s]*)\[(\w+)\]"?', args)
            assert target is not None, args
            assert target.group(2) in PYPROJECT["project"]["optional-dependencies"]
            assert "install --no-cache-dir" in args
    return steps


def test_lambda_dockerfile() -> None:
    steps = check_common(DEPLOY / "lambda" / "Dockerfile")
    assert steps[0] == ("FROM", "public.ecr.aws/lambda/python:3.11")
    (cmd,) = [json.loads(args) for k, args in steps if k == "CMD"]
    module, _, name = cmd[0].rpartition(".")
    assert cmd == ["tinyserve.serverless.handler"]
    assert callable(getattr(importlib.import_module(module), name))
    assert any(k == "RUN" and '"/tmp/build[s3]"' in a for k, a in steps)


def test_server_dockerfile() -> None:
    steps = check_common(DEPLOY / "docker" / "Dockerfile")
    stages = [args for k, args in steps if k == "FROM"]
    assert len(stages) == 2 and all(s.startswith("python:3.11-slim") for s in stages)
    users = [args for k, args in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    (health,) = [args for k, args in steps if k == "HEALTHCHECK"]
    assert "/health/ready" in health and " CMD " in f" {health} "
    (cmd,) = [json.loads(args) for k, args in steps if k == "CMD"]
    assert cmd[:4] == ["tinyserve", "serve", "--host", "0.0.0.0"]
    script = PYPROJECT["project"]["scripts"]["tinyserve"]
    module, _, name = script.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    help_text = subprocess.run(
        [sys.executable, "-m", "tinyserve", "serve", "--help"],
        capture_output=True, text=True, check=True, env={"COLUMNS": "200", "PATH": ""},
    ).stdout  # fmt: skip
    for option in (a for a in cmd if a.startswith("--")):
        assert option in help_text, option
    envs = " ".join(args for k, args in steps if k == "ENV")
    assert "TINYSERVE_REPO=/models" in envs and "TINYSERVE_CACHE_DIR" in envs
    assert "TINYSERVE_REPO" in help_text and "TINYSERVE_CACHE_DIR" in help_text
    # the health check is one exec-form command that python can at least compile
    probe = json.loads(health.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "healthcheck", "exec")


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    service = compose["services"]["tinyserve"]
    context = (DEPLOY / "docker" / service["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / service["build"]["dockerfile"]).is_file()
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])
    for volume in service["volumes"]:
        assert (DEPLOY / "docker" / volume.split(":")[0]).resolve().is_dir()
    env = dict(item.partition("=")[::2] for item in service["environment"])
    assert env["TINYSERVE_REPO"] == "${TINYSERVE_REPO:-/models}"
    assert "/tmp" in service["tmpfs"] and service["read_only"] is True
