"""LViT metrics as the official scripts compute them.

* Test (``test_model.py``): per-image Dice = 2|P∩G| / (|P| + |G| + 1e-5) and IoU = ``jaccard_score``, both at
  threshold 0.5 and **0 for an empty prediction on an empty mask**; averaged over the real image count.
* Validation (model selection in ``train_model.py``): per-sample hard Dice with 4e-5 smoothing, so
  empty/empty counts as **1**.
"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric

__all__ = ["lvit_dice_iou", "LViTDiceIoUMetric", "LViTValDiceMetric", "lvit_val_dice"]


def _binarise(pred: torch.Tensor, label: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != label.shape:
        raise ValueError(f"LViT metric: prediction {list(pred.shape)} and label {list(label.shape)} differ")
    return (pred >= threshold).flatten(1).float(), (label > 0).flatten(1).float()


def lvit_dice_iou(
    pred: torch.Tensor, label: torch.Tensor, threshold: float = 0.5, empty_empty: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU ``[B]`` of probabilities ``pred [B,1,...]`` vs a mask.

    ``empty_empty`` is the score given when both prediction and mask are empty: 0 reproduces the official test
    script (default, used for reported numbers), 1 is the usual convention.
    """
    p, g = _binarise(pred, label, threshold)
    inter = (p * g).sum(1)
    total = p.sum(1) + g.sum(1)
    dice = 2 * inter / (total + 1e-5)
    union = total - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    both_empty = total == 0
    fill = torch.full_like(dice, float(empty_empty))
    return torch.where(both_empty, fill, dice), torch.where(both_empty, fill, iou)


def lvit_val_dice(pred: torch.Tensor, label: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample validation hard Dice ``[B]`` (squared Dice on binarised maps, 4e-5 smoothing; empty/empty = 1)."""
    p, g = _binarise(pred, label, threshold)
    return (2 * (p * g).sum(1) + 4e-5) / (p.sum(1) + g.sum(1) + 4e-5)


class LViTDiceIoUMetric(CumulativeIterationMetric):
    """Cumulative per-image Dice or IoU (``metric="dice"|"iou"``) with a chosen empty/empty convention."""

    def __init__(self, metric: str = "dice", threshold: float = 0.5, empty_empty: float = 0.0) -> None:
        super().__init__()
        if metric not in ("dice", "iou"):
            raise ValueError(f"metric must be 'dice' or 'iou', got {metric!r}")
        self.metric = metric
        self.threshold = threshold
        self.empty_empty = empty_empty

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dice, iou = lvit_dice_iou(y_pred, y, self.threshold, self.empty_empty)
        return (dice if self.metric == "dice" else iou)[:, None]

    def aggregate(self) -> torch.Tensor:
        data = self.get_buffer()
        return data.float().mean() if isinstance(data, torch.Tensor) and data.numel() else torch.tensor(0.0)


class LViTValDiceMetric(CumulativeIterationMetric):
    """Cumulative validation hard Dice (the official model-selection score)."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return lvit_val_dice(y_pred, y, self.threshold)[:, None]

    def aggregate(self) -> torch.Tensor:
        data = self.get_buffer()
        return data.float().mean() if isinstance(data, torch.Tensor) and data.numel() else torch.tensor(0.0)
