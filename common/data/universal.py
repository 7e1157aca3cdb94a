"""Universal Model data: the 32-class taxonomy, per-dataset label tables, label transfer and post-processing.

Follows ``ljwztc/CLIP-Driven-Universal-Model`` (``utils/utils.py``, ``label_transfer.py``,
``dataset/dataloader.py``): each source dataset annotates a subset of the 32 universal classes; raw
label values are mapped to universal indices, tumours are folded into their host organ (and get their
own channel), left/right organs are split by position, and the result is a 32-channel multi-label
target plus a per-channel "annotated" mask.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform, get_largest_connected_component_mask
from scipy import ndimage

from ..core.taxonomy import CLASS_NAMES, NUM_CLASSES, PROMPT_NAMES
from .checks import source_name

__all__ = [
    "CLASS_CROP_DATASETS",
    "CLASS_NAMES",
    "LABEL_MAP",
    "NUM_CLASSES",
    "PROMPT_NAMES",
    "TEMPLATE",
    "ZOOM_DATASETS",
    "ForDatasetsd",
    "MarkUnannotatedd",
    "MergeLabelsd",
    "SavePerClassd",
    "UniversalLabeld",
    "UniversalPostProcessd",
    "class_indices",
    "dataset_key",
    "item_dataset_key",
    "label_transfer",
    "merge_label_map",
    "organ_post_process",
    "read_dataset_list",
    "uniform_sample_weights",
]

logger = logging.getLogger(__name__)
# Which universal classes each source dataset annotates (official ``TEMPLATE``, ``utils/utils.py``).
TEMPLATE: dict[str, tuple[int, ...]] = {
    "01": tuple(range(1, 15)),
    "01_2": (1, 3, 4, 5, 6, 7, 11, 14),
    "02": (1, 3, 4, 5, 6, 7, 11, 14),
    "03": (6,),
    "04": (6, 27),
    "05": (2, 3, 26, 32),
    "06": (1, 2, 3, 4, 6, 7, 11, 16, 17),
    "07": (6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 13, 20, 21, 23, 24),
    "08": (6, 2, 3, 1, 11),
    "09": (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22),
    "12": (6, 21, 16, 17, 2, 3),
    "13": (6, 2, 3, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25),
    "14": (11, 28),
    "10_03": (6, 27),
    "10_06": (30,),
    "10_07": (11, 28),
    "10_08": (15, 29),
    "10_09": (1,),
    "10_10": (31,),
    "15": tuple(range(1, 18)),
    "universal": tuple(range(1, NUM_CLASSES + 1)),
}

# Raw label value i -> universal index LABEL_MAP[key][i - 1] (0: dropped); official ``label_transfer.py``.
LABEL_MAP: dict[str, tuple[int, ...]] = {
    "01": tuple(range(1, 15)),
    "02": (1, 0, 3, 4, 5, 6, 7, 0, 0, 0, 11, 0, 0, 14),
    "03": (6,),
    "04": (6, 27),
    "05": (2, 26, 32),
    "07": (6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 20, 21, 23, 24),
    "08": (6, 2, 1, 11),
    "09": (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22),
    "12": (6, 21, 16, 2),
    "13": (6, 2, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25),
    "14": (11, 11, 28, 28, 28),
    "10_03": (6, 27),
    "10_06": (30,),
    "10_07": (11, 28),
    "10_08": (15, 29),
    "10_09": (1,),
    "10_10": (31,),
}
LABEL_MAP["01_2"] = LABEL_MAP["01"]
# Not official: labels already in universal indices (MONAI Label, merged predictions), all classes annotated.
LABEL_MAP["universal"] = tuple(range(1, NUM_CLASSES + 1))

# Tumours folded into their host organ; the tumour channel is rebuilt from these raw values.
TUMOR_FROM_RAW: dict[str, dict[int, tuple[int, ...]]] = {
    "04": {27: (2,)},
    "05": {26: (2,), 32: (3,)},
    "10_03": {27: (2,)},
    "10_07": {28: (2,)},
    "14": {28: (3, 4, 5)},
}
# Organs annotated as one label for both sides: index i becomes right (i) / left (i + 1) by position.
RL_SPLIT: dict[str, tuple[int, ...]] = {"05": (2,), "08": (2,), "13": (2,), "07": (12,), "12": (2, 16)}

# Official ``dataset/dataloader.py`` recipe switches: RandZoomd only for the MSD cases, and crops centred by
# raw class (ratios [1, 1, 5]) instead of foreground/background for the tumour datasets.
ZOOM_DATASETS: tuple[str, ...] = ("10_03", "10_06", "10_07", "10_08", "10_09", "10_10")
CLASS_CROP_DATASETS: tuple[str, ...] = ("04", "10_03", "10_07", "10_08")

_STRUCT26 = np.ones((3, 3, 3), dtype=bool)


def dataset_key(name: str) -> str:
    """Template key of a case from its name (label path without extension), as the official code derives it.

    ``name[0:2]``; MSD (``10``) cases use ``'10_' + name[17:19]`` (``10_Decathlon/TaskXX_...``); BTCV
    (``01``) cases numbered 60 and above carry the 8-organ labels and use ``'01_2'``.
    """
    key = name[0:2]
    if key == "10":
        return "10_" + name[17:19]
    if key == "01" and name[-2:].isdigit() and int(name[-2:]) >= 60:
        return "01_2"
    return key


def class_indices(names: Sequence[str | int] | None) -> list[int]:
    """Universal indices (1-based) for class names (case-insensitive, official prompt names too) or indices."""
    if names is None:
        return list(range(1, NUM_CLASSES + 1))
    lookup = {n.lower(): i + 1 for i, n in enumerate(CLASS_NAMES)}
    lookup.update({n.lower(): i + 1 for i, n in enumerate(PROMPT_NAMES)})
    out = []
    for n in names:
        idx = int(n) if isinstance(n, int) or str(n).isdigit() else lookup.get(str(n).strip().lower())
        if idx is None or not 1 <= idx <= NUM_CLASSES:
            raise ValueError(f"unknown universal class {n!r}; known: {', '.join(CLASS_NAMES)}.")
        out.append(idx)
    return out


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected component labels and their sizes (index 0 = background)."""
    labels, num = ndimage.label(mask, structure=_STRUCT26)
    return labels, np.bincount(labels.ravel(), minlength=num + 1)


