"""PUMIT networks: SAC semantics, token grids, parameter counts, RoPE, MIM masking, downstream shapes."""

import copy

import pytest
import torch
from torch.nn import functional as F

from common.networks.pumit import (
    ANISO_D_2D,
    InflatableConv3d,
    InflatableTransposedConv3d,
    SpatialState,
    Tokenizer,
    ViT,
    ViTClassifier,
    ViTForMIM,
    ViTSegmenter,
    aniso_d_from_spacing,
    vit_b,
)
from common.networks.pumit.rope import SpatialRotaryEmbedding, apply_rope


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_tokenizer(**kw) -> Tokenizer:
    return Tokenizer(down_channels=(8, 8, 16), up_channels=(8, 8, 16), num_codes=32, code_dim=16, **kw)


def tiny_vit(**kw) -> ViT:
    kw.setdefault("pos_embed_shape", (2, 4, 4))
    return ViT(embed_dim=32, depth=2, num_heads=2, **kw)


@pytest.mark.parametrize(
    "spacing, expected",
    [((1.0, 1.0, 1.0), 0), ((2.0, 1.0, 1.0), 1), ((5.0, 0.7, 0.8), 2), ((1e8, 1.0, 1.0), ANISO_D_2D), ((64, 1, 1), 5)],
)
def test_aniso_d_from_spacing(spacing, expected):
    assert aniso_d_from_spacing(spacing) == expected


def test_aniso_d_validation_rule_and_errors():
    assert aniso_d_from_spacing((64.0, 1.0, 1.0), validation=True) == 6  # unclipped
    assert aniso_d_from_spacing((0.5, 1.0, 1.0)) == 0  # clipped at r = 1
    with pytest.raises(ValueError, match="positive"):
        aniso_d_from_spacing((0.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "depth, aniso_d, grid",
    [
        (80, 0, (5, 10, 10)),
        (40, 1, (5, 10, 10)),
        (20, 2, (5, 10, 10)),
        (10, 3, (5, 10, 10)),
        (5, 4, (5, 10, 10)),
        (1, 4, (1, 10, 10)),
        (1, 5, (1, 10, 10)),
        (1, 6, (1, 10, 10)),
    ],
)
def test_patch_embed_token_grid(depth, aniso_d, grid):
    conv = InflatableConv3d(1, 2, 16, stride=16)
    with torch.no_grad():
        assert tuple(conv(torch.zeros(1, 1, depth, 160, 160), SpatialState(aniso_d)).shape[2:]) == grid


@pytest.mark.parametrize("aniso_d", [0, 3])
def test_patch_embed_2d_invalid_aniso_d(aniso_d):
    conv = InflatableConv3d(1, 2, 16, stride=16)
    with pytest.raises(ValueError, match="aniso_d"):
        conv(torch.zeros(1, 1, 1, 160, 160), SpatialState(aniso_d))


def test_2d_patch_embed_equals_conv2d_with_depth_summed_kernel():
    torch.manual_seed(0)
    conv = InflatableConv3d(3, 8, 16, stride=16)
    x = torch.randn(2, 3, 1, 64, 64)
    with torch.no_grad():
        y = conv(x, SpatialState(ANISO_D_2D))[:, :, 0]
        ref = F.conv2d(x[:, :, 0], conv.weight.sum(dim=2), conv.bias, stride=16)
    assert torch.equal(y, ref)


def test_2d_image_through_3d_tokenizer_equals_2d_computation():
    """The whole SAC tokenizer on a depth-1 image equals the same layers run as 2D convs with summed kernels."""
    torch.manual_seed(0)
    tok = tiny_tokenizer().eval()
    x = torch.randn(1, 3, 1, 32, 32)
    with torch.no_grad():
        z3 = tok.encoder(x, SpatialState(ANISO_D_2D))[:, :, 0]
        h = x[:, :, 0]
        for m in tok.encoder:
            if isinstance(m, InflatableConv3d):
                h = F.conv2d(h, m.weight.sum(dim=2), m.bias, m.stride[1:], m.padding[1:])
            else:
                h = m(h)
    torch.testing.assert_close(z3, h, rtol=0, atol=1e-5)


def test_anisotropic_depth_collapsed_kernel_equals_explicit_sum():
    """At DA 2 a stride-4 kernel-4 conv group-sums depth taps (1); a 3^3 conv with pending downsamples sums all."""
    torch.manual_seed(0)
    conv = InflatableConv3d(2, 3, 4, stride=4)
    x = torch.randn(1, 2, 8, 16, 16)
    with torch.no_grad():
        y = conv(x, SpatialState(aniso_d=1))  # p = 1 -> s_d = 2: two groups of two taps
        w = conv.weight
        w_explicit = torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2] + w[:, :, 3]], dim=2)
        ref = F.conv3d(x, w_explicit, conv.bias, stride=(2, 4, 4))
        torch.testing.assert_close(y, ref)
        conv3 = InflatableConv3d(2, 3, 3, padding=1)
        st = SpatialState(aniso_d=3, num_downsamples=1)
        y3 = conv3(x, st)
        ref3 = F.conv3d(
            x,
            conv3.weight[:, :, 0:1] + conv3.weight[:, :, 1:2] + conv3.weight[:, :, 2:3],
            conv3.bias,
            padding=(0, 1, 1),
        )
        torch.testing.assert_close(y3, ref3)
        assert st.num_downsamples == 1


