"""Runs through the real command line on every trainable bundle: DDP, kill-and-resume, release zip + tracking.

Each run costs a process start (about 20 s of imports on 2 cores) and demo epochs, so runs are short
(``SHORT_EPOCHS``: two training iterations and one validation batch per epoch, through the engines' own
``epoch_length``) and one run checks several things: the release zip's training also runs under
``--tracking mlflow`` (MONAI's bundle tracking adds ``MLFlowHandler`` to ``train#trainer`` and
``validate#evaluator``) against a local SQLite store, and with TensorBoard on.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import zipfile

import mlflow
import pytest
import torch
from monai.utils import path_to_sqlite_uri

from tests.conftest import BUNDLES, demo_dataset
from tools.package import package_bundle

TRAINABLE = [b for b in BUNDLES if os.path.exists(os.path.join(b, "configs", "multi_gpu_train.json"))]
pytestmark = pytest.mark.parametrize("bundle", TRAINABLE, ids=[os.path.basename(b) for b in TRAINABLE])


SHORT_EPOCHS = ["--train#trainer#epoch_length", "2", "--validate#evaluator#epoch_length", "1"]

# appended to ``initialize``: SIGKILL the process right after epoch 1's handlers (the checkpoint among them) ran,
# so even a bundle whose demo epoch takes milliseconds is killed mid-run, never after its last epoch
KILL_AFTER_FIRST_EPOCH = {
    "+initialize": [
        "$import os",
        "$import signal",
        "$import ignite",
        "$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_COMPLETED(once=1),"
        " lambda engine: os.kill(os.getpid(), signal.SIGKILL))",
    ]
}


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
    command += ["--bundle_root", root, "--dataset_dir", data, "--train#trainer#max_epochs", "1", *SHORT_EPOCHS]
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
    kill_overlay = os.path.join(root, "configs", "kill_after_first_epoch.json")
    with open(kill_overlay, "w") as f:
        json.dump(KILL_AFTER_FIRST_EPOCH, f)
    base = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", root, "--dataset_dir", data]
    base += ["--train#trainer#max_epochs", "3", *SHORT_EPOCHS]
    killed = subprocess.run(
        [*base, "--config_file", _configs(root, "train.json", "demo.json", "kill_after_first_epoch.json")],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert _last_epoch(root) == 1, "the killed run must leave epoch 1's checkpoint"
    resumed = [*base, "--config_file", _configs(root, "train.json", "demo.json"), "--resume", "true"]
    result = subprocess.run(resumed, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Restored all variables from" in log and "last.pt" in log, "the resumed run must load last.pt"
    assert "Epoch: 2/3" in log and "Epoch: 1/3" not in log, "the resumed run must start at epoch 2"
    assert _last_epoch(root) == 3


def _assert_tracked(uri: str, experiment_name: str, root: str, log: str) -> None:
    """An MLflow run with ``train_loss``, TensorBoard event files under the bundle and epoch progress in the log."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment in {uri}"
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    metrics = set().union(*(r.data.metrics for r in runs))
    assert "train_loss" in metrics, f"MLflow metrics: {sorted(metrics)}"
    events = glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)
    assert events, "TensorBoardStatsHandler must write event files under the bundle's output_dir"
    assert "Epoch: 1/1" in log or "Epoch[1]" in log, "epoch progress must be logged"


@pytest.mark.slow
def test_release_zip_trains_with_tracking_and_infers_when_unzipped(bundle, demo_data_dirs, tmp_path, tmp_path_factory):
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    name = os.path.basename(bundle)
    zip_path = package_bundle(bundle, out_dir=str(tmp_path / "dist"))
    assert os.path.basename(zip_path).startswith(f"{name}_v")
    with zipfile.ZipFile(zip_path) as zf:
        assert {n.split("/")[0] for n in zf.namelist()} == {name}
        assert f"{name}/common/__init__.py" in zf.namelist()
        zf.extractall(tmp_path / "unzipped")
    root = str(tmp_path / "unzipped" / name)
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    train = [sys.executable, "-m", "monai.bundle", "run", "training"]
    train += ["--config_file", "['configs/train.json','configs/demo.json']", "--dataset_dir", data]
    # TensorBoard on: demo overlays may switch it off
    train += [
        "--train#trainer#max_epochs",
        "1",
        *SHORT_EPOCHS,
        "--use_tensorboard",
        "True",
    ]  # demo overlays may switch it off
    train += ["--tracking", "mlflow", "--tracking_uri", uri, "--experiment_name", name]
    infer = [sys.executable, "-m", "monai.bundle", "run"]
    infer += ["--config_file", "['configs/inference.json','configs/demo.json']", "--dataset_dir", data]
    logs = []
    for command in (train, infer):
        result = subprocess.run(command, cwd=root, env=_env(), capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs.append(result.stdout + result.stderr)
    assert os.path.isfile(os.path.join(root, "models", "model.pt"))
    assert os.path.isdir(os.path.join(root, "common", "__pycache__")), "the vendored common must be the one imported"
    _assert_tracked(uri, name, root, logs[0])
