"""LoVT data: report sections and sentences, MIMIC-CXR-JPG index, CSV reader, subsets, collate, demo data."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.cxr_downstream import dataset_statistics, segmentation_datalist
from common.data.mimic_cxr import (
    LoVTCollate,
    SentenceSwapd,
    build_index,
    load_csv_datalist,
    load_datalist,
    pixel_statistics,
    report_sentences,
    split_sentences,
)
from common.demo.lovt import make_pretraining_demo, make_segmentation_demo, write_tiny_bert

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.  Eval for pneumonia.

 FINDINGS:

 Heart size is normal. There is a 2.5 cm opacity in the right lower lobe, approx. 3 cm from the
 hilum. No pleural effusion.

 IMPRESSION:

 1. Right lower lobe pneumonia.
 2. Dr. ___ was notified.
"""


def test_report_sections_and_sentences():
    findings, impression = report_sentences(REPORT)
    assert findings == [
        "Heart size is normal.",
        "There is a 2.5 cm opacity in the right lower lobe, approx. 3 cm from the hilum.",
        "No pleural effusion.",
    ]
    assert impression == ["Right lower lobe pneumonia.", "Dr. ___ was notified."]
    assert report_sentences("No acute process. Lungs clear.") == (["No acute process.", "Lungs clear."], [])
    assert split_sentences("  ") == []


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_pretraining_demo(str(tmp_path_factory.mktemp("mimic")), num_studies=10, image_size=(40, 32))


def test_demo_index_layout_and_views(demo):
    records = [json.loads(line) for line in open(f"{demo}/lovt_index.jsonl")]
    assert len(records) == 10
    assert [r["study_id"] for r in records] == sorted(r["study_id"] for r in records)
    assert all(r["sentences"] == r["findings_sentences"] + r["impression_sentences"] for r in records)
    # lateral views are excluded, study 0 has PA + AP
    assert all(not p.endswith("-01.jpg") for r in records for p in r["frontal_images"])
    assert len(records[0]["frontal_images"]) == 2
    stats = json.load(open(f"{demo}/lovt_index_statistics.json"))
    assert 0 < stats["pixel_mean"] < 1 and stats["pixel_std"] > 0


def test_build_index_reports_skipped_studies(demo, tmp_path, caplog):
    jpg = f"{demo}/mimic-cxr-jpg_2-0-0"
    missing = sorted(Path(jpg, "files").rglob("*-00.jpg"))[1]  # study 1 has only this frontal view
    missing.rename(missing.with_suffix(".bak"))
    try:
        with caplog.at_level(logging.WARNING):
            counts = build_index(jpg, f"{demo}/mimic-cxr_2-0-0/mimic-cxr-reports.zip", str(tmp_path / "i.jsonl"))
    finally:
        missing.with_suffix(".bak").rename(missing)
    assert counts["missing_images"] == 1 and counts["kept"] == 9
    assert "missing_images" in caplog.text


def test_first_fraction_subset(demo):
    full = load_datalist(f"{demo}/lovt_index.jsonl", f"{demo}/mimic-cxr-jpg_2-0-0", "train")
    subset = load_datalist(f"{demo}/lovt_index.jsonl", f"{demo}/mimic-cxr-jpg_2-0-0", "train", fraction=0.3)
    assert len(full) == 7 and subset == full[:2]  # round(7 * 0.3) = 2, the first ones
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_datalist(f"{demo}/nope.jsonl", demo)


def test_csv_reader_skips_bad_rows(tmp_path, caplog):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["image", "report"], ["a.png", "Lungs clear. No effusion."], ["b.png", "x y z."], ["a.png", " "]])
    with caplog.at_level(logging.WARNING):
        data = load_csv_datalist(str(tmp_path / "reports.csv"))
    assert data == [{"image": [str(tmp_path / "a.png")], "sentences": ["Lungs clear.", "No effusion."]}]
    assert "skipped 1 row(s) with missing_image" in caplog.text and "skipped 1 row(s) with empty_report" in caplog.text
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("path,text\n")
    with pytest.raises(ValueError, match="bad.csv: missing column"):
        load_csv_datalist(str(tmp_path / "bad.csv"))


def test_collate_token_layout(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_bert(str(tmp_path / "bert")))
    collate = LoVTCollate(tokenizer, max_length=10)
    batch = collate(
        [
            {
                "image": torch.zeros(1, 2, 2),
                "sentences": ["The heart is enlarged.", "No acute process.", "The lungs are otherwise clear."],
            },
            {"image": torch.ones(1, 2, 2), "sentences": ["No acute process."]},
        ]
    )
    # sample 0: 5 + 4 tokens exceed 8 -> only the first sentence fits; sample 1: 4 tokens
    assert batch["token_sentence"].tolist() == [[-1, 0, 0, 0, 0, 0, -1], [-1, 0, 0, 0, 0, -1, -1]]
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id and batch["input_ids"][0, 6] == tokenizer.sep_token_id
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    assert batch["num_sentences"] == 1 and batch["image"].shape == (2, 1, 2, 2)


def test_sentence_swap_permutes_only():
    swap = SentenceSwapd("sentences", prob=1.0, geometric_p=0.1)
    swap.set_random_state(0)
    sentences = [f"s{i}." for i in range(6)]
    outs = [swap({"sentences": sentences})["sentences"] for _ in range(5)]
    assert all(sorted(o) == sentences for o in outs) and any(o != sentences for o in outs)


def test_pixel_statistics_law_of_total_variance():
    a, b = np.zeros((2, 2)), np.ones((2, 2))
    mean, std = pixel_statistics([a, b])
    assert mean == 0.5 and std == pytest.approx(np.concatenate([a, b]).std())


def test_segmentation_demo_and_reader(tmp_path):
    root = make_segmentation_demo(str(tmp_path), num_images=10, image_size=(40, 32))
    train = segmentation_datalist(root, "train")
    assert len(train) == 6 and train[0]["label"].endswith("masks/train_0000.png")
    assert len(segmentation_datalist(root, "train", fraction=0.5)) == 3
    assert set(dataset_statistics(root)) == {"pixel_mean", "pixel_std"}
    with open(tmp_path / "test.csv", "w") as f:
        f.write("image,mask\ntest/images/test_0000.png,test/masks/missing.png\n")
    with pytest.raises(FileNotFoundError, match="test.csv:2"):
        segmentation_datalist(root, "test")
