"""Released Universal Model weights and the Swin UNETR initialisation, onto ``UniversalModel``.

The released ``clip_driven_universal_swin_unetr.pth`` / ``..._unet.pth`` (HF ``ljwztc/CLIP-Driven-Universal-Model``)
hold ``{"net": state_dict, ...}`` with DDP ``module.`` prefixes; our parameter names equal the official ones
once the prefix is stripped, so conversion is key editing plus a strict check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .io import read_checkpoint

__all__ = ["load_swin_init", "official_state_dict"]

_CONTAINER_KEYS = ("net", "state_dict", "model")


def _read(src: str | Mapping[str, Any]) -> Mapping[str, Any]:
    return src if isinstance(src, Mapping) else read_checkpoint(src)


def _unwrap(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def official_state_dict(src: str | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Flat ``UniversalModel`` state dict from a released checkpoint (``{"net": ...}``, ``module.`` prefixes)."""
    state = _unwrap(_read(src))
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        if isinstance(value, torch.Tensor):
            out[key] = value
    if "controller.weight" not in out:
        name = src if isinstance(src, str) else "the given state dict"
        raise KeyError(f"{name}: not a Universal Model checkpoint (no 'controller.weight' after removing 'module.').")
    return out


def load_swin_init(model: torch.nn.Module, src: str | Mapping[str, Any]) -> list[str]:
    """Copy a Swin UNETR checkpoint (e.g. ``swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt``) into
    ``model.backbone``: every key without ``out`` (official ``load_params``). Returns the copied keys."""
    state = {k.replace("module.", ""): v for k, v in _unwrap(_read(src)).items() if "out" not in k}
    own = model.backbone.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"Swin init keys not in the backbone: {unknown[:5]} ...")
    own.update(state)
    model.backbone.load_state_dict(own)
    return sorted(state)
