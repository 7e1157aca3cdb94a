"""LoVT weight files: take the ResNet50 image encoder out of a pretraining checkpoint.

The exported file is a flat state dict with torchvision/MONAI key names (``conv1.weight``,
``layer4.2.bn3.running_var``, ...), so it loads without key editing into
``FlexibleUNet(backbone="resnet50", spatial_dims=2, in_channels=3).encoder``, into
``monai.networks.nets.resnet50(pretrained=<file>, spatial_dims=2, n_input_channels=3, conv1_t_stride=2,
feed_forward=False, bias_downsample=False)`` and into :class:`common.networks.lovt.LoVTSegNet`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..core.distributed import is_main_process, unwrap_module
from ..core.io import save_atomically

__all__ = ["extract_lovt_image_encoder", "export_image_encoder", "image_encoder_weights", "ImageEncoderExport"]

_PREFIXES = ("image_encoder.backbone.", "backbone.", "encoder.", "")


def _load(src: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(src, Mapping):
        state = src
    else:
        if not os.path.isfile(src):
            raise FileNotFoundError(f"LoVT checkpoint not found: {src}")
        state = torch.load(src, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state.get("model"), Mapping) else state


def extract_lovt_image_encoder(src: str | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """ResNet50 state dict (torchvision keys, no ``fc``) from a LoVT checkpoint or state dict.

    Accepts the full pretraining model (``image_encoder.backbone.*``), a ``LoVTImageEncoder``
    (``backbone.*``), a segmentation net / FlexibleUNet (``encoder.*``) or an already plain ResNet50.
    """
    state = _load(src)
    for prefix in _PREFIXES:
        if f"{prefix}layer4.2.bn3.weight" in state:
            keys = [k for k in state if k.startswith(prefix) and not k[len(prefix) :].startswith("fc.")]
            return {k[len(prefix) :]: state[k] for k in keys}
    name = src if isinstance(src, str) else "the given state dict"
    raise KeyError(f"{name}: no ResNet50 image encoder found (looked for 'layer4.2.bn3.weight' under {_PREFIXES}).")


def image_encoder_weights(src: str | Mapping[str, Any] | None) -> dict[str, torch.Tensor] | None:
    """``extract_lovt_image_encoder(src)``, or ``None`` (random initialisation) when ``src`` is ``None``.

    Configs pass this to ``LoVTSegNet(encoder_weights=...)``, so the network itself never reads files.
    """
    return None if src is None else extract_lovt_image_encoder(src)


def export_image_encoder(src: str | Mapping[str, Any], dst: str) -> str:
    """Write the standalone ResNet50 encoder of ``src`` to ``dst`` and return ``dst``."""
    save_atomically(extract_lovt_image_encoder(src), dst)
    return dst


class ImageEncoderExport:
    """Attach to the validator: on every new best, write the image-encoder weights users take away.

    ``image_encoder.pt`` holds the whole ``LoVTImageEncoder`` (backbone, attention pool, projections;
    the pretraining bundle's ``inference.json`` loads it) and ``resnet50_encoder.pt`` the plain ResNet50
    for FlexibleUNet / resnet50 / the downstream bundle.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        save_dir: str,
        encoder_filename: str = "image_encoder.pt",
        backbone_filename: str = "resnet50_encoder.pt",
    ) -> None:
        self.network = network
        self.save_dir = save_dir
        self.encoder_filename = encoder_filename
        self.backbone_filename = backbone_filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process() or engine.state.best_metric_epoch != engine.state.epoch:
            return
        encoder = unwrap_module(self.network).image_encoder
        save_atomically(encoder.state_dict(), os.path.join(self.save_dir, self.encoder_filename))
        export_image_encoder(encoder.backbone.state_dict(), os.path.join(self.save_dir, self.backbone_filename))
