"""Small ignite handlers the bundles need and MONAI does not ship."""

from __future__ import annotations

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import LrScheduleHandler
from monai.handlers import ValidationHandler as _MonaiValidationHandler

from .checkpoint import BestMetricSaver, LastCheckpointSaver, ResumeCheckpointLoader

__all__ = [
    "BestMetricSaver",
    "EpochStartLrScheduleHandler",
    "LastCheckpointSaver",
    "ResumeCheckpointLoader",
    "TrainingProgressBar",
    "ValidationHandler",
]


class EpochStartLrScheduleHandler(LrScheduleHandler):
    """MONAI's epoch-level ``LrScheduleHandler`` stepping when each epoch starts instead of when it ends.

    The Universal Model's ``train.py`` calls ``scheduler.step()`` before training each epoch, so epoch 1
    trains at the first warm-up step (not at ``warmup_start_lr`` = 0) and the last epoch at ``eta_min``.
    A checkpoint saved after epoch ``k`` holds a scheduler stepped ``k`` times, so resuming continues the
    same sequence.
    """

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.EPOCH_STARTED, self)


class ValidationHandler(_MonaiValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` that also validates after the final epoch.

    With ``interval`` 100 a 1-epoch run (MONAI Label, smoke tests) would otherwise never validate and
    never write ``models/model.pt``.
    """

    def attach(self, engine: Engine) -> None:
        if self.validator is None:
            raise RuntimeError("please set validator in ValidationHandler before training.")
        engine.validator = self.validator  # found there by LastCheckpointSaver / ResumeCheckpointLoader
        if not self.epoch_level:
            super().attach(engine)
            return
        interval = self.interval

        def due(engine: Engine, epoch: int) -> bool:
            return epoch % interval == 0 or epoch == engine.state.max_epochs

        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=due), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


class TrainingProgressBar(ProgressBar):
    """ignite's tqdm ``ProgressBar`` over the whole run: one step per epoch, with elapsed time and ETA.

    MONAI's trainers call ``attach(engine)`` without options, which would count the iterations of one
    epoch; this counts epochs out of ``max_epochs`` so the remaining time is the run's. Rank 0 only.
    """

    def attach(self, engine: Engine) -> None:  # type: ignore[override]
        if idist.get_rank() == 0:
            super().attach(engine, event_name=Events.EPOCH_COMPLETED, closing_event_name=Events.COMPLETED)
