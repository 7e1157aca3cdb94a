"""LoVT image augmentation (``ScanAugmentationConfig`` of ``philip-mueller/lovt``) as MONAI dict transforms.

The official pipeline is torchvision's ``RandomResizedCrop(224, scale=(0.6, 1))``, ``RandomHorizontalFlip``,
``RandomAffine(±20°, translate 0.1, scale 0.95-1.05)``, ``ColorJitter(brightness 0.6-1.4, contrast
0.6-1.4)`` and ``GaussianBlur(23, σ 0.1-3)``. MONAI's nearest transforms sample differently (no log-uniform
aspect ratio, translations not rounded to whole pixels, scale about the identity, brightness and contrast in a
fixed order, an erf Gaussian without a fixed kernel). These transforms draw their parameters exactly as
torchvision's ``get_params`` does and apply them with torchvision's tensor formulas, on images laid out as
MONAI's ``PILReader`` loads them: ``[C, x (width), y (height)]``. Randomness comes from MONAI's ``self.R``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.networks.layers import separable_filtering
from monai.transforms import Affine, MapTransform, RandomizableTransform
from monai.utils import ensure_tuple_rep

__all__ = [
    "RandColorJitterd",
    "RandGaussianBlurd",
    "RandResizedCropd",
    "RandTorchvisionAffined",
    "adjust_brightness",
    "adjust_contrast",
    "blur_kernel_size",
    "gaussian_blur",
    "gaussian_kernel1d",
    "resized_crop",
    "torchvision_affine_matrix",
]


def _as_tensor(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Plain float tensor (the augmentation output carries no spatial metadata: the crop changes the grid)."""
    t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
    return t if t.is_floating_point() else t.float()


