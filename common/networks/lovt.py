"""LoVT (Müller et al., ECCV 2022): localized image-report alignment model.

The image encoder is MONAI's ``ResNetFeatures("resnet50")`` (torchvision key names, so the backbone
weights move to ``FlexibleUNet(backbone="resnet50")`` / ``resnet50`` unchanged); the report encoder
is any Hugging Face BERT-family model encoding all sentences of a report in one pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNetFeatures
from torch import nn

__all__ = [
    "AttentionPool",
    "ProjectionHead",
    "LoVTImageEncoder",
    "LoVTReportEncoder",
    "CrossAttention",
    "LoVTModel",
    "sentence_max_pool",
    "build_bert",
    "LoVTSegNet",
]

logger = logging.getLogger(__name__)


class AttentionPool(nn.Module):
    """Multi-head attention pooling: the mean of the elements queries the elements.

    Returns the pooled vector and the per-element attention weights averaged over heads, which
    LoVT uses (with stop-gradient) to weight the local losses. Padded elements (``mask`` False) are
    never attended to. The query, with a mask, is the sum of the valid elements divided by

    - ``"official"`` (default): the number of slots N, padding included, as the official
      ``GlobalAvgAttentionAggregator`` does (zero-filled padding, then ``mean`` over all slots);
    - ``"valid"``: the number of valid elements (a report pools the same whatever its batch).
    """

    def __init__(self, dim: int, num_heads: int = 8, query_mean: str = "official") -> None:
        super().__init__()
        if query_mean not in ("official", "valid"):
            raise ValueError(f"query_mean must be 'official' or 'valid', got {query_mean!r}.")
        self.query_mean = query_mean
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [B, N, D], ``mask`` [B, N] (True = valid) -> pooled [B, D], weights [B, N]."""
        key_padding_mask: torch.Tensor | None = None
        if mask is None:
            query = x.mean(dim=1, keepdim=True)
        else:
            m = mask.to(x.dtype).unsqueeze(-1)
            total = (x * m).sum(dim=1, keepdim=True)
            if self.query_mean == "official":
                query = total / x.shape[1]
            else:
                query = total / m.sum(dim=1, keepdim=True).clamp_min(1.0)
            key_padding_mask = ~mask
        pooled, weights = self.attention(
            query, x, x, key_padding_mask=key_padding_mask, need_weights=True, average_attn_weights=True
        )
        if weights is None:  # never with need_weights=True; narrows the type for TorchScript
            raise RuntimeError("attention weights were not returned")
        return pooled.squeeze(1), weights.squeeze(1)


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear on the last dim of [B, C] or [B, N, C] inputs.

    For sequences the BatchNorm statistics run over batch and elements, as the official 1x1 Conv1d
    head does. Kaiming fan_out init and zero biases, as in the reference code.
    """

    def __init__(self, in_dim: int, out_dim: int = 512, hidden_dim: int = 2048) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out")
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2) if h.dim() == 3 else self.norm(h)
        return self.fc2(F.relu(h))


class LoVTImageEncoder(nn.Module):
    """ResNet50 regions (``layer4``, 7x7 = 49 x 2048 at 224^2, raster order) + attention pool + projections.

    ``forward`` returns a dict so that TorchScript can script it and inference can write every
    embedding: ``regions`` [B, N, 2048], ``global`` [B, 2048], ``weights`` [B, N],
    ``z_local`` [B, N, d_z] and ``z_global`` [B, d_z].
    """

    def __init__(
        self, d_z: int = 512, hidden_dim: int = 2048, num_heads: int = 8, pretrained_backbone: str | None = None
    ) -> None:
        super().__init__()
        self.backbone = ResNetFeatures("resnet50", pretrained=False, spatial_dims=2, in_channels=3)
        if pretrained_backbone is None:
            logger.warning(
                "LoVT ResNet50: pretrained_backbone is null, so it starts from random initialisation "
                "(the paper starts from torchvision's ImageNet weights; pass their file to follow it)"
            )
        else:
            state = torch.load(pretrained_backbone, map_location="cpu", weights_only=True)
            self.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        self.feature_dim = 2048
        self.pool = AttentionPool(self.feature_dim, num_heads)
        self.project_local = ProjectionHead(self.feature_dim, d_z, hidden_dim)
        self.project_global = ProjectionHead(self.feature_dim, d_z, hidden_dim)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(image)[-1]  # [B, 2048, h, w]
        regions = features.flatten(2).transpose(1, 2)  # [B, h*w, 2048], raster order
        pooled, weights = self.pool(regions)
        return {
            "regions": regions,
            "global": pooled,
            "weights": weights,
            "z_local": self.project_local(regions),
            "z_global": self.project_global(pooled),
        }


def build_bert(model_name: str, revision: str | None = None, random_init: bool = False) -> nn.Module:
    """Build the BERT-family text model from a hub name or local folder (``random_init`` uses only its config)."""
    from transformers import AutoConfig, AutoModel

    if random_init:
        return AutoModel.from_config(AutoConfig.from_pretrained(model_name, revision=revision))
    return AutoModel.from_pretrained(model_name, revision=revision)


def sentence_max_pool(
    hidden: torch.Tensor, token_sentence: torch.Tensor, num_sentences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool token states into sentence vectors in one scatter.

    Args:
        hidden: last-layer token states [B, L, H].
        token_sentence: sentence index of each token [B, L]; -1 for [CLS]/[SEP]/padding.
        num_sentences: S, the number of sentence slots.

    Returns:
        sentences [B, S, H] (zeros for empty slots) and the sentence mask [B, S].
    """
    b, _, h = hidden.shape
    index = torch.where(token_sentence < 0, torch.full_like(token_sentence, num_sentences), token_sentence)
    out = hidden.new_full((b, num_sentences + 1, h), float("-inf"))
    out = out.scatter_reduce(1, index.unsqueeze(-1).expand(-1, -1, h), hidden, reduce="amax", include_self=True)
    out = out[:, :num_sentences]
    counts = torch.zeros(b, num_sentences + 1, device=hidden.device, dtype=torch.long)
    counts.scatter_add_(1, index, torch.ones_like(index))
    mask = counts[:, :num_sentences] > 0
    return out.masked_fill(~mask.unsqueeze(-1), 0.0), mask


