"""``python -m tools prepare lovt_downstream {rsna,siim,covid_rural} RAW OUT``: the LoVT downstream datasets.

Re-implements the authors' preparation scripts (``philip-mueller/lovt`` ``src/data/datasets/*``) so that the
output is the layout their loaders, and ``common.data.cxr_downstream``, read:

- ``rsna``: ``stage_2_train_images/<pid>.dcm`` + ``stage_2_train_labels.csv`` -> ``stage_2_train_images_processed/
  <pid>.png`` and ``stage_2_train_masks/<pid>.gif`` (boxes filled, 0/255); CSVs ``ID,boxes,classes``.
- ``siim``: ``dicom-images-train/*/*/<id>.dcm`` + ``train-rle.csv`` -> ``processed_images/<id>.png`` (histogram
  equalised) and ``segmentation_masks/<id>.gif`` (relative RLE decoded column-major, i.e. transposed); CSVs ``ID``.
- ``covid_rural``: ``jpgs/<id>.jpg`` + ``pngs_masks/<id>.png`` -> ``processed_images/<id>.jpg`` (grey, histogram
  equalised), ``pngs_masks/`` copied (0/1); images without a mask are skipped with a warning; split by patient.

Splits: ``--splits DIR`` copies the authors' ``train/validation/test.csv`` (and their ``dataset_statistics.json``)
unchanged, which the published numbers used; otherwise a seeded random 60/20/20 split as their scripts draw it.
``dataset_statistics.json`` is the official nested file (per split: ``num_samples``, ``scan.pixel_mean/std`` with
var = mean of per-image variances + variance of per-image means). ``OUT`` must be new or empty.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
STATS_FILE = "dataset_statistics.json"


def equalize_hist(image: np.ndarray, nbins: int = 256) -> np.ndarray:
    """``skimage.exposure.equalize_hist`` (as the authors call it): the image's CDF over ``nbins`` bins, in [0, 1]."""
    hist, edges = np.histogram(image, bins=nbins, range=(float(image.min()), float(image.max())))
    centers = (edges[:-1] + edges[1:]) / 2
    cdf = hist.cumsum() / hist.sum()
    return np.interp(image.flat, centers, cdf).reshape(image.shape)


def rle_decode(encodings: list[str], height: int, width: int) -> np.ndarray:
    """SIIM relative RLE (start offsets from the previous run's end), column-major, OR-ed over annotations."""
    mask = np.zeros(height * width, dtype=np.uint8)
    for rle in encodings:
        if rle.strip() == "-1":
            continue
        values = np.asarray([int(x) for x in rle.split()])
        position = 0
        for start, length in zip(values[0::2], values[1::2]):
            position += start
            mask[position : position + length] = 1
            position += length
    return mask.reshape(width, height).T


def box_mask(boxes: list[tuple[float, float, float, float]], height: int, width: int) -> np.ndarray:
    """RSNA ``(x, y, width, height)`` boxes filled with 1, corners rounded as the authors do."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x, y, w, h in boxes:
        mask[round(y) : round(y + h), round(x) : round(x + w)] = 1
    return mask


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask * 255).save(path, format="GIF")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    with open(path, newline="") as f:
        return [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


def _rsna(raw: Path, out: Path) -> tuple[dict, dict]:
    """``{pid: (boxes, classes)}`` and ``{pid: (mean, var)}``; writes images and filled-box masks."""
    patients: dict[str, list] = {}
    for line_no, row in enumerate(_read_csv(raw / "stage_2_train_labels.csv"), 2):
        boxes = patients.setdefault(row["patientId"], [])
        if row["Target"] == "1":
            try:
                boxes.append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))
            except ValueError as e:
                raise ValueError(f"{raw / 'stage_2_train_labels.csv'}:{line_no}: bad box ({e}).") from e
    (out / "stage_2_train_images_processed").mkdir()
    (out / "stage_2_train_masks").mkdir()
    samples, stats = {}, {}
    for pid, boxes in patients.items():
        pixels = pydicom.dcmread(raw / "stage_2_train_images" / f"{pid}.dcm").pixel_array
        image = Image.fromarray(pixels)
        image.save(out / "stage_2_train_images_processed" / f"{pid}.png", format="PNG")
        scaled = np.asarray(image, dtype=float) / 255.0
        stats[pid] = (scaled.mean(), scaled.var())
        _save_mask(box_mask(boxes, *scaled.shape[:2]), out / "stage_2_train_masks" / f"{pid}.gif")
        samples[pid] = (boxes, [1] * len(boxes))
    return samples, stats


def _siim(raw: Path, out: Path) -> tuple[dict, dict]:
    encodings: dict[str, list[str]] = defaultdict(list)
    for row in _read_csv(raw / "train-rle.csv"):
        encodings[row["ImageId"]].append(row["EncodedPixels"])
    dicoms = {p.stem: p for p in (raw / "dicom-images-train").glob("*/*/*.dcm")}
    missing = [i for i in encodings if i not in dicoms]
    if missing:
        raise FileNotFoundError(f"{raw / 'dicom-images-train'}: no DICOM for {len(missing)} id(s), e.g. {missing[:3]}.")
    (out / "processed_images").mkdir()
    (out / "segmentation_masks").mkdir()
    samples, stats = {}, {}
    for image_id, rles in encodings.items():
        image = equalize_hist(pydicom.dcmread(dicoms[image_id]).pixel_array.astype(float) / 255.0)
        stats[image_id] = (image.mean(), image.var())
        Image.fromarray((255 * image).astype(np.uint8)).convert("L").save(out / "processed_images" / f"{image_id}.png")
        _save_mask(rle_decode(rles, *image.shape), out / "segmentation_masks" / f"{image_id}.gif")
        samples[image_id] = None
    return samples, stats


def _covid_rural(raw: Path, out: Path) -> tuple[dict, dict]:
    (out / "processed_images").mkdir()
    (out / "pngs_masks").mkdir()
    samples, stats = {}, {}
    for source in sorted((raw / "jpgs").glob("COVID-19-AR-*.jpg")):
        mask_path = raw / "pngs_masks" / f"{source.stem}.png"
        if not mask_path.is_file():
            logger.warning(f"Mask not found: {mask_path} (image skipped, as the authors do)")
            continue
        image = np.asarray(Image.open(source), dtype=float) / 255.0
        image = equalize_hist(image.mean(axis=-1) if image.ndim == 3 else image)
        mask = np.asarray(Image.open(mask_path))
        if mask.shape != image.shape:
            raise ValueError(f"{mask_path}: mask size {mask.shape} differs from {source} {image.shape}.")
        if not set(np.unique(mask).tolist()) <= {0, 1}:
            raise ValueError(f"{mask_path}: mask values must be 0/1, found {np.unique(mask)[:10].tolist()}.")
        stats[source.stem] = (image.mean(), image.var())
        Image.fromarray((255 * image).astype(np.uint8)).convert("L").save(out / "processed_images" / source.name)
        shutil.copy2(mask_path, out / "pngs_masks" / mask_path.name)
        samples[source.stem] = None
    if not samples:
        raise FileNotFoundError(f"{raw / 'jpgs'}: no COVID-19-AR-*.jpg with a mask in {raw / 'pngs_masks'}.")
    return samples, stats


def _random_split(ids: list[str], seed: int | None, val: float, test: float) -> dict[str, list[str]]:
    """The authors' ``random_split_indices``: one permutation, test first, then validation, the rest train."""
    order = np.random.RandomState(seed).permutation(len(ids))
    n_test, n_val = round(test * len(ids)), round(val * len(ids))
    parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {split: [ids[i] for i in parts[split]] for split in SPLITS}


