"""LoVT downstream test metric: one Dice over all test pixels (torchmetrics micro-F1, threshold 0.5)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine
from monai.metrics import CumulativeIterationMetric

__all__ = ["GlobalDice", "GlobalDiceHandler"]

# the evaluators' (prediction, label) pair; a module constant, not a call in each signature (flake8 B008)
PRED_AND_LABEL = from_engine(["pred", "label"])


class GlobalDice(CumulativeIterationMetric):
    """Accumulate TP, FP and FN over every pixel seen, then Dice = 2TP / (2TP + FP + FN).

    This is torchmetrics ``F1(multiclass=False, average="micro")`` on probabilities with threshold 0.5,
    as the LoVT evaluation computes it: one value per test set, not a mean of per-image Dice. An
    empty denominator (no positive predicted or present anywhere) gives 0, as torchmetrics does.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pred = y_pred >= self.threshold
        target = y > 0.5
        tp = (pred & target).sum()
        fp = (pred & ~target).sum()
        fn = (~pred & target).sum()
        return torch.stack([tp, fp, fn]).double().unsqueeze(0)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        counts = self.get_buffer()
        if not isinstance(counts, torch.Tensor) or counts.numel() == 0:
            return torch.tensor(0.0)
        tp, fp, fn = counts.reshape(-1, 3).sum(0)
        denominator = 2 * tp + fp + fn
        return (2 * tp / denominator).float() if denominator > 0 else torch.tensor(0.0)


class GlobalDiceHandler(IgniteMetricHandler):
    """Ignite wrapper of :class:`GlobalDice` for MONAI evaluators (``pred`` probabilities, ``label`` mask)."""

    def __init__(self, threshold: float = 0.5, output_transform: Callable = PRED_AND_LABEL) -> None:
        super().__init__(metric_fn=GlobalDice(threshold), output_transform=output_transform)
