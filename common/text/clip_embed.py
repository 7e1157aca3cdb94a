"""Class embeddings for the Universal Model from a CLIP text encoder (``transformers``).

The official ``pretrained_weights/clip_embedding.py`` runs OpenAI CLIP ViT-B/32 ``encode_text`` on
``"A computerized tomography of a {name}"`` for the 32 class names and saves the (not L2-normalised)
``[32, 512]`` projections as ``txt_encoding.pth``. ``CLIPTextModelWithProjection.text_embeds`` is the
same quantity. The file written here holds the tensor plus a sha256 of its bytes, the model and prompt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch

from ..core.io import save_atomically
from ..core.taxonomy import PROMPT_NAMES
from .cache import PINNED_REVISIONS

__all__ = ["DEFAULT_REVISION", "PROMPT", "compute_class_embeddings", "embedding_sha256", "save_class_embeddings"]

PROMPT = "A computerized tomography of a {name}"
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_REVISION = PINNED_REVISIONS[DEFAULT_MODEL]


def embedding_sha256(embedding: torch.Tensor) -> str:
    """sha256 of the tensor's contiguous bytes (dtype and shape included), to identify an embedding."""
    t = embedding.detach().cpu().contiguous()
    header = f"{t.dtype}:{tuple(t.shape)}:".encode()
    return hashlib.sha256(header + t.view(torch.uint8).numpy().tobytes()).hexdigest()


@torch.no_grad()
def compute_class_embeddings(
    model: torch.nn.Module, tokenizer, names: Sequence[str] = PROMPT_NAMES, prompt: str = PROMPT
) -> torch.Tensor:
    """``[len(names), projection_dim]`` CLIP text projections of ``prompt.format(name=...)`` for each name."""
    texts = [prompt.format(name=n) for n in names]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    return model(**tokens).text_embeds.float()


def save_class_embeddings(
    dst: str,
    model_name: str = DEFAULT_MODEL,
    revision: str | None = DEFAULT_REVISION,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    names: Sequence[str] = PROMPT_NAMES,
    prompt: str = PROMPT,
    dtype: str = "float16",
) -> str:
    """Compute the class embeddings and save ``{"embedding", "sha256", "model", "prompt", "names"}`` to ``dst``.

    ``model``/``tokenizer`` default to ``CLIPTextModelWithProjection`` / ``CLIPTokenizer`` from ``model_name`` at
    the pinned ``revision`` (a Hub id or a local folder; the default needs the Hub once). ``model`` in the file
    is ``name@revision``. Returns the sha256.
    """
    if model is None or tokenizer is None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        model = CLIPTextModelWithProjection.from_pretrained(model_name, revision=revision)
        tokenizer = CLIPTokenizer.from_pretrained(model_name, revision=revision)
    emb = compute_class_embeddings(model, tokenizer, names, prompt).to(getattr(torch, dtype))
    digest = embedding_sha256(emb)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    source = f"{model_name}@{revision}" if revision else model_name
    payload = {"embedding": emb, "sha256": digest, "model": source, "prompt": prompt, "names": list(names)}
    save_atomically(payload, dst)
    return digest
