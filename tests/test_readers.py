"""Readers of official dataset files and the statistics that travel with a bundle (issue 13, items 3, 6, 7)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from common.data.cxr_downstream import dataset_statistics, normalization_statistics, save_normalization
from tools.bundle_io import REPO_ROOT, config_paths, copy_bundle, on_sys_path, parse_bundle

LOVT_SEG = os.path.join(REPO_ROOT, "bundles", "lovt_cxr_segmentation")
# The first keys of the official SIIM file (philip-mueller/lovt datasets/siim-acr-pneumothorax-segmentation).
OFFICIAL_SIIM = (
    '{"train": {"num_samples": 7229, "scan": {"pixel_mean": 0.5043012020616566, "pixel_std": 0.28800468898118353}, '
    '"segmentation_pos_weights": {"pneumothorax": 327.50465563430885}}, "validation": {"num_samples": 2409, '
    '"scan": {"pixel_mean": 0.5042212459526761, "pixel_std": 0.28803788144362635}}}'
)


def test_official_nested_statistics_read_unchanged(tmp_path):
    (tmp_path / "dataset_statistics.json").write_text(OFFICIAL_SIIM)
    assert dataset_statistics(str(tmp_path)) == {"pixel_mean": 0.5043012020616566, "pixel_std": 0.28800468898118353}
    assert dataset_statistics(str(tmp_path), split="validation")["pixel_mean"] == 0.5042212459526761
    (tmp_path / "flat.json").write_text('{"pixel_mean": 0.25, "pixel_std": 0.5}')
    assert dataset_statistics(str(tmp_path), "flat.json") == {"pixel_mean": 0.25, "pixel_std": 0.5}
    (tmp_path / "bad.json").write_text('{"train": {"scan": {"pixel_mean": 0.5}}}')
    with pytest.raises(KeyError, match="bad.json.*pixel_std"):
        dataset_statistics(str(tmp_path), "bad.json")


def test_normalization_prefers_file_then_config(tmp_path):
    target = str(tmp_path / "models" / "normalization.json")
    assert normalization_statistics(0.5, 0.25, target) == {"pixel_mean": 0.5, "pixel_std": 0.25}
    save_normalization({"pixel_mean": 0.1, "pixel_std": 0.2}, target)
    assert normalization_statistics(0.5, 0.25, target) == {"pixel_mean": 0.1, "pixel_std": 0.2}
    assert os.listdir(tmp_path / "models") == ["normalization.json"]  # no temp file left behind
    with pytest.raises(ValueError, match="pixel_std"):
        normalization_statistics(0.5, 0.0, None)


def _lovt_infer(root: str, dataset_dir: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=config_paths(root, ["inference.json", "demo.json"]),
        meta_file=os.path.join(root, "configs", "metadata.json"),
        workflow_type="infer",
        bundle_root=root,
        dataset_dir=dataset_dir,
        load_pretrain=False,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def test_lovt_segmentation_infers_from_an_image_alone(tmp_path):
    """No ``dataset_statistics.json`` anywhere: the config's statistics, or the trained model's file, are used."""
    root = copy_bundle(LOVT_SEG, str(tmp_path / "bundle"))
    images = tmp_path / "user" / "test" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8)).save(images / "mine.png")
    with on_sys_path(root):
        _lovt_infer(root, str(tmp_path / "user"), output_dir=str(tmp_path / "out"))
        assert Image.open(tmp_path / "out" / "mine_seg.png").size == (50, 70)
        parser = parse_bundle(root, ["inference.json"])
        assert parser.get_parsed_content("statistics") == {
            "pixel_mean": 0.5081052428896399,
            "pixel_std": 0.2906311866244445,
        }
        save_normalization({"pixel_mean": 0.3, "pixel_std": 0.1}, os.path.join(root, "models", "normalization.json"))
        parser = parse_bundle(root, ["inference.json"])
        assert parser.get_parsed_content("statistics") == {"pixel_mean": 0.3, "pixel_std": 0.1}


def test_lovt_training_writes_the_statistics_it_used(tmp_path):
    root = copy_bundle(LOVT_SEG, str(tmp_path / "bundle"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_statistics.json").write_text(OFFICIAL_SIIM)
    with on_sys_path(root):
        parser = parse_bundle(root, ["train.json"], dataset_dir=str(tmp_path / "data"))
        parser.get_parsed_content("save_statistics")
    with open(os.path.join(root, "models", "normalization.json")) as f:
        assert json.load(f) == {"pixel_mean": 0.5043012020616566, "pixel_std": 0.28800468898118353}