def test_transposed_conv_depth_stride_follows_remaining_upsamples():
    convt = InflatableTransposedConv3d(4, 2, 4)
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.no_grad():
        st = SpatialState(aniso_d=3, num_downsamples=4)  # one depth upsample left -> depth stride 2
        y = convt(x, st)
        assert tuple(y.shape[2:]) == (6, 20, 20) and st.num_downsamples == 2
        w = convt.weight
        ref = F.conv_transpose3d(
            x, torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2] + w[:, :, 3]], 2), convt.bias, stride=(2, 4, 4)
        )
        torch.testing.assert_close(y, ref)


def test_collapsed_kernel_cache_invalidated_by_weight_update():
    conv = InflatableConv3d(1, 1, 3, padding=1).eval()
    x = torch.randn(1, 1, 2, 8, 8)
    with torch.no_grad():
        y1 = conv(x, SpatialState(5))
        conv.weight.add_(1.0)
        y2 = conv(x, SpatialState(5))
    assert not torch.allclose(y1, y2)
    assert len(conv._cache.entries) == 1


def test_paper_parameter_counts():
    tok = Tokenizer()
    assert n_params(tok) == 34_253_955
    assert (n_params(tok.encoder), n_params(tok.decoder), n_params(tok.quantize)) == (15_496_832, 17_707_523, 1_049_600)
    vit = vit_b()
    assert n_params(vit) == 94_930_944
    assert n_params(vit.patch_embed) == 9_437_952 and vit.pos_embed.numel() == 384_000
    assert n_params(vit.blocks[0]) == 7_092_224
    mim = ViTForMIM(vit, tok)
    assert n_params(mim.mim_head) == 1_378_048
    assert "tokenizer.quantize.proj.weight" not in mim.state_dict()


def test_rope_matches_formula():
    rope = SpatialRotaryEmbedding(8, (2333.0, 10000.0, 10000.0))
    cos, sin = rope((2, 3, 4))
    assert cos.shape == (24, 8)
    idx = 1 * 12 + 2 * 4 + 3  # d=1, h=2, w=3
    half = 4
    theta = []
    for k in range(2):  # h half
        theta.append(2 * 10000.0 ** (-2 * k / half) + 1 * 2333.0 ** (-(2 * k + 1) / half))
    for k in range(2):  # w half
        theta.append(3 * 10000.0 ** (-2 * k / half) + 1 * 2333.0 ** (-(2 * k + 1) / half))
    expected = torch.tensor(theta).repeat_interleave(2)
    torch.testing.assert_close(cos[idx], expected.cos())
    x = torch.randn(24, 8)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


