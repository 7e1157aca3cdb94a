"""Spatially adaptive convolutions (SAC / SPAD-conv) of PUMIT.

A volume whose slices are thicker than its in-plane pixels (degree of anisotropy ``aniso_d`` = DA) is
downsampled in-plane only until it is roughly isotropic; 3D kernels are collapsed over depth (their taps
summed) while the input is still anisotropic, so one set of 3D weights serves 2D images (depth 1, DA 5)
and volumes of any slice thickness.

Unlike the official ``SpatialTensor`` subclass (which breaks gradient checkpointing), the state travels
as an explicit :class:`SpatialState` (DA plus the in-plane downsample counter ``n``) that the top-level
network creates per call and :class:`SACSequential` threads through its SAC layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ...core.spacing import ANISO_D_2D, aniso_d_from_spacing

__all__ = [
    "ANISO_D_2D",
    "AdaptiveInterpolationDownsample",
    "AdaptiveInterpolationUpsample",
    "AdaptiveTransposedConvUpsample",
    "InflatableConv3d",
    "InflatableTransposedConv3d",
    "SACSequential",
    "SpatialModule",
    "SpatialState",
    "adapt_in_channels",
    "aniso_d_from_spacing",
    "collapse_depth",
    "inflate_2d_kernel",
    "resample",
    "rgb_to_gray_out",
]

RGB_TO_GRAY_WEIGHT = (0.299, 0.587, 0.114)  # ITU-R BT.601


@dataclass
class SpatialState:
    """Degree of anisotropy of the input and in-plane downsamples applied so far (``n``)."""

    aniso_d: int
    num_downsamples: int = 0

    @property
    def pending_hw_downsamples(self) -> int:
        """p = max(DA - n, 0): in-plane-only downsamples still needed before depth may shrink."""
        return max(self.aniso_d - self.num_downsamples, 0)

    @property
    def remaining_d_upsamples(self) -> int:
        """max(n - DA, 0): how many of the remaining upsamples may also scale depth."""
        return max(self.num_downsamples - self.aniso_d, 0)


def collapse_depth(weight: torch.Tensor, taps: int) -> torch.Tensor:
    """Sum a ``(co, ci, kd, kh, kw)`` kernel over contiguous depth groups down to ``taps`` depth taps."""
    co, ci, kd, kh, kw = weight.shape
    if taps == kd:
        return weight
    if kd % taps:
        raise ValueError(f"cannot collapse {kd} depth taps into {taps} groups.")
    return weight.reshape(co, ci, taps, kd // taps, kh, kw).sum(dim=3)


def _log2_int(v: int) -> int:
    if v < 1 or v & (v - 1):
        raise ValueError(f"SAC strides must be powers of 2, got {v}.")
    return v.bit_length() - 1


class SpatialModule(nn.Module):
    """Marker base: ``forward(x, state)`` reads and updates a :class:`SpatialState`."""


class _CollapseCache:
    """Caches depth-collapsed kernels per number of taps while the weight is unchanged and no grad is needed.

    The key includes the weight's identity, storage and in-place version, so optimizer steps, ``.to()``
    and ``load_state_dict`` all invalidate it.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[tuple[int, int, int, torch.dtype], torch.Tensor]] = {}

    def get(self, weight: torch.Tensor, taps: int) -> torch.Tensor:
        if taps == weight.shape[2]:
            return weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return collapse_depth(weight, taps)
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype)
        hit = self.entries.get(taps)
        if hit is None or hit[0] != key:
            hit = (key, collapse_depth(weight.detach(), taps))
            self.entries[taps] = hit
        return hit[1]