class LoVTReportEncoder(nn.Module):
    """BERT-family report encoder: one pass per report, max-pooled sentences, attention pool, projections.

    ``pool_query_mean`` selects the attention-pool query over the padded sentence slots
    (:class:`AttentionPool`; ``"official"`` divides by the slot count, ``"valid"`` by the sentence count).

    The embeddings and the first ``frozen_layers`` transformer layers get ``requires_grad=False``;
    as nothing before them requires grad, autograd builds no graph through them.
    """

    def __init__(
        self,
        model_name: str = "emilyalsentzer/Bio_ClinicalBERT",
        revision: str | None = None,
        random_init: bool = False,
        frozen_layers: int = 6,
        d_z: int = 512,
        hidden_dim: int = 2048,
        num_heads: int = 8,
        pool_query_mean: str = "official",
    ) -> None:
        super().__init__()
        self.bert = build_bert(model_name, revision, random_init)
        self.freeze(frozen_layers)
        dim = self.bert.config.hidden_size
        self.feature_dim = dim
        self.pool = AttentionPool(dim, num_heads, pool_query_mean)
        self.project_local = ProjectionHead(dim, d_z, hidden_dim)
        self.project_global = ProjectionHead(dim, d_z, hidden_dim)

    def freeze(self, frozen_layers: int) -> None:
        """Freeze the embeddings and the first ``frozen_layers`` layers."""
        layers = self.bert.encoder.layer
        if not 0 <= frozen_layers <= len(layers):
            raise ValueError(f"frozen_layers must be in [0, {len(layers)}], got {frozen_layers}.")
        for module in [self.bert.embeddings, *layers[:frozen_layers]]:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_sentence: torch.Tensor, num_sentences: int
    ) -> dict[str, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sentences, mask = sentence_max_pool(hidden, token_sentence, num_sentences)
        pooled, weights = self.pool(sentences, mask)
        return {
            "sentences": sentences,
            "mask": mask,
            "global": pooled,
            "weights": weights,
            "z_local": self.project_local(sentences),
            "z_global": self.project_global(pooled),
        }


class CrossAttention(nn.Module):
    """Symmetric single-head cross-attention: one shared key projection for both modalities.

    ``b2a``: every element of ``a`` (image regions) attends over ``b`` (sentences, padding masked);
    ``a2b``: every element of ``b`` attends over ``a``, with padded query rows zeroed.
    Shared value/output projections, then BatchNorm1d over the attended vectors.
    """

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.key_projection = nn.Linear(dim, dim)
        self.value_projection = nn.Linear(dim, dim)
        self.output_projection = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.scale = 1.0 / math.sqrt(dim)
        for fc in (self.key_projection, self.value_projection, self.output_projection):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="linear")
            nn.init.zeros_(fc.bias)

    def _attend(
        self, scores: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None, query_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if query_mask is not None:
            probs = probs * query_mask.unsqueeze(-1).to(probs.dtype)
        attended = self.output_projection(probs @ values)
        return self.norm(attended.transpose(1, 2)).transpose(1, 2)

    def forward(
        self, z_a: torch.Tensor, z_b: torch.Tensor, mask_b: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_a`` [B, Na, D], ``z_b`` [B, Nb, D], ``mask_b`` [B, Nb] -> (b2a [B, Na, D], a2b [B, Nb, D])."""
        scores = self.key_projection(z_a) @ self.key_projection(z_b).transpose(1, 2) * self.scale  # [B, Na, Nb]
        b2a = self._attend(scores, self.value_projection(z_b), key_mask=mask_b, query_mask=None)
        a2b = self._attend(scores.transpose(1, 2), self.value_projection(z_a), key_mask=None, query_mask=mask_b)
        return b2a, a2b


class LoVTModel(nn.Module):
    """Image encoder + report encoder + symmetric cross-attention (the pretraining model).

    ``forward`` returns everything :class:`common.losses.lovt.LoVTLoss` needs.
    """

    def __init__(self, image_encoder: LoVTImageEncoder, report_encoder: LoVTReportEncoder, d_z: int = 512) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.report_encoder = report_encoder
        self.cross_attention = CrossAttention(d_z)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_sentence: torch.Tensor,
        num_sentences: int,
    ) -> dict[str, torch.Tensor]:
        img = self.image_encoder(image)
        rep = self.report_encoder(input_ids, attention_mask, token_sentence, num_sentences)
        b2a, a2b = self.cross_attention(img["z_local"], rep["z_local"], rep["mask"])
        return {
            "image_local": img["z_local"],
            "image_global": img["z_global"],
            "image_weights": img["weights"],
            "report_local": rep["z_local"],
            "report_global": rep["z_global"],
            "report_weights": rep["weights"],
            "sentence_mask": rep["mask"],
            "report_to_image": b2a,
            "image_to_report": a2b,
        }


class _ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )


class _UpBlock(nn.Module):
    """ConvTranspose 2x2 (stride 2), concatenation with the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            _ConvBNReLU(out_channels + skip_channels, out_channels), _ConvBNReLU(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.upsample(x), skip], dim=1))


