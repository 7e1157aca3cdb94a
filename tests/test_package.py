"""Release zips vendor only the part of ``common`` a bundle's configs reach, and that part stands alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


@pytest.fixture(scope="module")
def unzipped(tmp_path_factory) -> dict[str, str]:
    """Every bundle's release zip unpacked, by bundle name."""
    out = tmp_path_factory.mktemp("releases")
    roots = {}
    for bundle in BUNDLES:
        with zipfile.ZipFile(package_bundle(bundle, out_dir=str(out / "dist"))) as zf:
            zf.extractall(out / "unzipped")
        roots[os.path.basename(bundle)] = str(out / "unzipped" / os.path.basename(bundle))
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
