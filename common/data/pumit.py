"""PUMIT pre-training data: a multi-dataset data list of mixed 2D / 3D images that keep their spacing.

Data list (JSON)::

    {"datasets": {"<name>": {"weight": 1.0}},          # optional per-dataset sampling weights
     "training": [{"image": "ct/case1.nii.gz", "dataset": "<name>"},
                  {"image": "xray/img1.png", "dataset": "<name>", "spacing": [0.15, 0.15]},
                  {"image": "mr/series1", "dataset": "<name>"}],   # a folder = one DICOM series
     "validation": [...]}

Paths are relative to the JSON file. NIfTI spacing comes from the header, DICOM from PixelSpacing and
the slice positions, PNG is 2D (depth 1, depth spacing 1e8, so DA 5) with an optional in-plane
``spacing`` (default 1). Every volume is put depth-first ``(1, D, H, W)`` with depth the axis whose
removal leaves the most similar in-plane spacings, intensities map the 0.5-99.5 percentile range of
values above the minimum to [0, 1] (8-bit PNG: / 255). Missing or non-positive spacing is an error
naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from monai.transforms import MapTransform, Randomizable
from PIL import Image
from torch.utils.data import Sampler

from ..core.spacing import ANISO_D_2D, aniso_d_from_spacing

__all__ = [
    "DABucketBatchSampler",
    "LoadPUMITImaged",
    "PUMITCropd",
    "PUMITPrepareBatch",
    "PadToTokenGridd",
    "load_medmnist_npz",
    "load_pumit_datalist",
    "read_image",
    "read_spacing",
]

SPACING_2D = 1e8
PNG_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _check_spacing(spacing: Sequence[float], path: str) -> tuple[float, float, float]:
    if spacing is None or len(spacing) != 3:
        raise ValueError(f"{path}: missing spacing metadata (got {spacing!r}); add 'spacing' to its data list entry.")
    if any(not math.isfinite(float(s)) or float(s) <= 0 for s in spacing):
        raise ValueError(f"{path}: spacing {tuple(float(s) for s in spacing)} must be finite and positive.")
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


# not LoadImage(PydicomReader): it orders slices by InstanceNumber and steps along z only; this orders along the
# slice normal and measures the 3D step, so oblique or renumbered series keep their geometry
def _dicom_files(folder: str) -> list:
    import pydicom

    files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if not f.startswith(".")]
    if not files:
        raise ValueError(f"{folder}: the DICOM series folder is empty.")
    slices = [pydicom.dcmread(f, stop_before_pixels=False) for f in files]
    for f, ds in zip(files, slices):
        if "PixelSpacing" not in ds:
            raise ValueError(f"{f}: DICOM slice has no PixelSpacing (spacing metadata missing).")
        if "ImagePositionPatient" not in ds and len(slices) > 1:
            raise ValueError(f"{f}: DICOM slice has no ImagePositionPatient; cannot order the series.")
    if len(slices) > 1:
        orient = (
            np.asarray(slices[0].ImageOrientationPatient, dtype=float)
            if "ImageOrientationPatient" in slices[0]
            else np.array([1, 0, 0, 0, 1, 0], dtype=float)
        )
        normal = np.cross(orient[:3], orient[3:])
        order = sorted(
            range(len(slices)), key=lambda i: float(np.dot(normal, np.asarray(slices[i].ImagePositionPatient, float)))
        )
        slices = [slices[i] for i in order]
        files = [files[i] for i in order]
    return list(zip(files, slices))


def _dicom_spacing(series: list, folder: str) -> tuple[float, float, float]:
    f0, ds = series[0]
    sy, sx = (float(v) for v in ds.PixelSpacing)
    if len(series) > 1:
        p0 = np.asarray(series[0][1].ImagePositionPatient, float)
        p1 = np.asarray(series[1][1].ImagePositionPatient, float)
        sz = float(np.linalg.norm(p1 - p0))
    else:
        sz = float(getattr(ds, "SliceThickness", 0) or 0)
    return _check_spacing((sz, sy, sx), folder)


def _nifti_depth_first(path: str) -> tuple[nib.Nifti1Image, tuple[int, int, int], tuple[float, float, float]]:
    img = nib.load(path)
    with nib.openers.ImageOpener(path) as f:  # raw pixdim: nibabel's load silently turns 0 into 1
        raw = type(img.header).from_fileobj(f, check=False)
    zooms = tuple(float(z) for z in raw.get_zooms()[:3])
    if len(img.shape) < 3 or len(zooms) < 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {img.shape}.")
    zooms = _check_spacing(zooms, path)
    # depth = the axis whose removal leaves the closest in-plane spacings (ties: the thickest axis)
    depth = min(range(3), key=lambda a: (abs(np.subtract(*[zooms[i] for i in range(3) if i != a])), -zooms[a]))
    order = (depth, *[i for i in range(3) if i != depth])
    return img, order, tuple(zooms[i] for i in order)  # type: ignore[return-value]


def read_spacing(path: str, spacing: Sequence[float] | None = None) -> tuple[float, float, float]:
    """Depth-first spacing of an image without reading its pixels (2D images: depth spacing 1e8)."""
    if os.path.isdir(path):
        return _dicom_spacing(_dicom_files(path), path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: image listed in the data list does not exist.")
    lower = path.lower()
    if lower.endswith(PNG_SUFFIXES):
        sy, sx = (1.0, 1.0) if spacing is None else tuple(spacing)[-2:]
        return _check_spacing((SPACING_2D, sy, sx), path)
    if lower.endswith(NIFTI_SUFFIXES):
        return _nifti_depth_first(path)[2]
    raise ValueError(f"{path}: unsupported image format; use NIfTI, PNG/JPEG or a DICOM series folder.")


# not ScaleIntensityRangePercentiles: its percentiles count the background minimum too (a test shows the gap)
def _normalise(arr: np.ndarray) -> np.ndarray:
    """Map the 0.5-99.5 percentile range of the values above the minimum to [0, 1]."""
    arr = arr.astype(np.float32)
    fg = arr[arr > arr.min()]
    if fg.size == 0:
        return np.zeros_like(arr)
    lo, hi = np.percentile(fg, [0.5, 99.5])
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def read_image(path: str, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``(1, D, H, W)`` float32 image in [0, 1] and its depth-first spacing."""
    lower = path.lower()
    if os.path.isdir(path):
        series = _dicom_files(path)
        vol = np.stack(
            [
                ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
                for _, ds in series
            ]
        )
        return _normalise(vol)[None], _dicom_spacing(series, path)
    sp = read_spacing(path, spacing)
    if lower.endswith(PNG_SUFFIXES):
        img = np.asarray(Image.open(path).convert("L"))
        arr = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else _normalise(img)
        return arr[None, None], sp
    img, order, sp = _nifti_depth_first(path)
    vol = np.asarray(img.dataobj, dtype=np.float32)
    if vol.ndim > 3:
        vol = vol[..., 0] if vol.shape[3] == 1 else vol.reshape(*vol.shape[:3], -1)[..., 0]
    return _normalise(vol.transpose(order))[None], sp


