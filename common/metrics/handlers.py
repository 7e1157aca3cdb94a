"""Ignite wrappers so the parity metrics plug into MONAI evaluators like ``MeanDice``."""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine

from .btcv import BTCVParityDice

# the evaluators' (prediction, label) pair; a module constant, not a call in each signature (flake8 B008)
PRED_AND_LABEL = from_engine(["pred", "label"])


class BTCVParityDiceHandler(IgniteMetricHandler):
    """Mean organ Dice with research-contributions' empty-organ rule; ``save_details`` keeps per-case rows."""

    def __init__(self, output_transform: Callable = PRED_AND_LABEL, save_details: bool = True) -> None:
        super().__init__(metric_fn=BTCVParityDice(), output_transform=output_transform, save_details=save_details)
