"""Each release zip runs in a fresh environment holding only torch, MONAI and the packages its metadata lists.

For every bundle: ``tools package`` writes the zip, which is unpacked outside the repo; a new virtual
environment (no system site-packages) sees a shared base of ``torch`` + ``monai`` (+ their own
requirements) through a ``.pth`` file and gets ``required_packages_version`` installed with pip; its
python then builds ``network_def``, saves it where ``checkpointloader`` loads from and runs ``inference.json`` +
``demo.json`` on demo data (generated here) with no ``PYTHONPATH``. A package missing from the metadata
is an ``ImportError`` there.

Opt-in (it installs packages and takes about 12 minutes on 2 cores; ``.ci/run`` runs it): ``RUN_RELEASE_ENV=1``; set
``RELEASE_BASE_VENV`` to an existing venv with torch and monai to skip building the base.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from tests.conftest import BUNDLES, demo_dataset
from tools.bundle_io import load_metadata
from tools.package import package_bundle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("RUN_RELEASE_ENV") != "1", reason="installs packages into fresh venvs; set RUN_RELEASE_ENV=1"
    ),
]

INFER = """
import os, sys, torch
from monai.bundle import ConfigParser, run
root, data = sys.argv[1:3]
os.makedirs(os.path.join(root, "models"), exist_ok=True)
configs = [os.path.join(root, "configs", n) for n in ("inference.json", "demo.json")]
meta = os.path.join(root, "configs", "metadata.json")
sys.path.insert(0, root)
parser = ConfigParser()
parser.read_config(configs)
parser.read_meta(meta)
parser.update({"bundle_root": root, "dataset_dir": data})
checkpoint = parser.get_parsed_content("checkpointloader#load_path")  # model.pt, or LoVT's image_encoder.pt
torch.save(parser.get_parsed_content("network_def").state_dict(), checkpoint)
run(config_file=configs, meta_file=meta, bundle_root=root, dataset_dir=data)
import common
assert common.__file__.startswith(root), common.__file__
print("outputs:", sorted(os.listdir(os.path.join(root, "eval"))))
"""


def _sh(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT")}
    result = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _site_packages(python: str) -> str:
    return _sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()


@pytest.fixture(scope="session")
def base_env(tmp_path_factory) -> Iterator[str]:
    """A venv with only torch and monai (the versions installed here) and what they require; removed after."""
    given = os.environ.get("RELEASE_BASE_VENV")
    if given:
        yield given
        return
    base = str(tmp_path_factory.mktemp("release_base") / "venv")
    _sh(sys.executable, "-m", "venv", base)
    _sh(f"{base}/bin/pip", "install", "-q", f"torch=={version('torch').split('+')[0]}", f"monai=={version('monai')}")
    yield base
    shutil.rmtree(base, ignore_errors=True)  # about 2 GB; pytest keeps the last three temp roots


@pytest.mark.parametrize("bundle", BUNDLES, ids=[os.path.basename(b) for b in BUNDLES])
def test_release_zip_infers_with_listed_packages_only(bundle, base_env, demo_data_dirs, tmp_path, tmp_path_factory):
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    archive = package_bundle(bundle, out_dir=str(tmp_path / "dist"))
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "unzipped")
    (root,) = glob.glob(str(tmp_path / "unzipped" / "*"))

    env = str(tmp_path / "venv")
    try:
        _sh(sys.executable, "-m", "venv", "--without-pip", env)
        python = f"{env}/bin/python"
        with open(os.path.join(_site_packages(python), "base.pth"), "w") as f:
            f.write(_site_packages(f"{base_env}/bin/python") + "\n")
        packages = load_metadata(root).get("required_packages_version", {})
        packages = [f"{name}=={v}" for name, v in packages.items()]
        if packages:
            _sh(f"{base_env}/bin/pip", "--python", python, "install", "-q", *packages)
        result = _sh(python, "-c", INFER, root, data, cwd=str(tmp_path))
    finally:
        shutil.rmtree(env, ignore_errors=True)  # the bundle's packages: up to 1 GB each
    assert "outputs:" in result.stdout and "outputs: []" not in result.stdout, result.stdout[-2000:]
