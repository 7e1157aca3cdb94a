"""Masked image modelling of SPAD-ViT against a frozen SPAD-VT tokenizer's soft tokens (BEiT-style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .tokenizer import Tokenizer
from .vit import ViT

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ViTForMIM"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViTForMIM(nn.Module):
    """Masks ``mask_ratio`` of the patch tokens and predicts the tokenizer's code distribution there.

    ``forward(x, aniso_d)`` takes images in [0, 1] (1 channel is replicated to 3) and returns
    ``{"pred": (M, K) logits, "target": (M, K) soft tokens}`` for the M masked tokens of the batch:
    the tokenizer (frozen, eval mode, kept out of this module's ``state_dict``) sees ``2x - 1``, the ViT
    sees ImageNet-normalised ``x``. ``int(L * (1 - mask_ratio))`` tokens stay visible, drawn uniformly.
    Layers in ``mask_layer_ids`` (default: all, as for ViT-B) see mask tokens; the others only the
    visible tokens (ViT-L uses layers 18-23).
    """

    def __init__(
        self, vit: ViT, tokenizer: Tokenizer, mask_ratio: float = 0.55, mask_layer_ids: Sequence[int] | None = None
    ):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        if tuple(vit.patch_size) != (tokenizer.stride,) * 3:
            raise ValueError(f"ViT patch size {vit.patch_size} must equal the tokenizer stride {tokenizer.stride}.")
        self.vit = vit
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        self.visible_ratio = round(1.0 - mask_ratio, 6)  # int(L * 0.45) exactly, not int(L * 0.44999...)
        self.mask_layer_ids = set(range(len(vit.blocks)) if mask_layer_ids is None else mask_layer_ids)
        dim = vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.mim_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, tokenizer.codebook_size))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1, 1), persistent=False)
        self._register_state_dict_hook(self._drop_tokenizer)
        self._register_load_state_dict_pre_hook(self._keep_tokenizer)

    @staticmethod
    def _drop_tokenizer(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        for k in [k for k in state_dict if k.startswith(f"{prefix}tokenizer.")]:
            del state_dict[k]

    def _keep_tokenizer(self, state_dict: dict, prefix: str, *args) -> None:
        for k, v in self.tokenizer.state_dict(prefix=f"{prefix}tokenizer.").items():
            state_dict.setdefault(k, v)

    def train(self, mode: bool = True) -> ViTForMIM:
        super().train(mode)
        self.tokenizer.eval()
        return self

    def num_visible(self, num_tokens: int) -> int:
        return int(num_tokens * self.visible_ratio)

    def sample_visible(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Sorted indices of the visible tokens, uniformly without replacement: ``(N, num_visible)``."""
        idx = torch.rand(batch, num_tokens, device=device).argsort(dim=1)[:, : self.num_visible(num_tokens)]
        return idx.sort(dim=1).values

    def encode_masked(self, x: torch.Tensor, aniso_d: int, visible_idx: torch.Tensor) -> torch.Tensor:
        """Run the ViT with masked tokens replaced by the mask token; returns the normed ``(N, 1 + L, dim)``."""
        vit = self.vit
        tokens, shape = vit.embed(x, aniso_d)
        n, length, dim = tokens.shape
        cos, sin = vit.rope(shape)
        vis = torch.cat([visible_idx.new_zeros(n, 1), visible_idx + 1], dim=1)  # CLS stays visible
        vis_c = vis.unsqueeze(-1).expand(-1, -1, dim)
        seq = torch.cat([vit.cls_token.expand(n, 1, -1), tokens], dim=1).to(tokens.dtype)
        h = torch.cat([vit.cls_token.expand(n, 1, -1), self.mask_token.expand(n, length, -1)], dim=1).to(tokens.dtype)
        h = h.scatter(1, vis_c, seq.gather(1, vis_c))
        vis_rope = tuple(t[visible_idx].unsqueeze(1) for t in (cos, sin))  # (N, 1, Lv, head_dim)
        for i in range(len(vit.blocks)):
            if i in self.mask_layer_ids:
                h = vit.run_block(i, h, (cos, sin))
            else:
                h = h.scatter(1, vis_c, vit.run_block(i, h.gather(1, vis_c), vis_rope))
        return vit.norm(h)

    def forward(self, x: torch.Tensor, aniso_d: int = 0) -> dict[str, torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, *x.shape[2:])
        with torch.no_grad():
            logits = self.tokenizer.tokenize(2 * x - 1, aniso_d).logits.flatten(1, 3).float()
        n, length = logits.shape[:2]
        visible_idx = self.sample_visible(n, length, x.device)
        hidden = self.encode_masked((x - self.mean) / self.std, aniso_d, visible_idx)[:, 1:]
        masked = torch.ones(n, length, dtype=torch.bool, device=x.device).scatter(1, visible_idx, False)
        return {"pred": self.mim_head(hidden[masked]).float(), "target": logits[masked].softmax(dim=-1)}
