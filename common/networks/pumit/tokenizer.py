"""SPAD-VT: PUMIT's spatially adaptive visual tokenizer with a soft (probabilistic) codebook.

Encoder (total stride 16) -> ``SoftQuantizer`` (learned logits over 1024 x 512 codes, soft token
``z_q = softmax(logits) @ E``) -> decoder. Inputs are 3-channel images scaled to [-1, 1] (``2x - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .sac import (
    AdaptiveTransposedConvUpsample,
    InflatableConv3d,
    InflatableTransposedConv3d,
    SACSequential,
    SpatialState,
)

__all__ = ["ChannelLayerNorm", "PatchDiscriminator", "QuantizerOutput", "SoftQuantizer", "Tokenizer"]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a channel-first ``(N, C, *spatial)`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


@dataclass
class QuantizerOutput:
    """Soft tokens (channel-first) plus the per-token categorical distribution (channel-last)."""

    z_q: torch.Tensor
    """(N, dim, d, h, w) input of the decoder."""
    logits: torch.Tensor
    """(N, d, h, w, num_codes) learned logits over the codebook."""
    probs: torch.Tensor
    """(N, d, h, w, num_codes) distribution used to mix the codes (softmax, or Gumbel samples in training)."""


class SoftQuantizer(nn.Module):
    """Probabilistic vector quantizer: ``logits = proj(z)``, ``p = softmax(logits)``, ``z_q = p @ E``.

    ``mode="gumbel"`` mixes codes with hard straight-through Gumbel-softmax samples during training
    (temperature set by :meth:`set_temperature`); evaluation always uses ``softmax(logits)``.
    """

    def __init__(self, num_codes: int = 1024, dim: int = 512, in_channels: int | None = None, mode: str = "soft"):
        super().__init__()
        if mode not in ("soft", "gumbel"):
            raise ValueError(f"unknown quantizer mode {mode!r}; use 'soft' or 'gumbel'.")
        self.mode = mode
        self.embedding = nn.Embedding(num_codes, dim)
        self.proj = nn.Linear(in_channels or dim, num_codes)
        self.temperature = 1.0

    @property
    def num_codes(self) -> int:
        return self.embedding.num_embeddings

    def set_temperature(self, step: int, max_steps: int, t_max: float = 0.9, t_min: float = 1e-6) -> None:
        """Cosine-decay the Gumbel temperature from ``t_max`` to ``t_min`` (official schedule)."""
        self.temperature = t_min + 0.5 * (t_max - t_min) * (1 + math.cos(min(step / max_steps, 1.0) * math.pi))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        logits = self.proj(z.movedim(1, -1))
        probs = logits.softmax(dim=-1)
        mix = probs
        if self.mode == "gumbel" and self.training:
            mix = F.gumbel_softmax(logits, self.temperature, hard=True, dim=-1)
        z_q = (mix @ self.embedding.weight).movedim(-1, 1)
        return QuantizerOutput(z_q=z_q, logits=logits, probs=mix)


def _conv_gn(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        InflatableConv3d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.GroupNorm(8, out_ch),
        nn.LeakyReLU(inplace=True),
    ]


class Tokenizer(nn.Module):
    """SPAD-VT ``simple`` tokenizer (34.25M parameters with the defaults).

    ``forward(x, aniso_d)`` returns the reconstruction in eval mode and, in training mode, a dict with
    ``pred`` (reconstruction), ``logits`` and ``probs`` for :class:`common.losses.pumit.TokenizerLoss`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        start_stride: int = 4,
        down_channels: Sequence[int] = (128, 256, 512),
        up_channels: Sequence[int] = (128, 256, 512),
        num_codes: int = 1024,
        code_dim: int = 512,
        quantizer_mode: str = "soft",
    ):
        super().__init__()
        enc: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(down_channels):
            s = start_stride if i == 0 else 2
            enc += [InflatableConv3d(prev, ch, kernel_size=s, stride=s), ChannelLayerNorm(ch), nn.GELU()]
            prev = ch
        enc += _conv_gn(prev, prev) + _conv_gn(prev, code_dim)
        self.encoder = SACSequential(*enc)
        self.stride = start_stride << (len(down_channels) - 1)
        self.quantize = SoftQuantizer(num_codes, code_dim, mode=quantizer_mode)
        out_stride = self.stride >> (len(up_channels) - 1)
        self.decoder = SACSequential(
            *_conv_gn(code_dim, up_channels[-1]),
            *_conv_gn(up_channels[-1], up_channels[-1]),
            *[
                AdaptiveTransposedConvUpsample(up_channels[i + 1], up_channels[i])
                for i in reversed(range(len(up_channels) - 1))
            ],
            InflatableTransposedConv3d(up_channels[0], in_channels, out_stride),
        )

    @property
    def codebook_size(self) -> int:
        return self.quantize.num_codes

    def tokenize(self, x: torch.Tensor, aniso_d: int = 0) -> QuantizerOutput:
        """Encode and quantize ``x`` (already scaled to [-1, 1])."""
        return self.quantize(self.encoder(x, SpatialState(aniso_d)))

    def decode(self, z_q: torch.Tensor, aniso_d: int = 0) -> torch.Tensor:
        """Decode soft tokens produced at degree of anisotropy ``aniso_d``."""
        n = int(math.log2(self.stride))
        return self.decoder(z_q, SpatialState(aniso_d, n))

    def forward(self, x: torch.Tensor, aniso_d: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
        q = self.tokenize(x, aniso_d)
        rec = self.decode(q.z_q, aniso_d)
        if self.training:
            return {"pred": rec, "logits": q.logits, "probs": q.probs, "aniso_d": aniso_d}
        return rec


class PatchDiscriminator(nn.Module):
    """GAN discriminator: SAC 3^3 stride-2 convs + GroupNorm(16) + LeakyReLU, a post conv, a 1-channel output."""

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (128, 256, 512), num_post_convs: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [
                InflatableConv3d(prev, ch, 3, stride=2, padding=1),
                nn.GroupNorm(16, ch),
                nn.LeakyReLU(inplace=True),
            ]
            prev = ch
        for _ in range(num_post_convs):
            layers += [InflatableConv3d(prev, prev, 3, padding=1), nn.GroupNorm(16, prev), nn.LeakyReLU(inplace=True)]
        layers.append(InflatableConv3d(prev, 1, 3, padding=1))
        self.main = SACSequential(*layers)

    def forward(self, x: torch.Tensor, aniso_d: int = 0) -> torch.Tensor:
        """Patch-wise real/fake scores."""
        return self.main(x, SpatialState(aniso_d))
