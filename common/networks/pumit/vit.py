"""SPAD-ViT: EVA-02-style ViT (SwiGLU, sub-LN, 3D RoPE) with a spatially adaptive patch embedding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from monai.networks.layers import DropPath
from monai.utils import ensure_tuple_rep
from torch import nn
from torch.nn import functional as F
from torch.utils import checkpoint

from .rope import SpatialRotaryEmbedding, apply_rope
from .sac import InflatableConv3d, SpatialState, resample

__all__ = ["Attention", "Block", "SwiGLU", "ViT", "vit_b", "vit_l"]

logger = logging.getLogger(__name__)

Rope = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Bias-free q/k/v projections with learnable ``q_bias`` / ``v_bias`` (k has none), RoPE on patch tokens, SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        q = self._heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = self._heads(F.linear(x, self.k_proj.weight))
        v = self._heads(F.linear(x, self.v_proj.weight, self.v_bias))
        if rope is not None:  # token 0 is CLS and gets no rotation
            cos, sin = rope
            q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], cos, sin)], dim=2)
            k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], cos, sin)], dim=2)
        x = F.scaled_dot_product_attention(q, k.type_as(q), v.type_as(q))
        return self.proj(x.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """SPAD-ViT backbone.

    ``forward(x, aniso_d)`` returns the final-normed sequence ``(N, 1 + L, dim)`` (CLS first). The
    patch embedding is a SAC conv (``adaptive_patch_embed``) or a plain conv of ``patch_size``; the
    learnable ``pos_embed`` grid is resampled to the token grid (not added to CLS) and q/k of patch
    tokens get 3D RoPE.
    """

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int | Sequence[int] = 16,
        adaptive_patch_embed: bool = True,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        pos_embed_shape: Sequence[int] = (5, 10, 10),
        rope_base: Sequence[float] = (2333.0, 10000.0, 10000.0),
        drop_path_rate: float = 0.0,
        grad_ckpt: bool = False,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = ensure_tuple_rep(patch_size, 3)
        self.patch_embed = InflatableConv3d(
            in_channels, embed_dim, self.patch_size, stride=self.patch_size, adaptive=adaptive_patch_embed
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, embed_dim, *pos_embed_shape))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.rope = SpatialRotaryEmbedding(embed_dim // num_heads, rope_base)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.grad_ckpt = grad_ckpt
        self._register_load_state_dict_pre_hook(self._resample_pos_embed_on_load)

    def _resample_pos_embed_on_load(self, state_dict: dict, prefix: str, *args) -> None:
        """Resample a checkpoint's ``pos_embed`` grid to ours (logging old -> new shape)."""
        key = f"{prefix}pos_embed"
        pe = state_dict.get(key)
        if pe is not None and pe.ndim == 5 and pe.shape[2:] != self.pos_embed.shape[2:]:
            logger.info("resampling pos_embed %s -> %s", tuple(pe.shape[2:]), tuple(self.pos_embed.shape[2:]))
            state_dict[key] = resample(pe.float(), self.pos_embed.shape[2:]).to(pe.dtype)

    def embed(self, x: torch.Tensor, aniso_d: int = 0) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch tokens plus resampled ``pos_embed``: ``(N, L, dim)`` and the token grid."""
        x = self.patch_embed(x, SpatialState(aniso_d))
        shape = tuple(x.shape[2:])
        x = x + resample(self.pos_embed, shape).to(x.dtype)
        return x.flatten(2).transpose(1, 2), shape

    def run_block(self, i: int, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        if self.training and self.grad_ckpt:
            return checkpoint.checkpoint(self.blocks[i], x, rope, use_reentrant=False)
        return self.blocks[i](x, rope)

    def forward_features(self, x: torch.Tensor, aniso_d: int = 0) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
        """Hidden states after every block (CLS first, no final norm) and the token grid."""
        tokens, shape = self.embed(x, aniso_d)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        rope = self.rope(shape)
        states = []
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, rope)
            states.append(x)
        return states, shape

    def forward(self, x: torch.Tensor, aniso_d: int = 0) -> torch.Tensor:
        return self.norm(self.forward_features(x, aniso_d)[0][-1])


def vit_b(**kwargs) -> ViT:
    """ViT-B: dim 768, 12 layers, 12 heads (94.93M parameters)."""
    return ViT(embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit_l(**kwargs) -> ViT:
    """ViT-L: dim 1024, 24 layers, 16 heads (315.5M parameters)."""
    return ViT(embed_dim=1024, depth=24, num_heads=16, **kwargs)
