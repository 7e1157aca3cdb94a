"""Inferer wrapper that runs any MONAI inferer under ``torch.autocast``.

MONAI's trainers and evaluators only autocast on CUDA (``amp=True``). On CPU the bf16 lever
(AVX-512 BF16 / AMX) roughly halves UNETR's forward time, so the bundles expose it through this
wrapper: ``AutocastInferer(SlidingWindowInferer(...), dtype="bfloat16")``. Outputs come back as float32.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer


class AutocastInferer(Inferer):
    """Run ``inferer`` under autocast on the inputs' device type when ``enabled``; return float32 outputs."""

    def __init__(self, inferer: Inferer, dtype: str | torch.dtype = "bfloat16", enabled: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.enabled = enabled

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(device_type=inputs.device.type, dtype=self.dtype):
            outputs = self.inferer(inputs, network, *args, **kwargs)
        return _to_float(outputs)


def _to_float(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, tuple | list):
        return type(outputs)(_to_float(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    return outputs
