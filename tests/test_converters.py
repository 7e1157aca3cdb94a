"""Converters: official layouts built module by module as the authors' code builds them, equal outputs after
conversion, and one-line errors for truncated or non-checkpoint files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.networks.pumit import Tokenizer
from common.networks.pumit.sac import SpatialState
from common.weights.io import CheckpointError, read_checkpoint


class _ChannelLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(1, -1)


class _ChannelFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, 1)


class _Contiguous(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


class _OfficialLayerNormNd(nn.Sequential):
    """``mylib.models.layers.LayerNormNd``: Sequential(ChannelLast, LayerNorm, ChannelFirst, Contiguous)."""

    def __init__(self, channels: int) -> None:
        super().__init__(_ChannelLast(), nn.LayerNorm(channels), _ChannelFirst(), _Contiguous())


class _OfficialUpsample(nn.Module):
    """``pumit.sac.AdaptiveTransposedConvUpsample`` (isotropic input: plain 3D ops)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.transposed_conv = nn.ConvTranspose3d(c_in, c_out, 2, 2)
        self.conv = nn.Sequential(nn.Conv3d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.transposed_conv(x))


class _OfficialSimpleVQTokenizer(nn.Module):
    """``pumit.tokenizer.simple.SimpleVQTokenizer`` module tree (soft ``VectorQuantizer``), isotropic forward."""

    def __init__(self, down=(8, 16, 16), up=(8, 16, 16), num_codes=32, code_dim=16, start_stride=4) -> None:
        super().__init__()
        self.quantize = nn.Module()
        self.quantize.proj = nn.Linear(code_dim, num_codes)
        self.quantize.embedding = nn.Embedding(num_codes, code_dim)
        enc: list[nn.Module] = []
        for i, ch in enumerate(down):
            s = start_stride if i == 0 else 2
            enc += [nn.Conv3d(3 if i == 0 else down[i - 1], ch, s, s), _OfficialLayerNormNd(ch), nn.GELU()]
        enc += [nn.Conv3d(down[-1], down[-1], 3, padding=1), nn.GroupNorm(8, down[-1]), nn.LeakyReLU()]
        enc += [nn.Conv3d(down[-1], code_dim, 3, padding=1), nn.GroupNorm(8, code_dim), nn.LeakyReLU()]
        self.encoder = nn.Sequential(*enc)
        out_stride = start_stride << len(down) - 1 >> len(up) - 1
        self.decoder = nn.Sequential(
            nn.Conv3d(code_dim, up[-1], 3, padding=1),
            nn.GroupNorm(8, up[-1]),
            nn.LeakyReLU(),
            nn.Conv3d(code_dim, up[-1], 3, padding=1),
            nn.GroupNorm(8, up[-1]),
            nn.LeakyReLU(),
            *[_OfficialUpsample(up[i + 1], up[i]) for i in reversed(range(len(up) - 1))],
            nn.ConvTranspose3d(up[0], 3, out_stride, out_stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        probs = self.quantize.proj(z.movedim(1, -1)).softmax(-1)
        return self.decoder((probs @ self.quantize.embedding.weight).movedim(-1, 1))


def test_pumit_tokenizer_official_layernormnd_lightning_ckpt(tmp_path):
    from tools.converters.pumit import convert

    torch.manual_seed(0)
    official = _OfficialSimpleVQTokenizer().eval()
    sd = official.state_dict()
    assert {"encoder.1.1.weight", "encoder.4.1.bias", "encoder.7.1.weight", "decoder.6.transposed_conv.weight"} <= set(
        sd
    )
    assert sd["encoder.1.1.weight"].shape == (8,) and sd["decoder.6.conv.0.weight"].shape == (16, 16, 3, 3, 3)
    src, dst = tmp_path / "simple-soft.ckpt", tmp_path / "tokenizer.pt"
    lightning = {"epoch": 3, "global_step": 9, "state_dict": sd, "hyper_parameters": {"ckpt": tmp_path}}
    torch.save(lightning, src)  # a pathlib object in the hyper-parameters, as Lightning writes them
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        torch.load(src, weights_only=True)  # plain weights_only loading refuses the released wrapping
    kwargs = {"down_channels": (8, 16, 16), "up_channels": (8, 16, 16), "num_codes": 32, "code_dim": 16}
    convert(str(src), str(dst), network_kwargs=kwargs)
    ours = Tokenizer(**kwargs).eval()
    ours.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    x = torch.rand(1, 3, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(x, SpatialState(0)), official.encoder(x))
        torch.testing.assert_close(ours(x), official(x))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_read_checkpoint_one_line_errors(tmp_path, content):
    path = tmp_path / "model.ckpt"
    if content == "truncated":
        torch.save({"w": torch.zeros(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert ("truncated" in message) if content == "truncated" else ("empty" in message or "not a PyTorch" in message)


class _OfficialSequenceMLP(nn.Module):
    """LoVT ``SequenceMLP``: 1x1 ``Conv1d`` -> BatchNorm1d -> ReLU -> 1x1 ``Conv1d`` on (B, N, d)."""

    def __init__(self, d_in: int, d_out: int, d_hidden: int) -> None:
        super().__init__()
        self.projection_before = nn.Conv1d(d_in, d_hidden, kernel_size=1)
        self.projection_after = nn.Conv1d(d_hidden, d_out, kernel_size=1)
        self.norm = nn.BatchNorm1d(d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.projection_before(x.transpose(-1, -2))))
        return self.projection_after(h).transpose(-1, -2)


class _OfficialMLP(nn.Module):
    """LoVT ``MLP``: Linear -> BatchNorm1d -> ReLU -> Linear on (B, d)."""

    def __init__(self, d_in: int, d_out: int, d_hidden: int) -> None:
        super().__init__()
        self.projection_before = nn.Linear(d_in, d_hidden)
        self.projection_after = nn.Linear(d_hidden, d_out)
        self.norm = nn.BatchNorm1d(d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_after(torch.relu(self.norm(self.projection_before(x))))


class _OfficialScanModality(nn.Module):
    """LoVT ``ModalityModel(ScanEncoderModel)``: ``encoder.feature_extractor.backbone_layers`` (the torchvision
    ResNet50 children without avgpool/fc), ``encoder.global_aggregator.attention``, two projections."""

    def __init__(self, d_z: int, d_hidden: int) -> None:
        from monai.networks.nets import ResNetFeatures

        super().__init__()
        resnet = ResNetFeatures("resnet50", pretrained=False, spatial_dims=2, in_channels=3)
        self.encoder = nn.Module()
        self.encoder.feature_extractor = nn.Module()
        self.encoder.feature_extractor.backbone_layers = nn.ModuleDict(list(resnet.named_children())[:-1])
        self.encoder.global_aggregator = nn.Module()
        self.encoder.global_aggregator.attention = nn.MultiheadAttention(2048, 8, batch_first=True)
        self.project_local = _OfficialSequenceMLP(2048, d_z, d_hidden)
        self.project_global = _OfficialMLP(2048, d_z, d_hidden)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for layer in self.encoder.feature_extractor.backbone_layers.values():
            x = layer(x)
        regions = x.flatten(2).transpose(1, 2)
        query = regions.mean(dim=1, keepdim=True)
        pooled = self.encoder.global_aggregator.attention(query, regions, regions)[0].squeeze(1)
        return {"z_local": self.project_local(regions), "z_global": self.project_global(pooled), "global": pooled}


def test_lovt_official_layout_to_image_encoder_and_backbone(tmp_path):
    from common.networks.lovt import LoVTImageEncoder
    from common.weights.lovt import extract_lovt_image_encoder
    from tools.converters.lovt import convert

    torch.manual_seed(0)
    official = nn.Module()
    official.model_a = _OfficialScanModality(d_z=16, d_hidden=32)
    for bn in [m for m in official.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    official.eval()
    sd = official.state_dict()
    assert sd["model_a.encoder.feature_extractor.backbone_layers.layer4.2.bn3.running_var"].shape == (2048,)
    assert sd["model_a.project_local.projection_before.weight"].shape == (32, 2048, 1)  # Conv1d, kernel 1
    assert sd["model_a.project_global.projection_before.weight"].shape == (32, 2048)
    assert "model_a.encoder.global_aggregator.attention.in_proj_weight" in sd
    sd["model_b.encoder.transformer.embeddings.word_embeddings.weight"] = torch.zeros(4, 4)  # report side: dropped
    src = tmp_path / "lovt.ckpt"
    torch.save({"state_dict": sd, "epoch": 1, "hyper_parameters": {"dataset": tmp_path}}, src)

    dst = tmp_path / "image_encoder.pt"
    convert(str(src), str(dst), d_z=16, hidden_dim=32)
    ours = LoVTImageEncoder(d_z=16, hidden_dim=32).eval()
    ours.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = official.model_a(x), ours(x)
    for key in ("global", "z_local", "z_global"):
        torch.testing.assert_close(got[key], expected[key])

    backbone = extract_lovt_image_encoder(str(src))
    assert set(backbone) == set(ours.backbone.state_dict())
    with pytest.raises(FileExistsError):
        convert(str(src), str(dst))


@pytest.mark.parametrize("name", ["lovt", "lvit", "pumit", "unetr", "universal"])
@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_every_converter_reports_bad_files_in_one_line(tmp_path, name, damage):
    from tools.__main__ import Tools

    src, dst = tmp_path / "official.ckpt", tmp_path / "model.pt"
    if damage == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(64)}}, src)
        src.write_bytes(src.read_bytes()[:200])
    else:
        src.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError) as info:
        Tools().convert(name, str(src), str(dst))
    assert str(info.value).startswith(str(src)) and "\n" not in str(info.value)
    assert not dst.exists()


def test_cli_prints_one_line_instead_of_a_traceback(tmp_path, monkeypatch):
    from tools.__main__ import main

    src = tmp_path / "download.pth"
    src.write_text("<html>Access denied</html>")
    monkeypatch.setattr("sys.argv", ["tools", "convert", "unetr", str(src), str(tmp_path / "model.pt")])
    with pytest.raises(SystemExit) as info:
        main()
    assert str(info.value) == f"error: {src}: not a PyTorch checkpoint (no zip archive; starts with b'<htm')."