def test_tokenizer_forward_3d_and_2d():
    tok = tiny_tokenizer()
    out = tok(torch.randn(2, 3, 16, 32, 32), aniso_d=0)
    assert out["pred"].shape == (2, 3, 16, 32, 32) and out["logits"].shape == (2, 1, 2, 2, 32)
    tok.eval()
    with torch.no_grad():
        assert tok(torch.randn(1, 3, 4, 32, 32), aniso_d=2).shape == (1, 3, 4, 32, 32)
        assert tok(torch.randn(1, 3, 1, 32, 32), aniso_d=ANISO_D_2D).shape == (1, 3, 1, 32, 32)
        q = tok.tokenize(torch.randn(1, 3, 16, 32, 32))
        torch.testing.assert_close(q.z_q.movedim(1, -1), q.logits.softmax(-1) @ tok.quantize.embedding.weight)


def test_mim_masks_55_percent_and_targets_are_soft_tokens():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    mim = ViTForMIM(tiny_vit(), tok)
    x = torch.rand(2, 1, 32, 64, 64)  # 2 x 4 x 4 = 32 tokens per image -> int(32 * 0.45) = 14 visible
    out = mim(x, aniso_d=0)
    assert mim.num_visible(32) == 14 and mim.num_visible(500) == 225
    assert out["pred"].shape == (2 * (32 - 14), 32)
    torch.testing.assert_close(out["target"].sum(-1), torch.ones(36))
    assert not tok.training and all(not p.requires_grad for p in tok.parameters())
    out["pred"].sum().backward()
    assert mim.mask_token.grad is not None and tok.quantize.proj.weight.grad is None


def test_mim_visible_only_layers_run():
    mim = ViTForMIM(tiny_vit(), tiny_tokenizer(), mask_layer_ids=[1])
    out = mim(torch.rand(1, 3, 16, 64, 64), aniso_d=0)
    assert out["pred"].shape[0] == 16 - int(16 * 0.45) and torch.isfinite(out["pred"]).all()


def test_segmenter_shapes_and_eval_returns_single_tensor():
    vit = tiny_vit(in_channels=1, patch_size=(4, 16, 16), adaptive_patch_embed=False, pos_embed_shape=(3, 3, 3))
    net = ViTSegmenter(
        vit, num_classes=3, out_indexes=(0, 1, 1, 1), decoder_channels=(16, 16, 16, 16), full_res_channels=(8, 8, 16)
    )
    x = torch.rand(1, 1, 8, 32, 32)
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(1, 3, 8, 32, 32), (1, 3, 8, 16, 16), (1, 3, 8, 8, 8), (1, 3, 4, 4, 4)]
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 3, 8, 32, 32)


def test_segmenter_grad_ckpt_keeps_gradients_and_stores_less():
    vit = tiny_vit(in_channels=1, patch_size=(4, 16, 16), adaptive_patch_embed=False, pos_embed_shape=(3, 3, 3))
    plain = ViTSegmenter(
        vit, num_classes=3, out_indexes=(0, 1, 1, 1), decoder_channels=(16, 16, 16, 16), full_res_channels=(8, 8, 16)
    )
    ckpt = copy.deepcopy(plain)
    ckpt.grad_ckpt = True
    x = torch.rand(1, 1, 8, 32, 32)
    saved = {}
    for name, net in (("plain", plain), ("ckpt", ckpt)):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sum(o.square().mean() for o in net(x))
        loss.backward()
        saved[name] = sum(sizes)
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
    assert saved["ckpt"] < 0.5 * saved["plain"], saved


def test_classifier_uses_cls_token():
    net = ViTClassifier(tiny_vit(in_channels=1, adaptive_patch_embed=False), num_classes=5)
    assert net(torch.rand(2, 1, 32, 32, 32)).shape == (2, 5)


def test_pos_embed_resampled_on_load(caplog):
    src = tiny_vit(pos_embed_shape=(2, 4, 4))
    dst = tiny_vit(pos_embed_shape=(3, 3, 3))
    with caplog.at_level("INFO"):
        dst.load_state_dict(src.state_dict())
    assert "(2, 4, 4) -> (3, 3, 3)" in caplog.text
