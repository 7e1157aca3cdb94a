"""CLIP-Driven Universal Model (Liu et al., ICCV 2023): a backbone plus a text-conditioned dynamic head.

Parameter names follow the official ``ljwztc/CLIP-Driven-Universal-Model`` code (``backbone.*``,
``precls_conv``, ``GAP``, ``controller``, ``organ_embedding``, ``text_to_vision``) so its released
checkpoints load after stripping the DDP ``module.`` prefix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMergingV2

__all__ = [
    "PatchMergingUniversal",
    "SwinUNETRBackbone",
    "UNet3DBackbone",
    "UniversalModel",
    "dynamic_head",
    "load_class_embedding",
    "split_dynamic_params",
]

# Dynamic head layout: three 1x1x1 convs 8 -> 8 -> 8 -> 1; the controller emits weights then biases.
HEAD_CHANNELS = 8
WEIGHT_NUMS = (HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS)
BIAS_NUMS = (HEAD_CHANNELS, HEAD_CHANNELS, 1)
NUM_DYNAMIC_PARAMS = sum(WEIGHT_NUMS) + sum(BIAS_NUMS)  # 153


class PatchMergingUniversal(PatchMergingV2):
    """Swin patch merging with the sub-grid order of the official Universal Model code.

    The official copy concatenates (0,0,0), (1,0,0), (0,1,0), (0,0,1), (1,0,1), (0,1,0), (0,0,1), (1,1,1):
    (0,1,0) and (0,0,1) appear twice, (1,1,0) and (0,1,1) never. The released weights were trained with
    this order, so it is needed to reproduce them exactly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        order = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in order], -1)
        return self.reduction(self.norm(x))


class SwinUNETRBackbone(SwinUNETR):
    """MONAI SwinUNETR without its ``out`` layer, returning the bottleneck and the last decoder features.

    Returns ``(dec4, dec0)``: ``encoder10`` of the deepest hidden state (``16 * feature_size`` channels at
    1/32 resolution) and the last decoder output (``feature_size`` channels at full resolution).
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 48, patch_merging: str = "parity", **kwargs) -> None:
        downsample = {"parity": PatchMergingUniversal, "fixed": "mergingv2"}.get(patch_merging)
        if downsample is None:
            raise ValueError(f"patch_merging must be 'parity' or 'fixed', got {patch_merging!r}.")
        super().__init__(
            in_channels=in_channels, out_channels=1, feature_size=feature_size, downsample=downsample, **kwargs
        )
        del self.out
        self.out_channels = feature_size
        self.bottleneck_channels = 16 * feature_size

    def forward(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return dec4, self.decoder1(dec0, enc0)


class ContBatchNorm3d(nn.modules.batchnorm._BatchNorm):
    """Models Genesis batch norm: always normalises with batch statistics, also in eval mode (official parity)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps
        )


class LUConv(nn.Sequential):
    """Conv3d 3x3x3 -> ContBatchNorm3d -> ReLU, with the official attribute names."""

    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_chan, out_chan, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_chan)
        self.activation = nn.ReLU(inplace=True)


def _make_nconv(in_channel: int, depth: int, double_channel: bool = False) -> nn.Sequential:
    mid = 32 * 2 ** (depth + 1) if double_channel else 32 * 2**depth
    out = 32 * 2 ** (depth + 1)
    return nn.Sequential(LUConv(in_channel, mid), LUConv(mid, out))


