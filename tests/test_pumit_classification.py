"""PUMIT's MedMNIST-3D classification configs: train, evaluate and inference overlays on the demo npz."""

from __future__ import annotations

import csv
import os

from monai.bundle import ConfigWorkflow

from tests.conftest import BUNDLES
from tools.bundle_io import config_paths, on_sys_path, parse_bundle

BUNDLE = next(b for b in BUNDLES if os.path.basename(b) == "pumit_btcv_segmentation")


def _run(root: str, configs: list[str], workflow_type: str, **overrides) -> None:
    workflow = ConfigWorkflow(
        config_file=config_paths(root, configs),
        meta_file=os.path.join(root, "configs", "metadata.json"),
        workflow_type=workflow_type,
        bundle_root=root,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def test_classification_train_evaluate_infer(bundle_copy, tmp_path):
    root = bundle_copy(BUNDLE)
    data = str(tmp_path / "medmnist")
    with on_sys_path(root):
        parse_bundle(root, ["train.json", "train_cls.json", "demo_cls.json"], dataset_dir=data).get_parsed_content(
            "demo_data"
        )
        common = {"dataset_dir": data}
        _run(root, ["train.json", "train_cls.json", "demo_cls.json"], "train", max_epochs=1, **common)
        assert os.path.isfile(os.path.join(root, "models", "model.pt"))
        _run(root, ["train.json", "train_cls.json", "evaluate_cls.json", "demo_cls.json"], "train", **common)
        _run(root, ["train.json", "train_cls.json", "inference_cls.json", "demo_cls.json"], "train", **common)
    with open(os.path.join(root, "eval", "predictions.csv")) as f:
        rows = list(csv.reader(f))
    num_classes = 3  # configs/demo_cls.json
    assert rows and all(r[0].startswith("organmnist3d.npz#test/") for r in rows)
    assert len({r[0] for r in rows}) == len(rows), "one row per test sample"
    assert all(0 <= int(float(r[1])) < num_classes for r in rows)
