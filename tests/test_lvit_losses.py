"""LViT loss and metrics against hand-computed values and the spec formula."""

from __future__ import annotations

import math

import torch
from monai.losses import DiceLoss

from common.losses.lvit import LViTDiceBCE, balanced_bce, lv_loss
from common.metrics.lvit import LViTDiceIoUMetric, LViTValDiceMetric, lvit_dice_iou, lvit_val_dice


def test_loss_hand_computed():
    p = torch.tensor([0.8, 0.4, 0.2, 0.6]).view(1, 1, 2, 2)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    dice = 1 - (2 * 1.2 + 4e-5) / (0.64 + 0.16 + 0.04 + 0.36 + 2 + 4e-5)
    pos = (-math.log(0.8) - math.log(0.4)) / 2
    neg = (-math.log(0.8) - math.log(0.4)) / 2
    expected = 0.5 * dice + 0.5 * (0.5 * pos + 0.5 * neg)
    assert abs(float(LViTDiceBCE()(p, t)) - expected) < 1e-6


def test_loss_equals_spec_formula_on_random_inputs():
    torch.manual_seed(0)
    p = torch.rand(3, 1, 16, 16).clamp(1e-3, 1 - 1e-3)
    t = (torch.rand(3, 1, 16, 16) > 0.7).float()
    dice = DiceLoss(squared_pred=True, smooth_nr=4e-5, smooth_dr=4e-5)(p, t)
    bce = torch.nn.functional.binary_cross_entropy(p, t, reduction="none")
    bal = 0.5 * bce[t == 1].mean() + 0.5 * bce[t == 0].mean()
    assert abs(float(LViTDiceBCE()(p, t)) - float(0.5 * dice + 0.5 * bal)) < 1e-6


def test_balanced_bce_empty_class_term_is_zero():
    p = torch.full((1, 1, 2, 2), 0.25)
    assert abs(float(balanced_bce(p, torch.zeros_like(p))) - 0.5 * -math.log(0.75)) < 1e-6


def test_lv_loss():
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    b = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    assert abs(float(lv_loss(a, a))) < 1e-6 and abs(float(lv_loss(a, b)) - 1.0) < 1e-6
    p = a.clone().requires_grad_(True)
    lv_loss(p, b).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_metrics_empty_conventions_and_values():
    pred = torch.tensor([0.9, 0.9, 0.1, 0.1]).view(1, 1, 2, 2)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    dice, iou = lvit_dice_iou(pred, label)
    assert abs(float(dice) - 2 / (4 + 1e-5)) < 1e-6 and abs(float(iou) - 1 / 3) < 1e-6
    empty = torch.zeros(1, 1, 2, 2)
    assert lvit_dice_iou(empty, empty)[0].item() == 0.0 and lvit_dice_iou(empty, empty)[1].item() == 0.0
    assert lvit_dice_iou(empty, empty, empty_empty=1.0)[0].item() == 1.0
    assert abs(lvit_val_dice(empty, empty).item() - 1.0) < 1e-6


def test_cumulative_metrics_average_per_image():
    m, v = LViTDiceIoUMetric("dice"), LViTValDiceMetric()
    empty = torch.zeros(1, 1, 2, 2)
    full = torch.ones(1, 1, 2, 2)
    for pred, label in ((empty, empty), (full, full)):
        m(pred, label)
        v(pred, label)
    assert abs(float(m.aggregate()) - 0.5) < 1e-5 and abs(float(v.aggregate()) - 1.0) < 1e-5