class LoVTSegNet(nn.Module):
    """Downstream CXR segmentation from the LoVT ResNet50 encoder (``encoder.*`` keys, as FlexibleUNet).

    ``head="unet"``: the official ResUNet decoder (bridge of two 3x3 conv-BN-ReLU, five up-blocks with
    skips layer3, layer2, layer1, stem and the input image; 124.3M params at the paper's widths).
    ``head="linear"``: 1x1 conv on the ``layer4`` features, bilinear upsampling to the input size.
    Returns logits [B, out_channels, H, W]; ``freeze_encoder`` keeps the encoder frozen and in eval mode.

    Args:
        head: ``"unet"`` or ``"linear"``.
        out_channels: K, the number of binary masks.
        freeze_encoder: the frozen protocols (the linear protocol is always frozen in the paper).
        encoder_weights: a ResNet50 state dict (torchvision keys) to start from, e.g. from
            ``common.weights.lovt.image_encoder_weights``; ``None`` keeps the random initialisation.
        bridge_channels, decoder_channels: decoder widths (paper: 2048 and (1024, 512, 256, 128, 64)).
    """

    def __init__(
        self,
        head: str = "unet",
        out_channels: int = 1,
        freeze_encoder: bool = False,
        encoder_weights: Mapping[str, torch.Tensor] | None = None,
        bridge_channels: int = 2048,
        decoder_channels: tuple[int, ...] = (1024, 512, 256, 128, 64),
    ) -> None:
        super().__init__()
        if head not in ("unet", "linear"):
            raise ValueError(f"head must be 'unet' or 'linear', got {head!r}.")
        self.head_type = head
        self.encoder = ResNetFeatures("resnet50", pretrained=False, spatial_dims=2, in_channels=3)
        if encoder_weights is not None:
            self.encoder.load_state_dict(encoder_weights)
        if head == "unet":
            if len(decoder_channels) != 5:
                raise ValueError(f"decoder_channels needs 5 widths, got {decoder_channels}.")
            skips = (1024, 512, 256, 64, 3)
            self.bridge = nn.Sequential(
                _ConvBNReLU(2048, bridge_channels), _ConvBNReLU(bridge_channels, bridge_channels)
            )
            ins = (bridge_channels, *decoder_channels[:-1])
            self.up_blocks = nn.ModuleList(
                _UpBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels, strict=True)
            )
            self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=1)
        else:
            self.bridge = nn.Identity()
            self.up_blocks = nn.ModuleList()
            self.head = nn.Conv2d(2048, out_channels, kernel_size=1)
        self.encoder_frozen = False
        self.freeze_encoder(freeze_encoder)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (no grad, BatchNorm in eval mode) or release the encoder."""
        self.encoder_frozen = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.encoder.train(self.training and not frozen)

    def train(self, mode: bool = True) -> LoVTSegNet:
        super().train(mode)
        self.encoder.train(mode and not self.encoder_frozen)
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.encoder(image)
        x = self.bridge(features[4])
        if self.head_type == "linear":
            return F.interpolate(self.head(x), size=image.shape[2:], mode="bilinear", align_corners=False)
        skips = [features[3], features[2], features[1], features[0], image]
        for i, block in enumerate(self.up_blocks):
            x = block(x, skips[i])
        return self.head(x)
