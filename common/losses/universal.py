"""Partial-label BCE + Dice of the CLIP-Driven Universal Model (masked back-propagation).

Each source dataset annotates only some of the 32 classes. The loss is computed only on the
(sample, class) pairs a sample's dataset annotates; the other channels carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PartialLabelLoss", "annotated_from_target"]


def annotated_from_target(target: torch.Tensor, ignore_value: float = -1.0) -> torch.Tensor:
    """``[B, K]`` bool: a channel is annotated unless it holds ``ignore_value`` (official h5: -1 / 255)."""
    return ~(target == ignore_value).flatten(2).any(-1)


class PartialLabelLoss(nn.Module):
    """Mean BCE-with-logits + mean soft Dice over the annotated (sample, class) pairs.

    Dice per pair is ``1 - 2 sum(p t) / (sum(p) + sum(t) + smooth)`` with ``p = sigmoid(logits)``.

    Args:
        dice_mode: ``"volume"`` (one Dice per class volume; default for new training) or ``"per_slice"``
            (the 2022 official code: one Dice per axis-0 slice, averaged; parity with the released weights,
            empty slices contribute a loss of 1, hence its "Dice loss plateaus at 0.7-0.8").
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: denominator smoothing (numerator is not smoothed, as in the official code).
        ignore_value: target value marking a whole channel as not annotated, used when ``annotated`` is
            not given.
    """

    def __init__(
        self,
        dice_mode: str = "volume",
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        ignore_value: float = -1.0,
    ) -> None:
        super().__init__()
        if dice_mode not in ("volume", "per_slice"):
            raise ValueError(f"dice_mode must be 'volume' or 'per_slice', got {dice_mode!r}.")
        self.dice_mode = dice_mode
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.ignore_value = ignore_value

    def forward(self, input: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: ``[B, K, *spatial]`` logits.
            target: ``[B, K, *spatial]`` binary targets; unannotated channels may hold ``ignore_value``.
            annotated: optional ``[B, K]`` bool mask of supervised pairs (else derived from ``target``).
        """
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} shapes differ.")
        if annotated is None:
            annotated = annotated_from_target(target, self.ignore_value)
        annotated = annotated.to(device=input.device, dtype=torch.bool)
        if not bool(annotated.any()):
            return input.sum() * 0.0  # no supervised class in this batch: zero loss, graph kept
        logits = input[annotated].float()  # [P, *spatial]
        tgt = target[annotated].to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits.flatten(1), tgt.flatten(1), reduction="none").mean(1)
        prob = torch.sigmoid(logits)
        if self.dice_mode == "per_slice":
            prob, tgt = prob.flatten(2), tgt.flatten(2)  # [P, D0, rest]: one Dice per axis-0 slice
        else:
            prob, tgt = prob.flatten(1), tgt.flatten(1)
        dice = 1 - 2 * (prob * tgt).sum(-1) / (prob.sum(-1) + tgt.sum(-1) + self.smooth)
        if self.dice_mode == "per_slice":
            dice = dice.mean(-1)
        return self.bce_weight * bce.mean() + self.dice_weight * dice.mean()
