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
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.engines.utils import PrepareBatch
from monai.transforms import MapTransform, Randomizable, apply_transform
from PIL import Image
from torch.utils.data import Sampler

from ..core.spacing import ANISO_D_2D, aniso_d_from_spacing

__all__ = [
    "CHAOSSubmissionWriterd",
    "CHAOS_LABEL_VALUES",
    "DABucketBatchSampler",
    "ForegroundStatsd",
    "LoadPUMITImaged",
    "PUMITCropd",
    "PUMITPrepareBatch",
    "PUMITSampledDataset",
    "NormalizeWithStatsd",
    "PadToTokenGridd",
    "RandScaleDABatchSampler",
    "chaos_datalist",
    "chaos_label_from_png",
    "chaos_submission_template",
    "load_medmnist_npz",
    "load_pumit_datalist",
    "read_image",
    "read_spacing",
]

SPACING_2D = 1e8
PNG_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NPY_SUFFIX = ".npy"
"""Arrays written by ``python -m tools prepare pumit``: (D, H, W) float16 in [0, 1]; spacing from the data list."""


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
    if lower.endswith(NPY_SUFFIX):
        return _check_spacing(spacing, path)
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
    if lower.endswith(NPY_SUFFIX):
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 3:
            raise ValueError(f"{path}: prepared PUMIT arrays are (D, H, W), got shape {arr.shape}.")
        return np.asarray(arr, dtype=np.float32)[None], sp
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
                **({"shape": list(entry["shape"])} if "shape" in entry else {}),
            }
        )
    return items


