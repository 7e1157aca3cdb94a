"""LViT network: parameter counts, shapes, input checks, official-name loading, TorchScript/ONNX export."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from common.networks.lvit import LViT, UNetBaseline
from common.weights.lvit import load_lvit_from_unet, load_lvit_official
from tools.converters.lvit import convert

SMALL = {"img_size": 64, "base_channels": 8, "text_dim": 32}


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _official_dead_modules() -> dict[str, nn.Module]:
    """The modules the official LViT builds but never calls, at their official names and shapes."""
    from common.networks.lvit import ConvTransBN, Embeddings, PixLevelModule

    dead: dict[str, nn.Module] = {}
    for i, c in enumerate((64, 128, 256, 512), start=1):
        dead[f"pix_module{i}"] = PixLevelModule(c)
        dead[f"pix_module{i}.conv_sig"] = nn.Sequential(nn.Conv2d(c, c, 1))
        dead[f"up{i}.pixModule.conv_sig"] = nn.Sequential(nn.Conv2d(c, c, 1))
    for name, c, patch in (("", 64, 16), ("1", 128, 8), ("2", 256, 4), ("3", 512, 2)):
        for side in ("down", "up"):
            dead[f"{side}Vit{name}.head"] = nn.Linear(c, 1)
            dead[f"{side}Vit{name}.norm"] = nn.LayerNorm(c)
        dead[f"upVit{name}.embeddings"] = Embeddings(c, patch, 196)
        dead[f"upVit{name}.CTBN"] = ConvTransBN(c, c // 2)
        dead[f"upVit{name}.CTBN3"] = ConvTransBN(10, 196)
        if name:
            dead[f"downVit{name}.CTBN2"] = ConvTransBN(2 * c, c)
            dead[f"downVit{name}.CTBN3"] = ConvTransBN(10, 196)
    dead["upVit3.CTBN2"] = ConvTransBN(1024, 512)
    dead["downVit.CTBN"] = ConvTransBN(64, 32)
    dead["downVit.CTBN2"] = ConvTransBN(128, 64)
    return dead


def _official_state_dict(model: LViT) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    for prefix, module in _official_dead_modules().items():
        sd.update({f"{prefix}.{k}": torch.randn_like(v.float()).to(v.dtype) for k, v in module.state_dict().items()})
    return sd


def test_parameter_count_default():
    assert _count(LViT()) == 29_908_033
    pos = sum(p.numel() for n, p in LViT().named_parameters() if "position_embeddings" in n)
    assert _count(LViT()) - pos == 29_719_873  # thop's "29.7M"


def test_official_dead_modules_account_for_the_official_total():
    dead = _official_dead_modules()
    dead_params = sum(_count(m) for m in dead.values())
    assert dead_params == 10_025_312
    assert _count(LViT()) + dead_params == 39_933_345
    assert len(_official_state_dict(LViT())) == 541


def test_load_official_drops_dead_keys_and_matches_outputs(tmp_path):
    torch.manual_seed(0)
    src = LViT().eval()
    official = _official_state_dict(src)
    dst = LViT().eval()
    dropped = load_lvit_official(dst, {"state_dict": {f"module.{k}": v for k, v in official.items()}})
    assert len(dropped) == 541 - len(src.state_dict())
    x, t = torch.rand(1, 3, 224, 224), torch.rand(1, 10, 768)
    with torch.no_grad():
        assert torch.equal(src(x, t), dst(x, t))
    torch.save({"state_dict": official, "epoch": 3}, tmp_path / "official.pth.tar")
    convert(str(tmp_path / "official.pth.tar"), str(tmp_path / "model.pt"))
    converted = torch.load(tmp_path / "model.pt", weights_only=True)
    assert converted.keys() == src.state_dict().keys()


def test_load_official_rejects_unknown_keys():
    sd = dict(LViT(**SMALL).state_dict())
    sd["not_a_module.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError):
        load_lvit_official(LViT(**SMALL), sd)


def test_shapes_and_text_checks():
    model = LViT().eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224), torch.rand(1, 10, 768))
    assert out.shape == (1, 1, 224, 224)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    for n_tokens in (5, 14, 20):
        with pytest.raises(ValueError, match="10 tokens"):
            model(torch.rand(1, 3, 224, 224), torch.rand(1, n_tokens, 768))
    with pytest.raises(ValueError, match="224"):
        model(torch.rand(1, 3, 192, 192), torch.rand(1, 10, 768))


def test_vit_levels_have_196_tokens_and_official_widths():
    model = LViT()
    widths = [model.downVit.embeddings.position_embeddings.shape, model.downVit3.embeddings.position_embeddings.shape]
    assert widths == [torch.Size([1, 196, 64]), torch.Size([1, 196, 512])]
    heads = [
        (m.Encoder_blocks[0].attn.num_heads, m.Encoder_blocks[0].norm1.normalized_shape[0])
        for m in (model.downVit, model.downVit1, model.downVit2, model.downVit3)
    ]
    assert [c // h for h, c in heads] == [8, 16, 32, 64]


def test_multiclass_returns_logits_and_without_text_ignores_text():
    torch.manual_seed(0)
    logits = LViT(n_classes=3, **SMALL).eval()(torch.rand(1, 3, 64, 64), torch.rand(1, 10, 32))
    assert logits.shape == (1, 3, 64, 64) and (logits.min() < 0 or logits.max() > 1)
    no_text = LViT(use_text=False, **SMALL).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(no_text(x, torch.rand(1, 10, 32)), no_text(x, torch.rand(1, 10, 32)))
        assert torch.equal(no_text(x, None), no_text(x, torch.rand(1, 10, 32)))
    with pytest.raises(TypeError, match="--use_text False"):
        LViT(use_text="false", **SMALL)


def test_unet_baseline_and_pretrain_transfer():
    unet = UNetBaseline()
    assert _count(unet) == 14_751_873
    copied = load_lvit_from_unet(LViT(), unet.state_dict())
    assert len(copied) == 121 and len(unet.state_dict()) == 129


def test_torchscript_and_onnx_match_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = LViT(**SMALL).eval()
    x, t = torch.rand(2, 3, 64, 64), torch.rand(2, 10, 32)
    with torch.no_grad():
        ref = model(x, t)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x, t), ref, atol=1e-5)
    path = str(tmp_path / "lvit.onnx")
    torch.onnx.export(model, (x, t), path, input_names=["image", "text"], output_names=["pred"], dynamo=False)
    out = ort.InferenceSession(path).run(None, {"image": x.numpy(), "text": t.numpy()})[0]
    assert abs(out - ref.numpy()).max() < 1e-4


PARITY_FIXTURE = os.environ.get("LVIT_PARITY_FIXTURE", "tests/assets/lvit_parity_seed0.pt")


@pytest.mark.skipif(not os.path.isfile(PARITY_FIXTURE), reason="162 MB parity fixture (large_files.yml) not present")
def test_parity_fixture():
    fx = torch.load(PARITY_FIXTURE, weights_only=True)
    model = LViT().eval()
    load_lvit_official(model, fx["state_dict"])
    with torch.no_grad():
        out = model(fx["x"], fx["text"])
    assert abs(float(out.mean()) - 0.502762) < 1e-5
