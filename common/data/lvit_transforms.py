"""LViT-specific dictionary transforms: the official training augmentation and semi-supervised label filling."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

__all__ = ["LViTRandAugmentd", "ZeroLabelIfMissingd"]


class LViTRandAugmentd(RandomizableTransform, MapTransform):
    """The official ``RandomGenerator``: p 0.5 rot90(k in 0..3) followed by a flip along a random axis; otherwise
    p 0.5 rotation by an integer angle in [-20, 19] degrees (nearest, no reshape); otherwise nothing.

    Applies the same geometry to every key; arrays are channel-first ``[C, H, W]``.

    ``only_if_key``: augment only samples whose value there is truthy. The semi-supervised recipe passes
    ``"labelled"``: an unlabelled image must stay in its own frame, because its EPI pseudo-label (an average of
    earlier predictions) and its LV lung-zone template are both stored in that frame.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, only_if_key: str | None = None) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.only_if_key = only_if_key
        self._op = "none"
        self._k = 0
        self._axis = 0
        self._angle = 0

    def randomize(self, data: Any = None) -> None:
        if self.R.random_sample() > 0.5:
            self._op, self._k, self._axis = "rot_flip", int(self.R.randint(0, 4)), int(self.R.randint(0, 2))
        elif self.R.random_sample() > 0.5:
            self._op, self._angle = "rotate", int(self.R.randint(-20, 20))
        else:
            self._op = "none"

    def _apply(self, x: Any) -> Any:
        t = torch.as_tensor(x)
        if self._op == "rot_flip":
            t = torch.flip(torch.rot90(t, self._k, dims=(1, 2)), dims=(1 + self._axis,))
        elif self._op == "rotate":
            arr = ndimage.rotate(t.detach().cpu().numpy(), self._angle, axes=(2, 1), order=0, reshape=False)
            t = torch.as_tensor(np.ascontiguousarray(arr))
        return t.contiguous()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if self.only_if_key is not None and not d[self.only_if_key]:
            return d
        for key in self.key_iterator(d):
            d[key] = self._apply(d[key])
        return d


class ZeroLabelIfMissingd(MapTransform):
    """Give unlabelled samples an all-zero label shaped like ``ref_key`` (channel 1) so batches collate.

    The semi-supervised iteration never reads labels of samples whose ``labelled`` flag is 0.
    """

    def __init__(self, keys: KeysCollection = "label", ref_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            if d.get(key) is None:
                ref = torch.as_tensor(d[self.ref_key])
                d[key] = torch.zeros((1, *ref.shape[1:]), dtype=torch.float32)
        return d
