"""``monai.bundle run training --tracking mlflow`` on every training config (demo overlay, one epoch).

MONAI's bundle tracking adds ``MLFlowHandler`` to ``train#trainer`` and ``validate#evaluator``; the store
is a local SQLite file in the test's temp folder (MLflow >= 3.13 no longer accepts a plain folder store).
The run must also leave TensorBoard event files and log its progress (epochs, demo data, text caches).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import mlflow
import pytest
from monai.utils import path_to_sqlite_uri

from tests.conftest import BUNDLES, demo_dataset

TRAINABLE = [b for b in BUNDLES if os.path.exists(os.path.join(b, "configs", "train.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", TRAINABLE, ids=[os.path.basename(b) for b in TRAINABLE])
def test_mlflow_tracking_and_tensorboard(bundle, bundle_copy, demo_data_dirs, tmp_path, tmp_path_factory):
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    root = bundle_copy(bundle)
    uri = path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    configs = "[" + ",".join(f"'{os.path.join(root, 'configs', n)}'" for n in ("train.json", "demo.json")) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs]
    command += ["--bundle_root", root, "--dataset_dir", data, "--train#trainer#max_epochs", "1"]
    command += ["--use_tensorboard", "True"]  # demo overlays switch it off to save time; every train.json has the key
    command += ["--tracking", "mlflow", "--tracking_uri", uri, "--experiment_name", os.path.basename(bundle)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(os.path.basename(bundle))
    assert experiment is not None, f"no MLflow experiment in {uri}"
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    metrics = set().union(*(r.data.metrics for r in runs))
    assert "train_loss" in metrics, f"MLflow metrics: {sorted(metrics)}"

    events = glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)
    assert events, "TensorBoardStatsHandler must write event files under the bundle's output_dir"
    assert "Epoch: 1/1" in log or "Epoch[1]" in log, "epoch progress must be logged"
