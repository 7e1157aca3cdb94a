"""``common`` is layered: a module imports only its own package or packages of a lower layer.

core < data, text, losses, networks, metrics, optim < engines, weights, demo; ``tools`` sits on top and
``common`` never imports it. A sideways import (e.g. ``data`` -> ``networks``) is an upward arrow too:
move the shared helper into ``common.core``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

COMMON = pathlib.Path(__file__).resolve().parents[1] / "common"
LAYERS = {
    "core": 0,
    **dict.fromkeys(("data", "text", "losses", "networks", "metrics", "optim"), 1),
    **dict.fromkeys(("engines", "weights", "demo"), 2),
}


def _package(module: str) -> str:
    """``common.data.btcv`` -> ``data``; ``common`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(COMMON.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """Absolute names of every ``common``/``tools`` module ``path`` imports, relative imports resolved."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            elif node.module:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in ("common", "tools")]


def _violations() -> list[str]:
    bad = []
    for path in sorted(COMMON.rglob("*.py")):
        own = _package(_module_name(path))
        for line, name in _imports(path):
            where = f"{path.relative_to(COMMON.parent)}:{line} imports {name}"
            if name.split(".")[0] == "tools":
                bad.append(f"{where} (common never imports tools)")
                continue
            target = _package(name)
            if not own or target == own:
                continue
            if target not in LAYERS or own not in LAYERS:
                bad.append(f"{where} (package not in the layer table: add it to LAYERS)")
            elif LAYERS[target] >= LAYERS[own]:
                bad.append(f"{where} (layer {LAYERS[own]} may not import layer {LAYERS[target]})")
    return bad


def test_common_imports_point_down():
    assert _violations() == []


def test_core_imports_nothing_of_ours():
    core = [str(p) for p in (COMMON / "core").rglob("*.py") if _imports(p)]
    assert core == []


@pytest.mark.parametrize("package", sorted(p.name for p in COMMON.iterdir() if p.is_dir() and p.name != "__pycache__"))
def test_every_package_has_a_layer(package):
    assert package in LAYERS