def _conv_depth1(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """A 3D conv whose kernel has one depth tap (depth stride 1, no depth padding) as a conv2d over slices."""
    n, c, d, h, w = x.shape
    x2 = x.transpose(1, 2).reshape(n * d, c, h, w)
    y = F.conv2d(x2, weight[:, :, 0], bias, stride[1:], padding[1:], dilation[1:], groups)
    return y.reshape(n, d, *y.shape[1:]).transpose(1, 2)


class InflatableConv3d(nn.Conv3d, SpatialModule):
    """A 3D conv that adapts its depth stride and kernel to the input's degree of anisotropy.

    With ``s_d = max(s >> p, 1)``: if ``s_d == s`` and ``p == 0`` it is an ordinary conv; otherwise depth
    padding is 0 and the kernel is summed over depth to 1 tap (``s_d == 1``, needs ``k == s`` or ``k == 3``)
    or over contiguous groups to ``s_d`` taps (``1 < s_d < s``, needs ``k == s``). Afterwards n += log2 s.
    ``adaptive=False`` gives a plain ``nn.Conv3d`` (which still accepts and ignores ``state``).
    """

    def __init__(self, *args, adaptive: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.adaptive = adaptive
        self._cache = _CollapseCache()
        if adaptive:
            s = self.stride[0]
            if not self.stride[0] == self.stride[1] == self.stride[2]:
                raise ValueError(f"adaptive conv needs an isotropic stride, got {self.stride}.")
            if self.padding_mode != "zeros" or isinstance(self.padding, str):
                raise ValueError("adaptive conv supports only explicit zero padding.")
            self.log2_stride = _log2_int(s)
            k = self.kernel_size[0]
            if s > 1 and k != s and k != 3:
                raise ValueError(f"adaptive conv needs kernel == stride or kernel 3, got kernel {k}, stride {s}.")

    def adapted(self, aniso_d: int, num_downsamples: int) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, ...]]:
        """Effective (weight, stride, padding) for an input in the given state."""
        p = max(aniso_d - num_downsamples, 0)
        s = self.stride[0]
        s_d = max(s >> p, 1)
        if s_d == s and p == 0:
            return self.weight, self.stride, self.padding
        k = self.kernel_size[0]
        if s_d == 1:
            if not (k == s or k == 3):
                raise ValueError(f"cannot collapse a depth-{k} kernel with stride {s} to one tap.")
            taps = 1
        else:
            if k != s:
                raise ValueError(f"group-summing depth taps needs kernel == stride, got {k} and {s}.")
            taps = s_d
        weight = self._cache.get(self.weight, taps)
        return weight, (s_d, s, s), (0, *self.padding[1:])

    def forward(self, x: torch.Tensor, state: SpatialState | None = None) -> torch.Tensor:
        if not self.adaptive:
            return super().forward(x)
        if state is None:
            raise ValueError("an adaptive conv needs a SpatialState (aniso_d).")
        weight, stride, padding = self.adapted(state.aniso_d, state.num_downsamples)
        if x.shape[2] + 2 * padding[0] < weight.shape[2]:
            raise ValueError(
                f"input depth {x.shape[2]} is smaller than the effective depth kernel {weight.shape[2]} "
                f"at aniso_d={state.aniso_d} after {state.num_downsamples} downsamples: a 2D image needs "
                f"aniso_d >= {state.num_downsamples + self.log2_stride} (use aniso_d={ANISO_D_2D})."
            )
        if weight.shape[2] == 1 and stride[0] == 1:
            x = _conv_depth1(x, weight, self.bias, stride, padding, self.dilation, self.groups)
        else:
            x = F.conv3d(x, weight, self.bias, stride, padding, self.dilation, self.groups)
        state.num_downsamples += self.log2_stride
        return x


