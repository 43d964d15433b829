"""The layer table of docs/architecture.md is the law: every module is in it once, imports only
from lower layers, and no serving module ever imports torch or the training package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "tinyserve"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Outside the table: the package root (``__version__`` and lazy names), ``python -m``, and
# the empty ``__init__`` of the sub-packages.
EXEMPT = {
    "tinyserve",
    "tinyserve.__main__",
    "tinyserve.bench",
    "tinyserve.runtimes",
    "tinyserve.training",
}


def read_table() -> dict[str, tuple[int, str]]:
    """Module -> (layer, "serving" or "torch"), from the table under '## Layers'."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Layers") :]
    section = section[: section.index("\n## ", 1)]
    table: dict[str, tuple[int, str]] = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*L(\d+)\s*\|(.*)\|(.*)\|\s*$", line)
        if match is None:
            continue
        for side, cell in (("serving", match.group(2)), ("torch", match.group(3))):
            # Each comma-separated entry starts with the module; what is in brackets explains.
            for name in re.findall(r"(?:^|,)\s*`([\w.]+)`", re.sub(r"\([^)]*\)", "", cell)):
                module = f"tinyserve.{name}"
                assert module not in table, f"{module} is listed twice"
                table[module] = (int(match.group(1)), side)
    return table


TABLE = read_table()
SERVING_MODULES = sorted(m for m, (_, side) in TABLE.items() if side == "serving")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def runtime_imports(module: str) -> dict[str, bool]:
    """The tinyserve modules ``module`` imports when it runs (not under TYPE_CHECKING), each
    with whether every such import is lazy (inside a function)."""
    tree = ast.parse(MODULES[module].read_text())
    typing_only: set[int] = set()
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(n) for n in ast.walk(node))
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyserve"):
            assert node.level == 0, f"{module}: use absolute imports"
            for alias in node.names:  # 'from tinyserve.cli import serve' imports a module
                name = f"{node.module}.{alias.name}"
                names.append(name if name in MODULES else str(node.module))
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("tinyserve")]
        for name in names:
            found[name] = found.get(name, True) and id(node) in in_function
    found.pop(module, None)
    found.pop("tinyserve", None)
    return found


def test_every_module_is_in_the_table_once() -> None:
    assert sorted(set(MODULES) - EXEMPT - set(TABLE)) == [], "add these to docs/architecture.md"
    assert sorted(set(TABLE) - set(MODULES)) == [], "the table names modules that do not exist"


@pytest.mark.parametrize("module", sorted(TABLE))
def test_a_module_imports_only_lower_layers(module: str) -> None:
    layer, side = TABLE[module]
    for imported, lazy in sorted(runtime_imports(module).items()):
        assert imported in TABLE, f"{module} imports {imported}, which is not in the table"
        their_layer, their_side = TABLE[imported]
        assert their_layer < layer, (
            f"{module} (L{layer}) imports {imported} (L{their_layer}): a module imports only "
            "from lower layers (docs/architecture.md)"
        )
        if side == "serving" and their_side == "torch":
            # Only a command that needs torch reaches it, from inside the command.
            assert module.startswith("tinyserve.cli.") and lazy, f"{module} imports {imported}"


@pytest.mark.parametrize("module", ["tinyserve", *SERVING_MODULES])
def test_serving_module_does_not_import_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('tinyserve.training')]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_pinned() -> None:
    import tinyserve

    assert tinyserve.__all__ == sorted(tinyserve.__all__)
    assert tinyserve.__all__ == [
        "Engine",
        "EngineConfig",
        "ImageLimits",
        "InputSpec",
        "Manifest",
        "TinyServeError",
        "__version__",
        "decode_image",
    ]
    for name in tinyserve.__all__:
        assert getattr(tinyserve, name) is not None
