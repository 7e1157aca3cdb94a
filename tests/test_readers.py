"""Readers of official dataset files and the statistics that travel with a bundle (issue 13, items 3, 6, 7)."""

from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader
from PIL import Image

from common.data.cxr_downstream import dataset_statistics, normalization_statistics, save_normalization
from common.data.mimic_cxr import build_index
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


def _mimic(root, studies: dict[str, tuple[str | None, str]]) -> tuple[str, str]:
    """A MIMIC-CXR-JPG tree: ``{dicom_id: (split or None = absent from the split CSV, report text)}``."""
    jpg, reports = root / "mimic-cxr-jpg", root / "reports"
    meta, splits = [], []
    for i, (dicom, (split, text)) in enumerate(studies.items()):
        subject, study = "10000001", str(50000000 + i)
        folder = jpg / "files" / "p10" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(folder / f"{dicom}.jpg")
        meta.append(f"{dicom},{subject},{study},PA")
        if split is not None:
            splits.append(f"{dicom},{study},{subject},{split}")
        report = reports / "files" / "p10" / f"p{subject}" / f"s{study}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
    for name, header, rows in (
        ("metadata", "dicom_id,subject_id,study_id,ViewPosition", meta),
        ("split", "dicom_id,study_id,subject_id,split", splits),
    ):
        with gzip.open(jpg / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt") as f:
            f.write("\n".join([header, *rows]) + "\n")
    return str(jpg), str(reports)


REPORT = "FINDINGS: The lungs are clear. No effusion.\n\nIMPRESSION: No acute process.\n"


def test_mimic_images_missing_from_split_csv_are_excluded(tmp_path, caplog):
    jpg, reports = _mimic(tmp_path, {"a": ("train", REPORT), "b": (None, REPORT), "c": ("test", REPORT)})
    with caplog.at_level(logging.WARNING):
        counts = build_index(jpg, reports, str(tmp_path / "index.jsonl"))
    assert counts["kept"] == 2 and counts["not_in_split_csv"] == 1
    assert "'not_in_split_csv': 1" in caplog.text
    records = [json.loads(line) for line in open(tmp_path / "index.jsonl")]
    assert [(r["frontal_images"][0][-5:], r["split"]) for r in records] == [("a.jpg", "train"), ("c.jpg", "test")]


def test_empty_report_is_an_error_naming_the_file(tmp_path):
    jpg, reports = _mimic(tmp_path, {"a": ("train", REPORT), "b": ("train", " \n")})
    with pytest.raises(ValueError, match=r"p10000001/s50000001\.txt: empty report"):
        build_index(jpg, reports, str(tmp_path / "index.jsonl"))


def _png(path, shape) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return str(path)


def test_mask_of_another_size_is_an_error_naming_both_files(tmp_path):
    image = _png(tmp_path / "train" / "images" / "case.png", (40, 30))
    mask = _png(tmp_path / "train" / "masks" / "case.png", (40, 31))
    with on_sys_path(LOVT_SEG):
        transform = parse_bundle(LOVT_SEG, ["train.json"], dataset_dir=str(tmp_path)).get_parsed_content(
            "train#preprocessing"
        )
    with pytest.raises(RuntimeError) as error:
        transform({"image": image, "label": mask})
    assert f"{image} (30, 40), {mask} (31, 40): spatial sizes differ" in str(error.value.__cause__)


def test_corrupt_image_in_a_dataloader_worker_names_the_file(tmp_path):
    good = _png(tmp_path / "test" / "images" / "good.png", (40, 30))
    with open(good, "rb") as f:
        (tmp_path / "test" / "images" / "truncated.png").write_bytes(f.read()[:200])
    with on_sys_path(LOVT_SEG):
        dataset = parse_bundle(LOVT_SEG, ["inference.json"], dataset_dir=str(tmp_path)).get_parsed_content("dataset")
    assert len(dataset) == 2
    with pytest.raises(RuntimeError, match=r"truncated\.png: cannot read the image \(OSError: image file is truncated"):
        list(DataLoader(dataset, batch_size=1, num_workers=1))


def test_lvit_labelled_subset_is_deterministic_and_logged(tmp_path, caplog):
    from common.engines.lvit_semi import labelled_subset

    datalist = [{"name": f"mask_{i}.png"} for i in range(8)]
    with caplog.at_level(logging.INFO):
        first = labelled_subset(datalist, 0.25, path=str(tmp_path / "labelled_25.txt"))
    assert first == labelled_subset(list(reversed(datalist)), 0.25) and len(first) == 2
    assert (tmp_path / "labelled_25.txt").read_text().split() == first
    assert "labelled subset: 2 of 8 training masks, drawn with seed 666 on first use" in caplog.text
