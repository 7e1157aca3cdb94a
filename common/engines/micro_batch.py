"""Run each training batch as chunks of a few samples, accumulating gradients, to bound activation memory.

The 3D recipes draw several crops per image into one batch (UNETR 4 x 96^3, PUMIT 4 x 48x192^2, Universal
2 x 96^3). On a CPU host the activations of the whole batch do not fit a workstation's memory, so
:class:`MicroBatchIteration` (a ``SupervisedTrainer`` ``iteration_update``) runs the forward and backward
pass on ``micro_batch_size`` samples at a time and steps the optimiser once per batch. Each chunk's loss is
weighted by its share of the batch, so for a loss that averages over samples and a network without batch
statistics (instance / layer norm, as in all three) the update equals the whole-batch update; only the
peak memory (that of one chunk) and the float rounding differ. (MONAI's ``accumulation_steps`` accumulates
over iterations instead, which would change the recipe's step count and schedules.)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

__all__ = ["MicroBatchIteration"]


def _concat(chunks: list[Any]) -> Any:
    """Concatenate per-chunk outputs along the batch: tensors, or tuples/lists of them (deep supervision)."""
    if isinstance(chunks[0], (list, tuple)):
        return type(chunks[0])(_concat(list(parts)) for parts in zip(*chunks))
    return torch.cat(chunks, dim=0)


def _detach(output: Any) -> Any:
    if isinstance(output, (list, tuple)):
        return type(output)(_detach(o) for o in output)
    return output.detach()


class MicroBatchIteration:
    """``SupervisedTrainer`` iteration over chunks of at most ``micro_batch_size`` samples, one optimiser step.

    ``micro_batch_size`` None runs MONAI's own iteration unchanged. Events fire
    once per batch, in MONAI's order (forward, loss, backward, model completed), so handlers such as
    gradient clipping see the accumulated gradients. Under DDP the gradients are all-reduced once, on the
    last chunk.
    """

    def __init__(self, micro_batch_size: int | None = None) -> None:
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer or None, got {micro_batch_size}")
        self.micro_batch_size = micro_batch_size

    def __call__(self, engine: Any, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("MicroBatchIteration and SupervisedTrainer(accumulation_steps > 1) cannot be combined")
        if self.micro_batch_size is None:
            return engine._iteration(engine, batchdata)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        size, step = len(inputs), self.micro_batch_size

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        starts = range(0, size, step)
        preds, total = [], torch.zeros((), device=inputs.device)
        for start in starts:
            x, y = inputs[start : start + step], targets[start : start + step]
            last = start == starts[-1]
            no_sync = getattr(engine.network, "no_sync", None)
            with contextlib.ExitStack() as stack:
                if no_sync is not None and not last:
                    stack.enter_context(no_sync())
                if engine.amp:  # as MONAI's own iteration does
                    stack.enter_context(torch.autocast("cuda", **engine.amp_kwargs))
                pred = engine.inferer(x, engine.network, *args, **kwargs)
                loss = engine.loss_function(pred, y).mean() * (len(x) / size)
            (engine.scaler.scale(loss) if use_scaler else loss).backward()
            preds.append(_detach(pred))
            total = total + loss.detach()

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: _concat(preds), Keys.LOSS: total}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if use_scaler:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
