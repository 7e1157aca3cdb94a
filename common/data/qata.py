"""Readers for the LViT dataset layouts (QaTa-COV19, MosMedData+; MoNuSeg uses the same tree).

``<dataset_dir>/{Train_Folder,Val_Folder,Test_Folder}/{img/, labelcol/, <Split>_text.xlsx}``; the xlsx has columns
``Image`` (the **mask** file name) and ``Description``. The Covid19 branch of the official code instead reads one
``Train_Folder/Train_Val_text.xlsx`` for train and val; both forms are accepted.

Filename rule: for every mask ``m`` in ``labelcol/`` the image is ``m`` with a leading ``mask_`` stripped if that file
exists in ``img/``, else ``m`` itself; the text key is ``m``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from ..core.io import write_atomically

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "check_lvit_dataset", "lvit_datalist", "read_text_table", "record_split", "text_table_path"]

SPLITS = ("Train", "Val", "Test")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_text_table(path: str) -> dict[str, str]:
    """``{Image: Description}`` from an LViT text xlsx, with errors naming the file and the problem."""
    from openpyxl import load_workbook

    if not os.path.isfile(path):
        raise FileNotFoundError(f"text table not found: {path}")
    rows = list(load_workbook(path, read_only=True).worksheets[0].iter_rows(values_only=True))
    if not rows:
        raise ValueError(f"{path}: empty spreadsheet")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    if "Image" not in header or "Description" not in header:
        raise ValueError(f"{path}: needs columns 'Image' and 'Description', found {header}")
    i_img, i_txt = header.index("Image"), header.index("Description")
    table: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        name, text = row[i_img], row[i_txt]
        if name is None and text is None:
            continue
        if name is None or text is None or not str(text).strip():
            raise ValueError(f"{path}: row {n} has an empty Image or Description ({name!r}, {text!r})")
        table[str(name).strip()] = str(text)
    return table


def text_table_path(dataset_dir: str, split: str) -> tuple[str, bool]:
    """The xlsx for ``split`` and whether it is the combined ``Train_Val_text.xlsx`` (which also lists other splits)."""
    own = os.path.join(dataset_dir, f"{split}_Folder", f"{split}_text.xlsx")
    if os.path.isfile(own):
        return own, False
    combined = os.path.join(dataset_dir, "Train_Folder", "Train_Val_text.xlsx")
    if split in ("Train", "Val") and os.path.isfile(combined):
        return combined, True
    raise FileNotFoundError(f"no text table for split {split!r}: expected {own}")


def _list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder not found: {folder}")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXT))


def check_lvit_dataset(dataset_dir: str, split: str) -> list[str]:
    """Every mask/image/text mismatch of one split, one human-readable line each (empty when consistent)."""
    folder = os.path.join(dataset_dir, f"{split}_Folder")
    images, masks = _list_images(os.path.join(folder, "img")), _list_images(os.path.join(folder, "labelcol"))
    table_path, combined = text_table_path(dataset_dir, split)
    table = read_text_table(table_path)
    image_set, problems, used_images = set(images), [], set()
    for m in masks:
        stripped = m[len("mask_") :] if m.startswith("mask_") else m
        image = stripped if stripped in image_set else m
        if image not in image_set:
            problems.append(f"{folder}/labelcol/{m}: no image {stripped} in {folder}/img")
        used_images.add(image)
        if m not in table:
            problems.append(f"{folder}/labelcol/{m}: no Description for it in {table_path}")
    problems += [f"{folder}/img/{i}: image without mask (and so without text)" for i in images if i not in used_images]
    if not combined:
        mask_set = set(masks)
        problems += [
            f"{table_path}: text for {k} but no such mask in {folder}/labelcol" for k in table if k not in mask_set
        ]
    return problems


def lvit_datalist(dataset_dir: str, split: str = "Train", names: Sequence[str] | str | None = None) -> list[dict]:
    """``[{"image", "label", "text", "name"}]`` for one split, raising on any mismatch (see :func:`check_lvit_dataset`).

    ``names`` restricts the list to these mask names (a list, or a text file with one name a line, e.g. the
    labelled subset of the semi-supervised recipe).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems = check_lvit_dataset(dataset_dir, split)
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ValueError(f"{len(problems)} problem(s) in {dataset_dir} split {split}:\n  {shown}")
    folder = os.path.join(dataset_dir, f"{split}_Folder")
    table = read_text_table(text_table_path(dataset_dir, split)[0])
    image_set = set(_list_images(os.path.join(folder, "img")))
    keep = _read_names(names)
    items = []
    for m in _list_images(os.path.join(folder, "labelcol")):
        if keep is not None and m not in keep:
            continue
        stripped = m[len("mask_") :] if m.startswith("mask_") else m
        image = stripped if stripped in image_set else m
        items.append(
            {
                "image": os.path.join(folder, "img", image),
                "label": os.path.join(folder, "labelcol", m),
                "text": table[m],
                "name": m,
            }
        )
    if keep is not None and len(items) != len(keep):
        missing = sorted(keep - {d["name"] for d in items})[:10]
        raise ValueError(f"{len(keep) - len(items)} listed name(s) not in {folder}/labelcol, e.g. {missing}")
    return items


def record_split(dataset_dir: str, path: str) -> dict[str, list[str]]:
    """The mask names of each official split folder, written to ``path`` on first use and checked against it later.

    The official splits are the ``Train_Folder``/``Val_Folder``/``Test_Folder`` trees (the authors' downloads);
    the record lets a run say whether its dataset copy is the one an earlier run (or a published result) used.
    A difference is an error naming the file and the split; the record is never overwritten.
    """
    current = {
        split: _list_images(os.path.join(dataset_dir, f"{split}_Folder", "labelcol"))
        for split in SPLITS
        if os.path.isdir(os.path.join(dataset_dir, f"{split}_Folder", "labelcol"))
    }
    if not current:  # e.g. MONAI Label passes its datastore records instead of the official tree
        logger.info(f"no official split folders under {dataset_dir}: split record {path} not written or checked")
        return current
    if not os.path.isfile(path):
        write_atomically(path, lambda f: json.dump(current, f, indent=1), binary=False)
        sizes = ", ".join(f"{k} {len(v)}" for k, v in current.items())
        logger.info(f"split record written on first use: {path} ({sizes} masks from {dataset_dir})")
        return current
    with open(path) as f:
        recorded = json.load(f)
    for split, names in recorded.items():
        have = set(current.get(split, ()))
        missing, extra = sorted(set(names) - have), sorted(have - set(names))
        if missing or extra:
            raise ValueError(
                f"{dataset_dir} split {split} differs from the record {path}: {len(missing)} recorded mask(s) missing"
                f" (e.g. {missing[:3]}), {len(extra)} not recorded (e.g. {extra[:3]}); use the dataset the record"
                " lists, or move the record away to start a new one"
            )
    logger.info(f"split matches the record {path}")
    return current


def _read_names(names: Sequence[str] | str | None) -> set[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        if not os.path.isfile(names):
            raise FileNotFoundError(f"name list not found: {names}")
        with open(names) as f:
            return {line.strip() for line in f if line.strip()}
    return set(names)
