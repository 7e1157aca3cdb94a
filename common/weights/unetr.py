"""Load research-contributions' UNETR BTCV checkpoints into today's ``monai.networks.nets.UNETR``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .io import read_checkpoint

# Present in checkpoints saved by older MONAI, unused at inference, rejected by strict loading today
# (research-contributions issue #170).
OBSOLETE_UNETR_KEYS = (
    "vit.patch_embedding.cls_token",
    "encoder2.blocks.0.1.conv3.conv.weight",
    "encoder2.blocks.1.1.conv3.conv.weight",
    "encoder3.blocks.0.1.conv3.conv.weight",
)


def reference_state_dict(
    checkpoint: Mapping[str, torch.Tensor] | Mapping[str, Mapping], key_in_ckpt: str | None = None
):
    """The flat UNETR state dict inside a reference checkpoint.

    Handles ``trainer.py``'s ``{"epoch", "best_acc", "state_dict"}`` nesting (or ``key_in_ckpt``), the
    DDP ``module.`` prefix and the four obsolete keys.
    """
    if key_in_ckpt is not None:
        checkpoint = checkpoint[key_in_ckpt]
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return {k: v for k, v in state.items() if k not in OBSOLETE_UNETR_KEYS}


def load_unetr_reference(
    network: torch.nn.Module, path: str, key_in_ckpt: str | None = None, strict: bool = True
) -> list[str]:
    """Load ``path`` into ``network``; returns the keys skipped.

    ``strict=False`` additionally skips tensors whose shape differs (e.g. ``encoder1`` / ``out`` after
    changing ``in_channels`` / ``out_channels``) instead of failing; everything else must still match.
    """
    state = reference_state_dict(read_checkpoint(path), key_in_ckpt)
    skipped: list[str] = []
    if not strict:
        own = network.state_dict()
        skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = network.load_state_dict(state, strict=strict)
    if not strict and unexpected:
        raise KeyError(f"{path}: keys not in the network: {unexpected[:5]}")
    return skipped + [k for k in missing if k not in skipped]
