"""Synthetic PUMIT demo data: mixed 2D slices and anisotropic 3D volumes (NIfTI, PNG, a DICOM series) with a
data list, and a MedMNIST-3D-style npz. Each writer is idempotent and never overwrites other files."""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np
from PIL import Image

__all__ = ["write_btcv_pretraining_datalist", "write_chaos_demo", "write_medmnist_demo", "write_pretraining_demo"]

logger = logging.getLogger(__name__)

# (name, shape (D, H, W), depth-first spacing): isotropic CT, thick-slice CT, MR with 6 mm slices
VOLUMES = [
    ("ct_iso", (32, 64, 64), (1.0, 1.0, 1.0)),  # DA 0
    ("ct_thick", (12, 64, 64), (2.5, 0.7, 0.7)),  # DA 1
    ("mr_t2", (8, 64, 64), (6.0, 0.9, 0.9)),  # DA 2
]


def _refuse_foreign(dataset_dir: str, marker: str) -> bool:
    """True when the demo is already there; raises when the folder holds something else."""
    if os.path.exists(os.path.join(dataset_dir, marker)):
        logger.info("demo data already present in %s", dataset_dir)
        return True
    if os.path.isdir(dataset_dir) and os.listdir(dataset_dir):
        raise FileExistsError(f"{dataset_dir} is not empty and has no {marker}; choose an empty folder")
    os.makedirs(dataset_dir, exist_ok=True)
    return False


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], n: int = 4) -> np.ndarray:
    """Smooth ellipsoids of random intensity on a noisy background."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    img = 0.1 * rng.standard_normal(shape)
    for _ in range(n):
        c = rng.uniform(-0.6, 0.6, len(shape))
        r = rng.uniform(0.2, 0.5, len(shape))
        img += rng.uniform(0.5, 1.5) * (sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r)) < 1)
    return img


def _write_dicom_series(folder: str, vol: np.ndarray, spacing: tuple[float, float, float]) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder)
    series_uid, study_uid = generate_uid(), generate_uid()
    for i, sl in enumerate(vol):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "demo", i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i * spacing[0])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = sl.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = sl.astype(np.int16).tobytes()
        ds.save_as(os.path.join(folder, f"slice{i:03d}.dcm"), enforce_file_format=True)


def write_pretraining_demo(dataset_dir: str, copies: int = 2, num_png: int = 4, seed: int = 0) -> str:
    """Write NIfTI volumes (DA 0, 1, 2), a DICOM series (DA 2), 8-bit PNG slices (DA 5) and ``datalist.json``."""
    if _refuse_foreign(dataset_dir, "datalist.json"):
        return dataset_dir
    rng = np.random.default_rng(seed)
    training, validation = [], []
    for name, shape, sp in VOLUMES:
        os.makedirs(os.path.join(dataset_dir, name), exist_ok=True)
        for c in range(copies + 1):
            vol = (_blobs(rng, shape) * 400 - 100).astype(np.int16)
            # stored (W, H, D) on disk as scanners write them; the reader puts the thick axis first
            affine = np.diag([sp[2], sp[1], sp[0], 1.0])
            rel = f"{name}/case{c}.nii.gz"
            nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), affine), os.path.join(dataset_dir, rel))
            (validation if c == copies else training).append({"image": rel, "dataset": name})
    dicom_sp = (5.0, 0.8, 0.8)
    _write_dicom_series(os.path.join(dataset_dir, "dicom_ct", "series0"), _blobs(rng, (8, 64, 64)) * 300, dicom_sp)
    training.append({"image": "dicom_ct/series0", "dataset": "dicom_ct"})
    os.makedirs(os.path.join(dataset_dir, "xray"), exist_ok=True)
    for i in range(num_png + 1):
        img = np.clip(_blobs(rng, (64, 64)) * 120 + 60, 0, 255).astype(np.uint8)
        rel = f"xray/img{i}.png"
        Image.fromarray(img).save(os.path.join(dataset_dir, rel))
        (validation if i == num_png else training).append({"image": rel, "dataset": "xray", "spacing": [0.14, 0.14]})
    datalist = {
        "datasets": {
            "ct_iso": {"weight": 1.0},
            "ct_thick": {"weight": 1.0},
            "mr_t2": {"weight": 1.0},
            "dicom_ct": {"weight": 0.5},
            "xray": {"weight": 0.5},
        },
        "training": training,
        "validation": validation,
    }
    with open(os.path.join(dataset_dir, "datalist.json"), "w") as f:
        json.dump(datalist, f, indent=4)
    return dataset_dir


def write_btcv_pretraining_datalist(btcv_dir: str, datalist_json: str = "dataset_0.json") -> str:
    """Write ``<btcv_dir>/pumit_datalist.json``: the BTCV images (no labels) of ``datalist_json`` as a PUMIT data list.

    The training / validation images stay in their splits, so MIM pre-training on the BTCV demo never sees the
    downstream validation cases. Returns the path; pass it as ``--datalist`` to the pre-training bundle.
    """
    with open(os.path.join(btcv_dir, datalist_json)) as f:
        src = json.load(f)
    content = {"datasets": {"btcv": {"weight": 1.0}}}
    for split in ("training", "validation"):
        content[split] = [{"image": e["image"], "dataset": "btcv"} for e in src[split]]
    path = os.path.join(btcv_dir, "pumit_datalist.json")
    with open(path, "w") as f:
        json.dump(content, f, indent=4)
    return path


def write_medmnist_demo(
    dataset_dir: str, name: str = "organmnist3d", num_classes: int = 3, per_split: int = 12, seed: int = 0
) -> str:
    """Write ``<name>.npz`` with 28^3 uint8 volumes whose class sets the number of bright blobs."""
    if _refuse_foreign(dataset_dir, f"{name}.npz"):
        return dataset_dir
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "val", "test"):
        labels = np.arange(per_split) % num_classes
        images = [np.clip(_blobs(rng, (28, 28, 28), n=int(k) + 1) * 150, 0, 255).astype(np.uint8) for k in labels]
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.int64)
    np.savez_compressed(os.path.join(dataset_dir, f"{name}.npz"), **arrays)
    return dataset_dir


def write_chaos_demo(
    dataset_dir: str, num_cases: int = 4, shape: tuple[int, int, int] = (48, 48, 8), seed: int = 0
) -> str:
    """CHAOS MR layout ``Train/<case>/{T1DUAL,T2SPIR}/{image,label}.nii.gz`` of blob phantoms.

    T1DUAL images carry in/out phase as 2 channels (last axis), T2SPIR one; labels are 0..4 (liver, kidneys,
    spleen) inside the blobs, spacing (1.6, 1.6, 9) mm as the real scans. Returns ``dataset_dir``.
    """
    if _refuse_foreign(dataset_dir, "Train"):
        return dataset_dir
    rng = np.random.default_rng(seed)
    affine = np.diag([1.6, 1.6, 9.0, 1.0])
    for case in range(1, num_cases + 1):
        for seq, channels in (("T1DUAL", 2), ("T2SPIR", 1)):
            folder = os.path.join(dataset_dir, "Train", str(case), seq)
            os.makedirs(folder)
            label = np.zeros(shape, np.uint8)
            for organ in range(1, 5):
                label[_blobs(rng, shape, n=1) > 0.4] = organ
            phases = [100 + 80 * label + 10 * rng.standard_normal(shape) * (c + 1) for c in range(channels)]
            image = np.stack(phases, -1).astype(np.float32) if channels > 1 else phases[0].astype(np.float32)
            nib.save(nib.Nifti1Image(image, affine), os.path.join(folder, "image.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), os.path.join(folder, "label.nii.gz"))
    logger.info("wrote %d CHAOS demo cases to %s", num_cases, dataset_dir)
    return dataset_dir