class InflatableTransposedConv3d(nn.ConvTranspose3d, SpatialModule):
    """Transposed conv (kernel == stride) whose depth stride is ``min(2 ** remaining, s)``; n -= log2 s."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=stride, stride=stride, bias=bias)
        self.log2_stride = _log2_int(stride)
        self._cache = _CollapseCache()

    def forward(self, x: torch.Tensor, state: SpatialState) -> torch.Tensor:  # type: ignore[override]
        s = self.stride[0]
        s_d = min(1 << state.remaining_d_upsamples, s)
        weight = self._cache.get(self.weight, s_d)
        if s_d == 1:
            n, c, d, h, w = x.shape
            y = F.conv_transpose2d(x.transpose(1, 2).reshape(n * d, c, h, w), weight[:, :, 0], self.bias, s)
            x = y.reshape(n, d, *y.shape[1:]).transpose(1, 2)
        else:
            x = F.conv_transpose3d(x, weight, self.bias, (s_d, s, s))
        state.num_downsamples -= self.log2_stride
        return x


class AdaptiveInterpolationDownsample(SpatialModule):
    """Halve in-plane size (and depth once DA allows it) by interpolation; n += 1."""

    def __init__(self, mode: str = "area"):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, state: SpatialState) -> torch.Tensor:
        scale_d = 0.5 if state.pending_hw_downsamples == 0 else 1.0
        x = F.interpolate(x, scale_factor=(scale_d, 0.5, 0.5), mode=self.mode)
        state.num_downsamples += 1
        return x


class AdaptiveInterpolationUpsample(SpatialModule):
    """Double in-plane size (and depth while depth upsamples remain) by interpolation; n -= 1."""

    def __init__(self, mode: str = "trilinear"):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, state: SpatialState) -> torch.Tensor:
        scale_d = 2.0 if state.remaining_d_upsamples > 0 else 1.0
        x = F.interpolate(x, scale_factor=(scale_d, 2.0, 2.0), mode=self.mode)
        state.num_downsamples -= 1
        return x


class SACSequential(nn.Sequential):
    """``nn.Sequential`` that passes the :class:`SpatialState` to its SAC members."""

    def forward(self, x: torch.Tensor, state: SpatialState) -> torch.Tensor:  # type: ignore[override]
        for module in self:
            x = module(x, state) if isinstance(module, (SpatialModule, SACSequential)) else module(x)
        return x


class AdaptiveTransposedConvUpsample(SACSequential):
    """SAC transposed conv (k = s) followed by a SAC 3^3 conv, GroupNorm(8) and LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__(
            InflatableTransposedConv3d(in_channels, out_channels, stride),
            InflatableConv3d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.GroupNorm(8, out_channels),
            nn.LeakyReLU(inplace=True),
        )


def resample(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a channel-first grid: ``area`` along shrinking axes, then trilinear where it grows."""
    shape = tuple(int(s) for s in shape)
    down = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if down != tuple(x.shape[2:]):
        x = F.interpolate(x, down, mode="area")
    if shape != tuple(x.shape[2:]):
        x = F.interpolate(x, shape, mode="trilinear", align_corners=False)
    return x


def inflate_2d_kernel(weight: torch.Tensor, depth: int, mode: str = "average") -> torch.Tensor:
    """Inflate a ``(co, ci, kh, kw)`` kernel to ``depth`` taps: ``average`` repeats / d, ``center`` puts it mid-way."""
    if mode == "average":
        return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    if mode == "center":
        out = weight.new_zeros(*weight.shape[:2], depth, *weight.shape[2:])
        if depth % 2:
            out[:, :, depth // 2] = weight
        else:
            out[:, :, depth // 2 - 1 : depth // 2 + 1] = weight.unsqueeze(2) / 2
        return out
    raise ValueError(f"unknown inflation mode {mode!r}; use 'average' or 'center'.")


def adapt_in_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Change a kernel's input channels: sum over the old ones, divide by the new count, repeat."""
    summed = weight.sum(dim=1, keepdim=True) / in_channels
    return summed.expand(-1, in_channels, *weight.shape[2:]).clone()


def rgb_to_gray_out(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge a 3-output (RGB) conv into one gray output channel with BT.601 weights."""
    if weight.shape[0] != 3:
        raise ValueError(f"expected 3 output channels (RGB), got {weight.shape[0]}.")
    w = weight.new_tensor(RGB_TO_GRAY_WEIGHT)
    new_w = torch.einsum("c,c...->...", w, weight)[None]
    new_b = None if bias is None else (w * bias).sum()[None]
    return new_w, new_b
