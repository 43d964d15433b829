"""requirements.lock satisfies pyproject.toml: `make lock` was run after the last edit."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK_LINES = [
    line
    for line in (ROOT / "requirements.lock").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
LOCKED_EXTRAS = ("dev", "bench")  # what scripts/lock.sh installs


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK_LINES:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"requirements.lock: {line!r} is not NAME==VERSION"
        name = canonicalize_name(match[1])
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = Version(match[2])
    return pins


def required(extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements of tinyserve with ``extras``, its own extras (tinyserve[train]) expanded."""
    found = [Requirement(r) for r in PROJECT["dependencies"]]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in PROJECT["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "tinyserve":
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return [r for r in found if r.marker is None or r.marker.evaluate()]


def test_every_requirement_is_locked_within_its_range() -> None:
    pins = locked()
    for requirement in required(LOCKED_EXTRAS):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is missing from requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement}: run make lock"
        )


def test_the_extras_of_requirements_are_locked_too() -> None:
    # pip check, run by make install, checks what packages require but not their extras
    # (moto[server], tritonclient[http]); their metadata is on this machine.
    pins = locked()
    for requirement in required(LOCKED_EXTRAS):
        for extra in requirement.extras:
            for text in importlib.metadata.requires(requirement.name) or []:
                needed = Requirement(text)
                if needed.marker is not None and needed.marker.evaluate({"extra": extra}):
                    name = canonicalize_name(needed.name)
                    assert name in pins, f"{requirement} needs {needed}: run make lock"


def test_torch_is_the_pinned_cpu_release() -> None:
    # Written without +cpu so that the local CPU wheel and an index serve the same pin.
    assert "torch==2.13.0" in LOCK_LINES
    (train,) = [r for r in required(("train",)) if r.name == "torch"]
    assert str(train.specifier) == "==2.13.0"