class _DownTransition(nn.Module):
    def __init__(self, in_channel: int, depth: int) -> None:
        super().__init__()
        self.ops = _make_nconv(in_channel, depth)
        self.pool = depth < 3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class _UpTransition(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, depth: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_chans, out_chans, kernel_size=2, stride=2)
        self.ops = _make_nconv(in_chans + out_chans // 2, depth, double_channel=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class UNet3DBackbone(nn.Module):
    """The Models Genesis UNet3D used as the official ``unet`` backbone (19,073,600 parameters).

    Returns ``(bottleneck, decoder)``: 512 channels at 1/8 resolution and 64 channels at full resolution.
    """

    out_channels = 64
    bottleneck_channels = 512

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.down_tr64 = _DownTransition(in_channels, 0)
        self.down_tr128 = _DownTransition(64, 1)
        self.down_tr256 = _DownTransition(128, 2)
        self.down_tr512 = _DownTransition(256, 3)
        self.up_tr256 = _UpTransition(512, 512, 2)
        self.up_tr128 = _UpTransition(256, 256, 1)
        self.up_tr64 = _UpTransition(128, 128, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out64, skip64 = self.down_tr64(x)
        out128, skip128 = self.down_tr128(out64)
        out256, skip256 = self.down_tr256(out128)
        out512, _ = self.down_tr512(out256)
        up = self.up_tr256(out512, skip256)
        up = self.up_tr128(up, skip128)
        return out512, self.up_tr64(up, skip64)


def split_dynamic_params(params: torch.Tensor) -> list[torch.Tensor]:
    """Split controller outputs ``[..., 153]`` into ``[w1, w2, w3, b1, b2, b3]``, weights output-major.

    Shapes: w1, w2 ``[..., 8, 8]``, w3 ``[..., 1, 8]``, b1, b2 ``[..., 8]``, b3 ``[..., 1]``.
    """
    w1, w2, w3, b1, b2, b3 = torch.split(params, list(WEIGHT_NUMS + BIAS_NUMS), dim=-1)
    lead = params.shape[:-1]
    c = HEAD_CHANNELS
    return [w1.reshape(lead + (c, c)), w2.reshape(lead + (c, c)), w3.reshape(lead + (1, c)), b1, b2, b3]


def dynamic_head(features: torch.Tensor, params: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """Apply every class's dynamic 8-8-1 head to every sample: three batched matmuls per chunk of voxels.

    Args:
        features: ``[B, 8, *spatial]`` head inputs (``precls_conv`` output).
        params: ``[B, K, 153]`` controller outputs for ``K`` classes.
        chunk_size: voxels per chunk (0: all at once). The heads are memory-bound: a chunk's
            ``[B*K*8, chunk]`` intermediates should stay in cache, but each chunk costs five ops, so chunks
            should also be large: tiny two-thread ops stall whenever a partner thread is pre-empted.

    Returns:
        ``[B, K, *spatial]`` logits, equal to the official per-sample grouped-convolution loop.
    """
    b, c = features.shape[:2]
    spatial = features.shape[2:]
    k = params.shape[1]
    w1, w2, w3, b1, b2, b3 = split_dynamic_params(params)
    w1, b1 = w1.reshape(b, k * c, c), b1.reshape(b, k * c, 1)  # layer 1: classes share a sample's input
    w2, b2 = w2.reshape(b * k, c, c), b2.reshape(b * k, c, 1)  # layers 2-3: one matmul per (sample, class)
    w3, b3 = w3.reshape(b * k, 1, c), b3.reshape(b * k, 1, 1)
    flat = features.reshape(b, c, -1)
    n = flat.shape[-1]
    step = n if chunk_size <= 0 or torch.jit.is_tracing() or torch.jit.is_scripting() else chunk_size
    # Without autograd, the last matmul writes each chunk straight into the output (no concatenation pass).
    out = None if torch.is_grad_enabled() or torch.jit.is_tracing() else features.new_empty(b * k, 1, n)
    chunks = []
    for start in range(0, n, step):
        h = torch.baddbmm(b1, w1, flat[..., start : start + step]).relu_()
        h = torch.baddbmm(b2, w2, h.reshape(b * k, c, -1)).relu_()
        if out is None:
            chunks.append(torch.baddbmm(b3, w3, h))
        else:
            torch.baddbmm(b3, w3, h, out=out[..., start : start + step])
    if out is None:
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)
    return out.reshape((b, k) + spatial)


def load_class_embedding(path: str | Path, num_classes: int | None = None) -> torch.Tensor:
    """Load a ``[num_classes, 512]`` class-embedding tensor (``txt_encoding.pth`` or a ``clip_embed`` output).

    Accepts a bare tensor or a dict with an ``embedding`` tensor; raises naming the file when it is unusable.
    """
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    emb = obj.get("embedding") if isinstance(obj, dict) else obj
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise ValueError(f"{path}: expected a 2D class-embedding tensor (or a dict with 'embedding').")
    if num_classes is not None and emb.shape[0] != num_classes:
        raise ValueError(f"{path}: class embedding has {emb.shape[0]} rows, the network has {num_classes} classes.")
    return emb.float()


class UniversalModel(nn.Module):
    """CLIP-Driven Universal Model: multi-label logits for ``out_channels`` classes from one CT patch.

    Args:
        in_channels: image channels.
        out_channels: number of classes (32 universal classes).
        backbone: ``"swinunetr"`` (MONAI SwinUNETR) or ``"unet"`` (Models Genesis UNet3D).
        feature_size: SwinUNETR feature size (48 in the paper); ignored by ``unet``.
        encoding: ``"word_embedding"`` (CLIP class embeddings, a buffer) or ``"rand_embedding"`` (ablation).
        embedding_file: ``[out_channels, 512]`` class-embedding file loaded into ``organ_embedding``
            (``txt_encoding.pth``). ``None``: the buffer comes from a checkpoint (inference loads ``model.pt``).
            A missing file is an error saying how to get it, unless ``allow_random_embedding``.
        allow_random_embedding: keep a seeded random embedding when ``embedding_file`` is missing (smoke
            tests and demos only, with a warning); the paper's ablation is ``encoding="rand_embedding"``.
        patch_merging: ``"parity"`` (official sub-grid order, needed for released weights) or ``"fixed"``.
        use_checkpoint: gradient checkpointing in the Swin blocks.
        head_chunk_size: voxels per dynamic-head chunk (0: unchunked); large chunks keep the op count low.
        text_dim: class-embedding width (CLIP ViT-B/32: 512).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 32,
        backbone: str = "swinunetr",
        feature_size: int = 48,
        encoding: str = "word_embedding",
        embedding_file: str | None = None,
        allow_random_embedding: bool = False,
        patch_merging: str = "parity",
        use_checkpoint: bool = False,
        head_chunk_size: int = 16384,
        text_dim: int = 512,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
    ) -> None:
        super().__init__()
        if backbone == "swinunetr":
            self.backbone: nn.Module = SwinUNETRBackbone(
                in_channels,
                feature_size,
                patch_merging,
                depths=depths,
                num_heads=num_heads,
                use_checkpoint=use_checkpoint,
            )
        elif backbone == "unet":
            self.backbone = UNet3DBackbone(in_channels)
        else:
            raise ValueError(f"backbone must be 'swinunetr' or 'unet', got {backbone!r}.")
        dec_ch, neck_ch = self.backbone.out_channels, self.backbone.bottleneck_channels
        # GroupNorm(16, C) as in the paper; smaller feature sizes (demo) fall back to gcd(16, C) groups.
        self.precls_conv = nn.Sequential(
            nn.GroupNorm(math.gcd(16, dec_ch), dec_ch), nn.ReLU(inplace=True), nn.Conv3d(dec_ch, HEAD_CHANNELS, 1)
        )
        self.GAP = nn.Sequential(
            nn.GroupNorm(math.gcd(16, neck_ch), neck_ch),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(neck_ch, 256, kernel_size=1),
        )
        self.controller = nn.Conv3d(256 + 256, NUM_DYNAMIC_PARAMS, kernel_size=1)
        self.encoding = encoding
        self.class_num = out_channels
        self.head_chunk_size = head_chunk_size
        if encoding == "word_embedding":
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("organ_embedding", torch.randn(out_channels, text_dim, generator=gen))
            self.text_to_vision = nn.Linear(text_dim, 256)
            if embedding_file is not None:
                self.load_embedding(embedding_file, allow_random_embedding)
        elif encoding == "rand_embedding":
            self.organ_embedding = nn.Embedding(out_channels, 256)
        else:
            raise ValueError(f"encoding must be 'word_embedding' or 'rand_embedding', got {encoding!r}.")

    def load_embedding(self, path: str | Path, allow_random: bool = False) -> None:
        """Overwrite ``organ_embedding`` from a class-embedding file (official: at train start).

        A missing file raises, naming the two ways to get one; ``allow_random`` keeps the seeded random
        embedding with a warning instead.
        """
        if not Path(path).is_file():
            message = (
                f"class-embedding file {path} not found. Get the official one (sha256 9de46b0b...) with "
                "`python -m tools weights clip_driven_universal_ct_segmentation`, or compute it with "
                "common.text.clip_embed.save_class_embeddings; encoding='rand_embedding' is the paper's ablation."
            )
            if not allow_random:
                raise FileNotFoundError(message)
            warnings.warn(f"{message} Using a seeded RANDOM embedding (allow_random_embedding=True).", stacklevel=2)
            return
        emb = load_class_embedding(path, self.class_num)
        if emb.shape != self.organ_embedding.shape:
            raise ValueError(f"{path}: embedding shape {tuple(emb.shape)} != {tuple(self.organ_embedding.shape)}.")
        self.organ_embedding.copy_(emb)

    def class_features(self) -> torch.Tensor:
        """``[K, 256]`` text features: ReLU(Linear(embedding)), or the learned ``rand_embedding`` table."""
        if self.encoding == "word_embedding":
            return F.relu(self.text_to_vision(self.organ_embedding))
        return self.organ_embedding.weight

    def controller_params(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """``[B, K, 153]`` dynamic parameters from concat[image feature, text feature] per (sample, class)."""
        img = self.GAP(bottleneck).flatten(1)  # [B, 256]
        txt = self.class_features()  # [K, 256]
        b, k = img.shape[0], txt.shape[0]
        cond = torch.cat([img[:, None].expand(b, k, img.shape[1]), txt[None].expand(b, k, txt.shape[1])], -1)
        w = self.controller.weight.flatten(1)
        return F.linear(cond, w, self.controller.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, dec = self.backbone(x)
        params = self.controller_params(bottleneck)
        return dynamic_head(self.precls_conv(dec), params, self.head_chunk_size)
