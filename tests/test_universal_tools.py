"""Universal Model tools: released-checkpoint converter and CLIP class embeddings (tiny local CLIP)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from common.networks.universal import UniversalModel, load_class_embedding
from common.text.clip_embed import PROMPT, compute_class_embeddings, embedding_sha256, save_class_embeddings
from common.weights.universal import official_state_dict
from tools.converters.universal import convert


def test_convert_official_layout_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    official = UniversalModel(backbone="unet").eval()
    ckpt = {"epoch": 400, "net": {"module." + k: v for k, v in official.state_dict().items()}, "optimizer": {}}
    torch.save(ckpt, tmp_path / "clip_driven_universal_unet.pth")
    convert(str(tmp_path / "clip_driven_universal_unet.pth"), str(tmp_path / "model.pt"), backbone="unet")
    ours = UniversalModel(backbone="unet").eval()
    ours.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), official(x))


def test_converter_errors_name_the_problem(tmp_path):
    torch.save({"net": {"module.foo": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="bad.pth"):
        official_state_dict(str(tmp_path / "bad.pth"))
    state = {"module." + k: v for k, v in UniversalModel(backbone="unet").state_dict().items()}
    torch.save({"net": state}, tmp_path / "unet.pth")
    with pytest.raises(KeyError, match="missing"):
        convert(str(tmp_path / "unet.pth"), str(tmp_path / "out.pt"), backbone="swinunetr", feature_size=12)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        official_state_dict(str(tmp_path / "nope.pth"))


class _CharTokenizer:
    """Minimal tokenizer: characters -> ids, end-of-text as the largest id (CLIP pools there)."""

    def __call__(self, texts, padding=True, return_tensors="pt"):
        ids = [[2 + (ord(c) % 90) for c in t] + [99] for t in texts]
        n = max(map(len, ids))
        input_ids = torch.tensor([i + [0] * (n - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])
        return {"input_ids": input_ids, "attention_mask": mask}


def _tiny_clip() -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        projection_dim=512,
        eos_token_id=99,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def test_class_embeddings_from_tiny_clip(tmp_path):
    model, tok = _tiny_clip(), _CharTokenizer()
    emb = compute_class_embeddings(model, tok)
    assert emb.shape == (32, 512) and not torch.allclose(emb[0], emb[1])
    single = compute_class_embeddings(model, tok, names=["Liver"])
    torch.testing.assert_close(single[0], emb[5], atol=1e-5, rtol=1e-5)  # padding does not change a row
    digest = save_class_embeddings(str(tmp_path / "txt_encoding.pth"), model_name="tiny", model=model, tokenizer=tok)
    saved = torch.load(tmp_path / "txt_encoding.pth", weights_only=True)
    assert saved["sha256"] == digest == embedding_sha256(saved["embedding"]) and saved["prompt"] == PROMPT
    assert saved["embedding"].dtype == torch.float16
    net = UniversalModel(feature_size=12, embedding_file=str(tmp_path / "txt_encoding.pth"))
    torch.testing.assert_close(net.organ_embedding, load_class_embedding(tmp_path / "txt_encoding.pth"))
    assert embedding_sha256(emb) != embedding_sha256(emb + 1e-3)
