"""3D rotary position embedding of SPAD-ViT (EVA-02's 2D RoPE plus a depth term)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SpatialRotaryEmbedding", "apply_rope"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (-x1, x0)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., L, head_dim) by angles given as ``cos`` / ``sin`` broadcastable to it."""
    return x * cos + _rotate_half(x) * sin


class SpatialRotaryEmbedding(nn.Module):
    """Angles for a ``(d, h, w)`` token grid, per head of size ``head_dim`` (divisible by 4).

    In-plane: EVA-02's halves, h then w, each with frequencies ``base_hw ** (-2k / (head_dim / 2))``;
    depth: ``d * base_d ** (-(2k + 1) / (head_dim / 2))`` added to both halves. Positions are plain
    indices. Pairs are interleaved, as in EVA-02.
    """

    omega_d: torch.Tensor
    omega_h: torch.Tensor
    omega_w: torch.Tensor

    def __init__(self, head_dim: int = 64, base: Sequence[float] = (2333.0, 10000.0, 10000.0)):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be divisible by 4, got {head_dim}.")
        half = head_dim // 2
        omega_d = base[0] ** (-torch.arange(1, half, 2, dtype=torch.float64) / half)
        self.register_buffer("omega_d", omega_d.repeat(2).float(), persistent=False)
        for name, b in (("omega_h", base[1]), ("omega_w", base[2])):
            self.register_buffer(name, (b ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)).float(), False)

    def forward(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``(d*h*w, head_dim)`` for a token grid of ``shape``."""
        d, h, w = (int(s) for s in shape)
        dev = self.omega_d.device
        t_d = torch.outer(torch.arange(d, device=dev, dtype=torch.float32), self.omega_d)
        t_h = torch.outer(torch.arange(h, device=dev, dtype=torch.float32), self.omega_h)
        t_w = torch.outer(torch.arange(w, device=dev, dtype=torch.float32), self.omega_w)
        t_hw = torch.cat(torch.broadcast_tensors(t_h[:, None], t_w[None, :]), dim=-1)
        theta = (t_d[:, None, None] + t_hw[None]).flatten(0, 2).repeat_interleave(2, dim=-1)
        return theta.cos(), theta.sin()