def _patient_split(ids: list[str], seed: int | None, val: float, test: float) -> dict[str, list[str]]:
    """COVID-Rural: whole patients drawn in a random order until the test, then validation, counts are reached."""
    by_patient: dict[str, list[str]] = defaultdict(list)
    for scan in ids:
        by_patient[scan.split("_")[0]].append(scan)
    patients = list(by_patient)
    order = list(np.random.RandomState(seed).permutation(len(patients)))
    split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, fraction in (("test", test), ("validation", val)):
        while len(split[name]) < round(fraction * len(ids)):
            split[name] += by_patient[patients[order.pop(0)]]
    split["train"] = [scan for i in order for scan in by_patient[patients[i]]]
    return split


def _official_split(folder: Path, samples: dict) -> dict[str, list[str]]:
    split = {}
    for name in SPLITS:
        ids = [row["ID"] for row in _read_csv(folder / f"{name}.csv")]
        unknown = [i for i in ids if i not in samples]
        if unknown:
            raise ValueError(f"{folder / f'{name}.csv'}: {len(unknown)} ID(s) not in the raw data, e.g. {unknown[:3]}.")
        split[name] = ids
    return split


def _write_split(path: Path, ids: list[str], samples: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        detection = next(iter(samples.values())) is not None
        writer.writerow(["ID", "boxes", "classes"] if detection else ["ID"])
        for i in ids:
            if detection:
                boxes, classes = samples[i]
                writer.writerow([i, "|".join(";".join(str(v) for v in b) for b in boxes), "|".join(map(str, classes))])
            else:
                writer.writerow([i])


def split_statistics(stats: list[tuple[float, float]]) -> dict:
    """``{"num_samples", "scan": {"pixel_mean", "pixel_std"}}``: var = mean(variances) + var(means)."""
    if not stats:
        return {"num_samples": 0, "scan": {"pixel_mean": 0.0, "pixel_std": 0.0}}
    means, variances = np.asarray([s[0] for s in stats]), np.asarray([s[1] for s in stats])
    var = float(variances.mean() + means.var())
    return {"num_samples": len(stats), "scan": {"pixel_mean": float(means.mean()), "pixel_std": math.sqrt(var)}}


PREPARERS = {"rsna": _rsna, "siim": _siim, "covid_rural": _covid_rural}


def main(
    dataset: str,
    raw: str,
    out: str,
    splits: str | None = None,
    seed: int | None = None,
    val_percentage: float = 0.2,
    test_percentage: float = 0.2,
) -> str:
    """Build ``out`` from the raw download ``raw`` of ``dataset`` (``rsna``, ``siim`` or ``covid_rural``)."""
    if dataset not in PREPARERS:
        raise SystemExit(f"unknown dataset {dataset!r}; choose one of {sorted(PREPARERS)}")
    raw_dir, out_dir = Path(raw), Path(out)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw download folder not found: {raw}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new output folder (nothing is overwritten).")
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, stats = PREPARERS[dataset](raw_dir, out_dir)
    if splits:
        split = _official_split(Path(splits), samples)
    else:
        draw = _patient_split if dataset == "covid_rural" else _random_split
        split = draw(list(samples), seed, val_percentage, test_percentage)
    for name, ids in split.items():
        _write_split(out_dir / f"{name}.csv", ids, samples)
    official_stats = Path(splits) / STATS_FILE if splits else None
    if official_stats is not None and official_stats.is_file():
        shutil.copy2(official_stats, out_dir / STATS_FILE)
    else:
        with open(out_dir / STATS_FILE, "w") as f:
            json.dump({name: split_statistics([stats[i] for i in ids]) for name, ids in split.items()}, f)
    print(f"{dataset}: wrote {out} ({', '.join(f'{k} {len(v)}' for k, v in split.items())})")
    return str(out_dir)
