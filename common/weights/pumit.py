"""Load PUMIT checkpoints (ours or the official Lightning layout) into our tokenizer / ViT / MIM networks.

Official key layout (``function2-llx/PUMIT`` master): ``SimpleVQTokenizer`` has ``encoder.<i>`` (its
``LayerNormNd`` is ``Sequential(ChannelLast, LayerNorm, ChannelFirst, Contiguous)``, so ``encoder.<i>.1.weight``),
``decoder.<i>`` (the upsample blocks as ``transposed_conv`` + ``conv.<j>``) and ``quantize.{embedding,proj}``;
``ViT`` / ``ViTForMIM`` have ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.<i>...``,
``norm``, ``mask_token``, ``mim_head`` and non-persistent-by-intent ``rope`` buffers. Checkpoints are
read with :func:`common.weights.io.read_checkpoint` (``weights_only``; Lightning extras load as placeholders).
"""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import nn

from ..networks.pumit.sac import adapt_in_channels, collapse_depth
from ..networks.pumit.tokenizer import Tokenizer
from ..networks.pumit.vit import ViT
from .io import read_checkpoint, state_dict_of

__all__ = [
    "convert_official_tokenizer",
    "convert_official_vit",
    "load_pretrained_vit",
    "load_state_dict",
    "load_tokenizer",
    "load_weights",
]

logger = logging.getLogger(__name__)

_UPSAMPLE = re.compile(r"^decoder\.(\d+)\.(transposed_conv|conv\.(\d+))\.(.+)$")
_LAYER_NORM_ND = re.compile(r"^encoder\.(\d+)\.1\.(weight|bias)$")


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from ``path``: unwraps Lightning ``state_dict`` / Fabric ``model`` / ``module`` entries."""
    return state_dict_of(read_checkpoint(path), path, keys=("state_dict", "model", "module"))


def convert_official_tokenizer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``SimpleVQTokenizer`` keys -> :class:`Tokenizer` keys (``proj`` initialised from E if absent)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("tokenizer.").removeprefix("model.")
        if k.startswith("quantize.embed."):
            k = k.replace("quantize.embed.", "quantize.embedding.")
        m = _LAYER_NORM_ND.match(k)
        if m:  # LayerNormNd's LayerNorm -> our ChannelLayerNorm
            k = f"encoder.{m.group(1)}.{m.group(2)}"
        m = _UPSAMPLE.match(k)
        if m:
            idx = 0 if m.group(2) == "transposed_conv" else int(m.group(3)) + 1
            k = f"decoder.{m.group(1)}.{idx}.{m.group(4)}"
        if k.startswith(("encoder.", "decoder.", "quantize.")):
            out[k] = v
    if "quantize.proj.weight" not in out and "quantize.embedding.weight" in out:
        emb = out["quantize.embedding.weight"]
        out["quantize.proj.weight"] = emb.clone()  # dot-product logits
        out["quantize.proj.bias"] = emb.new_zeros(emb.shape[0])
    elif "quantize.proj.weight" in out and out["quantize.proj.weight"].ndim == 4:  # 1x1 conv2d from Gumbel VQGAN
        out["quantize.proj.weight"] = out["quantize.proj.weight"].flatten(1)
    return out


def convert_official_vit(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Official ``ViT`` / ``ViTForMIM`` keys -> ours: backbone keys get ``prefix`` (``"vit."`` for :class:`ViTForMIM`).

    ``mask_token`` / ``mim_head`` are kept only when ``prefix`` is set; RoPE buffers and the tokenizer are dropped.
    """
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("model.")
        if k.startswith(("tokenizer.", "rope.")) or ".rope." in k:
            continue
        if k.startswith(("mask_token", "mim_head.")):
            if prefix:
                out[k] = v
            continue
        k = k.removeprefix("vit.")
        out[prefix + k.replace("patch_embed.proj.", "patch_embed.")] = v
    return out


def load_weights(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load ``path`` (ours or the official layout) into a :class:`Tokenizer`, :class:`ViT` or ``ViTForMIM``."""
    sd = load_state_dict(path)
    if isinstance(model, Tokenizer):
        sd = convert_official_tokenizer(sd)
    elif isinstance(model, ViT):
        sd = convert_official_vit(sd)
    elif hasattr(model, "vit") and not any(k.startswith("vit.") for k in sd):
        sd = convert_official_vit(sd, prefix="vit.")
    model.load_state_dict(sd, strict=strict)
    return model


def load_tokenizer(tokenizer: Tokenizer, path: str) -> Tokenizer:
    """The stage-1 tokenizer for MIM (a clear error when stage 1 has not been run)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no tokenizer checkpoint; run stage 1 (configs/train.json + configs/train_tokenizer.json) first, "
            "or get the released simple-soft tokenizer with `python -m tools weights pumit_pretraining` and point "
            "'tokenizer_ckpt' at it. MIM never starts from a random tokenizer."
        )
    return load_weights(tokenizer, path)


def load_pretrained_vit(vit: ViT, path: str) -> ViT:
    """Load a pretrained SPAD-ViT (MIM or plain, ours or official) into a downstream ViT.

    The 16-deep adaptive patch kernel is group-summed to the target patch depth (e.g. 4 for BTCV),
    input channels are adapted (sum, divide by the new count) and ``pos_embed`` is resampled (logged).
    """
    sd = convert_official_vit({k.removeprefix("vit."): v for k, v in load_state_dict(path).items()})
    w = sd.get("patch_embed.weight")
    if w is not None:
        target = vit.patch_embed.weight
        if w.shape[2] != target.shape[2]:
            w = collapse_depth(w, target.shape[2])
        if w.shape[1] != target.shape[1]:
            w = adapt_in_channels(w, target.shape[1])
        if w.shape[3:] != target.shape[3:]:
            raise ValueError(f"{path}: patch kernel {tuple(w.shape)} cannot be adapted to {tuple(target.shape)}.")
        sd["patch_embed.weight"] = w
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing:
        raise ValueError(f"{path}: missing ViT weights {missing[:5]}{'...' if len(missing) > 5 else ''}.")
    if unexpected:
        logger.info("ignored %d checkpoint keys not in the ViT, e.g. %s", len(unexpected), unexpected[:3])
    return vit
