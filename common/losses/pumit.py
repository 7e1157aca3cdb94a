"""PUMIT losses: tokenizer generator loss (L1 + prior / per-token entropy regularisers, optional perceptual
and GAN terms), the MIM soft-target cross-entropy, and deep supervision for the segmentation decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DeepSupervisionLoss",
    "MIMLoss",
    "TokenAgreement",
    "TokenizerLoss",
    "codebook_perplexity",
    "gather_mean",
    "prior_entropy_loss",
    "token_entropy",
]


def gather_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all processes, with gradient only through the local part (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    detached = x.detach().contiguous()
    gathered = [torch.empty_like(detached) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, detached)
    return torch.stack(gathered).mean(dim=0) - detached + x


def prior_entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """``-H(p_mean) = sum p_mean log p_mean``, p_mean the codebook distribution averaged over all tokens
    (and processes); minimising it pushes codebook usage towards uniform."""
    p_mean = gather_mean(probs.flatten(0, -2).float().mean(dim=0))
    return (p_mean * p_mean.clamp_min(1e-12).log()).sum()


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of each token's entropy ``H(p_i)``; minimising it sharpens the soft tokens."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def codebook_perplexity(probs: torch.Tensor) -> torch.Tensor:
    """``exp(H(p_mean))``: the effective number of codes in use (1 .. codebook size)."""
    return torch.exp(-prior_entropy_loss(probs))


def hinge_d_loss(score_real: torch.Tensor, score_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1 - score_real).mean() + F.relu(1 + score_fake).mean())


class TokenizerLoss(nn.Module):
    """Generator loss of SPAD-VT.

    ``L = rec_weight |x - x_rec|_1 + perceptual_weight P(x, x_rec) + quant_weight (-H(p_mean))
    + entropy_weight mean H(p_i) + gan_weight (-D(x_rec))``.

    ``forward(output, x)`` takes the tokenizer's training output (``pred``, ``logits``, ``probs``,
    ``aniso_d``) and the input in [-1, 1]. Defaults follow the official README (w_q 0.03, w_e 1).

    * ``perceptual``: a module on 2D slice batches ``(N*d, 3, H, W)``, e.g. LPIPS-VGG16. It needs
      pretrained VGG weights, so it is off by default; up to ``max_perceptual_slices`` random depth
      slices per volume are scored during training.
    * ``discriminator`` with ``gan_weight > 0``: hinge GAN. Each call also takes one step of the
      discriminator (its own AdamW, ``disc_lr``); the generator term is used only while
      ``max(EMA_0.9(disc loss), disc loss) <= gan_start_threshold``.
    """

    def __init__(
        self,
        quant_weight: float = 0.03,
        entropy_weight: float = 1.0,
        rec_weight: float = 1.0,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        perceptual_weight: float = 1.0,
        max_perceptual_slices: int = 24,
        discriminator: nn.Module | None = None,
        gan_weight: float = 3e-3,
        disc_lr: float = 1e-3,
        gan_start_threshold: float = 0.025,
    ):
        super().__init__()
        self.quant_weight = quant_weight
        self.entropy_weight = entropy_weight
        self.rec_weight = rec_weight
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.max_perceptual_slices = max_perceptual_slices
        self.discriminator = discriminator
        self.gan_weight = gan_weight
        self.gan_start_threshold = gan_start_threshold
        self.disc_optimizer = (
            torch.optim.AdamW(discriminator.parameters(), lr=disc_lr) if discriminator is not None else None
        )
        self.disc_loss_ema: float | None = None
        self.last_disc_loss = float("inf")
        self.last: dict[str, float] = {}

    def _perceptual(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        d = x.shape[2]
        if self.training and d > self.max_perceptual_slices:
            idx = torch.rand(x.shape[0], d, device=x.device).argsort(dim=1)[:, : self.max_perceptual_slices]
            idx = idx[:, None, :, None, None].expand(-1, x.shape[1], -1, *x.shape[3:])
            x, rec = x.gather(2, idx), rec.gather(2, idx)
        return self.perceptual(x.transpose(1, 2).flatten(0, 1), rec.transpose(1, 2).flatten(0, 1)).mean()

    @property
    def gan_active(self) -> bool:
        """Whether the generator GAN term is on: ``max(EMA, last disc loss) <= gan_start_threshold``."""
        if self.disc_loss_ema is None:
            return False
        return max(self.disc_loss_ema, self.last_disc_loss) <= self.gan_start_threshold

    def _discriminator_step(self, x: torch.Tensor, rec: torch.Tensor, aniso_d: int) -> None:
        with torch.enable_grad():
            loss = hinge_d_loss(self.discriminator(x.detach(), aniso_d), self.discriminator(rec.detach(), aniso_d))
            self.disc_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.disc_optimizer.step()
        value = float(loss.detach())
        self.disc_loss_ema = value if self.disc_loss_ema is None else 0.9 * self.disc_loss_ema + 0.1 * value
        self.last_disc_loss = value

    def forward(self, output: dict, x: torch.Tensor) -> torch.Tensor:
        rec = output["pred"]
        rec_loss = F.l1_loss(rec, x)
        quant = prior_entropy_loss(output["probs"])
        ent = token_entropy(output["logits"])
        loss = self.rec_weight * rec_loss + self.quant_weight * quant + self.entropy_weight * ent
        if self.perceptual is not None and self.perceptual_weight > 0:
            loss = loss + self.perceptual_weight * self._perceptual(x, rec)
        if self.discriminator is not None and self.gan_weight > 0:
            aniso_d = int(output.get("aniso_d", 0))
            if self.gan_active:
                loss = loss - self.gan_weight * self.discriminator(rec, aniso_d).mean()
            if self.training and torch.is_grad_enabled():
                self._discriminator_step(x, rec, aniso_d)
        self.last = {"rec_loss": float(rec_loss), "prior_loss": float(quant), "token_entropy": float(ent)}
        return loss


class MIMLoss(nn.Module):
    """Cross-entropy against soft targets on masked tokens: ``mean_masked(-sum_c q_c log softmax(h)_c)``.

    ``forward(output)`` takes ``ViTForMIM``'s ``{"pred", "target"}``; the second argument (the batch
    label, unused) lets it serve as an ignite ``loss_function``. ``last_kl`` holds ``KL(q || softmax(h))``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_kl = float("nan")

    def forward(self, output: dict, _label: torch.Tensor | None = None) -> torch.Tensor:
        logp = output["pred"].float().log_softmax(dim=-1)
        q = output["target"].float()
        loss = -(q * logp).sum(dim=-1).mean()
        with torch.no_grad():
            self.last_kl = float((q * (q.clamp_min(1e-12).log() - logp)).sum(dim=-1).mean())
        return loss


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss(upsample(pred_i), label)`` with weights ``0.5 ** i`` normalised to sum 1.

    Each prediction is interpolated trilinearly to the label's size; a single tensor is passed through.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = weights

    def forward(self, preds: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if isinstance(preds, torch.Tensor):
            preds = [preds]
        w = torch.tensor(self.weights if self.weights is not None else [0.5**i for i in range(len(preds))])
        w = (w / w.sum()).tolist()
        total = 0.0
        for wi, p in zip(w, preds):
            if p.shape[2:] != label.shape[2:]:
                p = F.interpolate(p, label.shape[2:], mode="trilinear", align_corners=False)
            total = total + wi * self.loss(p, label)
        return total


class TokenAgreement(Metric):
    """Ignite metric: fraction of masked tokens whose predicted code (argmax) is the tokenizer's most likely code.

    A higher-is-better MIM validation score; ``output_transform`` must give ``(pred, target)`` of shape (M, K).
    """

    @reinit__is_reduced
    def reset(self) -> None:
        self._hits, self._count = 0, 0

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        pred, target = output
        self._hits += int((pred.argmax(dim=-1) == target.argmax(dim=-1)).sum())
        self._count += pred.shape[0]

    @sync_all_reduce("_hits", "_count")  # summed over DDP ranks, so every rank sees the same score
    def compute(self) -> float:
        return self._hits / max(self._count, 1)
