"""LoVT weight files: take the ResNet50 image encoder out of a pretraining checkpoint (ours or official).

The official code (``philip-mueller/lovt``, a Lightning module) stores the image side as ``model_a``:
``model_a.encoder.feature_extractor.backbone_layers.<torchvision ResNet50 keys>``, the attention pool as
``model_a.encoder.global_aggregator.attention.*`` and the projections as ``model_a.project_local``
(``SequenceMLP``: ``projection_before`` / ``projection_after`` are ``Conv1d`` with kernel 1) and
``model_a.project_global`` (``MLP``: ``Linear``), each with a BatchNorm1d ``norm``.

The exported file is a flat state dict with torchvision/MONAI key names (``conv1.weight``,
``layer4.2.bn3.running_var``, ...), so it loads without key editing into
``FlexibleUNet(backbone="resnet50", spatial_dims=2, in_channels=3).encoder``, into
``monai.networks.nets.resnet50(pretrained=<file>, spatial_dims=2, n_input_channels=3, conv1_t_stride=2,
feed_forward=False, bias_downsample=False)`` and into :class:`common.networks.lovt.LoVTSegNet`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..core.distributed import is_main_process, unwrap_module
from ..core.io import save_atomically
from .io import read_checkpoint, state_dict_of

logger = logging.getLogger(__name__)

__all__ = [
    "extract_lovt_image_encoder",
    "export_image_encoder",
    "image_encoder_state",
    "image_encoder_weights",
    "official_image_encoder_state",
    "ImageEncoderExport",
]

_PREFIXES = ("image_encoder.backbone.", "backbone.", "encoder.", "")
_OFFICIAL_BACKBONE = "encoder.feature_extractor.backbone_layers."
_OFFICIAL_MARKER = re.compile(r"^(.*?)" + re.escape(_OFFICIAL_BACKBONE) + r"layer4\.2\.bn3\.weight$")
_OFFICIAL_HEAD = {"projection_before": "fc1", "projection_after": "fc2", "norm": "norm"}


def _load(src: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(src, Mapping):
        state = src
    else:
        state = read_checkpoint(src)
    return state_dict_of(state, src if isinstance(src, str) else "the given state dict", keys=("state_dict", "model"))


def _official_prefix(state: Mapping[str, Any]) -> str | None:
    """``"model_a."`` (the modality model holding the official ResNet50), or ``None`` for other layouts."""
    for key in state:
        m = _OFFICIAL_MARKER.match(key)
        if m:
            return m.group(1)
    return None


def official_image_encoder_state(src: str | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """:class:`common.networks.lovt.LoVTImageEncoder` state dict from an official LoVT checkpoint.

    Backbone keys lose ``feature_extractor.backbone_layers``, the aggregator becomes ``pool``, and the
    ``Conv1d`` (kernel 1) weights of ``project_local`` are squeezed into ``Linear`` weights.
    """
    state = _load(src)
    prefix = _official_prefix(state)
    if prefix is None:
        name = src if isinstance(src, str) else "the given state dict"
        raise KeyError(f"{name}: not an official LoVT checkpoint (no '*{_OFFICIAL_BACKBONE}layer4.2.bn3.weight').")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key.startswith(_OFFICIAL_BACKBONE):
            if not key.startswith(_OFFICIAL_BACKBONE + "fc."):
                out["backbone." + key[len(_OFFICIAL_BACKBONE) :]] = value
        elif key.startswith("encoder.global_aggregator.attention."):
            out["pool.attention." + key[len("encoder.global_aggregator.attention.") :]] = value
        elif key.startswith(("project_local.", "project_global.")):
            head, layer, param = key.split(".", 2)
            if layer in _OFFICIAL_HEAD:
                if layer != "norm" and value.dim() == 3:  # Conv1d kernel 1 -> Linear
                    value = value.squeeze(-1)
                out[f"{head}.{_OFFICIAL_HEAD[layer]}.{param}"] = value
    return out


def image_encoder_state(src: str | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """:class:`common.networks.lovt.LoVTImageEncoder` state dict from an official or our pretraining checkpoint."""
    state = _load(src)
    if _official_prefix(state) is not None:
        return official_image_encoder_state(state)
    if any(k.startswith("image_encoder.") for k in state):
        return {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
    return dict(state)


def extract_lovt_image_encoder(src: str | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """ResNet50 state dict (torchvision keys, no ``fc``) from a LoVT checkpoint or state dict.

    Accepts an official LoVT checkpoint (``model_a.encoder.feature_extractor.backbone_layers.*``), our full
    pretraining model (``image_encoder.backbone.*``), a ``LoVTImageEncoder`` (``backbone.*``), a segmentation
    net / FlexibleUNet (``encoder.*``) or an already plain ResNet50.
    """
    state = _load(src)
    if _official_prefix(state) is not None:
        state = official_image_encoder_state(state)
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
    if src is None:
        logger.warning("LoVT image encoder: pretrained_encoder is null, so it starts from random initialisation")
        return None
    if isinstance(src, str) and not os.path.isfile(src):
        raise FileNotFoundError(
            f"{src}: no pretrained LoVT encoder; train lovt_mimic_cxr_pretraining (it writes resnet50_encoder.pt) "
            "or convert an official checkpoint with `python -m tools convert lovt SRC DST`; "
            "set pretrained_encoder to null to train from random initialisation"
        )
    return extract_lovt_image_encoder(src)


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
