"""What the alert and dashboard tests share: metric names, and running promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

METRICS_SOURCE = ROOT / "src" / "tinyserve" / "metrics.py"
NAME = re.compile(r"\b((?:tinyserve|process|python)_[a-z_]+)\b")
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")
# Built into Prometheus or prometheus_client's collectors rather than declared in metrics.py
BUILTIN = {"up", "process_resident_memory_bytes", "process_virtual_memory_bytes",
           "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
           "process_start_time_seconds", "python_gc_collections_total",
           "python_gc_objects_collected_total", "python_gc_objects_uncollectable_total",
           "python_info"}  # fmt: skip


def declared_series() -> set[str]:
    """Every series name tinyserve's collectors can expose (each family with its suffixes)."""
    families = set(re.findall(r'"(tinyserve_[a-z_]+)"', METRICS_SOURCE.read_text()))
    return {f + s for f in families for s in SUFFIXES} | BUILTIN


def referenced(expressions: Iterable[str]) -> set[str]:
    return {m for e in expressions for m in NAME.findall(e)}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (make data installs the prometheus package)")
    return path


def check_promql(expressions: dict[str, str], folder: Path) -> None:
    """Fail unless promtool parses every expression (as recording rules)."""
    rules = [{"record": f"check:{name}", "expr": expr} for name, expr in expressions.items()]
    path = folder / "check.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    run = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
