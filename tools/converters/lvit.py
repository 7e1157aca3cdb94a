"""``python -m tools convert lvit SRC DST``: an official LViT checkpoint -> a flat ``model.pt`` for this bundle."""

from __future__ import annotations

from common.core.io import save_atomically
from common.networks.lvit import LViT
from common.weights.io import read_checkpoint
from common.weights.lvit import load_lvit_official


def convert(src: str, dst: str, n_classes: int = 1, **network_kwargs) -> str:
    """Load ``src`` (official ``state_dict``/``model`` checkpoint), drop unused keys, verify it loads strictly into
    ``LViT(n_classes=..., **network_kwargs)`` and save that network's state dict to ``dst``."""
    obj = read_checkpoint(src)
    model = LViT(n_classes=n_classes, **network_kwargs)
    dropped = load_lvit_official(model, obj)
    save_atomically(model.state_dict(), dst)
    print(
        f"converted {src} -> {dst}: {len(model.state_dict())} tensors kept, {len(dropped)} unused official keys dropped"
    )
    return dst
