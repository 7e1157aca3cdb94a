"""Release zips vendor only the part of ``common`` a bundle's configs reach, and that part stands alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

from tests.conftest import BUNDLES
from tools.package import config_references, package_bundle, vendored_files

UNETR = next(b for b in BUNDLES if os.path.basename(b) == "unetr_btcv_segmentation")

# run with ``python -I`` (no PYTHONPATH, no working folder on sys.path): each unzipped bundle alone on sys.path
# imports every vendored module and resolves every ``common`` path its configs name, then is forgotten again
PROBE = """
import importlib, json, os, pydoc, sys
failures = []
for root, names in json.loads(sys.argv[1]).items():
    sys.path.insert(0, root)
    for folder, _, files in os.walk(os.path.join(root, "common")):
        for file in sorted(f for f in files if f.endswith(".py")):
            rel = os.path.relpath(os.path.join(folder, file), root)[: -len(".py")].replace(os.sep, ".")
            module = importlib.import_module(rel.removesuffix(".__init__"))
            if not module.__file__.startswith(root):
                failures.append(f"{rel} imported from {module.__file__}, not {root}")
    failures += [f"{root}: {name} not found" for name in names if pydoc.locate(name) is None]
    sys.path.remove(root)
    for name in [m for m in sys.modules if m == "common" or m.startswith("common.")]:
        del sys.modules[name]
print(json.dumps(failures))
"""


# Project-MONAI/model-zoo's code-format settings (setup.cfg, pyproject.toml at dfae206) and its runtests.sh
# --codeformat commands, run from the zoo root over ``models/<bundle>``
ZOO_SETUP_CFG = """
[flake8]
select = B,C,E,F,N,P,T4,W,B9
max_line_length = 120
ignore = E203,E501,E741,W503,W504,C408,N812,B023,B905,B028,B907,C419
per_file_ignores = __init__.py: F401, __main__.py: F401

[isort]
known_first_party = models
profile = black
line_length = 120
"""
ZOO_PYPROJECT = """
[tool.black]
line-length = 120
target-version = ['py37', 'py38', 'py39']
"""
ZOO_CHECKS = {
    "isort": ["-m", "isort", "--check"],
    "black": ["-m", "black", "--skip-magic-trailing-comma", "--check"],
    "flake8": ["-m", "flake8", "--count", "--statistics"],
}


@pytest.fixture(scope="module")
def unzipped(tmp_path_factory) -> dict[str, str]:
    """Every bundle's release zip unpacked into a model-zoo-like ``models/`` folder, by bundle name."""
    zoo = tmp_path_factory.mktemp("zoo")
    roots = {}
    for bundle in BUNDLES:
        with zipfile.ZipFile(package_bundle(bundle, out_dir=str(zoo.parent / f"{zoo.name}_dist"))) as zf:
            zf.extractall(zoo / "models")
        roots[os.path.basename(bundle)] = str(zoo / "models" / os.path.basename(bundle))
    return roots


def test_unetr_zip_vendors_only_its_import_closure():
    files = vendored_files(UNETR)
    assert {"common/__init__.py", "common/engines/handlers.py", "common/data/btcv.py", "common/demo/btcv.py"} <= set(
        files
    )
    assert "common/core/io.py" in files, "handlers import the atomic save from the bottom layer"
    other_papers = [f for f in files if any(p in f for p in ("pumit", "lvit", "lovt", "universal", "networks/"))]
    assert other_papers == [], "UNETR uses monai's network and no other paper's code"


def test_config_naming_no_module_of_common_is_refused(tmp_path):
    bundle = shutil.copytree(UNETR, tmp_path / "bundle", ignore=shutil.ignore_patterns("demo_data", "models"))
    with open(bundle / "configs" / "extra.json", "w") as f:
        json.dump({"thing": {"_target_": "common.nowhere.Thing"}}, f)
    with pytest.raises(ValueError, match=r"extra\.json: 'common\.nowhere\.Thing' names nothing in common"):
        vendored_files(str(bundle))


def test_every_release_zip_resolves_its_configs_from_the_unzipped_folder_alone(unzipped):
    names = {unzipped[os.path.basename(b)]: sorted(set().union(*config_references(b).values())) for b in BUNDLES}
    result = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, json.dumps(names)],
        cwd=str(next(iter(unzipped.values()))),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def _covering_zips(unzipped: dict[str, str]) -> list[str]:
    """Unzipped bundles (``models/<name>``) that together hold every distinct vendored file: same checks, less time."""
    held = {
        root: {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")}
        for root in unzipped.values()
    }
    chosen, seen = [], set()
    for root in sorted(held, key=lambda r: len(held[r]), reverse=True):
        if held[root] - seen:
            chosen.append(os.path.join("models", os.path.basename(root)))
            seen |= held[root]
    return chosen


@pytest.mark.parametrize("check", sorted(ZOO_CHECKS))
def test_release_zip_python_passes_the_model_zoo_format_checks(unzipped, check):
    zoo = os.path.dirname(os.path.dirname(next(iter(unzipped.values()))))
    with open(os.path.join(zoo, "setup.cfg"), "w") as f:
        f.write(textwrap.dedent(ZOO_SETUP_CFG))
    with open(os.path.join(zoo, "pyproject.toml"), "w") as f:
        f.write(textwrap.dedent(ZOO_PYPROJECT))
    command = [sys.executable, *ZOO_CHECKS[check], *_covering_zips(unzipped)]
    result = subprocess.run(command, cwd=zoo, capture_output=True, text=True)
    assert result.returncode == 0, f"{check} on {sorted(unzipped)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