def load_pumit_datalist(path: str, split: str = "training", scale: Sequence[float] = (1.0, 1.0, 1.0)) -> list[dict]:
    """Items ``{"image", "dataset", "weight", "spacing", "aniso_d"}`` of one split, headers checked up front."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: PUMIT data list not found.")
    with open(path) as f:
        content = json.load(f)
    if split not in content:
        raise KeyError(f"{path} has no '{split}' list (found: {sorted(content)})")
    datasets = content.get("datasets", {})
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for entry in content[split]:
        image = os.path.join(base, entry["image"])
        spacing = read_spacing(image, entry.get("spacing"))
        name = entry.get("dataset", "default")
        items.append(
            {
                "image": image,
                "dataset": name,
                "weight": float(datasets.get(name, {}).get("weight", 1.0)),
                "spacing": list(spacing),
                "aniso_d": aniso_d_from_spacing(spacing, scale),
            }
        )
    return items


class LoadPUMITImaged(MapTransform):
    """Read ``d[key]`` (NIfTI / PNG / DICOM folder) to a ``(1, D, H, W)`` MetaTensor in [0, 1].

    Also sets ``spacing`` (depth-first) and ``aniso_d``.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            arr, spacing = read_image(path, d.get("spacing") if path.lower().endswith(PNG_SUFFIXES) else None)
            affine = torch.diag(
                torch.tensor([*(1.0 if s >= SPACING_2D else s for s in spacing), 1.0], dtype=torch.float64)
            )
            d[key] = MetaTensor(
                torch.from_numpy(np.ascontiguousarray(arr)), affine=affine, meta={"filename_or_obj": path}
            )
            d["spacing"] = torch.tensor(spacing)
            d["aniso_d"] = aniso_d_from_spacing(spacing)
        return d


