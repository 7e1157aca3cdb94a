"""Universal Model data: template keys, label transfer, dataset lists, post-processing, demo phantoms."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.data.universal import (
    CLASS_NAMES,
    LABEL_MAP,
    PROMPT_NAMES,
    TEMPLATE,
    MarkUnannotatedd,
    MergeLabelsd,
    UniversalLabeld,
    UniversalPostProcessd,
    class_indices,
    dataset_key,
    label_transfer,
    merge_label_map,
    organ_post_process,
    read_dataset_list,
    uniform_sample_weights,
)
from common.demo.universal import write_universal_demo
from tools.bundle_io import BUNDLES_DIR, on_sys_path, parse_bundle


@pytest.mark.parametrize(
    "name, key",
    [
        ("01_Multi-Atlas_Labeling/label/label0001", "01"),
        ("01_Multi-Atlas_Labeling/label/label0061", "01_2"),
        ("01_Multi-Atlas_Labeling/label/label0059", "01"),
        ("10_Decathlon/Task03_Liver/label/liver_1", "10_03"),
        ("10_Decathlon/Task10_Colon/label/colon_1", "10_10"),
        ("05_KiTS/label/case_00001", "05"),
        ("13_AbdomenCT-12organ/label/Organ12_0001", "13"),
    ],
)
def test_dataset_key(name, key):
    assert dataset_key(name) == key


def test_taxonomy_tables():
    assert len(CLASS_NAMES) == len(PROMPT_NAMES) == 32
    assert PROMPT_NAMES[7] == "Arota" and PROMPT_NAMES[24] == "Celiac Truck"
    assert set(LABEL_MAP) <= set(TEMPLATE)
    assert TEMPLATE["01_2"] == (1, 3, 4, 5, 6, 7, 11, 14)
    assert class_indices(["liver", "Kidney Tumor", "arota", 32]) == [6, 26, 8, 32]
    with pytest.raises(ValueError, match="unknown universal class 'brain'"):
        class_indices(["brain"])


def _two_blobs(shape=(12, 6, 6)) -> np.ndarray:
    raw = np.zeros(shape, dtype=np.uint8)
    raw[1:4, 1:4, 1:4] = 1  # small axis-0 index: patient left in RAS
    raw[7:11, 1:5, 1:5] = 1
    return raw


def test_label_transfer_kits_split_and_tumour():
    raw = _two_blobs()
    raw[8, 2, 2] = 2  # tumour inside the right kidney
    raw[2, 2, 2] = 3  # cyst inside the left kidney
    target, annotated = label_transfer(raw, "05", "kits.nii.gz")
    assert target.shape == (32, *raw.shape) and target.dtype == np.uint8
    assert np.flatnonzero(annotated).tolist() == [1, 2, 25, 31]
    assert target[2, 2, 2, 2] == 1 and target[2, 8, 2, 2] == 0  # left kidney (index 3) holds the cyst voxel
    assert target[1, 8, 2, 2] == 1 and target[1].sum() == 64  # right kidney covers its tumour (folded)
    assert target[2].sum() == 27
    assert target[25].sum() == 1 and target[25, 8, 2, 2] == 1  # kidney tumour rebuilt from raw == 2
    assert target[31].sum() == 1 and target[31, 2, 2, 2] == 1  # kidney cyst from raw == 3


def test_label_transfer_mapping_and_drop():
    raw = np.array([[[0, 1, 2, 8, 11, 14]]])
    target, annotated = label_transfer(raw, "02")
    assert [int(target[:, 0, 0, i].argmax()) + 1 if target[:, 0, 0, i].any() else 0 for i in range(6)] == [
        0,
        1,
        0,
        0,
        11,
        14,
    ]
    assert annotated.sum() == len(TEMPLATE["02"])


def test_label_transfer_unknown_value_names_file():
    with pytest.raises(ValueError, match=r"chaos_7\.nii\.gz.*\[2\].*dataset 03"):
        label_transfer(np.array([[[0, 1, 2]]]), "03", "chaos_7.nii.gz")
    with pytest.raises(ValueError, match="no label table for dataset key '11'"):
        label_transfer(np.zeros((1, 1, 1)), "11", "x.nii.gz")


def test_universal_labeld_and_mark():
    raw = MetaTensor(torch.from_numpy(_two_blobs()[None]).float(), meta={"filename_or_obj": "a/label/x.nii.gz"})
    d = UniversalLabeld()({"label": raw, "name": "08_AbdomenCT-1K/label/x"})
    assert d["label"].shape == (32, 12, 6, 6) and isinstance(d["label"], MetaTensor)
    assert np.flatnonzero(d["annotated"].numpy()).tolist() == [0, 1, 2, 5, 10]
    marked = MarkUnannotatedd()(d)["label"]
    assert marked.dtype == torch.float32 and (marked[3] == -1).all() and (marked[2] >= 0).all()
    bad = MetaTensor(torch.full((1, 2, 2, 2), 9.0), meta={"filename_or_obj": "bad_label.nii.gz"})
    with pytest.raises(ValueError, match="bad_label.nii.gz"):
        UniversalLabeld()({"label": bad, "name": "03_CHAOS/label/x"})


def test_read_dataset_list_and_uniform_weights(tmp_path):
    for rel in ("03_CHAOS/img/a.nii.gz", "03_CHAOS/label/a.nii.gz", "05_KiTS/img/b.nii.gz", "05_KiTS/label/b.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text(
        "03_CHAOS/img/a.nii.gz\t03_CHAOS/label/a.nii.gz\n03_CHAOS/img/a.nii.gz\t03_CHAOS/label/a.nii.gz\n"
        "05_KiTS/img/b.nii.gz\t05_KiTS/label/b.nii.gz\n"
    )
    items = read_dataset_list(str(lst), str(tmp_path))
    assert [it["name"] for it in items] == ["03_CHAOS/label/a", "03_CHAOS/label/a", "05_KiTS/label/b"]
    assert items[2]["image"] == str(tmp_path / "05_KiTS/img/b.nii.gz")
    assert uniform_sample_weights(items).tolist() == [0.5, 0.5, 1.0]
    lst.write_text("03_CHAOS/img/a.nii.gz\t03_CHAOS/label/missing.nii.gz\n")
    with pytest.raises(FileNotFoundError, match=r"list.txt:1: file .*missing.nii.gz"):
        read_dataset_list(str(lst), str(tmp_path))
    lst.write_text("only_one_column.nii.gz\n")
    with pytest.raises(ValueError, match="list.txt:1"):
        read_dataset_list(str(lst), str(tmp_path))


def test_organ_post_process_rules():
    pred = np.zeros((32, 16, 8, 10), dtype=bool)
    pred[5, 8:14, 1:7, 1:9] = True  # liver
    pred[5, 1, 1, 1] = True  # stray liver voxel: removed
    pred[26, 10, 3, 3] = True  # liver tumour inside the liver: kept
    pred[26, 1, 6, 8] = True  # far from the liver: removed
    pred[15, 1:4, 1:4, 2:6] = True  # one lung blob on the left, labelled right
    pred[16, 10:13, 1:4, 2:6] = True  # one on the right, labelled left
    pred[10, 4:7, 4:6, 5:8] = True  # pancreas from axis-2 slice 5 up
    pred[9, 4:7, 6:8, 0:8] = True  # portal vein below and above
    out = organ_post_process(pred)
    assert out[5].sum() == pred[5].sum() - 1
    assert out[26, 10, 3, 3] and not out[26, 1, 6, 8]
    assert out[16, 2, 2, 3] and not out[15, 2, 2, 3]  # smaller axis-0 -> left lung (index 17)
    assert out[15, 11, 2, 3] and not out[16, 11, 2, 3]
    assert not out[9, :, :, :5].any() and out[9, :, :, 5:].any()
    only = organ_post_process(pred, ["liver"])
    assert only[5].any() and not only[np.arange(32) != 5].any()


def test_post_process_transform_and_merge():
    prob = torch.zeros(32, 6, 6, 6)
    prob[5, 1:5, 1:5, 1:5] = 0.9
    prob[26, 2, 2, 2] = 0.8
    d = UniversalPostProcessd()({"pred": prob})
    assert d["pred"].shape == (32, 6, 6, 6) and d["pred"][26, 2, 2, 2] == 1
    merged = merge_label_map(d["pred"])
    assert merged.shape == (1, 6, 6, 6) and merged[0, 2, 2, 2] == 27 and merged[0, 1, 1, 1] == 6
    lits = MergeLabelsd(label_map={"6": 1, "27": 2}, channels_key="pred_classes")({"pred": d["pred"]})
    assert lits["pred"][0, 2, 2, 2] == 2 and lits["pred"][0, 1, 1, 1] == 1
    assert lits["pred_classes"].shape[0] == 32


def test_demo_phantoms(tmp_path):
    root = write_universal_demo(str(tmp_path / "demo"), n_train=1, n_val=0, n_test=1, size=32)
    train = read_dataset_list(root + "/dataset_list/demo_train.txt", root)
    assert sorted(dataset_key(it["name"]) for it in train) == ["03", "05", "10_09"]
    test = read_dataset_list(root + "/dataset_list/demo_test.txt", root)
    assert [dataset_key(it["name"]) for it in test] == ["01"]
    before = (tmp_path / "demo/dataset_list/demo_train.txt").stat().st_mtime_ns
    write_universal_demo(str(tmp_path / "demo"), n_train=1, n_val=0, n_test=1, size=32)
    assert (tmp_path / "demo/dataset_list/demo_train.txt").stat().st_mtime_ns == before


def test_post_process_on_logits_equals_sigmoid_threshold():
    """Thresholding logits at logit(t) gives the masks of sigmoid >= t, as uint8, without a probability copy."""
    logits = torch.randn(32, 8, 8, 8) * 3
    for threshold in (0.5, 0.3):
        from_prob = UniversalPostProcessd(threshold=threshold, post_process=False)({"pred": torch.sigmoid(logits)})
        from_logits = UniversalPostProcessd(threshold=threshold, post_process=False, logits=True)({"pred": logits})
        assert from_logits["pred"].dtype == torch.uint8
        assert torch.equal(from_prob["pred"], from_logits["pred"])
    with pytest.raises(ValueError, match="threshold"):
        UniversalPostProcessd(threshold=1.0, logits=True)


def test_inference_postprocessing_writes_label_map_and_per_class_masks_from_logits(tmp_path):
    """``inference.json`` post-processing from raw logits: organ-aware masks, one label map and the per-class
    files, in the input's geometry (the uint8 masks go through ``Invertd`` and ``SavePerClassd``)."""
    bundle = os.path.join(BUNDLES_DIR, "clip_driven_universal_ct_segmentation")
    image = np.full((20, 16, 12), -1000, dtype=np.int16)  # air outside a soft-tissue box, cropped away
    image[2:18, 2:14, 2:10] = 40
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / "ct.nii.gz")
    parser = parse_bundle(bundle, ["inference.json"])
    parser["save_per_class"] = True
    parser["output_dir"] = str(tmp_path / "out")
    with on_sys_path(bundle):
        data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "ct.nii.gz")})
        post = parser.get_parsed_content("postprocessing")
    assert data["image"].shape == (1, 16, 12, 8)
    logits = torch.full((32, 16, 12, 8), -5.0)
    logits[5, 2:10, 2:10, 2:6] = 3.0  # liver (6)
    logits[0, 11:14, 3:6, 3:5] = 0.5  # spleen (1): sigmoid 0.62, above the 0.5 threshold
    data["pred"] = MetaTensor(logits, meta=data["image"].meta)
    data = post(data)
    label = data["pred"][0]
    assert label.shape == (20, 16, 12)
    assert (label == 6).sum() == 8 * 8 * 4 and (label == 1).sum() == 3 * 3 * 2
    assert label[4, 4, 4] == 6 and label[13, 5, 5] == 1 and label[0, 0, 0] == 0
    written = sorted(p.name for p in (tmp_path / "out").rglob("*.nii.gz"))
    assert written == ["ct_liver.nii.gz", "ct_seg.nii.gz", "ct_spleen.nii.gz"], written
    liver = nib.load(next((tmp_path / "out").rglob("ct_liver.nii.gz"))).get_fdata()
    assert liver.shape == (20, 16, 12) and liver.sum() == 8 * 8 * 4
