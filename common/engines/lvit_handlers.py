"""LViT's model-selection gate: keep the best validation checkpoint, but only from a given epoch on."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events

from ..core.distributed import is_main_process
from ..core.io import save_atomically
from .checkpoint import state_of

__all__ = ["BestAfterEpochSaver"]


class BestAfterEpochSaver:
    """Attach to an evaluator: save ``save_dict`` when ``metric_name`` beats every earlier value from ``min_epoch`` on.

    The official ``train_model.py`` saves the best validation Dice only after epoch 5; MONAI's savers have no such
    option. ``min_epoch`` 0 saves from the first validation (demo and 1-epoch runs).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        metric_name: str,
        min_epoch: int = 6,
        filename: str = "model.pt",
    ) -> None:
        self.path = os.path.join(save_dir, filename)
        self.save_dict = save_dict
        self.metric_name = metric_name
        self.min_epoch = min_epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        # kept on the evaluator's state, so that last.pt carries it across a resume
        if engine.state.epoch >= self.min_epoch and value > getattr(engine.state, "best_after_min_epoch", -math.inf):
            engine.state.best_after_min_epoch = value
            if is_main_process():
                save_atomically(state_of(self.save_dict), self.path)
