"""Synthetic partially labelled CT phantoms in the official Universal Model layout, for demos and tests.

Every phantom holds the same anatomy (liver, spleen, two kidneys, sometimes a kidney tumour), but each
"source dataset" annotates only part of it, with its own raw label values, as the real assembly does:

- ``03_CHAOS``: liver only (raw 1);
- ``05_KiTS``: kidneys as one label (raw 1) + tumour (raw 2), stored with an LPS affine, so the
  left/right split must go through the orientation;
- ``10_Decathlon/Task09_Spleen``: spleen only (raw 1).

Held-out ``01_Multi-Atlas_Labeling`` cases carry all four organs (BTCV values 1, 2, 3, 6), so the demo
reports Dice for classes that no single training source annotates. Lists are written in the official
``image<TAB>label`` format under ``dataset_list/``.
"""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

SPACING = 1.5
LISTS = ("demo_train.txt", "demo_val.txt", "demo_test.txt")
# organ -> (centre in [-1, 1] RAS voxel coords (axis 0 grows toward patient right), radii, HU)
_ORGANS = {
    "liver": ((0.35, -0.05, 0.15), (0.38, 0.40, 0.45), 110.0),
    "spleen": ((-0.45, 0.20, 0.20), (0.18, 0.22, 0.25), 190.0),
    "right kidney": ((0.40, 0.45, -0.40), (0.14, 0.15, 0.28), 240.0),
    "left kidney": ((-0.40, 0.45, -0.35), (0.14, 0.15, 0.28), 240.0),
}
_SOURCES = {
    # folder, image sub-folder, label sub-folder, case prefix
    "03": ("03_CHAOS", "img", "label", "case"),
    "05": ("05_KiTS", "img", "label", "case_00"),
    "10_09": ("10_Decathlon/Task09_Spleen", "imagesTr", "labelsTr", "spleen_"),
    "01": ("01_Multi-Atlas_Labeling", "img", "label", "img00"),
}


def _phantom(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU volume and organ masks in RAS voxel order."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    image = np.full((size,) * 3, -1000.0, dtype=np.float32)
    body = (grid[0] / 0.95) ** 2 + (grid[1] / 0.85) ** 2 <= 1.0
    image[body] = 20.0
    shift = rng.normal(0.0, 0.04, 3)
    masks = {}
    for name, (centre, radii, hu) in _ORGANS.items():
        c = np.array(centre) + shift
        r = np.array(radii) * rng.uniform(0.85, 1.15, 3)
        masks[name] = ((((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1.0) & body
        image[masks[name]] = hu
    side = "right kidney" if rng.random() < 0.5 else "left kidney"
    coords = np.argwhere(masks[side])
    tumor = np.zeros_like(body)
    if rng.random() < 0.7 and len(coords):
        centre = coords[rng.integers(len(coords))]
        radius = rng.uniform(2.0, 3.5)
        idx = np.indices(body.shape)
        tumor = (((idx - centre[:, None, None, None]) ** 2).sum(0) <= radius**2) & masks[side]
        image[tumor] = 40.0
    masks["kidney tumor"] = tumor
    image += rng.normal(0.0, 15.0, image.shape).astype(np.float32)
    return image, masks


def _raw_label(key: str, masks: dict[str, np.ndarray]) -> np.ndarray:
    label = np.zeros(masks["liver"].shape, dtype=np.uint8)
    if key == "03":
        label[masks["liver"]] = 1
    elif key == "05":
        label[masks["right kidney"] | masks["left kidney"]] = 1
        label[masks["kidney tumor"]] = 2
    elif key == "10_09":
        label[masks["spleen"]] = 1
    else:  # BTCV values
        for value, name in ((6, "liver"), (1, "spleen"), (2, "right kidney"), (3, "left kidney")):
            label[masks[name]] = value
    return label


def _write(path: str, array: np.ndarray, lps: bool) -> None:
    size = array.shape[0]
    if lps:  # flip the first two axes and say so in the affine: same anatomy in world space
        array = array[::-1, ::-1]
        affine = np.diag([-SPACING, -SPACING, SPACING, 1.0])
        affine[:2, 3] = (size - 1) * SPACING
    else:
        affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), path)


def write_universal_demo(
    dataset_dir: str, n_train: int = 2, n_val: int = 1, n_test: int = 3, size: int = 40, seed: int = 0
) -> str:
    """Write the phantoms and ``dataset_list/demo_{train,val,test}.txt`` under ``dataset_dir``; return it.

    ``n_train``/``n_val`` cases per training source, ``n_test`` fully labelled held-out cases. Idempotent:
    nothing is written when the three list files already exist; existing files are never overwritten.
    """
    list_dir = os.path.join(dataset_dir, "dataset_list")
    if all(os.path.isfile(os.path.join(list_dir, f)) for f in LISTS):
        return dataset_dir
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {f: [] for f in LISTS}
    plan = [(k, LISTS[0], n_train) for k in ("03", "05", "10_09")]
    plan += [(k, LISTS[1], n_val) for k in ("03", "05", "10_09")] + [("01", LISTS[2], n_test)]
    counters: dict[str, int] = {}
    for key, list_name, n in plan:
        folder, img_dir, lbl_dir, prefix = _SOURCES[key]
        for _ in range(n):
            counters[key] = counters.get(key, 0) + 1
            case = f"{prefix}{counters[key]:02d}"
            lbl_case = case.replace("img", "label")
            image, masks = _phantom(rng, size)
            img_rel = f"{folder}/{img_dir}/{case}.nii.gz"
            lbl_rel = f"{folder}/{lbl_dir}/{lbl_case}.nii.gz"
            for rel, arr in ((img_rel, image.round().astype(np.int16)), (lbl_rel, _raw_label(key, masks))):
                path = os.path.join(dataset_dir, rel)
                if not os.path.exists(path):
                    _write(path, arr, lps=key == "05")
            lines[list_name].append(f"{img_rel}\t{lbl_rel}")
    os.makedirs(list_dir, exist_ok=True)
    for list_name, rows in lines.items():
        path = os.path.join(list_dir, list_name)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("\n".join(rows) + "\n")
    logger.info("wrote Universal Model demo phantoms to %s", dataset_dir)
    return dataset_dir
