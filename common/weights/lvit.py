"""Map official LViT / U-Net checkpoints (``HUANGLIZI/LViT``) onto :class:`common.networks.lvit.LViT`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .io import read_checkpoint, state_dict_of

__all__ = ["DEAD_KEY_PATTERN", "load_lvit_from_unet", "load_lvit_official", "load_stage_a", "official_state_dict"]

#: parameters/buffers the official model builds but never uses in its forward pass
DEAD_KEY_PATTERN = re.compile(
    r"^(pix_module\d\."
    r"|up\d\.pixModule\.conv_sig\."
    r"|(down|up)Vit\d?\.(head|norm)\."
    r"|upVit\d?\.embeddings\."
    r"|upVit\d?\.(CTBN|CTBN3)\."
    r"|upVit3\.CTBN2\."
    r"|downVit\.(CTBN|CTBN2)\."
    r"|downVit\d\.(CTBN2|CTBN3)\.)"
)


def official_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """The model state dict inside an official checkpoint (``{"state_dict": ...}``, ``{"model": ...}`` or flat),
    with any DataParallel ``module.`` prefix removed."""
    sd = obj
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not an LViT checkpoint: expected a state dict of tensors (or one under 'state_dict'/'model')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_lvit_official(model: torch.nn.Module, obj: Mapping) -> list[str]:
    """Drop the official dead-module keys, then ``load_state_dict(strict=True)``. Returns the dropped keys."""
    sd = official_state_dict(obj)
    dropped = [k for k in sd if DEAD_KEY_PATTERN.match(k)]
    kept = {k: v for k, v in sd.items() if not DEAD_KEY_PATTERN.match(k)}
    model.load_state_dict(kept, strict=True)
    return dropped


def load_lvit_from_unet(model: torch.nn.Module, obj: Mapping) -> list[str]:
    """Copy every name- and shape-matching tensor of a U-Net baseline checkpoint into LViT (``LViT_pretrain``).

    Returns the copied keys (121 of the U-Net's 129 at the default width).
    """
    sd = official_state_dict(obj)
    own = model.state_dict()
    copied = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not copied:
        raise ValueError("no U-Net tensor matches an LViT tensor by name and shape")
    model.load_state_dict(copied, strict=False)
    return sorted(copied)


def load_stage_a(network: torch.nn.Module, path: str) -> torch.nn.Module:
    """Start semi-supervised stage B from the supervised stage-A weights at ``path`` (strict load).

    A missing file is an error: stage B never starts from random weights.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no stage-A checkpoint. Run stage A first (configs/train.json + configs/train_labelled.json) "
            f"and copy its models/model.pt to {path}; stage B never starts from random weights."
        )
    network.load_state_dict(state_dict_of(read_checkpoint(path), path), strict=True)
    return network
