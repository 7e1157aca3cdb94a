"""LViT losses: the official ``WeightedDiceBCE`` on probabilities and the language-vision (LV) term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["LViTDiceBCE", "balanced_bce", "lv_loss"]


def balanced_bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * mean BCE over positive pixels + 0.5 * mean BCE over negative pixels, pooled over the batch.

    A term whose pixel count is 0 contributes 0 (the official 1e-12 guard). The BCE runs in float32 with
    autocast off: CUDA autocast refuses ``binary_cross_entropy`` on probabilities ("unsafe to autocast").
    """
    with torch.autocast(prob.device.type, enabled=False):
        bce = F.binary_cross_entropy(prob.float(), target.float(), reduction="none")
    pos = (target > 0.5).float()
    neg = (target < 0.5).float()
    pos_term = (pos * bce).sum() / (pos.sum() + 1e-12)
    neg_term = (neg * bce).sum() / (neg.sum() + 1e-12)
    return 0.5 * pos_term + 0.5 * neg_term


class LViTDiceBCE(nn.Module):
    """``dice_weight * Dice + bce_weight * balanced BCE`` on probabilities (official weights 0.5 / 0.5).

    Dice is the per-sample squared Dice with 4e-5 smoothing, averaged over the batch; this equals the
    official ``WeightedDiceLoss`` (smooth 1e-5 after scaling p and t by 0.5).
    """

    def __init__(self, dice_weight: float = 0.5, bce_weight: float = 0.5) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.dice = DiceLoss(squared_pred=True, smooth_nr=4e-5, smooth_dr=4e-5, batch=False, reduction="mean")

    def forward(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prob.shape != target.shape:
            raise ValueError(f"LViTDiceBCE: prediction {list(prob.shape)} and target {list(target.shape)} differ")
        target = target.float()
        return self.dice_weight * self.dice(prob.float(), target) + self.bce_weight * balanced_bce(prob, target)


def lv_loss(prob: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1 - cos(flatten(prob), flatten(template))`` averaged over the batch (differentiable in prob)."""
    cos = F.cosine_similarity(prob.flatten(1).float(), template.flatten(1).float(), dim=1, eps=1e-8)
    return (1.0 - cos).mean()
