"""``python -m tools convert unetr SRC DST``: research-contributions UNETR checkpoint -> flat ``model.pt``."""

from __future__ import annotations

import os

from common.core.io import save_atomically
from common.weights.io import read_checkpoint
from common.weights.unetr import reference_state_dict


def convert(src: str, dst: str, key_in_ckpt: str | None = None) -> None:
    """Write the flat, current-MONAI state dict of ``src`` to ``dst`` (never over an existing file)."""
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; choose another destination")
    state = reference_state_dict(read_checkpoint(src), key_in_ckpt)
    save_atomically(state, dst)
    print(f"wrote {dst}: {len(state)} tensors from {src}")
