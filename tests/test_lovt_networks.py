"""LoVT networks: parameter counts, shapes, frozen layers, sentence pooling, TorchScript."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from common.networks.lovt import (
    AttentionPool,
    CrossAttention,
    LoVTImageEncoder,
    LoVTModel,
    LoVTReportEncoder,
    LoVTSegNet,
    sentence_max_pool,
)


def n_params(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("bert")
    BertConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
    ).save_pretrained(folder)
    return str(folder)


def test_paper_parameter_counts(tmp_path):
    BertConfig(vocab_size=28996).save_pretrained(tmp_path)  # Bio_ClinicalBERT size, random weights
    image, report = LoVTImageEncoder(), LoVTReportEncoder(str(tmp_path), random_init=True)
    model = LoVTModel(image, report)
    assert n_params(image.backbone) == 23_508_032
    assert n_params(image.pool) == 16_785_408
    assert n_params(image.project_local) == n_params(image.project_global) == 5_249_536
    assert n_params(report.bert) == 108_310_272
    assert n_params(report.pool) == 2_362_368
    assert n_params(report.project_local) == 2_628_096
    assert n_params(model.cross_attention) == 788_992
    assert abs(n_params(model) - 167.5e6) < 0.05e6
    assert abs(n_params(model, trainable=True) - 102.3e6) < 0.05e6


def test_image_encoder_regions_and_torchscript():
    encoder = LoVTImageEncoder(d_z=32, hidden_dim=64).eval()
    x = torch.rand(1, 3, 224, 224)
    out = encoder(x)
    assert out["regions"].shape == (1, 49, 2048)
    assert out["z_local"].shape == (1, 49, 32) and out["z_global"].shape == (1, 32)
    torch.testing.assert_close(out["weights"].sum(-1), torch.ones(1))
    features = encoder.backbone(x)[-1]
    torch.testing.assert_close(out["regions"][:, 8], features[:, :, 1, 1])  # raster order: row 1, column 1
    scripted = torch.jit.script(encoder)
    torch.testing.assert_close(scripted(x)["z_global"], out["z_global"])


def test_sentence_max_pool_respects_boundaries_and_padding():
    hidden = torch.arange(2 * 6 * 2, dtype=torch.float).reshape(2, 6, 2)
    hidden[0, 2] = -100.0  # a very negative token must not leak into another sentence
    # sample 0: [CLS] s0 s0 s1 [SEP] pad ; sample 1: [CLS] s0 [SEP] pad pad pad
    owner = torch.tensor([[-1, 0, 0, 1, -1, -1], [-1, 0, -1, -1, -1, -1]])
    sentences, mask = sentence_max_pool(hidden, owner, 2)
    torch.testing.assert_close(sentences[0, 0], hidden[0, 1])
    torch.testing.assert_close(sentences[0, 1], hidden[0, 3])
    torch.testing.assert_close(sentences[1, 0], hidden[1, 1])
    assert torch.equal(sentences[1, 1], torch.zeros(2))
    assert mask.tolist() == [[True, True], [True, False]]


def test_frozen_layers_get_no_gradient(tiny_bert):
    encoder = LoVTReportEncoder(tiny_bert, random_init=True, frozen_layers=2, d_z=16, hidden_dim=32)
    ids = torch.randint(5, 30, (2, 7))
    owner = torch.tensor([[-1, 0, 0, 1, 1, -1, -1], [-1, 0, 0, 0, 0, 0, -1]])
    out = encoder(ids, torch.ones_like(ids), owner, 2)
    (out["z_local"].sum() + out["z_global"].sum()).backward()
    frozen = [encoder.bert.embeddings, *encoder.bert.encoder.layer[:2]]
    assert all(p.grad is None and not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in encoder.bert.encoder.layer[2].parameters())
    with pytest.raises(ValueError, match="frozen_layers"):
        encoder.freeze(9)


def test_attention_pool_ignores_padding():
    pool = AttentionPool(8, num_heads=2)
    x = torch.randn(1, 3, 8)
    pooled, weights = pool(x, torch.tensor([[True, True, False]]))
    assert weights[0, 2] == 0
    x2 = x.clone()
    x2[0, 2] = 1e3
    torch.testing.assert_close(pool(x2, torch.tensor([[True, True, False]]))[0], pooled)


def test_attention_pool_official_query_counts_padding_slots():
    """Unequal sentence counts in one batch: the official query divides by all slots, ``valid`` by the sentences."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # zero-filled padding slots, as sentence_max_pool writes them
    official = AttentionPool(8, num_heads=2).eval()
    valid = AttentionPool(8, num_heads=2, query_mean="valid").eval()
    valid.load_state_dict(official.state_dict())
    pooled, weights = official(x, mask)
    # reference: zero-filled mean over all slots (official GlobalAvgAttentionAggregator) queries the elements
    query = x.masked_fill(~mask.unsqueeze(-1), 0.0).mean(dim=1, keepdim=True)
    expected, _ = official.attention(query, x, x, key_padding_mask=~mask)
    torch.testing.assert_close(pooled, expected.squeeze(1))
    assert weights[0, 2] == 0
    # the two-sentence report alone in its batch: same under "valid", different under "official"
    alone = x[:1, :2]
    torch.testing.assert_close(valid(x, mask)[0][0], valid(alone, mask[:1, :2])[0][0])
    assert not torch.allclose(pooled[0], official(alone, mask[:1, :2])[0][0])
    torch.testing.assert_close(pooled[1], valid(x, mask)[0][1])  # full report: both agree
    with pytest.raises(ValueError, match="query_mean"):
        AttentionPool(8, query_mean="masked")


def test_cross_attention_masks_padded_sentences():
    attention = CrossAttention(16).eval()
    regions, sentences = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    mask = torch.tensor([[True, True, False]])
    b2a, a2b = attention(regions, sentences, mask)
    assert b2a.shape == (1, 4, 16) and a2b.shape == (1, 3, 16)
    changed = sentences.clone()
    changed[0, 2] = 50.0
    torch.testing.assert_close(attention(regions, changed, mask)[0], b2a)
    # padded query rows are zeroed before the output projection and BatchNorm
    expected = attention.norm(attention.output_projection(torch.zeros(1, 16)))
    torch.testing.assert_close(a2b[0, 2], expected[0])


@pytest.mark.parametrize("head", ["unet", "linear"])
def test_segnet_shapes_counts_and_torchscript(head):
    net = LoVTSegNet(head=head)
    decoder = n_params(net) - n_params(net.encoder)
    assert decoder == (124_300_609 if head == "unet" else 2048 + 1)
    small = LoVTSegNet(head=head, bridge_channels=32, decoder_channels=(32, 16, 16, 8, 8)).eval()
    x = torch.rand(1, 3, 224 if head == "linear" else 64, 224 if head == "linear" else 64)
    y = small(x)
    assert y.shape == (1, 1, *x.shape[2:])
    torch.testing.assert_close(torch.jit.script(small)(x), y)


def test_segnet_freeze_keeps_encoder_in_eval():
    net = LoVTSegNet(head="linear", freeze_encoder=True).train()
    assert not net.encoder.training and net.head.training
    assert not any(p.requires_grad for p in net.encoder.parameters())
    net.freeze_encoder(False)
    net.train()
    assert net.encoder.training and all(p.requires_grad for p in net.encoder.parameters())
    with pytest.raises(ValueError, match="head"):
        LoVTSegNet(head="yolo")
