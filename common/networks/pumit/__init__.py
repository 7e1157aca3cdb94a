"""PUMIT / SPAD-Nets: spatially adaptive convolutions, the SPAD-VT tokenizer, SPAD-ViT, MIM and downstream heads."""

from .adapter import SimpleViTAdapter, ViTClassifier, ViTSegmenter
from .mim import ViTForMIM
from .rope import SpatialRotaryEmbedding
from .sac import (
    ANISO_D_2D,
    InflatableConv3d,
    InflatableTransposedConv3d,
    SACSequential,
    SpatialState,
    aniso_d_from_spacing,
    resample,
)
from .tokenizer import PatchDiscriminator, SoftQuantizer, Tokenizer
from .vit import ViT, vit_b, vit_l

__all__ = [
    "ANISO_D_2D",
    "InflatableConv3d",
    "InflatableTransposedConv3d",
    "PatchDiscriminator",
    "SACSequential",
    "SimpleViTAdapter",
    "SoftQuantizer",
    "SpatialRotaryEmbedding",
    "SpatialState",
    "Tokenizer",
    "ViT",
    "ViTClassifier",
    "ViTForMIM",
    "ViTSegmenter",
    "aniso_d_from_spacing",
    "resample",
    "vit_b",
    "vit_l",
]
