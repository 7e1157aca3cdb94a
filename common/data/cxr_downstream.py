"""Readers for the LoVT downstream chest X-ray segmentation datasets (SIIM, RSNA, COVID-Rural, own data).

Three layouts:

- the authors' files, read unchanged: ``<dataset_dir>/<split>.csv`` with an ``ID`` column (RSNA also ``boxes,
  classes``) and the images/masks where their preparation scripts (or ``python -m tools prepare lovt_downstream``)
  put them (``LAYOUTS``), plus their nested ``dataset_statistics.json``;
- a split CSV with image and mask path columns (relative to ``dataset_dir``);
- image/mask folders per split (``<dataset_dir>/<split>/{images,masks}/``, masks matched to images by file stem).

Subsets are the *first* round(N * fraction) rows, as the paper used.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from ..core.io import write_atomically

__all__ = ["segmentation_datalist", "dataset_statistics", "normalization_statistics", "save_normalization"]

logger = logging.getLogger(__name__)
# The authors' loaders (src/data/datasets/*): image and mask path of a CSV ``ID``.
LAYOUTS = {
    "rsna": ("stage_2_train_images_processed/{}.png", "stage_2_train_masks/{}.gif"),
    "siim": ("processed_images/{}.png", "segmentation_masks/{}.gif"),
    "covid_rural": ("processed_images/{}.jpg", "pngs_masks/{}.png"),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff"}


def _first(items: list, fraction: float) -> list:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    return items[: max(1, round(len(items) * fraction))] if items else items


def _folder_datalist(folder: Path) -> list[dict]:
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise FileNotFoundError(f"{folder}: expected 'images/' and 'masks/' sub-folders.")
    by_stem = {p.stem: p for p in masks.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
    data, unmatched = [], []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
        if image.stem in by_stem:
            data.append({"image": str(image), "label": str(by_stem[image.stem])})
        else:
            unmatched.append(image.name)
    if unmatched:
        raise FileNotFoundError(f"{masks}: no mask for {len(unmatched)} image(s), e.g. {unmatched[:5]}.")
    return data


def _official_layout(csv_file: Path, root: Path, first_id: str, layout: str | None) -> tuple[str, str]:
    """The ``LAYOUTS`` entry named by ``layout``, else the one whose image exists for the CSV's first ``ID``."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}.")
        return LAYOUTS[layout]
    for templates in LAYOUTS.values():
        if (root / templates[0].format(first_id)).is_file():
            return templates
    tried = [str(root / t[0].format(first_id)) for t in LAYOUTS.values()]
    raise FileNotFoundError(f"{csv_file}: image of ID {first_id!r} not found in any official layout; tried {tried}.")


def _csv_datalist(csv_file: Path, root: Path, image_col: str, mask_col: str, layout: str | None) -> list[dict]:
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    if "ID" in columns and image_col not in columns:
        templates = _official_layout(csv_file, root, rows[0]["ID"], layout) if rows else ("", "")
        rows = [{image_col: templates[0].format(r["ID"]), mask_col: templates[1].format(r["ID"])} for r in rows]
    elif {image_col, mask_col} - set(columns):
        missing = sorted({image_col, mask_col} - set(columns))
        raise ValueError(f"{csv_file}: missing column(s) {missing} (or an official 'ID' column); found {columns}.")
    data = []
    for line_no, row in enumerate(rows, 2):
        image, mask = root / row[image_col], root / row[mask_col]
        for path in (image, mask):
            if not path.is_file():
                raise FileNotFoundError(f"{csv_file}:{line_no}: file not found: {path}")
        data.append({"image": str(image), "label": str(mask)})
    return data


def segmentation_datalist(
    dataset_dir: str,
    split: str = "train",
    fraction: float = 1.0,
    csv_file: str | None = None,
    image_col: str = "image",
    mask_col: str = "mask",
    layout: str | None = None,
) -> list[dict]:
    """``[{"image", "label"}]`` of one split; a split CSV wins over folders when it exists.

    Args:
        dataset_dir: dataset root.
        split: ``train``, ``validation`` or ``test``.
        fraction: keep the first round(N * fraction) rows (RSNA 1%/10%; validation uses 0.1 in the paper).
        csv_file: the split CSV (default ``<dataset_dir>/<split>.csv``).
        image_col, mask_col: CSV columns holding paths relative to ``dataset_dir``.
        layout: for an official ``ID`` CSV, ``rsna``, ``siim`` or ``covid_rural`` (default: detected).
    """
    root = Path(dataset_dir)
    table = Path(csv_file) if csv_file else root / f"{split}.csv"
    if table.is_file():
        data = _csv_datalist(table, root, image_col, mask_col, layout)
    else:
        data = _folder_datalist(root / split)
    if not data:
        raise ValueError(f"{dataset_dir}: split '{split}' is empty.")
    return _first(data, fraction)


def dataset_statistics(dataset_dir: str, filename: str = "dataset_statistics.json", split: str = "train") -> dict:
    """``{"pixel_mean", "pixel_std"}`` of one split (intensities scaled to [0, 1]).

    Reads the official LoVT file unchanged (``{"train": {"scan": {"pixel_mean", "pixel_std"}, ...}, ...}``) and
    the flat ``{"pixel_mean", "pixel_std"}`` files this collection writes (MIMIC index, ``models/normalization.json``).
    """
    path = os.path.join(dataset_dir, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Dataset statistics not found: {path} (pixel_mean / pixel_std of the train split).")
    with open(path) as f:
        stats = json.load(f)
    if split in stats:
        stats = stats[split].get("scan", stats[split])
    for key in ("pixel_mean", "pixel_std"):
        if key not in stats:
            raise KeyError(f"{path}: missing '{key}' (looked in '{split}' -> 'scan' and at the top level).")
    return {"pixel_mean": float(stats["pixel_mean"]), "pixel_std": float(stats["pixel_std"])}


def normalization_statistics(pixel_mean: float, pixel_std: float, statistics_file: str | None = None) -> dict:
    """The train-split statistics in ``statistics_file`` when it exists, else the configured ``pixel_mean/std``.

    Training passes ``<dataset_dir>/dataset_statistics.json`` (the official file, only needed to get the numbers);
    inference and evaluation pass ``models/normalization.json``, which training writes next to ``model.pt``, so a
    model is always normalised as it was trained and inference needs nothing but an image.
    """
    if statistics_file and os.path.isfile(statistics_file):
        stats = dataset_statistics(os.path.dirname(statistics_file), os.path.basename(statistics_file))
        logger.info(f"normalisation from {statistics_file}: {stats}")
        return stats
    if pixel_std <= 0:
        raise ValueError(f"pixel_std must be positive, got {pixel_std}.")
    stats = {"pixel_mean": float(pixel_mean), "pixel_std": float(pixel_std)}
    logger.info(f"normalisation from the config ({statistics_file or 'no statistics file'} not found): {stats}")
    return stats


def save_normalization(stats: dict, path: str) -> str:
    """Write ``{"pixel_mean", "pixel_std"}`` to ``path`` atomically (temp file + rename); return ``path``."""
    values = {"pixel_mean": stats["pixel_mean"], "pixel_std": stats["pixel_std"]}
    write_atomically(path, lambda f: json.dump(values, f, indent=4), binary=False)
    return path
