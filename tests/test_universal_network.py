"""UniversalModel: official parameter counts and names, batched dynamic head vs the official loop, exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMergingV2

from common.networks.universal import (
    NUM_DYNAMIC_PARAMS,
    PatchMergingUniversal,
    UniversalModel,
    dynamic_head,
    split_dynamic_params,
)


def loop_reference_head(features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The official head: per sample, tile the 8-channel map over classes, three grouped 1x1x1 convs."""
    outs = []
    k = params.shape[1]
    for i in range(features.shape[0]):
        w1, w2, w3, b1, b2, b3 = split_dynamic_params(params[i])
        x = features[i : i + 1].repeat(1, k, 1, 1, 1)
        x = F.relu(F.conv3d(x, w1.reshape(k * 8, 8, 1, 1, 1), b1.reshape(-1), groups=k))
        x = F.relu(F.conv3d(x, w2.reshape(k * 8, 8, 1, 1, 1), b2.reshape(-1), groups=k))
        outs.append(F.conv3d(x, w3.reshape(k, 8, 1, 1, 1), b3.reshape(-1), groups=k))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "backbone, total, backbone_params, keys",
    [("swinunetr", 62_595_315, 62_186_610, 170), ("unet", 19_416_417, 19_073_600, 117)],
)
def test_official_parameter_counts(backbone, total, backbone_params, keys):
    net = UniversalModel(backbone=backbone)
    assert sum(p.numel() for p in net.parameters()) == total
    assert sum(p.numel() for p in net.backbone.parameters()) == backbone_params
    state = net.state_dict()
    assert len(state) == keys
    assert state["organ_embedding"].shape == (32, 512)
    assert net.controller.out_channels == NUM_DYNAMIC_PARAMS == 153
    assert not any(k.startswith("backbone.out.") for k in state)


def test_swin_head_parameter_counts():
    net = UniversalModel()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(net.controller), count(net.text_to_vision), count(net.GAP), count(net.precls_conv)) == (
        78_489,
        131_328,
        198_400,
        488,
    )


@pytest.mark.parametrize("chunk", [0, 100, 4096])
def test_batched_head_equals_loop(chunk):
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 6, 7, 5)
    params = torch.randn(2, 32, 153) * 0.5
    ref = loop_reference_head(feats, params)
    out = dynamic_head(feats, params, chunk_size=chunk)
    assert out.shape == (2, 32, 6, 7, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_head_gradients_match_loop():
    torch.manual_seed(1)
    feats = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    params = torch.randn(2, 5, 153, requires_grad=True)
    g_ref = torch.autograd.grad(loop_reference_head(feats, params).square().sum(), (feats, params))
    g_out = torch.autograd.grad(dynamic_head(feats, params, 16).square().sum(), (feats, params))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_patch_merging_official_order():
    torch.manual_seed(0)
    merge = PatchMergingUniversal(dim=3)
    x = torch.randn(1, 4, 4, 4, 3)
    order = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
    expected = merge.reduction(merge.norm(torch.cat([x[:, i::2, j::2, k::2] for i, j, k in order], -1)))
    torch.testing.assert_close(merge(x), expected)
    fixed = PatchMergingV2(dim=3)
    fixed.load_state_dict(merge.state_dict())
    assert not torch.allclose(fixed(x), merge(x))


# Smallest SwinUNETR input: divisible by 32 with more than one bottleneck voxel (instance norm).
SMALL = (32, 32, 64)


@pytest.fixture(scope="module")
def small_run():
    torch.manual_seed(0)
    net = UniversalModel(feature_size=12, head_chunk_size=1000).eval()
    x = torch.rand(1, 1, *SMALL)
    with torch.no_grad():
        neck, dec = net.backbone(x)
        out = dynamic_head(net.precls_conv(dec), net.controller_params(neck), net.head_chunk_size)
    return net, x, neck, dec, out


def test_forward_shape_and_dtype_small(small_run):
    net, x, _, _, out = small_run
    with torch.no_grad():
        full = net(x)
    assert full.shape == (1, 32, *SMALL) and full.dtype == torch.float32
    torch.testing.assert_close(full, out)


def test_forward_matches_official_loop_end_to_end(small_run):
    net, _, neck, dec, out = small_run
    with torch.no_grad():
        # official: per sample, concat[image feature tiled over classes, text feature] -> 1x1x1 conv controller
        img = net.GAP(neck)
        txt = F.relu(net.text_to_vision(net.organ_embedding))[:, :, None, None, None]
        params = net.controller(torch.cat([img.repeat(32, 1, 1, 1, 1), txt], 1)).flatten(1)[None]
        ref = loop_reference_head(net.precls_conv(dec), params)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_unet_batchnorm_uses_batch_statistics_in_eval():
    net = UniversalModel(backbone="unet").eval()
    bn = net.backbone.down_tr64.ops[0].bn1
    x = torch.randn(2, 32, 4, 4, 4) * 3 + 5
    y = bn(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3, 4)), torch.zeros(32), atol=1e-4, rtol=0)


def test_embedding_file_is_loaded_into_buffer(tmp_path):
    emb = torch.randn(32, 512, dtype=torch.float16)
    torch.save(emb, tmp_path / "txt_encoding.pth")
    net = UniversalModel(feature_size=12, embedding_file=str(tmp_path / "txt_encoding.pth"))
    torch.testing.assert_close(net.organ_embedding, emb.float())
    assert "organ_embedding" in dict(net.named_buffers())
    torch.save(torch.randn(31, 512), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        net.load_embedding(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth not found.*tools weights.*clip_embed"):
        UniversalModel(feature_size=12, embedding_file=str(tmp_path / "missing.pth"))
    with pytest.warns(UserWarning, match="RANDOM embedding"):
        UniversalModel(feature_size=12, embedding_file=str(tmp_path / "missing.pth"), allow_random_embedding=True)


def test_rand_embedding_ablation():
    net = UniversalModel(feature_size=12, encoding="rand_embedding")
    assert isinstance(net.organ_embedding, torch.nn.Embedding) and not hasattr(net, "text_to_vision")
    assert net.class_features().shape == (32, 256)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="backbone"):
        UniversalModel(backbone="dints")
    with pytest.raises(ValueError, match="patch_merging"):
        UniversalModel(patch_merging="merging")


def test_torchscript_trace_keeps_embedding_buffer(small_run):
    net, x, _, _, out = small_run
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        torch.testing.assert_close(traced(x), out, atol=1e-4, rtol=1e-4)
    assert "organ_embedding" in dict(traced.named_buffers())
