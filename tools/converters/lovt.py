"""``python -m tools convert lovt SRC DST [--part image_encoder|backbone]``: LoVT checkpoint -> bundle weights.

``SRC`` is a checkpoint of the official LoVT code (Lightning ``.ckpt``, ``model_a.*`` keys) or of our
pretraining bundle. ``image_encoder`` writes the whole :class:`~common.networks.lovt.LoVTImageEncoder`
(the pretraining bundle's ``models/image_encoder.pt``), strictly checked; ``backbone`` writes the plain
ResNet50 (torchvision keys) that ``lovt_cxr_segmentation`` reads as ``models/lovt_resnet50_encoder.pt``.
"""

from __future__ import annotations

import os

from common.core.io import save_atomically
from common.networks.lovt import LoVTImageEncoder
from common.weights.lovt import extract_lovt_image_encoder, image_encoder_state


def convert(src: str, dst: str, part: str = "image_encoder", d_z: int = 512, hidden_dim: int = 2048) -> str:
    """Convert ``src`` into ``part`` at ``dst`` (never over an existing file); returns ``dst``."""
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; choose another destination")
    if part == "backbone":
        state = extract_lovt_image_encoder(src)
    elif part == "image_encoder":
        state = image_encoder_state(src)
        LoVTImageEncoder(d_z=d_z, hidden_dim=hidden_dim).load_state_dict(state, strict=True)
    else:
        raise ValueError(f"unknown part {part!r}; use image_encoder or backbone")
    save_atomically(state, dst)
    print(f"converted LoVT {part} {src} -> {dst} ({len(state)} tensors)")
    return dst
