"""``python -m tools convert universal SRC DST``: released Universal Model checkpoint -> flat ``model.pt``.

Strips the DDP ``module.`` prefixes, checks the keys strictly against ``UniversalModel(backbone=...)``, and
saves the flat state dict the bundle loads (``models/model.pt``).
"""

from __future__ import annotations

import torch

from common.core.io import save_atomically
from common.networks.universal import UniversalModel
from common.weights.universal import official_state_dict


def convert(
    src: str, dst: str, backbone: str = "swinunetr", patch_merging: str = "parity", feature_size: int = 48
) -> str:
    """Convert ``src`` (official layout) to a flat state dict at ``dst``; raise naming the keys that differ."""
    state = official_state_dict(src)
    model = UniversalModel(backbone=backbone, patch_merging=patch_merging, feature_size=feature_size)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"{src}: does not match UniversalModel(backbone={backbone!r}): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"{src}: shapes differ from UniversalModel(backbone={backbone!r}) for {wrong[:5]}")
    save_atomically({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, dst)
    print(f"converted {len(state)} tensors ({backbone}) -> {dst}")
    return dst


if __name__ == "__main__":
    import fire

    torch.set_grad_enabled(False)
    fire.Fire(convert)
