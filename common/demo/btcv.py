"""Synthetic abdominal CT phantoms in the BTCV layout, for demos and tests.

Each case is a NIfTI volume in Hounsfield units (air, fat, soft tissue, contrast-enhanced vessels)
with 13 organ-like ellipsoids and tubes at jittered positions, stored with anisotropic spacing and
an LPS-like affine so that orientation and resampling are really exercised. Labels use BTCV values.
Each organ has its own enhancement level, 25 HU or more from the next (left and right organs share one),
so that a CPU-sized network can learn all 13 classes in minutes; real CT is far less forgiving.
"""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np

from ..data.btcv import btcv_split_json

logger = logging.getLogger(__name__)

# organ value -> (centre in body-relative coords [-1, 1], radii as a fraction of the body half-axes, HU)
_ORGANS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    6: ((-0.35, -0.10, 0.25), (0.45, 0.45, 0.45), 70.0),  # liver
    1: ((0.50, 0.25, 0.25), (0.18, 0.22, 0.25), 95.0),  # spleen
    7: ((0.25, -0.30, 0.30), (0.25, 0.18, 0.22), -50.0),  # stomach
    2: ((-0.40, 0.45, -0.25), (0.12, 0.14, 0.28), 170.0),  # right kidney
    3: ((0.40, 0.45, -0.20), (0.12, 0.14, 0.28), 170.0),  # left kidney
    4: ((-0.22, -0.35, 0.00), (0.08, 0.08, 0.12), -15.0),  # gallbladder
    11: ((0.05, 0.10, -0.05), (0.30, 0.07, 0.08), 120.0),  # pancreas
    12: ((-0.25, 0.40, 0.30), (0.05, 0.05, 0.08), 145.0),  # right adrenal
    13: ((0.25, 0.40, 0.35), (0.05, 0.05, 0.08), 145.0),  # left adrenal
}
# tubes running along z: value -> (x, y, radius fraction, HU)
_TUBES: dict[int, tuple[float, float, float, float]] = {
    8: (0.08, 0.35, 0.06, 245.0),  # aorta
    9: (-0.12, 0.30, 0.06, 195.0),  # inferior vena cava
    5: (0.02, 0.50, 0.035, 45.0),  # esophagus
}
_PORTAL_VEIN = 10


def _phantom(rng: np.random.Generator, shape: tuple[int, int, int], noise_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """One HU volume and its label map, both in voxel order (x, y, z) with x running left to right."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body_half = np.array([0.85, 0.70, 1.3]) * rng.uniform(0.93, 1.05, 3)
    body = ((grid / body_half[:, None, None, None]) ** 2)[:2].sum(0) <= 1.0
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = -90.0  # subcutaneous / visceral fat
    inner = ((grid / (body_half * 0.88)[:, None, None, None]) ** 2)[:2].sum(0) <= 1.0
    image[inner] = 20.0  # muscle and soft tissue
    label = np.zeros(shape, dtype=np.uint8)
    shift = rng.normal(0.0, 0.04, 3)
    for value, (centre, radii, hu) in _ORGANS.items():
        c = (np.array(centre) + shift) * body_half
        r = np.array(radii) * body_half * rng.uniform(0.85, 1.15, 3)
        mask = (((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1.0
        label[mask & inner] = value
        image[mask & inner] = hu
    for value, (x, y, radius, hu) in _TUBES.items():
        c = (np.array([x, y]) + shift[:2]) * body_half[:2]
        mask = (((grid[:2] - c[:, None, None, None]) / (radius * body_half[0])) ** 2).sum(0) <= 1.0
        if value == 5:  # the oesophagus only runs through the upper abdomen
            mask &= grid[2] > 0.3
        label[mask] = value
        image[mask] = hu
    portal = (np.abs(grid[1] - (0.05 + shift[1])) < 0.05) & (np.abs(grid[2] - 0.05) < 0.06) & (np.abs(grid[0]) < 0.4)
    label[portal & (label == 0) & inner] = _PORTAL_VEIN
    image[label == _PORTAL_VEIN] = 220.0
    image += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    return image, label


def write_btcv_demo(
    dataset_dir: str,
    num_training: int = 6,
    num_validation: int = 2,
    num_test: int = 1,
    shape: tuple[int, int, int] = (160, 128, 40),
    spacing: tuple[float, float, float] = (0.9, 0.9, 2.5),
    seed: int = 0,
    noise_hu: float = 8.0,
) -> str:
    """Write ``imagesTr``, ``labelsTr``, ``imagesTs`` and ``dataset_0.json`` to ``dataset_dir``; return it.

    Skips everything when ``dataset_0.json`` already exists there, and refuses to write into a folder
    that holds other files, so it never overwrites data it did not create.
    """
    json_path = os.path.join(dataset_dir, "dataset_0.json")
    if os.path.exists(json_path):
        logger.info("demo data already present in %s", dataset_dir)
        return dataset_dir
    if os.path.isdir(dataset_dir) and os.listdir(dataset_dir):
        raise FileExistsError(f"{dataset_dir} is not empty and has no dataset_0.json; choose an empty folder")
    rng = np.random.default_rng(seed)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # stored LPS-like, as scanners write them
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(dataset_dir, sub), exist_ok=True)
    total = num_training + num_validation + num_test
    cases = list(range(1, total + 1))
    for n, case in enumerate(cases, start=1):
        image, label = _phantom(rng, shape, noise_hu)
        is_test = n > num_training + num_validation
        folder = "imagesTs" if is_test else "imagesTr"
        nib.save(
            nib.Nifti1Image(image.astype(np.int16), affine), os.path.join(dataset_dir, folder, f"img{case:04d}.nii.gz")
        )
        if not is_test:
            label_path = os.path.join(dataset_dir, "labelsTr", f"label{case:04d}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), label_path)
        logger.info("demo case %d/%d written", n, total)
    split = btcv_split_json(
        cases[:num_training],
        cases[num_training : num_training + num_validation],
        cases[num_training + num_validation :],
    )
    with open(json_path, "w") as f:
        json.dump(split, f, indent=4)
    return dataset_dir
