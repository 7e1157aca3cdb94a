"""PUMIT losses: tokenizer generator loss (L1 + prior / per-token entropy regularisers, optional perceptual
and GAN terms), the MIM soft-target cross-entropy, and deep supervision for the segmentation decoder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DeepSupervisionLoss",
    "LPIPS",
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
        if isinstance(self.perceptual, nn.Module):
            self.perceptual.to(x.device)
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


_VGG16_CFG = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layout (same state-dict keys), up to ``relu5_3``."""
    layers: list[nn.Module] = []
    in_ch = 3
    for stage, channels in enumerate(_VGG16_CFG):
        if stage:
            layers.append(nn.MaxPool2d(2, 2))
        for out_ch in channels:
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = out_ch
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG16 perceptual distance of the official tokenizer loss, from local weight files only.

    ``vgg_weights``: torchvision's VGG16 ImageNet state dict (``features.*`` keys are used);
    ``lin_weights``: the LPIPS ``vgg.pth`` linear heads (``lin{i}.model.1.weight``). Nothing is downloaded:
    a missing file is an error. As in the official code, inputs in [-1, 1] are normalised with
    ``(x - (1 - 2 mean)) / (2 std)`` (sic), features are unit-normalised over channels, squared
    differences weighted by the 1x1 heads, averaged over space and batch, summed over the 5 stages, times 2.
    The heads' dropout is left out (the official module is always in eval mode).
    """

    def __init__(self, vgg_weights: str, lin_weights: str):
        super().__init__()
        for name, path in (("vgg_weights", vgg_weights), ("lin_weights", lin_weights)):
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(
                    f"LPIPS {name} not found at {path!r}: place the file locally (it is never downloaded), "
                    "or train without the perceptual term (perceptual: null)."
                )
        features = _vgg16_features()
        state = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        try:
            features.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{vgg_weights}: not a torchvision VGG16 state dict ({e}).") from None
        self.stages = nn.ModuleList(
            [features[s] for s in (slice(4), slice(4, 9), slice(9, 16), slice(16, 23), slice(23, 30))]
        )
        lin = torch.load(lin_weights, map_location="cpu", weights_only=True)
        self.heads = nn.ModuleList([nn.Conv2d(c[-1], 1, 1, bias=False) for c in _VGG16_CFG])
        for i, head in enumerate(self.heads):
            key = f"lin{i}.model.1.weight"
            if key not in lin:
                raise ValueError(f"{lin_weights}: missing LPIPS head '{key}'.")
            head.weight.data.copy_(lin[key].reshape(head.weight.shape))
        mean, std = torch.tensor(_IMAGENET_MEAN), torch.tensor(_IMAGENET_STD)
        self.register_buffer("shift", (1 - 2 * mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", (2 * std).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen feature extractor: always eval

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(())
        for stage, head in zip(self.stages, self.heads):
            x, y = stage(x), stage(y)
            nx = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            ny = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + head((nx - ny) ** 2).mean()
        return 2 * total
