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
