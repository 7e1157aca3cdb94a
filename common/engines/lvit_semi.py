"""Semi-supervised LViT (our design; the official code was never released): EPI pseudo-label bank + LV loss.

* :class:`EPIBank` keeps, per unlabelled image, an exponential moving average (beta 0.99) of its predicted
  probabilities; the pseudo-label is ``bank > 0.5``. It is an ``nn.Module`` with buffers, so it goes into the
  checkpoint ``save_dict`` and survives resume.
* :class:`LVTemplates` holds text+mask templates and picks, per sample, the template whose mean text embedding is
  most cosine-similar to the sample's.
* :class:`LViTSemiIteration` is a ``SupervisedTrainer`` ``iteration_update``: labelled samples get the supervised
  loss, unlabelled ones ``loss(pred, pseudo) + alpha * (1 - cos(pred, template))``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn

from ..core.io import write_atomically
from ..data.lvit_templates import DEFAULT_TEMPLATE_TEXTS, parse_zones, zone_mask
from ..losses.lvit import LViTDiceBCE, lv_loss

logger = logging.getLogger(__name__)

__all__ = ["EPIBank", "LVTemplates", "LViTSemiIteration", "count_unlabelled", "labelled_subset", "semi_datalist"]


class EPIBank(nn.Module):
    """Float16 ``[N, 1, H, W]`` EMA of predictions for N unlabelled images, indexed by their ``unlabelled_index``.

    The first update of an entry copies the prediction (the network then holds the stage-A weights), later ones do
    ``P <- beta * P + (1 - beta) * pred``.
    """

    def __init__(self, num_items: int, spatial_size: Sequence[int] = (224, 224), beta: float = 0.99) -> None:
        super().__init__()
        self.beta = beta
        self.register_buffer("probs", torch.zeros((num_items, 1, *spatial_size), dtype=torch.float16))
        self.register_buffer("seen", torch.zeros(num_items, dtype=torch.bool))

    @torch.no_grad()
    def update(self, index: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """EMA-update entries ``index`` with ``pred [B,1,H,W]`` (gathered across ranks); return their pseudo-labels.

        Under DDP every rank must call it at every iteration, also with an empty ``index`` (``B = 0``):
        the gather is a collective, and ranks hold different numbers of unlabelled images.
        """
        pred = pred.detach().float()
        all_index = _gather(index.to(pred.device).long()).to(self.probs.device)
        all_pred = _gather(pred).to(self.probs.device)
        if len(all_index):
            old = self.probs[all_index].float()
            seen = self.seen[all_index].view(-1, *([1] * (pred.dim() - 1)))
            new = torch.where(seen, self.beta * old + (1 - self.beta) * all_pred, all_pred)
            self.probs[all_index] = new.to(torch.float16)
            self.seen[all_index] = True
        return (self.probs[index.to(self.probs.device).long()].float() > 0.5).float().to(pred.device)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (any length along dim 0, zero included) from every rank; identity without a process group.

    Lengths are exchanged first, then every rank sends ``x`` padded to the longest, so unequal batches gather.
    Tensors stay on their device (CUDA for NCCL).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    length = torch.tensor([x.shape[0]], device=x.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n) for n in lengths]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class LVTemplates(nn.Module):
    """Template masks ``[T,1,H,W]`` and their L2-normalised mean text embeddings ``[T,D]``.

    Args:
        embedder: maps a list of descriptions to ``[T, L, D]`` (e.g. :class:`common.text.lvit_embed.LViTTextEmbedder`).
        texts: template descriptions; masks are the lung zones their text names (:mod:`common.data.lvit_templates`).
        spatial_size: template mask size (the network input size).
    """

    def __init__(self, embedder: Any, texts: Sequence[str] | None = None, spatial_size: int = 224) -> None:
        super().__init__()
        texts = list(texts or DEFAULT_TEMPLATE_TEXTS)
        masks = []
        for t in texts:
            zones = parse_zones(t)
            if not zones:
                raise ValueError(f"LV template text names no lung zone: {t!r}")
            masks.append(torch.from_numpy(zone_mask(zones, spatial_size))[None])
        emb = torch.as_tensor(embedder.embed(texts)).float()
        self.texts = texts
        self.register_buffer("masks", torch.stack(masks))
        self.register_buffer("text_emb", F.normalize(emb.mean(1), dim=-1))

    def select(self, text: torch.Tensor) -> torch.Tensor:
        """Index ``[B]`` of the most similar template for sample embeddings ``text [B,L,D]``."""
        query = F.normalize(text.float().mean(1), dim=-1)
        return (query @ self.text_emb.to(query.device).T).argmax(1)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """The selected template masks ``[B,1,H,W]``."""
        return self.masks.to(text.device)[self.select(text)]


class LViTSemiIteration:
    """``iteration_update`` for ``SupervisedTrainer`` over a batch mixing labelled and unlabelled samples.

    Batches carry ``image``, ``label``, ``text`` ([B,L,D]), ``labelled`` (1/0) and ``unlabelled_index``.
    """

    def __init__(
        self, bank: EPIBank, templates: LVTemplates, loss: nn.Module | None = None, alpha: float = 0.1
    ) -> None:
        self.bank = bank
        self.templates = templates
        self.loss = loss if loss is not None else LViTDiceBCE()
        self.alpha = alpha

    def __call__(self, engine: Any, batchdata: dict) -> dict:
        device = engine.state.device
        image = batchdata[Keys.IMAGE].to(device).float()
        label = batchdata[Keys.LABEL].to(device).float()
        text = batchdata["text"].to(device).float()
        labelled = torch.as_tensor(batchdata["labelled"]).to(device).bool().view(-1)
        index = torch.as_tensor(batchdata["unlabelled_index"]).to(device).long().view(-1)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label}
        amp = bool(getattr(engine, "amp", False))
        with torch.autocast("cuda", enabled=amp):  # as MONAI's trainer: AMP is CUDA autocast + its GradScaler
            pred = engine.network(image, text)
            engine.state.output[Keys.PRED] = pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            out = self.compute_loss(pred, label, text, labelled, index)
        engine.state.output.update(out)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        scaler = getattr(engine, "scaler", None) if amp else None
        (scaler.scale(out["loss"]) if scaler is not None else out["loss"]).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            engine.optimizer.step()
        # MODEL_COMPLETED triggers the trainer's decollation and post-processing (train metrics, loss logging)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def compute_loss(
        self, pred: torch.Tensor, label: torch.Tensor, text: torch.Tensor, labelled: torch.Tensor, index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Count-weighted mean of the labelled and unlabelled losses (labels of unlabelled samples are unused)."""
        n = pred.shape[0]
        zero = pred.sum() * 0.0
        sup, unsup, lv = zero, zero, zero
        if labelled.any():
            sup = self.loss(pred[labelled], label[labelled])
        unl = ~labelled
        pseudo = self.bank.update(index[unl], pred[unl])  # on every rank, every step: it gathers across ranks
        if unl.any():
            lv = lv_loss(pred[unl], self.templates(text[unl]))
            unsup = self.loss(pred[unl], pseudo) + self.alpha * lv
        n_l = labelled.sum().float()
        total = (n_l * sup + (n - n_l) * unsup) / n
        return {"loss": total, "loss_sup": sup.detach(), "loss_unsup": unsup.detach(), "loss_lv": lv.detach()}


