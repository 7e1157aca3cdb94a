"""``python -m tools benchmark pumit``: SAC conv vs plain conv, ViT-B forward / MIM train step, tokenizer forward.

SAC rows compare an adaptive conv with a plain conv producing the same output shape (target: within
1.2x): a 3^3 conv on an isotropic volume (DA 0), the same weights on a thick-slice volume (DA 2,
collapsed to 1x3x3) and a 16^3 patch embedding on a 2D image (DA 5, collapsed to 16x16). Each phase runs
in its own process (peak RSS per phase), fp32 and bf16 autocast.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from common.losses.pumit import MIMLoss
from common.networks.pumit import ANISO_D_2D, InflatableConv3d, SpatialState, Tokenizer, ViTForMIM, vit_b
from tools.benchmarks._harness import (
    PEAK_GFLOPS,
    autocast,
    count_flops,
    median_seconds,
    print_table,
    run_phase_subprocess,
)

MODULE = "tools.benchmarks.pumit"

# name: (in, out, kernel, stride, padding, input D x H x W, aniso_d, plain conv kernel / stride / padding, 2D?)
SAC_CASES = {
    "3^3 conv 64ch, 32x64^2, DA 0": (64, 64, 3, 1, 1, (32, 64, 64), 0, (3, 1, 1), False),
    "3^3 conv 64ch, 8x64^2, DA 2": (64, 64, 3, 1, 1, (8, 64, 64), 2, ((1, 3, 3), 1, (0, 1, 1)), False),
    "16^3 patch embed, 2D 224^2, DA 5": (3, 768, 16, 16, 0, (1, 224, 224), ANISO_D_2D, (16, 16, 0), True),
}


def sac(case: str, dtype: str, repeats: int = 20) -> dict:
    ci, co, k, s, p, shape, da, plain_args, is_2d = SAC_CASES[case]
    torch.manual_seed(0)
    conv = InflatableConv3d(ci, co, k, stride=s, padding=p).eval()
    plain = (nn.Conv2d if is_2d else nn.Conv3d)(ci, co, *plain_args).eval()
    x = torch.rand(1, ci, *shape)
    x_plain = x[:, :, 0] if is_2d else x

    def run_sac():
        with torch.no_grad(), autocast(dtype):
            conv(x, SpatialState(da))

    def run_plain():
        with torch.no_grad(), autocast(dtype):
            plain(x_plain)

    flops = count_flops(run_plain)
    t_sac = median_seconds(run_sac, warmup=3, repeats=repeats)
    t_plain = median_seconds(run_plain, warmup=3, repeats=repeats)
    return {"seconds": t_sac, "plain_seconds": t_plain, "gflops": flops / 1e9}


def vit_forward(dtype: str, shape: tuple = (80, 160, 160), aniso_d: int = 0, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    net = vit_b().eval()
    x = torch.rand(1, 3, *shape)

    def step():
        with torch.no_grad(), autocast(dtype):
            net(x, aniso_d)

    flops = count_flops(step)
    return {"seconds": median_seconds(step, repeats=repeats), "gflops": flops / 1e9}


def tokenizer_forward(dtype: str, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    net = Tokenizer().eval()
    x = torch.rand(1, 3, 64, 128, 128) * 2 - 1

    def step():
        with torch.no_grad(), autocast(dtype):
            net(x, 0)

    flops = count_flops(step)
    return {"seconds": median_seconds(step, repeats=repeats), "gflops": flops / 1e9}


def mim_step(dtype: str, batch: int = 1, repeats: int = 2) -> dict:
    torch.manual_seed(0)
    net = ViTForMIM(vit_b(), Tokenizer()).train()
    loss_fn = MIMLoss()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.05)
    x = torch.rand(batch, 3, 80, 160, 160)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(dtype):
            loss = loss_fn(net(x, 0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        optimizer.step()

    flops = count_flops(step)
    return {"seconds": median_seconds(step, repeats=repeats), "gflops": flops / 1e9}


def main(
    threads: int = 2, keep_heap: bool = True, dtypes: str = "float32,bfloat16", out: str | None = None
) -> list[dict]:
    dtype_list = list(dtypes) if isinstance(dtypes, (list, tuple)) else [d.strip() for d in str(dtypes).split(",")]
    opts = {"threads": threads, "keep_heap": keep_heap}
    rows = []
    for case in SAC_CASES:
        for dtype in dtype_list:
            r = run_phase_subprocess(MODULE, "sac", case=case, dtype=dtype, **opts)
            rows.append({"phase": f"SAC {case}", "dtype": dtype, "vs plain": r["seconds"] / r["plain_seconds"], **r})
            print(json.dumps(rows[-1]), flush=True)
    phases = [
        ("vit_forward", "ViT-B forward 1x3x80x160^2 (5x10^2 tokens)", {}),
        ("vit_forward", "ViT-B forward 2D 1x3x1x224^2", {"shape": (1, 224, 224), "aniso_d": ANISO_D_2D}),
        ("tokenizer_forward", "tokenizer forward 1x3x64x128^2", {}),
        ("mim_step", "MIM train step b1 80x160^2", {}),
    ]
    for phase, label, kw in phases:
        for dtype in dtype_list:
            r = run_phase_subprocess(MODULE, phase, dtype=dtype, **kw, **opts)
            rows.append({"phase": label, "dtype": dtype, **r})
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["GFLOP/s"] = r["gflops"] / r["seconds"]
        r["% of peak"] = 100.0 * r["GFLOP/s"] / PEAK_GFLOPS[r["dtype"]]
    print_table(
        f"PUMIT benchmark (keep_heap={keep_heap})",
        rows,
        ["phase", "dtype", "seconds", "plain_seconds", "vs plain", "gflops", "GFLOP/s", "% of peak", "peak_rss_gb"],
    )
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
