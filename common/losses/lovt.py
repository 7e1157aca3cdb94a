"""LoVT losses: local intra-sample contrastive loss, global InfoNCE, their weighted total, and the
smp-style binary Dice used downstream."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["image_positive_weights", "local_intra_sample_contrastive", "global_info_nce", "LoVTLoss", "SmpBinaryDice"]


def image_positive_weights(height: int, width: int, threshold: float = 0.5, smooth: float = 1.0) -> torch.Tensor:
    """Positive weights between the regions of an ``height x width`` grid (raster order), rows normalised.

    Grid coordinates are divided by the diagonal sqrt(H^2 + W^2); pairs within ``threshold`` are
    positive with weight exp(-smooth * d). On 7x7 every region has 22 to 49 positives (35 on average).
    """
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).double() / math.sqrt(height**2 + width**2)
    distance = torch.cdist(coords, coords)
    weights = torch.exp(-smooth * distance) * (distance <= threshold)
    return (weights / weights.sum(-1, keepdim=True)).float()


def local_intra_sample_contrastive(
    z: torch.Tensor,
    z_attended: torch.Tensor,
    positive_weights: torch.Tensor,
    element_weights: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoVT's local loss for one modality, negatives from the same sample only.

    s_ij = cos(z_i, z_att_j) / tau; l_i = -sum_j w_ij s_ij + logsumexp_j s_ij ("l2att" uses the rows of
    s, "att2l" its transpose). Each l_i is weighted by the stop-gradient pooling weight of element i
    (masked, renormalised), summed over i and averaged over the batch.

    Args:
        z: local embeddings [B, N, D].
        z_attended: the other modality attended onto these elements [B, N, D].
        positive_weights: [N, N] or [B, N, N], the positive targets (padded columns are zeroed here).
        element_weights: pooling attention weights [B, N].
        mask: valid elements [B, N] (True = valid); None when all are valid.
        temperature: tau_l.

    Returns:
        (l2att, att2l) scalars.
    """
    b, n, _ = z.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=z.device)
    valid = mask.to(z.dtype)
    targets = positive_weights.to(z.dtype).expand(b, n, n) * valid[:, None, :]
    targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)
    weights = element_weights.detach() * valid
    weights = weights / weights.sum(-1, keepdim=True)

    scores = F.normalize(z, dim=-1) @ F.normalize(z_attended, dim=-1).transpose(1, 2) / temperature
    column_mask = (~mask)[:, None, :]

    def soft_cross_entropy(s: torch.Tensor) -> torch.Tensor:
        positive = (targets * s).sum(-1)
        return torch.logsumexp(s.masked_fill(column_mask, float("-inf")), dim=-1) - positive

    l2att = (weights * soft_cross_entropy(scores)).sum(-1).mean()
    att2l = (weights * soft_cross_entropy(scores.transpose(1, 2))).sum(-1).mean()
    return l2att, att2l


def global_info_nce(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between [B, D] embeddings; negatives: the other modality in the micro-batch."""
    logits = F.normalize(z_a, dim=-1) @ F.normalize(z_b, dim=-1).t() / temperature
    target = torch.arange(z_a.shape[0], device=z_a.device)
    return F.cross_entropy(logits, target), F.cross_entropy(logits.t(), target)


class LoVTLoss(nn.Module):
    """Total LoVT loss on the output dict of :class:`common.networks.lovt.LoVTModel`.

    ``L = 0.75 L_g(a2b) + 0.25 L_g(b2a) + 0.375 (L_img,l2att + L_img,att2l) + 0.375 (L_rep,l2att + L_rep,att2l)``.
    ``forward`` returns every term and ``total``.
    """

    def __init__(
        self,
        local_temperature: float = 0.3,
        global_temperature: float = 0.1,
        distance_threshold: float = 0.5,
        distance_smooth: float = 1.0,
        global_weights: tuple[float, float] = (0.75, 0.25),
        image_local_weight: float = 0.375,
        report_local_weight: float = 0.375,
    ) -> None:
        super().__init__()
        self.local_temperature = local_temperature
        self.global_temperature = global_temperature
        self.distance_threshold = distance_threshold
        self.distance_smooth = distance_smooth
        self.global_weights = global_weights
        self.image_local_weight = image_local_weight
        self.report_local_weight = report_local_weight

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = out["image_local"].shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"LoVTLoss expects a square region grid, got {n} regions.")
        image_pos = image_positive_weights(side, side, self.distance_threshold, self.distance_smooth)
        img_l2att, img_att2l = local_intra_sample_contrastive(
            out["image_local"],
            out["report_to_image"],
            image_pos.to(out["image_local"].device),
            out["image_weights"],
            None,
            self.local_temperature,
        )
        s = out["report_local"].shape[1]
        rep_l2att, rep_att2l = local_intra_sample_contrastive(
            out["report_local"],
            out["image_to_report"],
            torch.eye(s, device=out["report_local"].device),
            out["report_weights"],
            out["sentence_mask"],
            self.local_temperature,
        )
        g_a2b, g_b2a = global_info_nce(out["image_global"], out["report_global"], self.global_temperature)
        total = (
            self.global_weights[0] * g_a2b
            + self.global_weights[1] * g_b2a
            + self.image_local_weight * (img_l2att + img_att2l)
            + self.report_local_weight * (rep_l2att + rep_att2l)
        )
        return {
            "total": total,
            "global_a2b": g_a2b,
            "global_b2a": g_b2a,
            "image_l2att": img_l2att,
            "image_att2l": img_att2l,
            "report_l2att": rep_l2att,
            "report_att2l": rep_att2l,
        }


class SmpBinaryDice(nn.Module):
    """Binary Dice loss on logits, as segmentation_models_pytorch ``DiceLoss(mode="binary")`` computes it.

    Dice over the whole batch (batch and pixel dims), smooth 0, the denominator clamped at >= 1e-7 (smp's
    ``soft_dice_score``); the loss is 0 for a batch without any positive pixel (MONAI
    ``DiceLoss(batch=True)`` differs there). Computed in float32: under AMP the logits are float16, whose
    pixel sums overflow and whose loss the GradScaler must not get.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits.float()).flatten()
        t = target.to(p.dtype).flatten()
        intersection = (p * t).sum()
        cardinality = (p + t).sum()
        score = 2.0 * intersection / cardinality.clamp_min(self.eps)
        return (1.0 - score) * (t.sum() > 0).to(p.dtype)
