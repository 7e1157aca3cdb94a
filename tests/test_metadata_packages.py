"""Every package a bundle's configs and its vendored ``common`` modules import is listed in its metadata.

Static and cheap: the ``_target_`` paths and ``$import`` lines of every config name the modules a bundle
runs; the ``common`` modules among them are followed through their own imports (lazy ones included).
A package imported only inside a function with a fallback (the ONNX Runtime / OpenVINO inference
backends) belongs in ``optional_packages_version``. Packages MONAI imports only optionally (``einops``
for its ViT) are not visible here: ``test_release_env.py`` runs each release zip in an environment with
only the listed packages.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import sys

import pytest

from tests.conftest import BUNDLE_IDS, BUNDLES
from tools.bundle_io import REPO_ROOT, load_metadata

BASE = {"torch", "monai", "numpy", "common"}  # MONAI's own requirements, and the vendored package
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "ignite": "pytorch-ignite", "skimage": "scikit-image"}
IMPORT_LINE = re.compile(r"^\$import ([\w.]+)")


def _config_modules(bundle: str) -> set[str]:
    """Dotted modules named by ``_target_`` values and ``$import`` lines in every config of ``bundle``."""
    modules: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and "." in target:
                modules.add(target.rsplit(".", 1)[0])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and IMPORT_LINE.match(node):
            modules.add(IMPORT_LINE.match(node).group(1))

    for path in glob.glob(os.path.join(bundle, "configs", "*.json")):
        with open(path) as f:
            walk(json.load(f))
    return modules


def _module_file(module: str) -> str | None:
    base = os.path.join(REPO_ROOT, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _imports_of(module: str) -> set[str]:
    """Absolute modules imported anywhere in ``common`` module ``module`` (relative imports resolved)."""
    path = _module_file(module)
    if path is None:
        return set()
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
    return found


def required_packages(bundle: str) -> set[str]:
    """Distribution names of the third-party packages ``bundle`` imports (beyond torch, MONAI and numpy)."""
    seen, todo, top = set(), list(_config_modules(bundle)), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        top.add(parts[0])
        if parts[0] == "common":
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]
            todo += sorted(_imports_of(module))
    third_party = top - BASE - set(sys.stdlib_module_names) - {"__future__"}
    return {DISTRIBUTIONS.get(name, name) for name in third_party}


@pytest.mark.parametrize("bundle", BUNDLES, ids=BUNDLE_IDS)
def test_metadata_lists_imported_packages(bundle):
    meta = load_metadata(bundle)
    listed = set(meta.get("required_packages_version", {})) | set(meta.get("optional_packages_version", {}))
    missing = required_packages(bundle) - listed
    assert not missing, f"{bundle}/configs/metadata.json: required/optional_packages_version lack {sorted(missing)}"
    assert "fire" in listed, "MONAI's `python -m monai.bundle download/run` needs fire"
