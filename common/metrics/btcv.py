"""BTCV Dice exactly as research-contributions' ``UNETR/BTCV/test.py`` scores it."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric


def btcv_case_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int = 14) -> torch.Tensor:
    """Per-organ Dice of one case from label maps; an organ absent from the ground truth scores 0.

    MONAI's ``DiceMetric`` gives NaN (or 1) for an organ missing from both prediction and ground truth;
    the reference test script gives 0 whatever the prediction, which this reproduces.
    """
    pred, label = pred.reshape(-1), label.reshape(-1)
    scores = torch.zeros(num_classes - 1, dtype=torch.float64)
    for organ in range(1, num_classes):
        p, g = pred == organ, label == organ
        g_sum = int(g.sum())
        if g_sum:
            scores[organ - 1] = 2.0 * int((p & g).sum()) / (int(p.sum()) + g_sum)
    return scores


class BTCVParityDice(CumulativeIterationMetric):
    """Cumulative per-case, per-organ Dice with the reference rule; aggregate is the mean over organs and cases.

    Expects one-hot (or probability) ``y_pred`` and one-hot ``y`` of shape ``[B, C, ...]`` including background.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("BTCVParityDice needs the ground truth")
        num_classes = y_pred.shape[1]
        pred_labels, true_labels = y_pred.argmax(1), y.argmax(1)
        return torch.stack([btcv_case_dice(p, g, num_classes) for p, g in zip(pred_labels, true_labels)])

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        return data.mean(dim=1).mean()
