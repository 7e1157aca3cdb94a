"""``python -m tools convert pumit SRC DST [--kind auto|tokenizer|vit|mim]``: official PUMIT checkpoints -> ours.

Reads the released Lightning / Fabric checkpoints (``pumit-b.ckpt``, ``simple-soft.ckpt``; tensors under
``state_dict`` / ``model`` or flat) with ``weights_only=True`` (Lightning's non-tensor extras load as inert
placeholders, see ``common.weights.io``), renames keys to our layout
(``common.weights.pumit``), checks them against a freshly built network of the paper size and writes a
flat state dict. ``auto`` picks ``tokenizer`` when encoder / decoder keys are present, ``mim`` when
``mim_head`` is, else ``vit``.
"""

from __future__ import annotations

from common.core.io import save_atomically
from common.networks.pumit import Tokenizer, ViTForMIM, vit_b
from common.weights.pumit import convert_official_tokenizer, convert_official_vit, load_state_dict


def _kind(sd: dict) -> str:
    keys = [k.removeprefix("model.") for k in sd]
    if any(k.startswith(("encoder.", "decoder.", "tokenizer.encoder.")) for k in keys) and not any(
        "blocks." in k for k in keys
    ):
        return "tokenizer"
    return "mim" if any(k.startswith("mim_head.") for k in keys) else "vit"


def convert(src: str, dst: str, kind: str = "auto", strict: bool = True, network_kwargs: dict | None = None) -> str:
    """Convert ``src`` (official layout) into a flat state dict of our network at ``dst``; returns ``dst``.

    ``network_kwargs`` overrides the tokenizer's paper-size arguments for the strict check (tokenizer only).
    """
    sd = load_state_dict(src)
    kind = _kind(sd) if kind == "auto" else kind
    if kind == "tokenizer":
        out, model = convert_official_tokenizer(sd), Tokenizer(**(network_kwargs or {}))
    elif kind == "vit":
        out, model = convert_official_vit(sd), vit_b()
    elif kind == "mim":
        out = convert_official_vit(sd, prefix="vit.")
        model = ViTForMIM(vit_b(), Tokenizer())
    else:
        raise ValueError(f"unknown kind {kind!r}; use auto, tokenizer, vit or mim")
    if strict:
        model.load_state_dict(out, strict=True)  # shape / key check at the paper size
    save_atomically(out, dst)
    print(f"converted {kind} checkpoint {src} -> {dst} ({len(out)} tensors)")
    return dst
