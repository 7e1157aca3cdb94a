"""PUMIT training and test recipe pieces MONAI does not ship.

* ``WarmupCosineStepLR``: timm's ``CosineLRScheduler(t_in_epochs=False, warmup_prefix=True)`` as the
  official Lightning code steps it (every ``update_every`` optimiser steps).
* ``GradientClipHandler``: ``clip_grad_norm_`` between backward and the optimiser step (Lightning's
  ``gradient_clip_val`` with ``gradient_clip_algorithm: norm``), AMP-aware.
* ``FlipTTAInferer``: the official 8-flip test-time augmentation (mean of softmax probabilities).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["CodebookUsageHandler", "FlipTTAInferer", "GradientClipHandler", "WarmupCosineStepLR"]


class WarmupCosineStepLR(LambdaLR):
    """Per-iteration linear warm-up then cosine decay, held constant between updates.

    At optimiser step ``s`` the schedule is evaluated at ``t = update_every * floor(s / update_every)``:
    ``lr = warmup_lr_init + (base - warmup_lr_init) * t / warmup_steps`` while ``t < warmup_steps``, then
    ``lr_min + (base - lr_min) * (1 + cos(pi * (t - warmup_steps) / t_initial)) / 2`` (timm's
    ``warmup_prefix``: the cosine period starts after warm-up and lasts ``t_initial`` steps, the official
    ``t_initial`` being ``max_steps``). Step it once per iteration (``LrScheduleHandler(epoch_level=False)``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        t_initial: int,
        lr_min: float = 1e-6,
        warmup_lr_init: float = 0.0,
        update_every: int = 100,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or t_initial <= 0 or update_every <= 0:
            raise ValueError(
                f"need warmup_steps >= 0, t_initial > 0, update_every > 0; got {warmup_steps}, {t_initial}, "
                f"{update_every}"
            )
        self.warmup_steps = warmup_steps
        self.t_initial = t_initial
        self.lr_min = lr_min
        self.warmup_lr_init = warmup_lr_init
        self.update_every = update_every
        self._base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        lambdas = [lambda step, base=base: self.lr_at(step, base) / base for base in self._base_lrs]
        super().__init__(optimizer, lambdas, last_epoch)

    def lr_at(self, step: int, base_lr: float) -> float:
        """Learning rate used by optimiser step ``step`` (0-based) for a group with initial lr ``base_lr``."""
        t = (step // self.update_every) * self.update_every
        if t < self.warmup_steps:
            return self.warmup_lr_init + (base_lr - self.warmup_lr_init) * t / self.warmup_steps
        progress = min((t - self.warmup_steps) / self.t_initial, 1.0)
        return self.lr_min + 0.5 * (base_lr - self.lr_min) * (1.0 + math.cos(math.pi * progress))


class GradientClipHandler:
    """Clip the gradient norm of ``engine.network`` to ``max_norm`` after backward, before the optimiser step.

    Under AMP the gradients are unscaled first (``GradScaler.unscale_``), so the threshold applies to true
    gradients, as Lightning does for ``gradient_clip_val`` with 16-mixed precision.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self.max_norm = max_norm
        self.norm_type = norm_type

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        params = [p for p in engine.network.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)


class FlipTTAInferer(Inferer):
    """Average of ``softmax(inferer(flip(x)))`` flipped back, over every subset of the spatial axes.

    With 3 spatial axes this is the official 8-flip TTA (``[], [2], [3], [4], [2, 3], [2, 4], [3, 4],
    [2, 3, 4]``). ``enabled=False`` keeps only the identity, so the output is always class probabilities
    (post-processing must not apply softmax again).
    """

    def __init__(self, inferer: Inferer, spatial_dims: int = 3, enabled: bool = True, softmax: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        axes = range(2, 2 + spatial_dims)
        subsets = [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]
        self.flips: list[tuple[int, ...]] = subsets if enabled else [()]
        self.softmax = softmax

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = None
        for dims in self.flips:
            out = self.inferer(torch.flip(inputs, dims) if dims else inputs, network, *args, **kwargs)
            out = out.float().softmax(dim=1) if self.softmax else out.float()
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total + out
        return total / len(self.flips)


class CodebookUsageHandler:
    """Per-epoch tokenizer health from the training outputs' soft code assignments ``pred["probs"]``.

    Works with batch outputs and with MONAI's decollated (per-sample) outputs.

    Logs and keeps in ``history`` (one dict per epoch): ``used`` (distinct argmax codes over the epoch), and
    ``perplexity`` = ``exp(H(p_mean))`` of the epoch-averaged code distribution (1 .. number of codes).
    """

    def __init__(self, pred_key: str = "pred", probs_key: str = "probs") -> None:
        self.pred_key, self.probs_key = pred_key, probs_key
        self.history: list[dict[str, float]] = []
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._used: set[int] = set()

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log)

    def _reset(self, engine: Engine) -> None:
        self._sum, self._count, self._used = None, 0, set()

    def _update(self, engine: Engine) -> None:
        output = engine.state.output
        outputs = output if isinstance(output, list) else [output]  # decollated per sample, or a batch
        probs = torch.cat([o[self.pred_key][self.probs_key].detach().float().flatten(0, -2) for o in outputs])
        self._sum = probs.sum(0) if self._sum is None else self._sum + probs.sum(0)
        self._count += probs.shape[0]
        self._used.update(probs.argmax(-1).unique().tolist())

    def _log(self, engine: Engine) -> None:
        p = self._sum / max(self._count, 1)
        perplexity = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
        record = {"epoch": engine.state.epoch, "used": len(self._used), "perplexity": perplexity}
        self.history.append(record)
        engine.logger.info(
            f"codebook epoch {record['epoch']}: used {record['used']}/{p.numel()}, perplexity {perplexity:.2f}"
        )
