"""``python -m tools.lovt_augment_parity``: LoVT augmentation vs torchvision (needs torchvision, not a dependency).

Applies each ``common.data.lovt_transforms`` formula and torchvision's tensor functional with the same
parameters (max |difference|, differing pixels for the nearest affine), and compares 20,000 sampled
parameters of ``RandResizedCropd`` / ``RandTorchvisionAffined`` with torchvision's ``get_params``
(two-sample Kolmogorov-Smirnov p-values). Images are torchvision ``[C, H, W]``; ours ``[C, W, H]`` (PILReader).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Affine
from scipy.stats import ks_2samp

from common.data.lovt_transforms import (
    RandResizedCropd,
    RandTorchvisionAffined,
    adjust_brightness,
    adjust_contrast,
    gaussian_blur,
    resized_crop,
    torchvision_affine_matrix,
)


def main(draws: int = 20000, seed: int = 0) -> dict[str, float]:
    try:
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF
    except ImportError as err:
        raise SystemExit(f"torchvision is needed for this comparison only: pip install torchvision ({err}).") from err
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tv = torch.rand(1, 60, 80)
    ours = tv.transpose(1, 2).clone()
    out: dict[str, float] = {}
    a = TF.resized_crop(tv, 5, 7, 40, 50, [32, 32], antialias=True)
    out["resized_crop_max_abs"] = float((a - resized_crop(ours, (7, 5, 50, 40), (32, 32)).transpose(1, 2)).abs().max())
    out["blur_max_abs"] = max(
        float((TF.gaussian_blur(tv, [23, 23], [s, s]) - gaussian_blur(ours, 23, s).transpose(1, 2)).abs().max())
        for s in (0.1, 1.3, 3.0)
    )
    a = TF.adjust_contrast(TF.adjust_brightness(tv, 1.3), 0.7)
    out["jitter_max_abs"] = float((a - adjust_contrast(adjust_brightness(ours, 1.3), 0.7).transpose(1, 2)).abs().max())
    differing = 0
    for _ in range(20):
        angle, scale = float(rng.uniform(-20, 20)), float(rng.uniform(0.95, 1.05))
        shift = (int(rng.integers(-8, 9)), int(rng.integers(-6, 7)))
        a = TF.affine(tv, angle, list(shift), scale, [0.0, 0.0], interpolation=T.InterpolationMode.NEAREST, fill=[0.0])
        matrix = torch.as_tensor(torchvision_affine_matrix(angle, shift, scale))
        b = Affine(affine=matrix, mode="nearest", padding_mode="zeros", image_only=True)(ours).transpose(1, 2)
        differing += int((a != b).sum())
    out["affine_differing_pixels_of_96000"] = differing

    image = torch.empty(1, 3056, 2544)  # a typical MIMIC-CXR JPG, H x W
    reference = np.array([T.RandomResizedCrop.get_params(image, [0.6, 1.0], [3 / 4, 4 / 3]) for _ in range(draws)])
    crop = RandResizedCropd("image", 224, scale=(0.6, 1.0)).set_random_state(seed)
    mine = []
    for _ in range(draws):
        crop.randomize((2544, 3056))
        x0, y0, w, h = crop.box
        mine.append((y0, x0, h, w))
    mine = np.array(mine)
    for col, name in enumerate(("top", "left", "height", "width")):
        out[f"crop_{name}_ks_p"] = float(ks_2samp(reference[:, col], mine[:, col]).pvalue)
    aff = RandTorchvisionAffined("image", (-20, 20), (0.1, 0.1), (0.95, 1.05)).set_random_state(seed)
    reference, mine = [], []
    for _ in range(draws):
        angle, (tx, ty), scale, _ = T.RandomAffine.get_params([-20.0, 20.0], [0.1, 0.1], [0.95, 1.05], None, [224, 224])
        reference.append((angle, tx, ty, scale))
        aff.randomize((224, 224))
        mine.append((aff.params[0], *aff.params[1], aff.params[2]))
    reference, mine = np.array(reference), np.array(mine)
    for col, name in enumerate(("angle", "tx", "ty", "scale")):
        out[f"affine_{name}_ks_p"] = float(ks_2samp(reference[:, col], mine[:, col]).pvalue)
    for key, value in out.items():
        print(f"{key}: {value:.3g}")
    return out


if __name__ == "__main__":
    main()
