"""Learning-rate schedules of the reference implementations."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


# not monai WarmupCosineSchedule: its warm-up divides by W (ours by W - 1, as the reference) and it clamps at
# end_lr instead of decaying to eta_min (tests/test_library_equivalence.py shows both)
class LinearWarmupCosineAnnealingLR(LRScheduler):
    """Linear warm-up then cosine decay to ``eta_min``, stepped once per epoch.

    Closed form of research-contributions' UNETR/BTCV scheduler: for epoch ``e`` with warm-up ``W``
    and total ``E``, ``lr = warmup_start + (base - warmup_start) * e / (W - 1)`` while ``e < W``, then
    ``eta_min + (base - eta_min) * (1 + cos(pi * (e - W) / (E - W))) / 2``. Epoch 0 trains at
    ``warmup_start_lr`` (0 by default), as in the reference.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_epochs: int,
        max_epochs: int,
        warmup_start_lr: float = 0.0,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0 <= warmup_epochs < max_epochs:
            raise ValueError(f"need 0 <= warmup_epochs < max_epochs, got {warmup_epochs} and {max_epochs}")
        self.warmup_epochs = warmup_epochs
        self.max_epochs = max_epochs
        self.warmup_start_lr = warmup_start_lr
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, base_lr: float, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            fraction = epoch / max(self.warmup_epochs - 1, 1)
            return self.warmup_start_lr + (base_lr - self.warmup_start_lr) * fraction
        progress = (epoch - self.warmup_epochs) / (self.max_epochs - self.warmup_epochs)
        return self.eta_min + 0.5 * (base_lr - self.eta_min) * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def get_lr(self) -> list[float]:
        return [self._lr_at(base, self.last_epoch) for base in self.base_lrs]
