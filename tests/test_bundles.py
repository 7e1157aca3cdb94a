"""Model-zoo style checks run on every bundle found under ``bundles/`` (none is listed by hand)."""

from __future__ import annotations

import csv
import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

import common
from tests.conftest import BUNDLE_IDS, BUNDLES, demo_dataset
from tools.bundle_io import config_paths, load_metadata, on_sys_path
from tools.verify import check_files, check_large_files, check_metadata, check_name, verify_bundle

pytestmark = pytest.mark.parametrize("bundle", BUNDLES, ids=BUNDLE_IDS)


def _workflow(bundle_root: str, configs: list[str], workflow_type: str, **overrides) -> ConfigWorkflow:
    logging_file = os.path.join(bundle_root, "configs", "logging.conf")
    return ConfigWorkflow(
        config_file=config_paths(bundle_root, configs),
        meta_file=os.path.join(bundle_root, "configs", "metadata.json"),
        logging_file=logging_file if os.path.exists(logging_file) else None,
        workflow_type=workflow_type,
        bundle_root=bundle_root,
        **overrides,
    )


def _run(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


def _channel_names(bundle_root: str) -> dict[int, str] | None:
    pred = load_metadata(bundle_root)["network_data_format"]["outputs"]["pred"]
    return {int(k): v for k, v in pred["channel_def"].items()} if pred["format"] == "segmentation" else None


def _assert_outputs_named(bundle_root: str) -> None:
    """Every label value the inference writes has a ``channel_def`` name (PNG masks are written scaled by 255)."""
    names = _channel_names(bundle_root)
    if names is None:
        return
    files = glob.glob(os.path.join(bundle_root, "eval", "**", "*_seg.*"), recursive=True)
    assert files, "inference wrote no *_seg.* label file"
    for path in files:
        data = np.asarray(Image.open(path)) // 255 if path.endswith(".png") else np.asarray(nib.load(path).dataobj)
        values = {int(v) for v in np.unique(data)}
        assert values <= names.keys(), f"{path}: label values {sorted(values)} without a channel_def name {names}"


def _assert_csv_columns_named(bundle_root: str) -> None:
    """Per-class CSV columns carry the ``channel_def`` names (not ``class0..classN``)."""
    names = _channel_names(bundle_root)
    raw = glob.glob(os.path.join(bundle_root, "eval", "*_raw.csv"))
    if names is None or not raw:
        return
    for path in raw:
        with open(path) as f:
            header = next(csv.reader(f))
        assert header == ["filename", *[names[k] for k in sorted(names) if k > 0], "mean"], f"{path}: {header}"


def test_layout_and_metadata(bundle):
    check_name(bundle)
    check_files(bundle)
    check_large_files(bundle)
    meta = check_metadata(bundle, schema=None)
    assert meta["common_version"] == common.__version__
    for config in ("inference.json", "demo.json"):
        with open(os.path.join(bundle, "configs", config)) as f:
            text = f.read()
        assert "$import common" not in text, f"{config}: reference common only through _target_ paths"
    with open(os.path.join(bundle, "configs", "inference.json")) as f:
        initialize = json.load(f)["initialize"]
    assert initialize[0].startswith("$sys.path.insert(0, os.path.abspath(@bundle_root))")


def test_train_evaluate_infer_on_demo_data(bundle, bundle_copy, demo_data_dirs, tmp_path_factory):
    """``[train, demo]`` for one epoch, then ``[train, evaluate, demo]`` and ``[inference, demo]``."""
    dataset_dir = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    root = bundle_copy(bundle)
    with on_sys_path(root):
        if os.path.exists(os.path.join(root, "configs", "train.json")):
            overrides = {"dataset_dir": dataset_dir, "train#trainer#max_epochs": 1}
            overrides |= {"train#trainer#epoch_length": 2, "validate#evaluator#epoch_length": 1}  # evaluate runs all
            _run(_workflow(root, ["train.json", "demo.json"], "train", **overrides))
            assert os.path.isfile(os.path.join(root, "models", "model.pt")), "training must write models/model.pt"
            _run(_workflow(root, ["train.json", "evaluate.json", "demo.json"], "train", dataset_dir=dataset_dir))
            _assert_csv_columns_named(root)
        _run(_workflow(root, ["inference.json", "demo.json"], "infer", dataset_dir=dataset_dir))
        _assert_outputs_named(root)


@pytest.mark.slow
def test_verify(bundle):
    report = verify_bundle(bundle)
    atol = load_metadata(bundle).get("verify", {}).get("atol", 1e-4)
    assert all(diff <= atol for diff in report.get("export_max_abs_diff", {}).values())