class LoadPUMITImaged(MapTransform):
    """Read ``d[key]`` (NIfTI / PNG / DICOM folder) to a ``(1, D, H, W)`` MetaTensor in [0, 1].

    Also sets ``spacing`` (depth-first) and ``aniso_d`` (of the spacing times ``d["scale"]`` when a
    ``RandScaleDABatchSampler`` drew one).
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            listed = path.lower().endswith((*PNG_SUFFIXES, NPY_SUFFIX))  # spacing comes from the data list
            arr, spacing = read_image(path, d.get("spacing") if listed else None)
            affine = torch.diag(
                torch.tensor([*(1.0 if s >= SPACING_2D else s for s in spacing), 1.0], dtype=torch.float64)
            )
            d[key] = MetaTensor(
                torch.from_numpy(np.ascontiguousarray(arr)), affine=affine, meta={"filename_or_obj": path}
            )
            d["spacing"] = torch.tensor(spacing)
            d["aniso_d"] = aniso_d_from_spacing(spacing, d.get("scale", (1.0, 1.0, 1.0)))
        return d


class PUMITCropd(Randomizable, MapTransform):
    """Random crop of ``(tz * (patch >> DA), patch * tx, patch * tx)`` voxels (``tz = 1`` in 2D), padded if small.

    With ``d["scale"] = (scale_z, scale_x, scale_x)`` (drawn by ``RandScaleDABatchSampler``) a region of
    ``roi * scale`` voxels is cropped and resized (trilinear) to the roi, i.e. the spacing becomes
    ``spacing * scale``; ``d["spacing"]`` is updated accordingly.
    """

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
        scale = [float(v) for v in d.get("scale", (1.0, 1.0, 1.0))]
        size = [max(round(r * f), 1) for r, f in zip(roi, scale)]
        for key in self.key_iterator(d):
            img = d[key]
            pad = [max(r - s, 0) for r, s in zip(size, img.shape[1:])]
            if any(pad):
                img = torch.nn.functional.pad(img, [p for q in reversed(pad) for p in (q // 2, q - q // 2)])
            start = [int(self.R.randint(0, s - r + 1)) for s, r in zip(img.shape[1:], size)]
            img = img[:, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]
            if tuple(size) != roi:
                img = torch.nn.functional.interpolate(img[None], size=roi, mode="trilinear", align_corners=False)[0]
            d[key] = img
        if "spacing" in d and any(f != 1.0 for f in scale):
            d["spacing"] = torch.as_tensor(d["spacing"]) * torch.tensor(
                scale, dtype=torch.as_tensor(d["spacing"]).dtype
            )
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
    images of the same ``aniso_d`` (also by weight). One epoch is ``num_batches`` batches in all ranks
    together: every rank draws the same epoch from ``(seed, epoch)`` and keeps batches ``rank::world``,
    so under DDP no batch is drawn twice and each rank runs ``ceil(num_batches / world)`` of them.
    ``set_epoch`` (called by :meth:`attach`'s handler, like MONAI does for ``DistributedSampler``) picks
    the epoch; without it each pass over the sampler moves on to the next epoch.
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        running = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if running else 1
        self.rank = rank if rank is not None else dist.get_rank() if running else 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, {self.num_replicas}).")
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = 0
        self.weights = np.array([float(d.get("weight", 1.0)) for d in data])
        self.aniso_d = np.array([int(d["aniso_d"]) for d in data])

    def __len__(self) -> int:
        return -(-self.num_batches // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def attach(self, engine: Engine) -> None:
        """Call ``set_epoch(engine.state.epoch)`` at the start of every epoch of ``engine`` (resume included)."""
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.set_epoch(e.state.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        p = self.weights / self.weights.sum()
        for i in range(len(self) * self.num_replicas):
            first = int(rng.choice(len(p), p=p))
            same = np.flatnonzero(self.aniso_d == self.aniso_d[first])
            q = self.weights[same] / self.weights[same].sum()
            batch = [first, *rng.choice(same, size=self.batch_size - 1, p=q).tolist()]
            if i % self.num_replicas == self.rank:
                yield batch


class RandScaleDABatchSampler(Sampler[list[tuple[int, dict]]]):
    """The official PUMIT batch sampler: per-sample scale augmentation that changes the degree of anisotropy.

    Images are drawn with probability proportional to ``weight`` (a buffer of ``buffer_size`` draws at a
    time). For each draw: in-plane scale ``U[scale_x[0], min(size_x / (patch * tx), scale_x[1])]`` with
    probability ``scale_x_p`` (the cap needs ``shape`` in the item), depth scale ``U[scale_z]`` with
    probability ``scale_z_p`` only when ``s_z <= isotropic_th * s_xy``; then
    ``DA = floor(log2(clip(s_z * scale_z / (s_xy * scale_x), 1, 32)))``. Draws are bucketed by DA and every
    full bucket is one batch of ``(index, {"aniso_d", "scale"})`` items (``PUMITSampledDataset`` reads them).
    Batches are dealt round-robin to the ``num_replicas`` ranks and each rank runs ``num_batches`` of them, as
    the official sampler does (so ``num_batches`` is optimiser steps per rank and epoch, matching the per-step
    schedule). Each epoch's draws come from ``(seed, epoch)``; ``attach`` sets the epoch from the engine.
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        batch_size: int,
        num_batches: int,
        tx: int = 10,
        patch: int = 16,
        scale_x: Sequence[float] = (0.75, 2.0),
        scale_x_p: float = 0.5,
        scale_z: Sequence[float] = (0.8, 1.25),
        scale_z_p: float = 0.3,
        isotropic_th: float = 1.5,
        buffer_size: int = 16384,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = (
            num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if distributed else 1)
        )
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.data = data
        self.batch_size, self.num_batches = batch_size, num_batches
        self.size_x = patch * tx
        self.scale_x, self.scale_x_p = tuple(scale_x), scale_x_p
        self.scale_z, self.scale_z_p = tuple(scale_z), scale_z_p
        self.isotropic_th = isotropic_th
        self.buffer_size = buffer_size
        self.weights = torch.tensor([float(d.get("weight", 1.0)) for d in data], dtype=torch.float64)
        self.seed, self.epoch = seed, 0
        self.rng = np.random.default_rng([seed, 0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def attach(self, engine: Engine) -> None:
        """Call ``set_epoch(engine.state.epoch)`` at the start of every epoch of ``engine`` (resume included)."""
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.set_epoch(e.state.epoch))

    def __len__(self) -> int:
        return self.num_batches

    def draw(self, index: int) -> dict:
        """Random ``scale`` (depth, in-plane, in-plane) of one image and the resulting ``aniso_d``."""
        item = self.data[index]
        spacing = [float(v) for v in item["spacing"]]
        s_xy = min(spacing[1:])
        scale_x = 1.0
        if self.rng.uniform() < self.scale_x_p:
            high = self.scale_x[1]
            if "shape" in item:
                high = min(min(int(v) for v in item["shape"][-2:]) / self.size_x, high)
            scale_x = float(self.rng.uniform(self.scale_x[0], max(high, self.scale_x[0])))
        scale_z = 1.0
        if spacing[0] <= self.isotropic_th * s_xy and self.rng.uniform() < self.scale_z_p:
            scale_z = float(self.rng.uniform(*self.scale_z))
        scale = (scale_z, scale_x, scale_x)
        return {"aniso_d": aniso_d_from_spacing(spacing, scale), "scale": scale}

    def __iter__(self) -> Iterator[list[tuple[int, dict]]]:
        self.rng = np.random.default_rng([self.seed, self.epoch])  # every rank draws the same stream
        generator = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        self.epoch += 1
        remaining, next_rank, buckets = self.num_batches, 0, {}
        while remaining > 0:
            for index in torch.multinomial(self.weights, self.buffer_size, True, generator=generator).tolist():
                trans = self.draw(index)
                bucket = buckets.setdefault(trans["aniso_d"], [])
                bucket.append((index, trans))
                if len(bucket) < self.batch_size:
                    continue
                if next_rank == self.rank:
                    yield bucket
                    remaining -= 1
                    if remaining == 0:
                        return
                next_rank = (next_rank + 1) % self.num_replicas
                buckets.pop(trans["aniso_d"])


class PUMITSampledDataset(Dataset):
    """MONAI ``Dataset`` that also accepts ``(index, extra)`` items: ``extra`` (e.g. ``aniso_d``, ``scale``) is
    merged into the data dict before the transform runs."""

    def __getitem__(self, index: Any):
        if isinstance(index, tuple) and len(index) == 2 and isinstance(index[1], Mapping):
            data = {**self.data[index[0]], **index[1]}
            return apply_transform(self.transform, data) if self.transform is not None else data
        return super().__getitem__(index)


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


# ---- CHAOS (MR) downstream: official layout ``<root>/{Train,Test}/<case>/{T1DUAL,T2SPIR}/{image,label}.nii.gz``

CHAOS_LABEL_VALUES = (0, 63, 126, 189, 252)
"""Grey values of the CHAOS MR ground-truth PNGs for background, liver, right kidney, left kidney, spleen."""
CHAOS_CASES = tuple(range(1, 41))
CHAOS_SEQUENCES = ("T1DUAL", "T2SPIR")


def chaos_datalist(
    dataset_dir: str,
    split: str = "Train",
    sequences: Sequence[str] = CHAOS_SEQUENCES,
    cases: Sequence[str] | None = None,
    exclude_cases: Sequence[str] = (),
) -> list[dict]:
    """``{"image", ["label"]}`` items of one split (``Train`` carries labels); T1DUAL images hold in/out phase.

    ``cases`` keeps only those case folders, ``exclude_cases`` drops some (e.g. a validation hold-out).
    """
    root = os.path.join(dataset_dir, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: CHAOS split folder not found (expected <dataset_dir>/{split}/<case>/<seq>).")
    items = []
    found = sorted(os.listdir(root), key=lambda c: (len(c), c))
    missing = sorted(set(cases or ()) - set(found))
    if missing:
        raise ValueError(f"{root}: requested CHAOS cases {missing} not found.")
    for case in found:
        if (cases is not None and case not in cases) or case in exclude_cases:
            continue
        for seq in sequences:
            folder = os.path.join(root, case, seq)
            if not os.path.isdir(folder):
                continue
            item = {"image": os.path.join(folder, "image.nii.gz")}
            if split == "Train":
                item["label"] = os.path.join(folder, "label.nii.gz")
            for key, path in item.items():
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path}: CHAOS {key} missing.")
            items.append(item)
    if not items:
        raise ValueError(f"{root}: no CHAOS cases with sequences {list(sequences)}.")
    return items


def chaos_label_from_png(slices: Sequence[np.ndarray]) -> np.ndarray:
    """Stack CHAOS ground-truth PNG slices (grey values 0/63/126/189/252) into the image's voxel order, 0..4."""
    stack = np.stack(slices, axis=-1)
    unknown = np.setdiff1d(np.unique(stack), CHAOS_LABEL_VALUES)
    if unknown.size:
        raise ValueError(f"CHAOS ground truth has grey values {unknown.tolist()} outside {CHAOS_LABEL_VALUES}.")
    label = np.searchsorted(CHAOS_LABEL_VALUES, stack).astype(np.uint8)
    return np.ascontiguousarray(np.flip(np.rot90(label), 0))


def chaos_submission_template(out_dir: str) -> str:
    """Create the CHAOS challenge's empty submission tree (Task1-5, CT / MR cases 1-40, ``Results`` folders)."""
    tasks = {1: ("CT", "MR"), 2: ("CT",), 3: ("MR",), 4: ("CT", "MR"), 5: ("MR",)}
    for task, modalities in tasks.items():
        for modality in modalities:
            for case in CHAOS_CASES:
                subs = [""] if modality == "CT" else list(CHAOS_SEQUENCES)
                for sub in subs:
                    folder = os.path.join(out_dir, f"Task{task}", modality, str(case), sub, "Results")
                    os.makedirs(folder, exist_ok=True)
    return out_dir


class ForegroundStatsd(MapTransform):
    """Store each channel's mean and (unbiased) std over its positive voxels in ``d[f"stats_{key}"]`` (2, C).

    (The key must not start with ``image_``: MONAI's spatial transforms treat such keys as meta dicts.)

    The official CHAOS pipeline takes these statistics right after percentile scaling and normalises with
    them after augmentation (``NormalizeWithStatsd``).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            img = img.float()
            stats = []
            for channel in img:
                fg = channel[channel > 0]
                if fg.numel() < 2:
                    name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                    raise ValueError(f"{name}: channel has fewer than 2 positive voxels; cannot normalise it.")
                stats.append(torch.stack([fg.mean(), fg.std()]))
            d[f"stats_{key}"] = torch.stack(stats, dim=1)
        return d


class NormalizeWithStatsd(MapTransform):
    """``(x - mean) / std`` with the statistics of ``ForegroundStatsd``; single-channel images (T2SPIR) are
    repeated to ``channels`` first, as the official ``InputTransformD`` does."""

    def __init__(self, keys: KeysCollection = "image", channels: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img, stats = d[key], torch.as_tensor(d.pop(f"stats_{key}"))
            if img.shape[0] == 1 and self.channels > 1:
                img, stats = img.repeat(self.channels, *[1] * (img.ndim - 1)), stats.repeat(1, self.channels)
            shape = (-1,) + (1,) * (img.ndim - 1)
            d[key] = (img - stats[0].reshape(shape).to(img)) / stats[1].reshape(shape).to(img)
        return d


class CHAOSSubmissionWriterd(MapTransform):
    """Write an argmax prediction ``(1, X, Y, Z)`` (image.nii.gz's voxel grid) as CHAOS submission PNGs.

    The case and sequence come from the image path ``.../<split>/<case>/<seq>/image.nii.gz``. Task 5 gets all
    organs (grey values ``CHAOS_LABEL_VALUES``), Task 3 the liver only. Slices are named after the DICOM
    files of ``<dicom_root>/<split>_Sets/MR/<case>/<seq>/DICOM_anon[/InPhase]`` when given, else
    ``result000.png`` ...
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir: str = "./submit", dicom_root: str | None = None):
        super().__init__(keys)
        self.output_dir = output_dir
        self.dicom_root = dicom_root

    def _stems(self, split: str, case: str, seq: str, n: int) -> list[str]:
        if self.dicom_root is None:
            return [f"result{i:03d}" for i in range(n)]
        folder = os.path.join(self.dicom_root, f"{split}_Sets", "MR", case, seq, "DICOM_anon")
        folder = os.path.join(folder, "InPhase") if seq == "T1DUAL" else folder
        stems = sorted(f[: -len(".dcm")] for f in os.listdir(folder) if f.endswith(".dcm"))
        if len(stems) != n:
            raise ValueError(f"{folder}: {len(stems)} DICOM slices but the prediction has {n}.")
        return stems

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            path = str(pred.meta["filename_or_obj"])
            split, case, seq = os.path.normpath(path).split(os.sep)[-4:-1]
            arr = np.asarray(torch.as_tensor(pred).detach().cpu())[0].astype(np.int64)
            arr = np.rot90(np.flip(np.asarray(CHAOS_LABEL_VALUES, dtype=np.uint8)[arr], 0), 3)
            stems = self._stems(split, case, seq, arr.shape[2])
            for task, volume in (("Task5", arr), ("Task3", np.where(arr == CHAOS_LABEL_VALUES[1], arr, 0))):
                folder = os.path.join(self.output_dir, task, "MR", case, seq, "Results")
                os.makedirs(folder, exist_ok=True)
                for i, stem in enumerate(stems):
                    Image.fromarray(np.ascontiguousarray(volume[..., i]).astype(np.uint8)).save(
                        os.path.join(folder, f"{stem}.png")
                    )
        return d
