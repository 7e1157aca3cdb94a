"""LViT word-level text embeddings from any HF BERT-family encoder, cached on disk.

The official code runs MXNet ``bert-embedding`` (BERT-Base uncased, ``max_seq_length=25``, last layer) in every
DataLoader worker for every sample and epoch. Here each distinct description is embedded once:

1. fewer than 9 whitespace words -> append ``" EOF XXX"`` x (9 - n); keep the text before the first newline;
2. tokenize (max 25 pieces incl. [CLS]/[SEP]), take the last hidden layer, drop [CLS]/[SEP]/padding, and average
   word pieces back into the basic-tokenizer words (punctuation is a word);
3. keep the first L (=10) word vectors; fewer are zero-padded (and logged).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from monai.transforms import MapTransform

from .cache import TextEmbeddingCache, encoder_key

__all__ = [
    "BertWordEmbedder",
    "LViTTextEmbedder",
    "LViTTextd",
    "TextPromptedInferer",
    "lvit_text",
    "random_bert_word_embedder",
]

logger = logging.getLogger(__name__)


def lvit_text(description: str, min_words: int = 9) -> str:
    """The official text preparation: pad short descriptions with ``" EOF XXX"`` and keep the first line."""
    n = len(description.split())
    if n < min_words:
        description = description + " EOF XXX" * (min_words - n)
    return description.split("\n")[0]


class BertWordEmbedder:
    """Word vectors ``[n_words, D]`` from a BERT-family encoder's last layer, word pieces averaged.

    Args:
        model_name_or_path: HF hub id or local folder (default ``bert-base-uncased``).
        revision: pinned hub revision.
        max_length: word pieces including [CLS]/[SEP] (25 as official).
        device: where the encoder runs.
        local_files_only: never touch the network (True in tests and offline installs).
        tokenizer, model: ready objects (e.g. a tiny random BERT in tests); then nothing is loaded.
    """

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        revision: str | None = None,
        max_length: int = 25,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
        tokenizer: Any = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.model_name_or_path = model_name_or_path
        self.revision = revision
        self.max_length = max_length
        self.device = torch.device(device)
        self.local_files_only = local_files_only
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval() if model is not None else None
        self.calls = 0

    @property
    def encoder_id(self) -> str:
        return f"{encoder_key(self.model_name_or_path, self.revision)}|last_layer|max_length={self.max_length}"

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        kw = {"revision": self.revision, "local_files_only": self.local_files_only}
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, **kw)
        if self.model is None:
            self.model = AutoModel.from_pretrained(self.model_name_or_path, **kw)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[torch.Tensor]:
        if self.tokenizer is None or self.model is None:
            self._load()
        self.calls += 1
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        inputs = {
            k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        hidden = self.model(**inputs).last_hidden_state.float().cpu()
        out = []
        for i in range(len(texts)):
            word_ids = torch.tensor([-1 if w is None else w for w in enc.word_ids(i)])
            n_words = int(word_ids.max()) + 1 if (word_ids >= 0).any() else 0
            assign = (word_ids[None, :] == torch.arange(n_words)[:, None]).float()  # [n_words, seq]
            out.append(assign @ hidden[i] / assign.sum(1, keepdim=True).clamp(min=1))
        return out


def random_bert_word_embedder(
    words: Sequence[str], folder: str, hidden_size: int = 768, num_layers: int = 1, seed: int = 0, **kwargs: Any
) -> BertWordEmbedder:
    """A BERT with random weights over a small vocabulary written to ``folder/vocab.txt`` (tests, offline demos).

    It downloads nothing; its embeddings carry word identity and position but no pretrained meaning.
    """
    import hashlib
    import os

    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        intermediate_size=hidden_size * 4,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config)
    digest = hashlib.sha1("\n".join(vocab).encode()).hexdigest()[:10]
    name = f"random-bert-h{hidden_size}-l{num_layers}-seed{seed}-vocab{digest}"
    return BertWordEmbedder(name, tokenizer=tokenizer, model=model, **kwargs)


class LViTTextEmbedder:
    """Fixed-length ``[L, D]`` LViT text embeddings, served from a :class:`TextEmbeddingCache`.

    The encoder (``word_embedder``) is loaded and called only for descriptions missing from the cache;
    :meth:`prepare` fills the cache for a whole datalist before training so epochs never call it.
    """

    def __init__(
        self,
        word_embedder: BertWordEmbedder | None = None,
        cache_file: str | None = None,
        num_tokens: int = 10,
        batch_size: int = 32,
    ) -> None:
        self.word_embedder = word_embedder if word_embedder is not None else BertWordEmbedder()
        self.num_tokens = num_tokens
        self.batch_size = batch_size
        encoder_id = f"{self.word_embedder.encoder_id}|lvit_tokens={num_tokens}"
        self.cache = TextEmbeddingCache(cache_file, encoder_id)

    @property
    def encoder_calls(self) -> int:
        return self.word_embedder.calls

    def _fixed_length(self, words: torch.Tensor) -> torch.Tensor:
        if words.shape[0] < self.num_tokens:
            words = torch.cat([words, words.new_zeros(self.num_tokens - words.shape[0], words.shape[1])])
        return words[: self.num_tokens]

    def _fill(self, texts: list[str]) -> None:
        """Embed the texts missing from the cache; one log line counts those zero-padded to ``num_tokens``."""
        padded: list[str] = []

        def compute(batch: list[str]) -> list[torch.Tensor]:
            words = self.word_embedder(batch)
            padded.extend(t for w, t in zip(words, batch, strict=True) if w.shape[0] < self.num_tokens)
            return [self._fixed_length(w) for w in words]

        added = self.cache.fill(texts, compute, self.batch_size)
        if padded:
            logger.info(
                "%d of %d newly embedded texts have fewer than %d words and were zero-padded (e.g. %r)",
                len(padded),
                added,
                self.num_tokens,
                padded[0],
            )

    def embed(self, descriptions: Sequence[str]) -> torch.Tensor:
        """``[N, L, D]`` float32 for raw descriptions (prepared with :func:`lvit_text`)."""
        texts = [lvit_text(d) for d in descriptions]
        self._fill(texts)
        return torch.stack([self.cache.get(t) for t in texts])

    def __call__(self, description: str) -> torch.Tensor:
        return self.embed([description])[0]

    def prepare(self, datalist: Sequence[Mapping[Hashable, Any]], key: str = "text") -> Sequence[Mapping]:
        """Embed every description of ``datalist`` not yet cached (one encoder pass), save, return the datalist."""
        texts = [lvit_text(d[key]) for d in datalist if isinstance(d.get(key), str)]
        self._fill(texts)
        return datalist


class LViTTextd(MapTransform):
    """Replace a description string by its cached ``[L, D]`` embedding (tensors pass through unchanged)."""

    def __init__(self, keys: Any, embedder: LViTTextEmbedder, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.embedder = embedder

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], str):
                d[key] = self.embedder(d[key])
        return d


class TextPromptedInferer(Inferer):
    """Run ``network(image, text)`` where ``text`` is a report sentence, a list of them, or an embedding tensor."""

    def __init__(self, embedder: LViTTextEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def __call__(self, inputs: torch.Tensor, network: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str):
            text = [text]
        if isinstance(text, (list, tuple)):
            text = self.embedder.embed(list(text))
        if text is not None:
            text = torch.as_tensor(text).to(inputs.device)
        return network(inputs, text, *args, **kwargs)
