"""Runs through the real command line on every trainable bundle: DDP, kill-and-resume, release zip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from tests.conftest import BUNDLES, demo_dataset
from tools.package import package_bundle

TRAINABLE = [b for b in BUNDLES if os.path.exists(os.path.join(b, "configs", "multi_gpu_train.json"))]
pytestmark = pytest.mark.parametrize("bundle", TRAINABLE, ids=[os.path.basename(b) for b in TRAINABLE])


def _env(**extra: str) -> dict[str, str]:
    # no PYTHONPATH (a user of the zip has none); bytecode on, so an imported vendored ``common`` leaves a cache
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _configs(root: str, *names: str) -> str:
    return "[" + ",".join(f"'{os.path.join(root, 'configs', n)}'" for n in names) + "]"


def _last_epoch(root: str) -> int:
    state = torch.load(os.path.join(root, "models", "last.pt"), map_location="cpu", weights_only=True)
    trainer = state["trainer"]  # ignite saves the iteration count, not the epoch
    return int(trainer["iteration"]) // int(trainer["epoch_length"])


@pytest.mark.slow
def test_multi_gpu_config_runs_two_processes_on_cpu(bundle, bundle_copy, demo_data_dirs, tmp_path_factory):
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    root = bundle_copy(bundle)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    command += [
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        _configs(root, "train.json", "multi_gpu_train.json", "demo.json"),
    ]
    command += ["--bundle_root", root, "--dataset_dir", data, "--train#trainer#max_epochs", "1"]
    result = subprocess.run(
        command, cwd=str(tmp_path_factory.getbasetemp()), env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.isfile(os.path.join(root, "models", "model.pt"))
    assert _last_epoch(root) == 1


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(bundle, bundle_copy, demo_data_dirs, tmp_path_factory):
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    root = bundle_copy(bundle)
    base = [sys.executable, "-m", "monai.bundle", "run", "training"]
    base += ["--config_file", _configs(root, "train.json", "demo.json"), "--bundle_root", root, "--dataset_dir", data]
    base += ["--train#trainer#max_epochs", "4"]
    last = os.path.join(root, "models", "last.pt")
    proc = subprocess.Popen(
        base, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while not os.path.exists(last) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _last_epoch(root)
    assert 1 <= killed_at < 4, "training must be killed mid-run for this test to mean anything"
    result = subprocess.run([*base, "--resume", "true"], env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from iteration" in result.stdout + result.stderr
    assert _last_epoch(root) == 4


@pytest.mark.slow
def test_release_zip_trains_and_infers_when_unzipped(bundle, demo_data_dirs, tmp_path, tmp_path_factory):
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    name = os.path.basename(bundle)
    zip_path = package_bundle(bundle, out_dir=str(tmp_path / "dist"))
    assert os.path.basename(zip_path).startswith(f"{name}_v")
    with zipfile.ZipFile(zip_path) as zf:
        assert {n.split("/")[0] for n in zf.namelist()} == {name}
        assert f"{name}/common/__init__.py" in zf.namelist()
        zf.extractall(tmp_path / "unzipped")
    root = str(tmp_path / "unzipped" / name)
    train = [sys.executable, "-m", "monai.bundle", "run", "training"]
    train += ["--config_file", "['configs/train.json','configs/demo.json']", "--dataset_dir", data]
    train += ["--train#trainer#max_epochs", "1"]
    infer = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/inference.json','configs/demo.json']",
    ]
    infer += ["--dataset_dir", data]
    for command in (train, infer):
        result = subprocess.run(command, cwd=root, env=_env(), capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.isfile(os.path.join(root, "models", "model.pt"))
    assert os.path.isdir(os.path.join(root, "common", "__pycache__")), "the vendored common must be the one imported"
