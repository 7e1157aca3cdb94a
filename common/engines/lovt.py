"""LoVT engine pieces: the pretraining iteration (own gradient accumulation + AMP), its validation
iteration, the downstream decoder warm-up and an embedding writer for the image-encoder inference.

MONAI's ``accumulation_steps`` only applies to ``SupervisedTrainer``'s default iteration, so
``LoVTTrainStep`` does its own: InfoNCE negatives stay inside each micro-batch while the optimizer
sees ``accumulation_steps`` micro-batches per step, as Lightning's ``accumulate_grad_batches`` did.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel

from ..core.distributed import is_main_process, unwrap_module

__all__ = ["lovt_inputs", "LoVTTrainStep", "LoVTEvalStep", "EncoderWarmup", "EmbeddingWriter"]

_TEXT_KEYS = ("input_ids", "attention_mask", "token_sentence")


def lovt_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Model keyword inputs of a :class:`common.data.mimic_cxr.LoVTCollate` batch, moved to ``device``."""
    inputs = {k: torch.as_tensor(batch[k]).to(device) for k in ("image", *_TEXT_KEYS)}
    inputs["num_sentences"] = int(batch["num_sentences"])
    return inputs


def _detached(terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.detach() for k, v in terms.items()}
    out["loss"] = out["total"]
    return out


class LoVTTrainStep:
    """``SupervisedTrainer.iteration_update`` for LoVT pretraining.

    Every iteration is one micro-batch; the optimizer (and the per-step ``lr_scheduler``, the paper's
    cosine schedule) steps every ``accumulation_steps`` iterations and at the end of each epoch.
    Uses the trainer's ``amp`` flag and ``scaler``; with AMP on CPU it autocasts to bfloat16.
    The output is a one-element list holding the loss terms: the shape of a decollated
    ``SupervisedTrainer`` output, so handlers reading ``from_engine(["loss"], first=True)`` (MONAI's
    bundle tracking among them) get the scalar loss.
    """

    def __init__(self, accumulation_steps: int = 16, lr_scheduler: Any = None) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}.")
        self.accumulation_steps = accumulation_steps
        self.lr_scheduler = lr_scheduler

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        inputs = lovt_inputs(batch, engine.state.device)
        engine.network.train()
        device_type = inputs["image"].device.type
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        position = (engine.state.iteration - 1) % engine.state.epoch_length + 1
        step = position % self.accumulation_steps == 0 or position == engine.state.epoch_length
        scaler = getattr(engine, "scaler", None) if engine.amp and device_type == "cuda" else None
        # DDP all-reduces gradients in backward; only the micro-batch before the optimizer step needs it
        sync = step or not isinstance(engine.network, DistributedDataParallel)
        with nullcontext() if sync else engine.network.no_sync():
            with torch.autocast(device_type, dtype=dtype, enabled=bool(engine.amp)):
                terms = engine.loss_function(engine.network(**inputs))
            loss = terms["total"] / self.accumulation_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()

        if step:
            if scaler is not None:
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                engine.optimizer.step()
            engine.optimizer.zero_grad(set_to_none=True)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        return [_detached(terms)]


class LoVTEvalStep:
    """``SupervisedEvaluator.iteration_update``: the LoVT loss terms on a validation batch."""

    def __init__(self, loss: torch.nn.Module) -> None:
        self.loss = loss

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        inputs = lovt_inputs(batch, engine.state.device)
        engine.network.eval()
        with torch.no_grad():
            return _detached(self.loss(engine.network(**inputs)))


class EncoderWarmup:
    """Train the decoder alone for ``steps`` iterations at ``warmup_lr``, then unfreeze the encoder at ``lr``.

    The LoVT downstream fine-tune protocol (20 warm-up steps at 1e-3 for COVID-Rural, 100 for SIIM).
    ``network`` must expose ``freeze_encoder(bool)``. ``steps=0`` disables the warm-up.
    """

    def __init__(
        self, network: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, warmup_lr: float, lr: float
    ):
        self.network = network
        self.optimizer = optimizer
        self.steps = steps
        self.warmup_lr = warmup_lr
        self.lr = lr

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def attach(self, engine: Engine) -> None:
        if self.steps > 0:
            engine.add_event_handler(Events.STARTED, self.start)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.maybe_release)

    def start(self, engine: Engine) -> None:
        if engine.state.iteration < self.steps:
            unwrap_module(self.network).freeze_encoder(True)
            self._set_lr(self.warmup_lr)

    def maybe_release(self, engine: Engine) -> None:
        if engine.state.iteration == self.steps:
            unwrap_module(self.network).freeze_encoder(False)
            self._set_lr(self.lr)


class EmbeddingWriter:
    """Write each image's region and global embeddings (``LoVTImageEncoder`` outputs) to ``<output_dir>/<name>.pt``."""

    def __init__(self, output_dir: str, keys: tuple[str, ...] = ("regions", "global", "z_local", "z_global")) -> None:
        self.output_dir = output_dir
        self.keys = keys

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        os.makedirs(self.output_dir, exist_ok=True)
        pred = engine.state.output["pred"]
        paths = engine.state.batch["image"].meta["filename_or_obj"]
        for i, path in enumerate(paths):
            name = os.path.splitext(os.path.basename(str(path)))[0]
            embeddings = {k: pred[k][i].detach().cpu().float() for k in self.keys}
            torch.save(embeddings, os.path.join(self.output_dir, f"{name}.pt"))
