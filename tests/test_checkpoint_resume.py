"""``last.pt`` carries the validator's best metric, so a resumed run never replaces a better ``model.pt``."""

from __future__ import annotations

import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.engines.checkpoint import BestMetricSaver, LastCheckpointSaver, ResumeCheckpointLoader
from common.engines.lvit_handlers import BestAfterEpochSaver


def _engines(metric: float | None = None) -> tuple[Engine, Engine]:
    trainer, validator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    validator.state.metrics = {"dice": metric}
    trainer.validator = validator  # what ValidationHandler.attach does
    return trainer, validator


def test_resumed_run_keeps_the_best_metric_and_model(tmp_path):
    net = torch.nn.Linear(2, 2)
    trainer, validator = _engines()
    validator.state.best_metric, validator.state.best_metric_epoch = np.float64(0.8), 2  # as metric handlers give
    validator.state.best_after_min_epoch = torch.tensor(0.8, dtype=torch.float64)
    LastCheckpointSaver(str(tmp_path), {"model": net}).attach(trainer)
    trainer.run([0], max_epochs=2)  # writes last.pt at each epoch end

    resumed, fresh_validator = _engines(metric=0.5)
    fresh_validator.state.best_metric, fresh_validator.state.best_metric_epoch = -1, -1
    ResumeCheckpointLoader(os.path.join(tmp_path, "last.pt"), {"model": torch.nn.Linear(2, 2)}).attach(resumed)
    resumed.fire_event(Events.STARTED)
    assert (fresh_validator.state.best_metric, fresh_validator.state.best_metric_epoch) == (0.8, 2)
    assert fresh_validator.state.best_after_min_epoch == 0.8

    # a worse first validation after the resume must not overwrite model.pt
    fresh_validator.state.epoch = 3
    BestAfterEpochSaver(str(tmp_path), {"model": net}, "dice", min_epoch=0)(fresh_validator)
    BestMetricSaver(str(tmp_path), {"model": net})(fresh_validator)
    assert not os.path.exists(os.path.join(tmp_path, "model.pt"))
    fresh_validator.state.metrics = {"dice": 0.9}
    BestAfterEpochSaver(str(tmp_path), {"model": net}, "dice", min_epoch=0)(fresh_validator)
    assert os.path.exists(os.path.join(tmp_path, "model.pt")) and fresh_validator.state.best_after_min_epoch == 0.9