def resized_crop(img: torch.Tensor, box: Sequence[int], size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Crop ``box = (x0, y0, w, h)`` of a ``[C, x, y]`` image and resize it to ``size = (x, y)``.

    Bilinear uses ``antialias=True`` like torchvision's tensor ``resized_crop``; ``nearest`` is for masks.
    """
    x0, y0, w, h = (int(v) for v in box)
    crop = _as_tensor(img)[:, x0 : x0 + w, y0 : y0 + h]
    if mode == "nearest":
        return F.interpolate(crop[None], size=tuple(size), mode="nearest")[0]
    return F.interpolate(crop[None], size=tuple(size), mode=mode, align_corners=False, antialias=True)[0]


class RandResizedCropd(RandomizableTransform, MapTransform):
    """torchvision ``RandomResizedCrop``: crop a random area fraction in ``scale`` with a log-uniform aspect ratio
    (width / height) in ``ratio``, then resize to ``spatial_size``; after 10 failed draws, a centre crop clamped
    to ``ratio``. All keys get the same box; ``mode`` per key (``bilinear`` images, ``nearest`` masks)."""

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        mode: Sequence[str] | str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.spatial_size = ensure_tuple_rep(spatial_size, 2)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def randomize(self, data: Sequence[int]) -> None:
        """Draw ``(x0, y0, w, h)`` for an image of spatial size ``data = (width, height)``."""
        width, height = int(data[0]), int(data[1])
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                self.box = (int(self.R.randint(0, width - w + 1)), int(self.R.randint(0, height - h + 1)), w, h)
                return
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        self.box = ((width - w) // 2, (height - h) // 2, w, h)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(d[first].shape[1:])
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = resized_crop(d[key], self.box, self.spatial_size, mode)
        return d


def torchvision_affine_matrix(angle: float, translate: Sequence[float], scale: float) -> np.ndarray:
    """Output-to-input matrix (3x3, centred ``(x, y)`` pixel coordinates) of torchvision's ``affine`` with no
    shear: ``T(translate) · C · R(angle) · S(scale) · C⁻¹`` inverted, as ``_get_inverse_affine_matrix`` builds it
    (positive ``angle`` rotates clockwise as displayed, ``y`` pointing down, as torchvision's ``affine`` documents)."""
    rot = math.radians(angle)
    a, b = math.cos(rot) / scale, math.sin(rot) / scale
    c, d = -math.sin(rot) / scale, math.cos(rot) / scale
    tx, ty = float(translate[0]), float(translate[1])
    return np.array([[a, b, -(a * tx + b * ty)], [c, d, -(c * tx + d * ty)], [0.0, 0.0, 1.0]])


class RandTorchvisionAffined(RandomizableTransform, MapTransform):
    """torchvision ``RandomAffine(degrees, translate, scale)``: angle uniform in ``degrees``; translation
    ``round(uniform(±translate[0]·width))`` and ``round(uniform(±translate[1]·height))`` whole pixels; scale
    uniform in ``scale``; no shear; zeros outside. Resampled by MONAI's ``Affine`` (``nearest`` by default, as
    torchvision's default interpolation)."""

    def __init__(
        self,
        keys: KeysCollection,
        degrees: Sequence[float] | float,
        translate: Sequence[float] = (0.0, 0.0),
        scale: Sequence[float] = (1.0, 1.0),
        mode: Sequence[str] | str = "nearest",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        deg = (-float(degrees), float(degrees)) if isinstance(degrees, (int, float)) else tuple(map(float, degrees))
        self.degrees = deg
        self.translate = (float(translate[0]), float(translate[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.params: tuple[float, tuple[int, int], float] = (0.0, (0, 0), 1.0)

    def randomize(self, data: Sequence[int]) -> None:
        """Draw ``(angle, (tx, ty), scale)`` for an image of spatial size ``data = (width, height)``."""
        angle = float(self.R.uniform(*self.degrees))
        max_dx, max_dy = self.translate[0] * int(data[0]), self.translate[1] * int(data[1])
        tx = int(round(self.R.uniform(-max_dx, max_dx)))
        ty = int(round(self.R.uniform(-max_dy, max_dy)))
        self.params = (angle, (tx, ty), float(self.R.uniform(*self.scale)))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(d[first].shape[1:])
        matrix = torch.as_tensor(torchvision_affine_matrix(*self.params), dtype=torch.float64)
        for key, mode in self.key_iterator(d, self.mode):
            resample = Affine(affine=matrix, mode=mode, padding_mode="zeros", image_only=True)
            d[key] = _as_tensor(resample(_as_tensor(d[key])))
        return d


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision ``adjust_brightness`` on a float image in [0, 1]: ``clamp(factor · img, 0, 1)``."""
    return (factor * img).clamp(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision ``adjust_contrast`` on a 1-channel float image in [0, 1]: blend with the image mean."""
    mean = img.mean()
    return (factor * img + (1.0 - factor) * mean).clamp(0.0, 1.0)


class RandColorJitterd(RandomizableTransform, MapTransform):
    """torchvision ``RandomApply([ColorJitter(brightness, contrast)], p=prob)`` for greyscale images in [0, 1]:
    factors uniform in the given ranges, applied in a random order (torchvision draws a permutation)."""

    def __init__(
        self,
        keys: KeysCollection,
        brightness: Sequence[float] = (1.0, 1.0),
        contrast: Sequence[float] = (1.0, 1.0),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=prob)
        self.brightness = (float(brightness[0]), float(brightness[1]))
        self.contrast = (float(contrast[0]), float(contrast[1]))
        self.brightness_first = True
        self.factors = (1.0, 1.0)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        order = self.R.permutation(4)  # torchvision: randperm over (brightness, contrast, saturation, hue)
        self.brightness_first = bool(np.argmax(order == 0) < np.argmax(order == 1))
        self.factors = (float(self.R.uniform(*self.brightness)), float(self.R.uniform(*self.contrast)))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        b, c = self.factors
        for key in self.key_iterator(d):
            img = _as_tensor(d[key])
            if self.brightness_first:
                d[key] = adjust_contrast(adjust_brightness(img, b), c)
            else:
                d[key] = adjust_brightness(adjust_contrast(img, c), b)
        return d


def blur_kernel_size(image_size: int) -> int:
    """The official kernel size: ``int(0.1 · image_size)``, made odd (23 for 224)."""
    k = int(0.1 * image_size)
    return k + 1 if k % 2 == 0 else k


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision's sampled, normalised Gaussian over ``kernel_size`` taps."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).float()


def gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision ``gaussian_blur``: separable sampled Gaussian with reflect padding, same σ on both axes."""
    kernel = gaussian_kernel1d(kernel_size, sigma)
    return separable_filtering(_as_tensor(img)[None], [kernel, kernel], mode="reflect")[0]


class RandGaussianBlurd(RandomizableTransform, MapTransform):
    """torchvision ``GaussianBlur(kernel_size, sigma)``: σ uniform in ``sigma``, applied every call (the
    official pipeline has no probability). ``kernel_size`` None uses the official ``int(0.1 · size)``, odd."""

    def __init__(
        self,
        keys: KeysCollection,
        sigma: Sequence[float] = (0.1, 2.0),
        kernel_size: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if kernel_size is not None and (kernel_size <= 0 or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.kernel_size = kernel_size
        self.value = self.sigma[0]

    def randomize(self, data: object = None) -> None:
        self.value = float(self.R.uniform(*self.sigma))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            k = self.kernel_size or blur_kernel_size(max(img.shape[1:]))
            d[key] = gaussian_blur(img, k, self.value)
        return d
