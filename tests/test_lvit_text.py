"""LViT text pipeline: word-piece averaging, fixed length, the on-disk cache and the text-prompted inferer."""

from __future__ import annotations

import torch

from common.data.lvit_templates import QATA_WORDS
from common.text.cache import TextEmbeddingCache
from common.text.lvit_embed import (
    LViTTextd,
    LViTTextEmbedder,
    TextPromptedInferer,
    lvit_text,
    random_bert_word_embedder,
)


def _embedder(tmp_path, cache=True):
    words = [*QATA_WORDS, "lesion", "##s"]
    we = random_bert_word_embedder(words, str(tmp_path / "bert"), hidden_size=32, num_layers=1)
    return LViTTextEmbedder(we, cache_file=str(tmp_path / "cache" / "text.pt") if cache else None)


def test_lvit_text_padding_rule():
    assert lvit_text("one two") == "one two" + " EOF XXX" * 7
    assert lvit_text("a b c d e f g h i\nsecond line") == "a b c d e f g h i"


def test_word_pieces_are_averaged_back_to_words(tmp_path):
    e = _embedder(tmp_path, cache=False)
    tok = e.word_embedder.tokenizer
    assert tok.tokenize("lesions") == ["lesion", "##s"]
    words = e.word_embedder(["lesions left lung ."])[0]
    assert words.shape == (4, 32)  # lesions / left / lung / .
    enc = tok(["lesions left lung ."], return_tensors="pt")
    hidden = e.word_embedder.model(**enc).last_hidden_state[0]
    assert torch.allclose(words[0], hidden[1:3].mean(0), atol=1e-5)
    assert torch.allclose(words[1], hidden[3], atol=1e-5)


def test_fixed_length_and_zero_padding(tmp_path):
    e = _embedder(tmp_path, cache=False)
    long = e.embed(["Bilateral pulmonary infection, two infected areas, all left lung and all right lung."])
    assert long.shape == (1, 10, 32) and long.abs().sum(-1).min() > 0
    short = e.embed(["left lung left lung left lung left lung left"])  # 9 words, no punctuation -> 9 vectors
    assert short.shape == (1, 10, 32) and short[0, 9].abs().sum() == 0 and short[0, 8].abs().sum() > 0


def test_padding_is_logged_once_with_a_count(tmp_path, caplog):
    e = _embedder(tmp_path, cache=False)
    e.batch_size = 2  # the count covers every batch of one fill, not one line per batch or per text
    short = ["left lung left lung left lung left lung left", "lung left lung left lung left lung left lung"]
    long = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."
    with caplog.at_level("INFO", logger="common.text.lvit_embed"):
        e.prepare([{"text": t} for t in [*short, long]])
    padded = [r.getMessage() for r in caplog.records if "zero-padded" in r.getMessage()]
    assert len(padded) == 1 and padded[0].startswith("2 of 3 newly embedded texts have fewer than 10 words"), padded


def test_second_epoch_calls_encoder_zero_times(tmp_path):
    e = _embedder(tmp_path)
    texts = ["Unilateral pulmonary infection, one infected area, upper left lung."] * 3 + [
        "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
    ]
    t = LViTTextd("text", e)
    first = [t({"text": s})["text"] for s in texts]
    calls_after_first_epoch = e.encoder_calls
    second = [t({"text": s})["text"] for s in texts]
    assert e.encoder_calls == calls_after_first_epoch
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    fresh = _embedder(tmp_path)  # same cache file on disk: a new run embeds nothing
    fresh.prepare([{"text": s} for s in texts])
    assert fresh.encoder_calls == 0 and torch.allclose(fresh(texts[0]), first[0])


def test_prepare_embeds_a_datalist_in_one_pass(tmp_path):
    e = _embedder(tmp_path)
    data = [{"text": f"Unilateral pulmonary infection, one infected area, {z} left lung."} for z in ("upper", "lower")]
    e.prepare(data * 5)
    assert e.encoder_calls == 1 and len(e.cache) == 2


def test_cache_is_keyed_by_encoder(tmp_path):
    path = str(tmp_path / "c.pt")
    a = TextEmbeddingCache(path, "enc-a")
    a.fill(["x"], lambda b: [torch.ones(2, 3) for _ in b])
    b = TextEmbeddingCache(path, "enc-b")
    assert "x" not in b and "x" in TextEmbeddingCache(path, "enc-a")


def test_text_prompted_inferer_accepts_sentences(tmp_path):
    e = _embedder(tmp_path)
    seen = {}

    def net(x, text):
        seen["text"] = text
        return x

    TextPromptedInferer(e)(torch.zeros(1, 3, 4, 4), net, ["Unilateral pulmonary infection, one infected area."])
    assert seen["text"].shape == (1, 10, 32)
