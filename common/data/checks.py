"""Input checks that turn bad data into errors naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, LoadImaged, MapTransform


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


class CheckSameSpatialShaped(MapTransform):
    """Raise ``ValueError`` naming both files when loaded images (e.g. an image and its mask) differ in size.

    Place it right after loading: a later resize would hide the mismatch and misalign the mask.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        shapes = {key: tuple(d[key].shape[1:]) for key in self.key_iterator(d)}
        if len(set(shapes.values())) > 1:
            found = ", ".join(f"{source_name(d, k)} {shape}" for k, shape in shapes.items())
            raise ValueError(f"{found}: spatial sizes differ; an image and its mask must have the same size.")
        return d


class LoadImageNamedd(LoadImaged):
    """MONAI's ``LoadImaged``; a file that cannot be read or decoded raises ``OSError`` naming it.

    A truncated PNG otherwise surfaces from a DataLoader worker as ``applying transform <LoadImaged>`` with
    PIL's "image file is truncated" and no path.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loader = _FileNamingLoader(self._loader)


class _FileNamingLoader:
    """Calls a ``LoadImage`` and names the file in any error it raises; everything else is the wrapped loader's."""

    def __init__(self, loader: LoadImage) -> None:
        self.loader = loader

    def __getattr__(self, name: str):
        if name == "loader":  # not yet set (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __setattr__(self, name: str, value) -> None:  # e.g. MONAI Label sets ``_loader.image_only = False``
        if name == "loader":
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)

    def __call__(self, filename, reader=None):
        try:
            return self.loader(filename, reader)
        except Exception as e:
            raise OSError(f"{filename}: cannot read the image ({type(e).__name__}: {e}).") from e