def labelled_subset(datalist: Sequence[dict], fraction: float, seed: int = 666, path: str | None = None) -> list[str]:
    """The labelled mask names (sorted) of the semi-supervised recipe, read from ``path`` when it exists.

    Otherwise they are a seeded random draw of ``round(fraction * N)`` of the sorted training mask names, written
    one a line to ``path`` (if given) so that later runs and other people use the same subset. An existing file is
    never redrawn or overwritten; a name in it that the datalist lacks is an error naming the file.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction}")
    names = sorted(d["name"] for d in datalist)
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            chosen = sorted(line.strip() for line in f if line.strip())
        unknown = sorted(set(chosen) - set(names))
        if unknown or not chosen:
            what = f"{len(unknown)} name(s) not in the training split, e.g. {unknown[:5]}" if unknown else "no names"
            raise ValueError(f"{path}: labelled subset file lists {what}; delete it to draw the subset again")
        expected = max(1, round(fraction * len(names)))
        if len(chosen) != expected:
            logger.warning(f"{path} lists {len(chosen)} masks; fraction {fraction} of {len(names)} is {expected}")
        logger.info(f"labelled subset: {len(chosen)} of {len(names)} training masks, read from {path}")
        return chosen
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = sorted(names[i] for i in perm[: max(1, round(fraction * len(names)))])
    logger.info(
        f"labelled subset: {len(chosen)} of {len(names)} training masks, drawn with seed {seed} on first use"
        f" -> {path or '(not saved)'}"
    )
    if path is not None:
        write_atomically(path, lambda f: f.write("\n".join(chosen) + "\n"), binary=False)
    return chosen


def semi_datalist(datalist: Sequence[dict], labelled_names: Sequence[str] | str) -> list[dict]:
    """Flag each item ``labelled`` (1/0), number the unlabelled ones (``unlabelled_index``) and drop their label."""
    if isinstance(labelled_names, str):
        with open(labelled_names) as f:
            labelled_names = [line.strip() for line in f if line.strip()]
    keep = set(labelled_names)
    unknown = keep - {d["name"] for d in datalist}
    if unknown:
        raise ValueError(f"{len(unknown)} labelled name(s) are not in the datalist, e.g. {sorted(unknown)[:5]}")
    out, u = [], 0
    for d in datalist:
        item = dict(d)
        if d["name"] in keep:
            item.update(labelled=1, unlabelled_index=-1)
        else:
            item.pop("label", None)
            item.update(labelled=0, unlabelled_index=u)
            u += 1
        out.append(item)
    return out


def count_unlabelled(datalist: Sequence[dict]) -> int:
    """Number of unlabelled items of a :func:`semi_datalist` (the EPI bank size)."""
    return sum(1 for d in datalist if not d["labelled"])
