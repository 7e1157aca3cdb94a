"""Input checks that turn bad data into errors naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


def source_name(data: Mapping[Hashable, object], key: Hashable) -> str:
    """The file a loaded item came from (``MetaTensor`` metadata), or the key when unknown."""
    value = data[key]
    meta = getattr(value, "meta", None) or data.get(f"{key}_meta_dict", {})  # type: ignore[union-attr]
    return str(meta.get("filename_or_obj", key)) if isinstance(meta, Mapping) else str(key)


class CheckLabelRanged(MapTransform):
    """Raise ``ValueError`` naming the file when a label map holds values outside ``0..max_label``."""

    def __init__(self, keys: KeysCollection, max_label: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_label = max_label

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.unique(torch.as_tensor(d[key]))
            bad = values[(values < 0) | (values > self.max_label) | (values != values.round())]
            if bad.numel():
                shown = [_plain(v) for v in bad.tolist()[:10]]
                raise ValueError(f"{source_name(d, key)}: label values {shown} are outside 0..{self.max_label}")
        return d


def _plain(value: float) -> int | float:
    """``17.0`` -> ``17`` so messages show label values as users wrote them."""
    return int(value) if float(value).is_integer() else value
