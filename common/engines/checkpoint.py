"""Atomic checkpoint writing and the two savers every training config uses.

MONAI's ``CheckpointSaver`` writes in place (ignite ``atomic=False``), so a run killed mid-write
leaves a truncated file. These savers write to a temporary file in the same folder and rename it,
so ``models/last.pt`` and ``models/model.pt`` are always complete. ``last.pt`` also carries the
validator's best metric so far: a resumed run keeps comparing against it instead of overwriting
``model.pt`` with its first, possibly worse, validation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from ..core.distributed import is_main_process, unwrap_module
from ..core.io import save_atomically


def state_of(save_dict: Mapping[str, Any]) -> dict[str, Any]:
    """State dict of one object (flat, as the model zoo ships ``model.pt``) or a dict of state dicts."""
    states = {k: unwrap_module(v).state_dict() for k, v in save_dict.items()}
    return next(iter(states.values())) if len(states) == 1 else states


VALIDATOR_BEST_KEY = "validator_best"
_VALIDATOR_BEST_FIELDS = ("best_metric", "best_metric_epoch", "best_after_min_epoch")


def validator_best(trainer: Engine) -> dict[str, Any]:
    """The best-metric fields of the validator that ``ValidationHandler`` registered on ``trainer`` (or none)."""
    validator = getattr(trainer, "validator", None)
    if validator is None:
        return {}
    # plain Python numbers: metrics may be numpy or tensor scalars, which weights_only loading refuses
    best = {k: getattr(validator.state, k) for k in _VALIDATOR_BEST_FIELDS if hasattr(validator.state, k)}
    return {k: int(v) if k == "best_metric_epoch" else float(v) for k, v in best.items()}


class LastCheckpointSaver:
    """Save ``save_dict`` (model, optimizer, scheduler, ...) and the trainer's state every ``interval`` epochs.

    The engine it is attached to is stored under ``engine_key``, so configs need no (circular) reference
    from the trainer's handler list back to the trainer. ``ResumeCheckpointLoader`` reads the file back.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "last.pt",
        interval: int = 1,
        engine_key: str = "trainer",
    ):
        self.path = os.path.join(save_dir, filename)
        self.save_dict = dict(save_dict)
        self.interval = interval
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        self.save_dict[self.engine_key] = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            save_atomically({**state_of(self.save_dict), VALIDATOR_BEST_KEY: validator_best(engine)}, self.path)


class ResumeCheckpointLoader:
    """Restore ``load_dict`` and the trainer's epoch/iteration from ``load_path`` when training starts.

    A thin wrapper of MONAI's ``CheckpointLoader`` that adds the engine it is attached to under
    ``engine_key`` (see ``LastCheckpointSaver``). A missing file is an error naming it, not a silent restart.
    """

    def __init__(
        self, load_path: str, load_dict: Mapping[str, Any], map_location: Any = None, engine_key: str = "trainer"
    ):
        self.load_path = load_path
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        if not os.path.isfile(self.load_path):
            raise FileNotFoundError(f"cannot resume: no checkpoint at {self.load_path}")
        load_dict = {**self.load_dict, self.engine_key: engine}
        CheckpointLoader(load_path=self.load_path, load_dict=load_dict, map_location=self.map_location).attach(engine)
        engine.add_event_handler(Events.STARTED, self.restore_validator_best)

    def restore_validator_best(self, engine: Engine) -> None:
        """Give the validator back its best metric so far, so ``model.pt`` is only replaced by a better model."""
        validator = getattr(engine, "validator", None)
        if validator is None:
            return
        # mmap: only the few numbers are read, not the weights a second time
        saved = torch.load(self.load_path, map_location="cpu", weights_only=True, mmap=True)
        for name, value in saved.get(VALIDATOR_BEST_KEY, {}).items():
            setattr(validator.state, name, value)


# not monai CheckpointSaver(save_key_metric=True): it writes in place (ignite atomic=False, see the module docstring)
class BestMetricSaver:
    """Attach to an evaluator: save ``save_dict`` whenever the evaluator's key metric improved.

    MONAI evaluators update ``state.best_metric_epoch`` before handlers attached later run, so a new best
    is exactly ``best_metric_epoch == epoch`` (the trainer epoch the validation ran at).
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], filename: str = "model.pt"):
        self.path = os.path.join(save_dir, filename)
        self.save_dict = save_dict

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if is_main_process() and engine.state.best_metric_epoch == engine.state.epoch:
            save_atomically(state_of(self.save_dict), self.path)