def _split_left_right(label: np.ndarray, organ: int) -> None:
    """In place: of the two largest components of ``organ``, the one with the smaller mean axis-0 index
    (patient left in RAS) becomes ``organ + 1``; all other voxels keep ``organ`` (official ``rl_split``)."""
    labels, sizes = _components(label == organ)
    if len(sizes) < 3:
        return
    first, second = (np.argsort(sizes[1:])[::-1][:2] + 1).tolist()
    mean_a = np.nonzero(labels == first)[0].mean()
    mean_b = np.nonzero(labels == second)[0].mean()
    label[labels == (first if mean_a < mean_b else second)] = organ + 1


def label_transfer(raw: np.ndarray, key: str, filename: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Turn a raw label map (RAS-oriented, spatial dims only) into the 32-channel universal target.

    Returns ``(target, annotated)``: ``uint8 [32, *spatial]`` (1 inside each class, overlapping: the host
    organ covers its tumour) and ``bool [32]`` (the classes dataset ``key`` annotates).

    Raises:
        ValueError: naming ``filename`` when the dataset key or a raw label value is unknown.
    """
    if key not in LABEL_MAP or key not in TEMPLATE:
        raise ValueError(f"{filename}: no label table for dataset key {key!r}; known: {sorted(LABEL_MAP)}.")
    table = np.asarray((0,) + LABEL_MAP[key], dtype=np.int64)
    raw = np.asarray(raw)
    values = np.unique(raw)
    bad = values[(values < 0) | (values >= len(table)) | (values != np.round(values))]
    if bad.size:
        raise ValueError(
            f"{filename}: raw label values {bad.tolist()[:10]} unknown for dataset {key} "
            f"(its table maps 0..{len(table) - 1})."
        )
    raw = raw.astype(np.int64)
    label = table[raw]
    tumors = TUMOR_FROM_RAW.get(key, {})
    host = LABEL_MAP[key][0]
    for tumor in tumors:
        label[label == tumor] = host
    for organ in RL_SPLIT.get(key, ()):
        _split_left_right(label, organ)
    target = np.zeros((NUM_CLASSES,) + raw.shape, dtype=np.uint8)
    annotated = np.zeros(NUM_CLASSES, dtype=bool)
    for idx in TEMPLATE[key]:
        annotated[idx - 1] = True
        target[idx - 1] = label == idx
    for tumor, sources in tumors.items():
        target[tumor - 1] = np.isin(raw, sources)
    return target, annotated


def item_dataset_key(
    data: Mapping[Hashable, object],
    name_key: str = "name",
    key_key: str = "dataset",
    default_key: str | None = "universal",
    filename: str = "item",
) -> str:
    """Template key of a datalist item: ``data[key_key]``, else ``dataset_key(data[name_key])``, else
    ``default_key``."""
    if key_key in data:
        return str(data[key_key])
    if name_key in data:
        return dataset_key(str(data[name_key]))
    if default_key is not None:
        return default_key
    raise KeyError(f"{filename}: item needs '{name_key}' or '{key_key}' to pick its label table.")


class ForDatasetsd(Randomizable, Transform):
    """Apply ``transform`` only to items of the listed source datasets (or, with ``exclude``, of all others);
    other items pass through unchanged.

    The official recipe switches transforms per dataset this way (``RandZoomd_select``,
    ``RandCropBy*_select`` in ``dataset/dataloader.py``). Random states set by ``Compose`` reach the
    wrapped transform, and ``CacheDataset`` stops caching here like at any random transform.
    """

    def __init__(
        self,
        transform: Transform,
        datasets: Sequence[str],
        exclude: bool = False,
        name_key: str = "name",
        key_key: str = "dataset",
        default_key: str | None = "universal",
    ) -> None:
        self.transform = transform
        self.datasets = frozenset(str(k) for k in datasets)
        self.exclude = exclude
        self.name_key = name_key
        self.key_key = key_key
        self.default_key = default_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ForDatasetsd:
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: object) -> None:
        """The wrapped transform draws its own parameters."""

    def selects(self, data: Mapping[Hashable, object]) -> bool:
        """Whether ``data`` gets the wrapped transform."""
        key = item_dataset_key(data, self.name_key, self.key_key, self.default_key)
        return (key in self.datasets) != self.exclude

    def __call__(self, data: Mapping[Hashable, object]) -> object:
        return self.transform(data) if self.selects(data) else dict(data)


class UniversalLabeld(MapTransform):
    """Replace a raw label (``[1, *spatial]``, RAS) by its 32-channel universal target and store the
    per-channel annotated mask under ``annotated_key``. The dataset comes from ``data[key_key]``, else
    ``dataset_key(data[name_key])``, else ``default_key`` (``"universal"``: labels already in universal indices,
    e.g. from MONAI Label). With ``raw_key`` the raw label is kept there (uint8): the official recipe picks
    its random crop centres from the raw values. Per-class voxel counts are logged at debug level."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        name_key: str = "name",
        key_key: str = "dataset",
        annotated_key: str = "annotated",
        default_key: str | None = "universal",
        raw_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.name_key = name_key
        self.key_key = key_key
        self.annotated_key = annotated_key
        self.default_key = default_key
        self.raw_key = raw_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            filename = source_name(d, key)
            ds_key = item_dataset_key(d, self.name_key, self.key_key, self.default_key, filename)
            lbl = d[key]
            if lbl.shape[0] != 1:
                raise ValueError(f"{filename}: expected a 1-channel raw label, got shape {tuple(lbl.shape)}.")
            target, annotated = label_transfer(np.asarray(lbl[0].cpu()), ds_key, filename)
            logger.debug("%s (%s) voxels per class: %s", filename, ds_key, target.reshape(NUM_CLASSES, -1).sum(1))
            if self.raw_key is not None:
                d[self.raw_key] = _like(torch.as_tensor(lbl).to(torch.uint8), lbl)
            d[key] = _like(torch.from_numpy(target), lbl)
            d[self.annotated_key] = torch.from_numpy(annotated)
        return d


def _like(values: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``values`` carrying ``ref``'s metadata and applied operations when ``ref`` is a ``MetaTensor``."""
    if isinstance(ref, MetaTensor):
        return MetaTensor(
            values.as_tensor() if isinstance(values, MetaTensor) else values,
            meta=ref.meta,
            applied_operations=ref.applied_operations,
        )
    return values


class MarkUnannotatedd(MapTransform):
    """Cast targets to float and fill every channel the item does not annotate with ``value`` (-1).

    Run it last in training preprocessing: ``PartialLabelLoss`` reads the filled channels as unsupervised,
    so the default ``(pred, label)`` trainer interface carries the annotated mask.
    """

    def __init__(self, keys: KeysCollection = "label", annotated_key: str = "annotated", value: float = -1.0) -> None:
        super().__init__(keys)
        self.annotated_key = annotated_key
        self.value = value

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        annotated = torch.as_tensor(d[self.annotated_key], dtype=torch.bool)
        for key in self.key_iterator(d):
            lbl = d[key].float()
            lbl[~annotated] = self.value
            d[key] = lbl
        return d


def read_dataset_list(list_file: str | Sequence[str], data_root: str, check_files: bool = True) -> list[dict[str, str]]:
    """Read official dataset lists (``image<TAB>label`` per line, paths relative to ``data_root``).

    Items are ``{"image", "label", "name"}`` with ``name`` the label path without its extension, as the
    official loader builds it (``dataset_key(name)`` gives the template key). Several files concatenate.
    """
    files = [list_file] if isinstance(list_file, str | Path) else list(list_file)
    items = []
    for lf in files:
        lf = Path(lf) if Path(lf).is_absolute() or Path(lf).exists() else Path(data_root) / lf
        if not lf.is_file():
            raise FileNotFoundError(f"dataset list {lf} does not exist.")
        for n, line in enumerate(lf.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{lf}:{n}: expected 'image<TAB>label', got {line!r}.")
            image, label = (str(Path(data_root) / p) for p in parts)
            if check_files:
                for p in (image, label):
                    if not Path(p).is_file():
                        raise FileNotFoundError(f"{lf}:{n}: file {p} does not exist.")
            name = parts[1].split(".")[0]
            key = dataset_key(name)
            if key not in TEMPLATE:
                raise ValueError(f"{lf}:{n}: case {name!r} gives dataset key {key!r}, not in TEMPLATE.")
            items.append({"image": image, "label": label, "name": name})
    return items


def uniform_sample_weights(items: Sequence[Mapping[str, str]]) -> torch.Tensor:
    """Per-item sampling weights that draw every source dataset equally often (``--uniform_sample``)."""
    keys = [dataset_key(str(it["name"])) if "name" in it else "universal" for it in items]
    counts = Counter(keys)
    return torch.tensor([1.0 / counts[k] for k in keys], dtype=torch.double)


_KEEP_LARGEST = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 18, 19, 20, 21, 22, 23, 24, 25}
_TUMOR_HOST = {26: (2, 3), 27: (6,)}


def organ_post_process(pred: np.ndarray, classes: Sequence[int] | None = None) -> np.ndarray:
    """Official organ-aware post-processing of a binary ``[32, *spatial]`` prediction (RAS).

    Largest component for most organs; pancreas largest component and the portal/splenic vein cut below
    the pancreas's lowest axis-2 slice; lungs re-split into left/right by position; kidney and liver
    tumours kept inside their (closed, dilated) host organ; other classes unchanged. Classes outside
    ``classes`` are zeroed.
    """
    pred = np.asarray(pred).astype(bool)
    out = np.zeros_like(pred)
    wanted = set(class_indices(classes) if classes is not None else range(1, NUM_CLASSES + 1))
    for c in sorted(wanted):
        ch = c - 1
        if c in _KEEP_LARGEST or c == 11:
            out[ch] = get_largest_connected_component_mask(pred[ch], connectivity=3)
        elif c in (16, 17):
            continue  # both lungs handled together below
        elif c in _TUMOR_HOST:
            host = np.any(pred[[h - 1 for h in _TUMOR_HOST[c]]], 0)
            host = get_largest_connected_component_mask(host, connectivity=3, num_components=len(_TUMOR_HOST[c]))
            box = np.ones((5, 5, 5), dtype=bool)
            host = ndimage.binary_dilation(ndimage.binary_closing(host, structure=box), structure=box)
            out[ch] = pred[ch] & host
        else:
            out[ch] = pred[ch]
    if 10 in wanted and 11 in wanted and out[10].any():
        lowest = np.nonzero(out[10].any(axis=(0, 1)))[0].min()
        out[9, :, :, :lowest] = False
    if wanted & {16, 17}:
        labels, sizes = _components(pred[15] | pred[16])
        order = (np.argsort(sizes[1:])[::-1][:2] + 1).tolist()
        if len(order) == 2:
            mean = [np.nonzero(labels == o)[0].mean() for o in order]
            left, right = (order[0], order[1]) if mean[0] < mean[1] else (order[1], order[0])
            out[16], out[15] = labels == left, labels == right
        elif order:
            out[15] = labels == order[0]  # one component: the official code cannot split it either
        for c in {16, 17} - wanted:
            out[c - 1] = False
    return out


class UniversalPostProcessd(MapTransform):
    """Threshold the 32 class maps and apply ``organ_post_process`` to each item (``[32, *spatial]``).

    ``classes``: names or indices to predict (others zeroed); ``post_process`` False keeps the raw threshold.
    ``logits``: ``pred`` holds logits, thresholded at ``logit(threshold)`` (the same masks as the sigmoid, without
    a float32 copy of the 32 maps: 1.7 GB for a 260x260x200 CT). The output is a uint8 mask.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        threshold: float = 0.5,
        classes: Sequence[str | int] | None = None,
        post_process: bool = True,
        logits: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if logits and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) to threshold logits, got {threshold}")
        self.threshold = math.log(threshold / (1.0 - threshold)) if logits else threshold
        self.classes = class_indices(classes) if classes is not None else None
        self.post_process = post_process

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            binary = (pred >= self.threshold).cpu().numpy()
            if self.post_process:
                binary = organ_post_process(binary, self.classes)
            elif self.classes is not None:
                binary[[i for i in range(NUM_CLASSES) if i + 1 not in self.classes]] = False
            out = torch.from_numpy(np.ascontiguousarray(binary, dtype=np.uint8))
            d[key] = (
                MetaTensor(out, meta=pred.meta, applied_operations=pred.applied_operations)
                if isinstance(pred, MetaTensor)
                else out
            )
        return d


def merge_label_map(pred: torch.Tensor, label_map: Mapping[int, int] | None = None) -> torch.Tensor:
    """Merge a binary ``[32, *spatial]`` prediction into one ``[1, *spatial]`` label map.

    Classes are painted in index order so later ones (tumours) overwrite earlier ones (organs). ``label_map``
    (universal index -> output value, e.g. LiTS ``{6: 1, 27: 2}``) restricts and renumbers the classes.
    """
    mapping = {int(k): int(v) for k, v in (label_map or {i: i for i in range(1, NUM_CLASSES + 1)}).items()}
    out = torch.zeros((1,) + tuple(pred.shape[1:]), dtype=torch.uint8, device=pred.device)
    for src in sorted(mapping):
        out[0][pred[src - 1] > 0] = mapping[src]
    if isinstance(pred, MetaTensor):
        out = MetaTensor(out, meta=pred.meta, applied_operations=pred.applied_operations)
    return out


class MergeLabelsd(MapTransform):
    """``merge_label_map`` as a dictionary transform; the 32-channel input is kept under ``channels_key``
    when given (for per-class files)."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        label_map: Mapping[int, int] | None = None,
        channels_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_map = label_map
        self.channels_key = channels_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.channels_key is not None:
                d[self.channels_key] = d[key]
            d[key] = merge_label_map(d[key], self.label_map)
        return d


class SavePerClassd(MapTransform):
    """Write each channel of a ``[32, *spatial]`` binary prediction as its own NIfTI (postfix: class name),
    for the classes in ``classes`` (default: all that are non-empty)."""

    def __init__(
        self,
        keys: KeysCollection = "pred_classes",
        output_dir: str = "./eval",
        classes: Sequence[str | int] | None = None,
        separate_folder: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.classes = class_indices(classes) if classes is not None else None
        self.output_dir = output_dir
        self.separate_folder = separate_folder

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        from monai.transforms import SaveImage

        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            for c in self.classes or [i + 1 for i in range(pred.shape[0]) if pred[i].any()]:
                saver = SaveImage(
                    output_dir=self.output_dir,
                    output_postfix=CLASS_NAMES[c - 1].replace(" ", "_"),
                    output_dtype=np.uint8,
                    resample=False,
                    separate_folder=self.separate_folder,
                    print_log=False,
                )
                saver(pred[c - 1 : c].to(torch.uint8))
        return d
