"""LViT data: the QaTa layout reader and its errors, demo data, augmentation, lung-zone templates."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from openpyxl import Workbook
from PIL import Image

from common.data.lvit_templates import DEFAULT_TEMPLATE_TEXTS, describe, parse_zones, zone_mask
from common.data.lvit_transforms import LViTRandAugmentd, ZeroLabelIfMissingd
from common.data.qata import check_lvit_dataset, lvit_datalist, read_text_table, record_split
from common.demo.lvit import _opacities, make_lvit_demo
from common.engines.lvit_semi import labelled_subset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_lvit_demo(str(tmp_path_factory.mktemp("qata")), n_train=4, n_val=2, n_test=2, size=64)


def _write_split(root, split, masks, images, table, combined=False):
    folder = os.path.join(root, f"{split}_Folder")
    for sub, names in (("labelcol", masks), ("img", images)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for n in names:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(folder, sub, n))
    book = Workbook()
    book.active.append(["Image", "Description"])
    for k, v in table.items():
        book.active.append([k, v])
    name = "Train_Val_text.xlsx" if combined else f"{split}_text.xlsx"
    os.makedirs(os.path.join(root, "Train_Folder"), exist_ok=True)
    book.save(os.path.join(root, "Train_Folder" if combined else folder, name))


def test_demo_layout_and_datalist(demo):
    items = lvit_datalist(demo, "Train")
    assert len(items) == 4
    first = items[0]
    assert os.path.basename(first["image"]) == "covid_1.png" and first["name"] == "mask_covid_1.png"
    assert first["text"] == read_text_table(os.path.join(demo, "Train_Folder", "Train_text.xlsx"))["mask_covid_1.png"]
    mask = np.array(Image.open(first["label"])) > 0
    zones = zone_mask(parse_zones(first["text"]), 64) > 0
    assert mask.any() and not (mask & ~zones).any()  # the lesion lies where the text says
    assert make_lvit_demo(demo) == demo  # idempotent


def test_demo_distractors_look_like_lesions_outside_the_named_zones():
    zones = {("left", "upper"), ("left", "middle")}
    lesion, distractor = _opacities(64, zones, 3, np.random.default_rng(0))
    named = zone_mask(zones, 64) > 0
    assert lesion.any() and distractor.any()
    assert not (lesion.astype(bool) & ~named).any() and not (distractor.astype(bool) & named).any()
    assert not _opacities(64, zones, 0, np.random.default_rng(0))[1].any()


def test_filename_rule_and_combined_table(tmp_path):
    _write_split(tmp_path, "Train", ["mask_a.png", "b.png"], ["a.png", "b.png"], {"mask_a.png": "t a", "b.png": "t b"})
    items = lvit_datalist(str(tmp_path), "Train")
    assert [os.path.basename(d["image"]) for d in items] == ["b.png", "a.png"]
    _write_split(tmp_path / "c", "Val", ["mask_v.png"], ["v.png"], {"mask_v.png": "t v", "mask_x.png": "t x"}, True)
    assert lvit_datalist(str(tmp_path / "c"), "Val")[0]["text"] == "t v"


def test_mismatches_are_reported(tmp_path):
    _write_split(tmp_path, "Test", ["mask_a.png", "mask_b.png"], ["a.png", "c.png"], {"mask_a.png": "x", "z.png": "y"})
    problems = "\n".join(check_lvit_dataset(str(tmp_path), "Test"))
    assert "no image b.png" in problems
    assert "labelcol/mask_b.png: no Description" in problems
    assert "img/c.png: image without mask" in problems
    assert "text for z.png but no such mask" in problems
    with pytest.raises(ValueError, match="4 problem"):
        lvit_datalist(str(tmp_path), "Test")


def test_bad_spreadsheet_names_the_file(tmp_path):
    book = Workbook()
    book.active.append(["Name", "Text"])
    path = str(tmp_path / "x.xlsx")
    book.save(path)
    with pytest.raises(ValueError, match="x.xlsx.*'Image' and 'Description'"):
        read_text_table(path)


def test_augmentation_keeps_image_and_label_aligned():
    t = LViTRandAugmentd(["image", "label"])
    t.set_random_state(0)
    img = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 16, 16)
    ops = set()
    for _ in range(20):
        out = t({"image": img, "label": img[:1].clone()})
        ops.add(t._op)
        assert out["image"].shape == (2, 16, 16) and torch.equal(out["image"][:1], out["label"])
    assert ops == {"rot_flip", "rotate", "none"}


def test_semi_augmentation_leaves_unlabelled_images_in_their_frame():
    t = LViTRandAugmentd(["image", "label"], only_if_key="labelled")
    t.set_random_state(0)
    img = torch.arange(16 * 16, dtype=torch.float32).view(1, 16, 16)
    moved = [not torch.equal(t({"image": img, "label": img, "labelled": 1})["image"], img) for _ in range(10)]
    assert any(moved)
    assert all(torch.equal(t({"image": img, "label": img, "labelled": 0})["image"], img) for _ in range(10))


def test_zero_label_for_unlabelled():
    out = ZeroLabelIfMissingd()({"image": torch.ones(3, 8, 8)})
    assert out["label"].shape == (1, 8, 8) and out["label"].sum() == 0


def test_templates_from_text():
    assert parse_zones(
        "Bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung."
    ) == {("left", "upper"), ("left", "middle"), ("left", "lower"), ("right", "middle"), ("right", "lower")}
    left = zone_mask({("left", "upper")}, 64)
    assert left[:, 32:].sum() > 0 and left[:, :32].sum() == 0  # patient-left is image-right
    assert all(parse_zones(t) for t in DEFAULT_TEMPLATE_TEXTS)
    zones = {("right", "lower"), ("left", "upper")}
    assert parse_zones(describe(zones)) == zones


def test_split_record_is_written_once_then_checked(tmp_path, caplog):
    root = make_lvit_demo(str(tmp_path / "qata"), n_train=4, n_val=2, n_test=2, size=32)
    record = str(tmp_path / "splits" / "qata_split.json")
    with caplog.at_level(logging.INFO):
        first = record_split(root, record)
    assert {k: len(v) for k, v in first.items()} == {"Train": 4, "Val": 2, "Test": 2}
    assert "split record written on first use" in caplog.text
    assert record_split(root, record) == first  # an unchanged dataset passes
    written = os.path.getmtime(record)
    os.remove(os.path.join(root, "Val_Folder", "labelcol", first["Val"][0]))
    with pytest.raises(ValueError, match=r"split Val differs from the record .*qata_split\.json: 1 recorded mask"):
        record_split(root, record)
    assert os.path.getmtime(record) == written  # the record is never rewritten
    assert record_split(str(tmp_path / "no_dataset"), str(tmp_path / "none.json")) == {}
    assert not (tmp_path / "none.json").exists()  # nothing to record: no empty record is left behind


def test_labelled_subset_file_is_reused_not_redrawn(tmp_path):
    datalist = [{"name": f"mask_{i}.png"} for i in range(8)]
    path = tmp_path / "qata_labelled_25.txt"
    path.write_text("mask_7.png\nmask_0.png\n")  # a subset someone shipped or chose
    assert labelled_subset(datalist, 0.25, path=str(path)) == ["mask_0.png", "mask_7.png"]
    assert path.read_text() == "mask_7.png\nmask_0.png\n"
    path.write_text("mask_0.png\nmask_99.png\n")
    with pytest.raises(ValueError, match=r"qata_labelled_25\.txt: labelled subset file lists 1 name\(s\) not in"):
        labelled_subset(datalist, 0.25, path=str(path))
