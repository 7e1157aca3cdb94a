"""``channel_def`` names every label value a segmentation bundle writes; CSV columns carry those names.

MONAI Label reads ``channel_def`` as ``{label value: name}`` (``"background"`` skipped), so a binary mask
needs ``{"0": "background", "1": <finding>}``. The values actually written are checked against it by
``tests/test_bundles.py`` on each bundle's demo inference.
"""

from __future__ import annotations

import csv
import os

import pytest
import torch
from ignite.engine import Engine

from common.metrics.handlers import ClassNamedMetricsSaver
from tests.conftest import BUNDLES
from tools.bundle_io import load_metadata, parse_bundle

SEGMENTATION = [
    b for b in BUNDLES if load_metadata(b)["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
]
EVALUATED = [b for b in SEGMENTATION if os.path.exists(os.path.join(b, "configs", "evaluate.json"))]


@pytest.mark.parametrize("bundle", SEGMENTATION, ids=[os.path.basename(b) for b in SEGMENTATION])
def test_channel_def_names_each_label_value(bundle):
    pred = load_metadata(bundle)["network_data_format"]["outputs"]["pred"]
    keys = sorted(int(k) for k in pred["channel_def"])
    assert keys == list(range(len(keys))), f"channel_def keys must be the label values 0..N: {keys}"
    assert pred["channel_def"]["0"] == "background"
    # a softmax/argmax output has one channel per label value; independent sigmoid channels add background
    assert len(keys) in (pred["num_channels"], pred["num_channels"] + 1)


@pytest.mark.parametrize("bundle", EVALUATED, ids=[os.path.basename(b) for b in EVALUATED])
def test_evaluate_csv_class_labels_resolve(bundle):
    """The evaluate config's ``class_labels`` expression resolves to the foreground ``channel_def`` names."""
    parser = parse_bundle(bundle, ["train.json", "evaluate.json"])
    savers = [i for i, h in enumerate(parser["validate#handlers"]) if "ClassNamedMetricsSaver" in h.get("_target_", "")]
    assert savers, "evaluate.json must save per-class metrics with named columns"
    for i in savers:
        labels = parser.get_parsed_content(f"validate#handlers#{i}#class_labels")
        channel_def = load_metadata(bundle)["network_data_format"]["outputs"]["pred"]["channel_def"]
        assert labels == [channel_def[str(k)] for k in range(1, len(channel_def))]


def test_saver_names_columns_and_refuses_a_width_mismatch(tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"dice": 0.5}
    engine.state.metric_details = {"dice": torch.tensor([[0.2, 0.4], [0.6, 0.8]])}
    saver = ClassNamedMetricsSaver(str(tmp_path), metric_details="*", class_labels=["spleen", "liver"])
    saver._filenames = ["a.nii.gz", "b.nii.gz"]
    saver(engine)
    with open(tmp_path / "dice_raw.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "spleen", "liver", "mean"]
    assert rows[1][0] == "a.nii.gz" and float(rows[2][2]) == pytest.approx(0.8)
    assert (tmp_path / "metrics.csv").read_text().startswith("dice,0.5")

    wrong = ClassNamedMetricsSaver(str(tmp_path), metric_details="*", class_labels=["spleen"])
    wrong._filenames = ["a.nii.gz", "b.nii.gz"]
    with pytest.raises(ValueError, match="'dice' reports 2 classes per case, but class_labels names 1"):
        wrong(engine)
