"""LViT (Li et al., TMI 2023): a U-Net whose skips are refined by a text-conditioned U-shaped ViT path.

Only the modules the official forward pass uses are built (the official model holds 10,025,312 dead
parameters), and every used module keeps its official attribute name so official state dicts load by
name through :func:`common.weights.lvit.load_lvit_official`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LViT", "UNetBaseline"]


class ConvBatchNorm(nn.Module):
    """3x3 conv (bias) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


def _make_nconv(in_channels: int, out_channels: int, nb_conv: int = 2) -> nn.Sequential:
    layers = [ConvBatchNorm(in_channels, out_channels)]
    layers += [ConvBatchNorm(out_channels, out_channels) for _ in range(nb_conv - 1)]
    return nn.Sequential(*layers)


class DownBlock(nn.Module):
    """2x2 max-pool then two ConvBatchNorm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool = nn.MaxPool2d(2)
        self.nConvs = _make_nconv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nConvs(self.maxpool(x))


class PixLevelModule(nn.Module):
    """PLAM: a per-pixel weight from [mean, max, mean+max] of two 1x1-conv branches (no sigmoid, as official)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv_avg = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.relu_avg = nn.ReLU()
        self.conv_max = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.relu_max = nn.ReLU()
        self.bottleneck = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_avg = self.relu_avg(self.conv_avg(x)).mean(dim=1, keepdim=True)
        x_max = self.relu_max(self.conv_max(x)).amax(dim=1, keepdim=True)
        feats = torch.cat((x_avg, x_max, x_avg + x_max), dim=1)
        weight = self.bottleneck(feats.transpose(1, 3)).transpose(1, 3)
        return weight * x


class UpblockAttention(nn.Module):
    """Nearest x2 upsample of the deeper map, PLAM on the skip, concat [skip, up], two ConvBatchNorm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0)
        self.pixModule = PixLevelModule(in_channels // 2)
        self.nConvs = _make_nconv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip_x: torch.Tensor) -> torch.Tensor:
        return self.nConvs(torch.cat([self.pixModule(skip_x), self.up(x)], dim=1))


class Reconstruct(nn.Module):
    """Tokens [B, N, C] -> [B, C, sqrt N, sqrt N] -> nearest upsample -> 1x1 conv + BN + ReLU."""

    def __init__(self, channels: int, scale_factor: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.norm = nn.BatchNorm2d(channels)
        self.activation = nn.ReLU()
        self.scale_factor = float(scale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = int(n**0.5)
        x = x.transpose(1, 2).reshape(b, c, side, side)
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        return self.activation(self.norm(self.conv(x)))


class ConvTransBN(nn.Module):
    """Conv1d(k3, p1) -> BN1d -> ReLU (the official CTBN blocks)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm1d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class Embeddings(nn.Module):
    """Patchify conv (C->C) plus a zero-initialised learnable position embedding, then dropout 0.1."""

    def __init__(self, channels: int, patch_size: int, n_patches: int) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv2d(channels, channels, kernel_size=patch_size, stride=patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches, channels))
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(x).flatten(2).transpose(1, 2)
        return self.dropout(x + self.position_embeddings)


