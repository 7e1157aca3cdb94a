"""Downstream heads on SPAD-ViT: the BTCV segmentation adapter and the CLS-token classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from .vit import ViT

__all__ = ["SimpleViTAdapter", "ViTClassifier", "ViTSegmenter"]

_NORM = ("instance", {"affine": True})


class SimpleViTAdapter(nn.Module):
    """Multi-scale feature maps from a non-adaptive ViT (patch ``(4, 16, 16)``, so tokens are isotropic).

    Hidden states ``out_indexes`` go through InstanceNorm and an FPN (ConvT x4, ConvT x2, identity,
    MaxPool) giving ``dim``-channel maps at 4x, 2x, 1x and 0.5x the token grid.
    """

    def __init__(self, vit: ViT, out_indexes: Sequence[int] = (3, 5, 7, 11)):
        super().__init__()
        if len(out_indexes) != 4:
            raise ValueError(f"out_indexes needs 4 block indices, got {tuple(out_indexes)}.")
        if vit.patch_embed.adaptive:
            raise ValueError("the segmentation adapter expects a non-adaptive patch embedding, e.g. (4, 16, 16).")
        self.vit = vit
        self.out_indexes = tuple(out_indexes)
        dim = vit.embed_dim
        self.norms = nn.ModuleList([nn.InstanceNorm3d(dim, affine=True) for _ in out_indexes])
        self.fpn = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose3d(dim, dim, 2, 2),
                    nn.InstanceNorm3d(dim, affine=True),
                    nn.GELU(),
                    nn.ConvTranspose3d(dim, dim, 2, 2),
                ),
                nn.ConvTranspose3d(dim, dim, 2, 2),
                nn.Identity(),
                nn.MaxPool3d(2, 2),
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        states, shape = self.vit.forward_features(x)
        out = []
        for i, norm, fpn in zip(self.out_indexes, self.norms, self.fpn):
            fmap = states[i][:, 1:].transpose(1, 2).unflatten(2, shape)
            out.append(fpn(norm(fmap)))
        return out


class ViTSegmenter(nn.Module):
    """SimpleViTAdapter + UNet decoder (``PlainConvUNetDecoder`` in ``FullResAdapter``) with deep supervision.

    Full-resolution stages (``full_res_channels``, kernels (1, 3, 3), in-plane stride (1, 2, 2)) encode
    the image itself at 1x and 1/2 in-plane; the third joins the finest ViT level. 1x1 laterals map the
    ViT maps to ``decoder_channels``. Input in [0, 1] is scaled to ``2x - 1`` (BTCV); ``rescale_input=False``
    takes already normalised input (CHAOS: z-scored channels). Training returns the
    main logits followed by ``num_deep_supervision - 1`` coarser ones; eval returns the main logits only.
    ``grad_ckpt`` recomputes each convolution block in the backward pass instead of storing its activations
    (same gradients; the full-resolution blocks hold most of a training step's memory).
    """

    def __init__(
        self,
        vit: ViT,
        num_classes: int = 14,
        out_indexes: Sequence[int] = (3, 5, 7, 11),
        decoder_channels: Sequence[int] = (128, 256, 512, 512),
        full_res_channels: Sequence[int] = (32, 64, 128),
        num_deep_supervision: int = 4,
        rescale_input: bool = True,
        grad_ckpt: bool = False,
    ):
        super().__init__()
        self.rescale_input = rescale_input
        self.grad_ckpt = grad_ckpt
        self.adapter = SimpleViTAdapter(vit, out_indexes)
        in_ch = vit.patch_embed.in_channels
        dim = vit.embed_dim
        c0, c1, c2 = full_res_channels
        if c2 != decoder_channels[0]:
            raise ValueError("full_res_channels[-1] must equal decoder_channels[0] (they share a level).")
        plane = (1, 3, 3)
        self.full_res = nn.ModuleList(
            [
                UnetBasicBlock(3, in_ch, c0, plane, 1, _NORM),
                UnetBasicBlock(3, c0, c1, plane, (1, 2, 2), _NORM),
                UnetBasicBlock(3, c1, c2, plane, (1, 2, 2), _NORM),
            ]
        )
        self.laterals = nn.ModuleList([nn.Conv3d(dim, c, 1) for c in decoder_channels])
        levels = [c0, c1, *decoder_channels]  # fine -> coarse
        ups = [(1, 2, 2), (1, 2, 2), 2, 2, 2]
        self.up = nn.ModuleList(
            [UnetUpBlock(3, levels[i + 1], levels[i], 3 if i > 1 else plane, 1, ups[i], _NORM) for i in range(len(ups))]
        )
        self.heads = nn.ModuleList([UnetOutBlock(3, levels[i], num_classes) for i in range(num_deep_supervision)])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.rescale_input:
            x = 2 * x - 1
        f0 = self._block(self.full_res[0], x)
        f1 = self._block(self.full_res[1], f0)
        f2 = self._block(self.full_res[2], f1)
        vit_maps = [lat(m) for lat, m in zip(self.laterals, self.adapter(x))]
        skips = [f0, f1, f2 + vit_maps[0], *vit_maps[1:]]
        h = skips[-1]
        outs = [h]
        for i in reversed(range(len(self.up))):
            h = self._block(self.up[i], h, skips[i])
            outs.append(h)
        outs = outs[::-1]  # fine -> coarse
        if not self.training:
            return self.heads[0](outs[0])
        return [head(o) for head, o in zip(self.heads, outs)]

    def _block(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)


class ViTClassifier(nn.Module):
    """CLS token of the final-normed ViT sequence -> Linear (MedMNIST-3D fine-tuning). Input in [0, 1] -> ``2x - 1``."""

    def __init__(self, vit: ViT, num_classes: int):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(2 * x - 1)[:, 0])