class PUMITCropd(Randomizable, MapTransform):
    """Random crop of ``(tz * (patch >> DA), patch * tx, patch * tx)`` voxels (``tz = 1`` in 2D), padded if small."""

    def __init__(self, keys: KeysCollection = "image", tz: int = 5, tx: int = 10, patch: int = 16):
        super().__init__(keys)
        self.tz, self.tx, self.patch = tz, tx, patch

    def roi(self, aniso_d: int) -> tuple[int, int, int]:
        if aniso_d >= ANISO_D_2D:
            return 1, self.patch * self.tx, self.patch * self.tx
        return self.tz * max(self.patch >> aniso_d, 1), self.patch * self.tx, self.patch * self.tx

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        roi = self.roi(int(d["aniso_d"]))
        for key in self.key_iterator(d):
            img = d[key]
            pad = [max(r - s, 0) for r, s in zip(roi, img.shape[1:])]
            if any(pad):
                img = torch.nn.functional.pad(img, [p for q in reversed(pad) for p in (q // 2, q - q // 2)])
            start = [int(self.R.randint(0, s - r + 1)) for s, r in zip(img.shape[1:], roi)]
            d[key] = img[:, start[0] : start[0] + roi[0], start[1] : start[1] + roi[1], start[2] : start[2] + roi[2]]
        return d


class PadToTokenGridd(MapTransform):
    """Zero-pad the end of each axis to whole tokens: depth to a multiple of ``patch >> DA``, in-plane of ``patch``."""

    def __init__(self, keys: KeysCollection = "image", patch: int = 16):
        super().__init__(keys)
        self.patch = patch

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        k_d = max(self.patch >> int(d["aniso_d"]), 1)
        for key in self.key_iterator(d):
            img = d[key]
            pad = [(-s) % k for s, k in zip(img.shape[1:], (k_d, self.patch, self.patch))]
            d[key] = torch.nn.functional.pad(img, [0, pad[2], 0, pad[1], 0, pad[0]])
        return d


class DABucketBatchSampler(Sampler[list[int]]):
    """Weighted draws of images, one degree of anisotropy per batch (DA is a per-batch network argument).

    Each batch draws its first image with probability proportional to ``weight``, then fills up with
    images of the same ``aniso_d`` (also by weight). ``num_batches`` batches make one epoch.
    """

    def __init__(self, data: Sequence[Mapping], batch_size: int, num_batches: int, seed: int = 0):
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.weights = np.array([float(d.get("weight", 1.0)) for d in data])
        self.aniso_d = np.array([int(d["aniso_d"]) for d in data])
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        p = self.weights / self.weights.sum()
        for _ in range(self.num_batches):
            first = int(self.rng.choice(len(p), p=p))
            same = np.flatnonzero(self.aniso_d == self.aniso_d[first])
            q = self.weights[same] / self.weights[same].sum()
            yield [first, *self.rng.choice(same, size=self.batch_size - 1, p=q).tolist()]


class PUMITPrepareBatch(PrepareBatch):
    """``(image, target, (), {"aniso_d": DA})`` for SupervisedTrainer / Evaluator.

    ``target_key`` None gives no target (MIM); ``"image"`` makes the input its own target (tokenizer).
    """

    def __init__(self, image_key: str = "image", target_key: str | None = None):
        self.image_key = image_key
        self.target_key = target_key

    def __call__(self, batchdata: dict, device: torch.device | None = None, non_blocking: bool = False, **kwargs):
        da = torch.as_tensor(batchdata["aniso_d"]).flatten()
        if not bool((da == da[0]).all()):
            raise ValueError(f"a PUMIT batch must share one aniso_d, got {da.tolist()}; use DABucketBatchSampler.")
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking)
        target = None if self.target_key is None else image
        if self.target_key not in (None, self.image_key):
            target = torch.as_tensor(batchdata[self.target_key]).to(device=device, non_blocking=non_blocking)
        return image, target, (), {"aniso_d": int(da[0])}


def load_medmnist_npz(path: str, split: str = "train") -> list[dict]:
    """MedMNIST-3D ``.npz`` (``{split}_images`` N x 28^3 uint8, ``{split}_labels`` N x 1) as image / label items.

    Each item also carries ``filename_or_obj`` = ``"<file>#<split>/<index>"``, the key MONAI's savers read.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: MedMNIST npz not found.")
    with np.load(path) as npz:
        for k in (f"{split}_images", f"{split}_labels"):
            if k not in npz:
                raise KeyError(f"{path}: missing array '{k}' (found {sorted(npz.files)}).")
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    if images.ndim != 4:
        raise ValueError(f"{path}: {split}_images must be N x D x H x W, got shape {images.shape}.")
    name = os.path.basename(path)
    return [
        {
            "image": (img[None].astype(np.float32) / 255.0),
            "label": int(np.asarray(lab).reshape(-1)[0]),
            "filename_or_obj": f"{name}#{split}/{index}",  # names the sample in saved predictions
        }
        for index, (img, lab) in enumerate(zip(images, labels))
    ]
