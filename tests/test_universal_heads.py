"""Universal Model dynamic heads: few large ops per forward, outputs equal to the previous per-sample version."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.networks.universal import dynamic_head, split_dynamic_params


def per_sample_head(features: torch.Tensor, params: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The previous implementation: one addmm / two baddbmm per sample and chunk, copied into the output."""
    b, c = features.shape[:2]
    k = params.shape[1]
    w1, w2, w3, b1, b2, b3 = split_dynamic_params(params)
    flat = features.reshape(b, c, -1)
    n = flat.shape[-1]
    out = features.new_empty(b, k, n)
    for i in range(b):
        for start in range(0, n, chunk_size):
            x = flat[i, :, start : start + chunk_size]
            h = torch.addmm(b1[i].reshape(k * c, 1), w1[i].reshape(k * c, c), x).relu_().reshape(k, c, -1)
            h = torch.baddbmm(b2[i][..., None], w2[i], h).relu_()
            out[i, :, start : start + chunk_size] = torch.baddbmm(b3[i][..., None], w3[i], h)[:, 0]
    return out.reshape(b, k, *features.shape[2:])


class _CountOps(TorchDispatchMode):
    """Counts the ops that touch data (views and splits are free)."""

    COMPUTE = ("addmm", "baddbmm", "bmm", "mm", "relu", "relu_", "copy_", "cat", "stack", "add", "add_")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.COMPUTE
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [64, 1000, 0])
def test_heads_equal_previous_implementation(chunk):
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 10, 12, 9)
    params = torch.randn(2, 32, 153) * 0.5
    with torch.no_grad():
        expected = per_sample_head(feats, params, chunk or feats[0, 0].numel())
        assert torch.equal(dynamic_head(feats, params, chunk), expected)
    assert torch.equal(dynamic_head(feats, params, chunk).detach(), expected)  # autograd path (concatenated)


def test_heads_run_five_ops_per_chunk_whatever_the_batch():
    torch.manual_seed(0)
    params = torch.randn(4, 32, 153)
    counts = {}
    for b in (1, 4):
        feats = torch.randn(b, 8, 16, 16, 16)
        with torch.no_grad(), _CountOps() as ops:
            dynamic_head(feats, params[:b], chunk_size=1024)
        counts[b] = ops.count
    assert counts[1] == counts[4]  # samples ride in the matmuls' batch, not in a Python loop
    assert counts[1] == 5 * (16**3 // 1024)  # 3 matmuls + 2 ReLUs per chunk, written in place
