"""``python -m tools prepare lovt_downstream ...`` on raw layouts built from pydicom's real test file (item 6)."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from PIL import Image
from pydicom.data import get_testdata_file

from common.data.cxr_downstream import dataset_statistics, segmentation_datalist
from tools.__main__ import Tools
from tools.preparers.lovt_downstream import equalize_hist, rle_decode


def _dicom(path, seed: int) -> np.ndarray:
    """pydicom's ``CT_small.dcm`` rewritten as the 8-bit greyscale radiograph RSNA / SIIM ship; returns its pixels."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = np.random.default_rng(seed).integers(0, 256, (ds.Rows, ds.Columns), dtype=np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for tag in ("RescaleSlope", "RescaleIntercept"):
        delattr(ds, tag)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return pixels


def _relative_rle(mask: np.ndarray) -> str:
    """Kaggle SIIM encoding of ``mask``: column-major runs, each start relative to the previous run's end."""
    flat = np.concatenate([[0], mask.T.flatten(), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    previous_end = np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s - p} {e - s}" for s, e, p in zip(starts, ends, previous_end))


def test_rle_decode_is_column_major_and_relative():
    mask = np.zeros((6, 4), np.uint8)
    mask[1:3, 0] = 1  # a vertical run in column 0
    mask[4, 1:4] = 1  # a horizontal run on row 4: three runs column-major
    encoded = _relative_rle(mask)
    assert encoded == "1 2 7 1 5 1 5 1"  # indices x * 6 + y: 1-2, 10, 16, 22
    np.testing.assert_array_equal(rle_decode([encoded, " -1"], 6, 4), mask)


def test_equalize_hist_is_the_empirical_cdf():
    out = equalize_hist(np.array([[0.0, 0.0], [0.5, 1.0]]))
    # CDF 0.5 after the zeros, 0.75 after 0.5, 1 at the top; 0.5 sits between two bin centres (skimage interpolates)
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.625, 1.0]])


def test_prepare_rsna_fills_boxes_and_reads_back(tmp_path):
    raw = tmp_path / "raw"
    for i in range(5):
        _dicom(raw / "stage_2_train_images" / f"pid{i}.dcm", seed=i)
    rows = ["patientId,x,y,width,height,Target", "pid0,10.4,20.6,30,40,1", "pid0,60,5,10,10,1", "pid1,,,,,0"]
    rows += [f"pid{i},,,,,0" for i in range(2, 5)]
    (raw / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    Tools().prepare("lovt_downstream", "rsna", str(raw), str(out), seed=0)

    mask = np.asarray(Image.open(out / "stage_2_train_masks" / "pid0.gif").convert("L"))
    expected = np.zeros((128, 128), np.uint8)
    expected[21:61, 10:40] = 255  # round(20.6) .. round(60.6), round(10.4) .. round(40.4)
    expected[5:15, 60:70] = 255
    np.testing.assert_array_equal(mask, expected)
    ids = {s: (out / f"{s}.csv").read_text().splitlines() for s in ("train", "validation", "test")}
    assert ids["train"][0] == "ID,boxes,classes" and sum(len(v) - 1 for v in ids.values()) == 5
    assert "pid0,10.4;20.6;30.0;40.0|60.0;5.0;10.0;10.0,1|1" in sum(ids.values(), [])
    stats = json.loads((out / "dataset_statistics.json").read_text())
    assert stats["train"]["num_samples"] == 3 and set(stats["train"]["scan"]) == {"pixel_mean", "pixel_std"}

    data = segmentation_datalist(str(out), "train") + segmentation_datalist(str(out), "test")
    pid0 = next(d for d in data + segmentation_datalist(str(out), "validation") if "pid0" in d["image"])
    assert pid0["label"].endswith("stage_2_train_masks/pid0.gif")
    loaded = LoadImage(reader="PILReader", image_only=True)(pid0["label"]).numpy()  # as the bundle: GIF indices
    np.testing.assert_array_equal(loaded.T > 0, expected > 0)
    with pytest.raises(FileExistsError, match="not empty"):
        Tools().prepare("lovt_downstream", "rsna", str(raw), str(out))


def test_prepare_siim_with_the_official_split_files(tmp_path):
    raw, splits = tmp_path / "raw", tmp_path / "lovt_splits"
    masks, lines = {}, ["ImageId, EncodedPixels"]  # Kaggle's header has the leading space
    for i in range(3):
        _dicom(raw / "dicom-images-train" / f"study{i}" / "series" / f"1.2.{i}.dcm", seed=i)
        mask = np.zeros((128, 128), np.uint8)
        mask[10 * i : 10 * i + 5, 50:90] = i > 0
        masks[f"1.2.{i}"] = mask
        lines.append(f"1.2.{i}, {_relative_rle(mask) if i else '-1'}")
    (raw / "train-rle.csv").write_text("\n".join(lines) + "\n")
    splits.mkdir()
    for name, ids in (("train", ["1.2.2", "1.2.0"]), ("validation", ["1.2.1"]), ("test", [])):
        (splits / f"{name}.csv").write_text("\n".join(["ID", *ids]) + "\n")
    out = tmp_path / "out"
    Tools().prepare("lovt_downstream", "siim", str(raw), str(out), splits=str(splits))

    for image_id, mask in masks.items():
        gif = Image.open(out / "segmentation_masks" / f"{image_id}.gif").convert("L")
        np.testing.assert_array_equal(np.asarray(gif), mask * 255)
    assert (out / "train.csv").read_text() == (splits / "train.csv").read_text()
    train = segmentation_datalist(str(out), "train")
    assert [d["image"].rsplit("/", 1)[1] for d in train] == ["1.2.2.png", "1.2.0.png"]
    equalised = [equalize_hist(_dicom(tmp_path / "again" / f"{i}.dcm", seed=i) / 255.0) for i in (2, 0)]
    means, variances = [e.mean() for e in equalised], [e.var() for e in equalised]
    assert dataset_statistics(str(out)) == pytest.approx(
        {"pixel_mean": np.mean(means), "pixel_std": np.sqrt(np.mean(variances) + np.var(means))}
    )


def test_prepare_covid_rural_splits_by_patient(tmp_path, caplog):
    raw = tmp_path / "raw"
    (raw / "jpgs").mkdir(parents=True)
    (raw / "pngs_masks").mkdir()
    rng = np.random.default_rng(0)
    for patient in range(5):
        for scan in range(2):
            name = f"COVID-19-AR-{patient}_0{scan}-01-2012-XR"
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(raw / "jpgs" / f"{name}.jpg")
            if (patient, scan) != (4, 1):
                Image.fromarray((rng.random((40, 30)) > 0.7).astype(np.uint8)).save(raw / "pngs_masks" / f"{name}.png")
    out = tmp_path / "out"
    Tools().prepare("lovt_downstream", "covid_rural", str(raw), str(out), seed=1)
    assert "Mask not found" in caplog.text and "COVID-19-AR-4_01" in caplog.text
    patients = {}
    for split in ("train", "validation", "test"):
        for item in segmentation_datalist(str(out), split):
            patients.setdefault(item["image"].rsplit("/", 1)[1].split("_")[0], set()).add(split)
    assert len(patients) == 5 and all(len(s) == 1 for s in patients.values())  # no patient in two splits
    assert Image.open(next((out / "processed_images").iterdir())).mode == "L"
