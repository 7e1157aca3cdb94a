"""Model-zoo style distribution: ``tools package --all`` served over HTTP on 127.0.0.1, downloaded, checked, run."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial

import numpy as np
import pytest
from monai.apps.utils import HashCheckError
from monai.bundle import download
from monai.bundle.scripts import _get_fake_spatial_shape

from tests.conftest import BUNDLE_IDS, BUNDLES, demo_dataset
from tools.bundle_io import load_metadata
from tools.package import fetch_bundle, package_all, sha256_of


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def release_server(tmp_path_factory):
    """Serve ``good/`` (``tools package --all`` output) and ``corrupt/`` (same index, one zip damaged)."""
    root = tmp_path_factory.mktemp("releases")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        package_all(out_dir=str(root / "good"), url_template="{file}")  # relative: resolved against the index URL
        shutil.copytree(root / "good", root / "corrupt")
        yield base, root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _entry(index_path: str, name: str) -> dict:
    with open(index_path) as f:
        return next(e for e in json.load(f).values() if e["name"] == name)


def test_index_lists_every_bundle(release_server):
    _, root = release_server
    with open(root / "good" / "model_info.json") as f:
        index = json.load(f)
    assert sorted(e["name"] for e in index.values()) == sorted(BUNDLE_IDS)
    for key, entry in index.items():
        zip_path = root / "good" / entry["source"]
        assert key == f"{entry['name']}_v{entry['version']}" == zip_path.name[: -len(".zip")]
        assert entry["sha256"] == sha256_of(str(zip_path)) and entry["size"] == zip_path.stat().st_size


def _input_size(bundle: str) -> int:
    image = next(iter(load_metadata(bundle)["network_data_format"]["inputs"].values()))
    return image.get("num_channels", 1) * int(np.prod(_get_fake_spatial_shape(image["spatial_shape"])))


# every bundle is downloaded and hash-checked; the one with the smallest network input also runs its inference
# from the download (test_bundle_runs already trains and infers every release zip, so once is enough here)
INFER_BUNDLE = min(BUNDLES, key=lambda b: (_input_size(b), b))


def _download(name: str, version: str, url: str, bundle_dir: str, command_line: bool) -> None:
    """``monai.bundle.download`` via ``python -m monai.bundle download``, or in-process (no 20 s interpreter start)."""
    if not command_line:
        download(name=name, version=version, url=url, bundle_dir=bundle_dir, progress=False)
        return
    command = [sys.executable, "-m", "monai.bundle", "download", "--name", name, "--version", version]
    command += ["--url", url, "--bundle_dir", bundle_dir, "--progress", "False"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("bundle", BUNDLES, ids=BUNDLE_IDS)
def test_download_and_check_hash(bundle, release_server, demo_data_dirs, tmp_path, tmp_path_factory):
    """``monai.bundle download --url`` from the local server, then its sha256 against the index.

    ``INFER_BUNDLE`` goes through the command line and runs its inference; the others call the same function
    in-process."""
    base, root = release_server
    name, version = os.path.basename(bundle), load_metadata(bundle)["version"]
    entry = _entry(str(root / "good" / "model_info.json"), name)
    _download(name, version, f"{base}/good/{entry['source']}", str(tmp_path), command_line=bundle == INFER_BUNDLE)
    assert sha256_of(str(tmp_path / f"{name}.zip")) == entry["sha256"]
    downloaded = tmp_path / name
    assert load_metadata(str(downloaded))["version"] == version
    assert (downloaded / "common" / "__init__.py").is_file()
    if bundle != INFER_BUNDLE:
        return
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    infer += ["['configs/inference.json','configs/demo.json']", "--dataset_dir", data, "--load_pretrain", "False"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the vendored common must be enough
    result = subprocess.run(infer, cwd=downloaded, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.listdir(downloaded / "eval"), "inference must write its outputs to the bundle's eval folder"


def test_fetch_checks_sha256_and_unpacks(release_server, tmp_path):
    base, _ = release_server
    name = BUNDLE_IDS[0]
    folder = fetch_bundle(name, f"{base}/good/model_info.json", bundle_dir=str(tmp_path))
    assert os.path.isfile(os.path.join(folder, "configs", "metadata.json"))
    assert os.path.isfile(os.path.join(folder, "common", "__init__.py"))


def test_corrupted_zip_is_rejected_and_nothing_unpacked(release_server, tmp_path):
    base, root = release_server
    name = BUNDLE_IDS[0]
    zip_path = root / "corrupt" / _entry(str(root / "corrupt" / "model_info.json"), name)["source"]
    data = bytearray(zip_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    zip_path.write_bytes(bytes(data))
    target = tmp_path / "bundles"
    with pytest.raises(HashCheckError, match="sha256 hash check of downloaded file failed"):
        fetch_bundle(name, f"{base}/corrupt/model_info.json", bundle_dir=str(target))
    assert not target.exists() or not any(target.iterdir()), "nothing may be unpacked from a corrupted zip"
