"""Partial-label BCE + Dice: only annotated (sample, class) pairs count; values checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses.universal import PartialLabelLoss, annotated_from_target


def test_hand_computed_volume_loss():
    # one sample, two classes, 4 voxels; logits 0 -> p = 0.5, BCE = ln 2 everywhere
    logits = torch.zeros(1, 2, 1, 2, 2)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 1, 2, 2)
    loss = PartialLabelLoss()(logits, target)
    # Dice: class 0: 1 - 2*1 / (2 + 2 + 1) = 0.6; class 1: 1 - 2*0.5 / (2 + 1 + 1) = 0.75
    assert loss.item() == pytest.approx(math.log(2) + (0.6 + 0.75) / 2, abs=1e-6)


def test_unannotated_channels_are_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    masked = target.clone()
    masked[~annotated] = -1
    loss_fn = PartialLabelLoss()
    loss = loss_fn(logits, masked)
    assert torch.equal(annotated_from_target(masked), annotated)
    # equals the mean over the three supervised pairs computed one by one
    pairs = [(0, 0), (0, 2), (1, 1)]
    bce = torch.stack(
        [torch.nn.functional.binary_cross_entropy_with_logits(logits[b, c], target[b, c]) for b, c in pairs]
    ).mean()
    p = torch.sigmoid(logits)
    dice = torch.stack(
        [1 - 2 * (p[b, c] * target[b, c]).sum() / (p[b, c].sum() + target[b, c].sum() + 1) for b, c in pairs]
    ).mean()
    assert loss.item() == pytest.approx((bce + dice).item(), abs=1e-5)
    assert loss_fn(logits, target, annotated).item() == pytest.approx(loss.item(), abs=1e-6)
    loss.backward()
    assert logits.grad[~annotated].abs().sum() == 0 and logits.grad[annotated].abs().sum() > 0


def test_per_slice_dice_counts_empty_slices_as_one():
    logits = torch.full((1, 1, 2, 1, 2), 20.0)  # p ~ 1 everywhere
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 1, 2)
    loss_fn = PartialLabelLoss(dice_mode="per_slice", bce_weight=0.0)
    # slice 0: 1 - 4/(2+2+1) = 0.2; slice 1 (empty target): 1 - 0/(2+0+1) = 1
    assert loss_fn(logits, target).item() == pytest.approx((0.2 + 1.0) / 2, abs=1e-4)
    vol = PartialLabelLoss(dice_mode="volume", bce_weight=0.0)(logits, target).item()
    assert vol == pytest.approx(1 - 4 / 7, abs=1e-4)


def test_no_annotated_class_gives_zero_with_graph():
    logits = torch.randn(1, 2, 2, 2, 2, requires_grad=True)
    loss = PartialLabelLoss()(logits, torch.full((1, 2, 2, 2, 2), -1.0))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="dice_mode"):
        PartialLabelLoss(dice_mode="slice")
    with pytest.raises(ValueError, match="shapes differ"):
        PartialLabelLoss()(torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2))