class Mlp(nn.Module):
    """fc1 -> GELU -> drop -> fc2 -> GELU -> drop (the official second GELU is kept)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act_layer = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.act_layer(self.fc1(x)))
        return self.dropout(self.act_layer(self.fc2(x)))


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (same maths as the official loop)."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-LN transformer block (drop-path 0, attention dropout 0)."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """One LViT ViT level without embedding: the deepest up level (``upVit3``) applies only its block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.Encoder_blocks = nn.Sequential(Block(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Encoder_blocks(x)


class TextViT(nn.Module):
    """First down level (``downVit``): Emb(x) + CTBN3(text) -> block; CTBN3 treats the L tokens as channels."""

    def __init__(self, channels: int, patch_size: int, n_patches: int, num_text_tokens: int) -> None:
        super().__init__()
        self.embeddings = Embeddings(channels, patch_size, n_patches)
        self.Encoder_blocks = nn.Sequential(Block(channels))
        self.CTBN3 = ConvTransBN(num_text_tokens, n_patches)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.Encoder_blocks(self.embeddings(x) + self.CTBN3(text))


class DownViT(nn.Module):
    """Down levels 2-4: block(Emb(x)), CTBN halves the width, then concat the previous level's tokens."""

    def __init__(self, channels: int, patch_size: int, n_patches: int) -> None:
        super().__init__()
        self.embeddings = Embeddings(channels, patch_size, n_patches)
        self.Encoder_blocks = nn.Sequential(Block(channels))
        self.CTBN = ConvTransBN(channels, channels // 2)

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        x = self.CTBN(self.Encoder_blocks(self.embeddings(x)).transpose(1, 2)).transpose(1, 2)
        return torch.cat([x, previous], dim=2)


class UpViT(nn.Module):
    """Up levels 1-3: block(x) + CTBN2(deeper up level's tokens)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.Encoder_blocks = nn.Sequential(Block(channels))
        self.CTBN2 = ConvTransBN(channels * 2, channels)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        return self.Encoder_blocks(x) + self.CTBN2(deeper.transpose(1, 2)).transpose(1, 2)


class LViT(nn.Module):
    """LViT-T. ``forward(image [B,C,S,S] in [0,1], text [B,L,D]) -> [B,n_classes,S,S]``.

    The output is a sigmoid probability map when ``n_classes == 1`` (as official) and raw logits otherwise.

    Args:
        n_channels: image channels (3 as official; grayscale X-rays are repeated to 3).
        n_classes: output channels.
        img_size: input side, a multiple of 16 (224 as official; the ViT levels then hold 14x14 tokens).
        base_channels: width of the first level (64 as official); every width scales with it.
        num_text_tokens: L, the number of word vectors (10 as official; CTBN3 is built for exactly L).
        text_dim: D, the word-vector size (768 for BERT-Base).
        use_text: False feeds zeros instead of the text (an ablation, not the paper's LViT-TW).
    """

    def __init__(
        self,
        n_channels: int = 3,
        n_classes: int = 1,
        img_size: int = 224,
        base_channels: int = 64,
        num_text_tokens: int = 10,
        text_dim: int = 768,
        use_text: bool = True,
    ) -> None:
        super().__init__()
        if img_size % 16 != 0:
            raise ValueError(f"LViT needs img_size divisible by 16, got {img_size}")
        if base_channels % 8 != 0:
            raise ValueError(f"LViT needs base_channels divisible by 8 (8 heads), got {base_channels}")
        if not isinstance(use_text, bool):  # a CLI "--use_text false" arrives as the truthy string 'false'
            raise TypeError(f"use_text must be a bool (on the command line: --use_text False), got {use_text!r}")
        self.n_classes = n_classes
        self.img_size = img_size
        self.num_text_tokens = num_text_tokens
        self.text_dim = text_dim
        self.use_text = use_text
        c = base_channels
        n_patches = (img_size // 16) ** 2
        self.inc = ConvBatchNorm(n_channels, c)
        self.down1 = DownBlock(c, c * 2)
        self.down2 = DownBlock(c * 2, c * 4)
        self.down3 = DownBlock(c * 4, c * 8)
        self.down4 = DownBlock(c * 8, c * 8)
        self.downVit = TextViT(c, 16, n_patches, num_text_tokens)
        self.downVit1 = DownViT(c * 2, 8, n_patches)
        self.downVit2 = DownViT(c * 4, 4, n_patches)
        self.downVit3 = DownViT(c * 8, 2, n_patches)
        self.upVit3 = VisionTransformer(c * 8)
        self.upVit2 = UpViT(c * 4)
        self.upVit1 = UpViT(c * 2)
        self.upVit = UpViT(c)
        self.reconstruct1 = Reconstruct(c, 16)
        self.reconstruct2 = Reconstruct(c * 2, 8)
        self.reconstruct3 = Reconstruct(c * 4, 4)
        self.reconstruct4 = Reconstruct(c * 8, 2)
        self.up4 = UpblockAttention(c * 16, c * 4)
        self.up3 = UpblockAttention(c * 8, c * 2)
        self.up2 = UpblockAttention(c * 4, c)
        self.up1 = UpblockAttention(c * 2, c)
        self.outc = nn.Conv2d(c, n_classes, kernel_size=1)
        self.text_module4 = nn.Conv1d(text_dim, c * 8, kernel_size=3, padding=1)
        self.text_module3 = nn.Conv1d(c * 8, c * 4, kernel_size=3, padding=1)
        self.text_module2 = nn.Conv1d(c * 4, c * 2, kernel_size=3, padding=1)
        self.text_module1 = nn.Conv1d(c * 2, c, kernel_size=3, padding=1)

    def _check_inputs(self, x: torch.Tensor, text: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"LViT expects an image [B,C,{self.img_size},{self.img_size}], got {list(x.shape)}")
        if text.dim() != 3 or text.shape[1] != self.num_text_tokens or text.shape[2] != self.text_dim:
            raise ValueError(
                f"LViT expects text [B,{self.num_text_tokens},{self.text_dim}] (CTBN3 is built for exactly "
                f"{self.num_text_tokens} tokens), got {list(text.shape)}"
            )

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        if text is None or not self.use_text:
            text = x.new_zeros((x.shape[0], self.num_text_tokens, self.text_dim))
        self._check_inputs(x, text)
        t = text.float().transpose(1, 2)
        t = self.text_module1(self.text_module2(self.text_module3(self.text_module4(t))))
        x1 = self.inc(x)
        y1 = self.downVit(x1, t.transpose(1, 2))
        x2 = self.down1(x1)
        y2 = self.downVit1(x2, y1)
        x3 = self.down2(x2)
        y3 = self.downVit2(x3, y2)
        x4 = self.down3(x3)
        y4 = self.downVit3(x4, y3)
        x5 = self.down4(x4)
        y4 = self.upVit3(y4)
        y3 = self.upVit2(y3, y4)
        y2 = self.upVit1(y2, y3)
        y1 = self.upVit(y1, y2)
        x1 = self.reconstruct1(y1) + x1
        x2 = self.reconstruct2(y2) + x2
        x3 = self.reconstruct3(y3) + x3
        x4 = self.reconstruct4(y4) + x4
        x = self.up1(self.up2(self.up3(self.up4(x5, x4), x3), x2), x1)
        out = self.outc(x)
        return torch.sigmoid(out) if self.n_classes == 1 else out


class UpBlock(nn.Module):
    """U-Net decoder block: 2x2 transposed conv of the deeper map, concat [up, skip], two ConvBatchNorm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels // 2, in_channels // 2, kernel_size=2, stride=2)
        self.nConvs = _make_nconv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip_x: torch.Tensor) -> torch.Tensor:
        return self.nConvs(torch.cat([self.up(x), skip_x], dim=1))


class UNetBaseline(nn.Module):
    """The official U-Net baseline (``nets/UNet.py``) used to pre-train LViT's CNN branch; same module names."""

    def __init__(self, n_channels: int = 3, n_classes: int = 1, base_channels: int = 64) -> None:
        super().__init__()
        self.n_classes = n_classes
        c = base_channels
        self.inc = ConvBatchNorm(n_channels, c)
        self.down1 = DownBlock(c, c * 2)
        self.down2 = DownBlock(c * 2, c * 4)
        self.down3 = DownBlock(c * 4, c * 8)
        self.down4 = DownBlock(c * 8, c * 8)
        self.up4 = UpBlock(c * 16, c * 4)
        self.up3 = UpBlock(c * 8, c * 2)
        self.up2 = UpBlock(c * 4, c)
        self.up1 = UpBlock(c * 2, c)
        self.outc = nn.Conv2d(c, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        x1 = self.inc(x.float())
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up1(self.up2(self.up3(self.up4(self.down4(x4), x4), x3), x2), x1)
        out = self.outc(x)
        return torch.sigmoid(out) if self.n_classes == 1 else out
