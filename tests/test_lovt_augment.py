"""LoVT image augmentation: torchvision's parameter sampling and formulas, and the pretraining config using them.

Parity against torchvision itself (not a dependency) is measured by ``python -m
tools.lovt_augment_parity``; these tests check the same semantics against the formulas torchvision documents.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from common.data.lovt_transforms import (
    RandColorJitterd,
    RandGaussianBlurd,
    RandResizedCropd,
    RandTorchvisionAffined,
    adjust_brightness,
    adjust_contrast,
    blur_kernel_size,
    gaussian_blur,
    gaussian_kernel1d,
    resized_crop,
)
from tools.bundle_io import parse_bundle

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "bundles", "lovt_mimic_cxr_pretraining")


def test_resized_crop_sampling_as_torchvision():
    crop = RandResizedCropd("image", 16, scale=(0.6, 1.0)).set_random_state(0)
    width, height = 256, 256
    boxes = []
    for _ in range(3000):
        crop.randomize((width, height))
        boxes.append(crop.box)
    x0, y0, w, h = np.array(boxes, dtype=float).T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()
    area = w * h / (width * height)
    log_ratio = np.log(w / h)
    assert area.min() > 0.59 and area.max() <= 1.0  # round() of w and h moves the area by < 1 %
    assert np.abs(log_ratio).max() < math.log(4 / 3) + 0.02
    # the area fraction is uniform in [0.6, 1] before rejection; large areas with a non-square aspect are rejected
    assert 0.6 < np.median(area) < 0.8
    # width/height is log-uniform, symmetric about 1 on a square image
    assert abs(np.mean(log_ratio > 0) - 0.5) < 0.05
    # offsets uniform over the free range
    free = width - w
    assert abs(np.mean(x0[free > 0] / free[free > 0]) - 0.5) < 0.03


def test_resized_crop_fallback_and_resize():
    crop = RandResizedCropd(["image", "mask"], (8, 8), scale=(0.9, 1.0), mode=["bilinear", "nearest"])
    img = torch.arange(1000 * 10, dtype=torch.float32).reshape(1, 1000, 10)
    mask = (img > 5000).float()
    out = crop.set_random_state(0)({"image": img, "mask": mask})
    # every draw fails (a 0.9 area needs width/height > 80): centre crop clamped to ratio 4/3 -> 13 x 10
    assert crop.box == ((1000 - 13) // 2, 0, 13, 10)
    assert out["image"].shape == out["mask"].shape == (1, 8, 8)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    same = resized_crop(img[:, :20], (0, 0, 20, 10), (20, 10))
    assert torch.equal(same, img[:, :20])


def test_affine_sampling_and_geometry():
    aff = RandTorchvisionAffined("image", (-20, 20), (0.1, 0.1), (0.95, 1.05)).set_random_state(0)
    draws = []
    for _ in range(2000):
        aff.randomize((224, 100))
        angle, (tx, ty), scale = aff.params
        draws.append((angle, tx, ty, scale))
    angle, tx, ty, scale = np.array(draws).T
    assert -20 <= angle.min() < -19 and 19 < angle.max() <= 20
    assert set(np.unique(tx)) == set(range(-22, 23)) and set(np.unique(ty)) == set(range(-10, 11))  # whole pixels
    assert 0.95 <= scale.min() and scale.max() <= 1.05 and abs(scale.mean() - 1.0) < 0.005

    img = torch.zeros(1, 21, 21)
    img[0, 12, 10] = 1.0  # 2 pixels right of the centre (10, 10)
    aff.params = (0.0, (3, -4), 1.0)
    moved = _apply_params(aff, img)
    assert moved[0].nonzero().tolist() == [[15, 6]]  # content moves by +translate
    aff.params = (0.0, (0, 0), 2.0)
    assert _apply_params(aff, img)[0, 14, 10] == 1.0  # scale 2 doubles the offset from the centre
    aff.params = (90.0, (0, 0), 1.0)
    # +90 deg is clockwise as displayed (torchvision's affine convention): right of centre -> below it (y down)
    assert _apply_params(aff, img)[0].nonzero().tolist() == [[10, 12]]


def _apply_params(aff: RandTorchvisionAffined, img: torch.Tensor) -> torch.Tensor:
    """Apply ``aff`` with its current parameters (bypassing the random draw)."""
    params = aff.params
    aff.randomize = lambda data: setattr(aff, "params", params)
    try:
        return aff({"image": img})["image"]
    finally:
        del aff.randomize


def test_color_jitter_formulas_and_order():
    img = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]])
    assert torch.allclose(adjust_brightness(img, 1.5), torch.tensor([[[0.3, 0.6], [0.9, 1.0]]]))
    assert torch.allclose(adjust_contrast(img, 0.5), 0.5 * img + 0.5 * 0.5)
    assert torch.allclose(adjust_contrast(img, 3.0), (3 * img - 2 * 0.5).clamp(0, 1))
    jitter = RandColorJitterd("image", (0.6, 1.4), (0.6, 1.4), prob=1.0).set_random_state(0)
    orders, factors = [], []
    for _ in range(400):
        out = jitter({"image": img})["image"]
        b, c = jitter.factors
        orders.append(jitter.brightness_first)
        factors.append((b, c))
        first, second = (
            (adjust_brightness, adjust_contrast) if jitter.brightness_first else (adjust_contrast, adjust_brightness)
        )
        arg = (b, c) if jitter.brightness_first else (c, b)
        assert torch.allclose(out, second(first(img, arg[0]), arg[1]))
    assert 0.4 < np.mean(orders) < 0.6  # torchvision applies the two in a random order
    f = np.array(factors)
    assert f.min() >= 0.6 and f.max() <= 1.4 and np.abs(f.mean(0) - 1.0).max() < 0.04
    never = RandColorJitterd("image", (0.6, 1.4), (0.6, 1.4), prob=0.0)
    assert never({"image": img})["image"] is img


def test_gaussian_blur_as_torchvision():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(210) == 21 and blur_kernel_size(96) == 9
    k = gaussian_kernel1d(23, 2.0)
    x = torch.arange(-11, 12, dtype=torch.float64)
    expected = torch.exp(-(x**2) / 8.0)
    assert torch.allclose(k.double(), expected / expected.sum(), atol=1e-7)
    impulse = torch.zeros(1, 31, 31)
    impulse[0, 15, 15] = 1.0
    assert torch.allclose(gaussian_blur(impulse, 23, 2.0)[0, 4:27, 4:27], torch.outer(k, k), atol=1e-7)
    flat = torch.full((1, 30, 20), 0.3)
    assert torch.allclose(gaussian_blur(flat, 23, 3.0), flat)  # reflect padding keeps a constant image
    edge = torch.zeros(1, 30, 20)
    edge[0, :, :3] = 1.0
    # reflect (not zero) padding: border pixels keep mass from their mirrored neighbours
    assert gaussian_blur(edge, 5, 1.0)[0, 15, 0] > 0.5
    blur = RandGaussianBlurd("image", sigma=(0.1, 3.0)).set_random_state(0)
    sigmas = []
    for _ in range(200):
        blur({"image": flat})
        sigmas.append(blur.value)
    assert 0.1 <= min(sigmas) and max(sigmas) <= 3.0 and abs(np.mean(sigmas) - 1.55) < 0.15
    with pytest.raises(ValueError, match="odd"):
        RandGaussianBlurd("image", kernel_size=4)


def test_pretraining_config_is_official():
    parser = parse_bundle(os.path.abspath(BUNDLE), ["train.json"])
    crop, flip, affine, jitter, blur = parser.get_parsed_content("train#random_transforms")[:5]
    assert isinstance(crop, RandResizedCropd) and crop.spatial_size == (224, 224)
    assert crop.scale == (0.6, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert flip.prob == 0.5
    assert isinstance(affine, RandTorchvisionAffined)
    assert (affine.degrees, affine.translate, affine.scale) == ((-20.0, 20.0), (0.1, 0.1), (0.95, 1.05))
    assert isinstance(jitter, RandColorJitterd) and jitter.prob == 1.0
    assert (jitter.brightness, jitter.contrast) == ((0.6, 1.4), (0.6, 1.4))
    assert isinstance(blur, RandGaussianBlurd) and (blur.sigma, blur.kernel_size) == ((0.1, 3.0), 23)
