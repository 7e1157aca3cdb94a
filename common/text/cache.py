"""An on-disk text-embedding cache: one file, one table per encoder, keyed by the exact text.

Any paper that embeds fixed report text with a frozen encoder can use it: embeddings are computed once,
in batches, for the texts not yet in the table, and every later epoch (or run) only reads them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence

import torch

from ..core.io import save_atomically

__all__ = ["PINNED_REVISIONS", "TextEmbeddingCache", "encoder_key", "is_commit"]

logger = logging.getLogger(__name__)
_FORMAT = 1
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

#: Hub commits the configs pin (``revision``): a cache key names the exact weights, never a moving branch
PINNED_REVISIONS = {
    "bert-base-uncased": "86b5e0934494bd15c9632b12f734a8a67f723594",
    "emilyalsentzer/Bio_ClinicalBERT": "d5892b39a4adaed74b92212a44081509db72f87b",
    "openai/clip-vit-base-patch32": "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
}


def is_commit(revision: str | None) -> bool:
    """Whether ``revision`` is a full Hub commit hash (immutable), not a branch, tag or ``None``."""
    return revision is not None and bool(_COMMIT.match(revision))


def encoder_key(name_or_path: str, revision: str | None) -> str:
    """Cache-key part naming a text encoder's exact weights: ``name@commit``, or ``name@local`` for a folder.

    A Hub id without a commit (``"main"``, ``None``) still gets a key, with a warning: entries cached under
    it may come from different weights once the branch moves.
    """
    if os.path.isdir(name_or_path):
        return f"{name_or_path}@local"
    if not is_commit(revision):
        logger.warning(
            "text encoder %s is not pinned to a commit (revision=%r); pin it (e.g. %s) so cached embeddings "
            "always come from the same weights",
            name_or_path,
            revision,
            PINNED_REVISIONS.get(name_or_path, "a 40-character commit hash"),
        )
    return f"{name_or_path}@{revision or 'default'}"


class TextEmbeddingCache:
    """Text -> tensor table of one encoder, optionally persisted to ``path``.

    Args:
        path: ``.pt`` file holding ``{"format": 1, "tables": {encoder_id: {text: tensor}}}``; None keeps it in memory.
        encoder_id: identifies the encoder and its settings (name, revision, layer, length); part of the key.
        dtype: storage dtype (float16 halves the file; values are returned as float32).
    """

    def __init__(self, path: str | None, encoder_id: str, dtype: torch.dtype = torch.float16) -> None:
        self.path = path
        self.encoder_id = encoder_id
        self.dtype = dtype
        self._tables: dict[str, dict[str, torch.Tensor]] = {}
        if path is not None and os.path.exists(path):
            self._tables = self._read(path)
        self.table = self._tables.setdefault(encoder_id, {})

    @staticmethod
    def _read(path: str) -> dict[str, dict[str, torch.Tensor]]:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"text-embedding cache {path} cannot be read ({e}); delete it to rebuild") from e
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or not isinstance(obj.get("tables"), dict):
            raise ValueError(f"text-embedding cache {path} is not a format-{_FORMAT} cache; delete it to rebuild")
        return obj["tables"]

    def __contains__(self, text: str) -> bool:
        return text in self.table

    def __len__(self) -> int:
        return len(self.table)

    def missing(self, texts: Iterable[str]) -> list[str]:
        """Unique texts (first-seen order) that are not cached yet."""
        return [t for t in dict.fromkeys(texts) if t not in self.table]

    def fill(self, texts: Iterable[str], compute: Callable[[list[str]], Sequence[torch.Tensor]], batch_size: int = 32):
        """Compute ``compute(batch)`` for the missing texts only, store them, and save once if anything was added."""
        todo = self.missing(texts)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for text, emb in zip(batch, compute(batch), strict=True):
                self.table[text] = emb.detach().to("cpu", self.dtype).contiguous()
        if todo:
            logger.info("embedded %d new texts with %s", len(todo), self.encoder_id)
            self.save()
        return len(todo)

    def get(self, text: str) -> torch.Tensor:
        """The cached embedding as float32; a clear error if the text was never embedded."""
        try:
            return self.table[text].float()
        except KeyError:
            raise KeyError(f"text not in the embedding cache {self.path} for {self.encoder_id}: {text!r}") from None

    def save(self) -> None:
        if self.path is not None:
            save_atomically({"format": _FORMAT, "tables": self._tables}, self.path)
