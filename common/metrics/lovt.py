"""LoVT downstream test metric: one Dice over all test pixels (torchmetrics micro-F1, threshold 0.5)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine
from monai.metrics import ConfusionMatrixMetric

__all__ = ["GlobalDice", "GlobalDiceHandler"]

# the evaluators' (prediction, label) pair; a module constant, not a call in each signature (flake8 B008)
PRED_AND_LABEL = from_engine(["pred", "label"])


class GlobalDice(ConfusionMatrixMetric):
    """One Dice over every pixel seen: MONAI's summed confusion matrix, F1 = 2TP / (2TP + FP + FN).

    This is torchmetrics ``F1(multiclass=False, average="micro")`` on probabilities with threshold 0.5,
    as the LoVT evaluation computes it: one value per test set, not a mean of per-image Dice. An
    empty denominator (no positive predicted or present anywhere) gives 0, as torchmetrics does (MONAI: NaN).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__(metric_name="f1 score", compute_sample=False, reduction="sum")
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super()._compute_tensor((y_pred >= self.threshold).float(), (y > 0.5).float())

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        return torch.nan_to_num(super().aggregate()[0].float(), nan=0.0).squeeze()


class GlobalDiceHandler(IgniteMetricHandler):
    """Ignite wrapper of :class:`GlobalDice` for MONAI evaluators (``pred`` probabilities, ``label`` mask)."""

    def __init__(self, threshold: float = 0.5, output_transform: Callable = PRED_AND_LABEL) -> None:
        super().__init__(metric_fn=GlobalDice(threshold), output_transform=output_transform)
