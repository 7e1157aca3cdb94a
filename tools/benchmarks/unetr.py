"""``python -m tools benchmark unetr``: UNETR (paper config) forward, train step and sliding window.

Each phase runs in its own process (peak RSS per phase), fp32 and bf16 autocast, with the heap kept
between allocations unless ``--keep_heap False``. Achieved GFLOP/s are compared with the machine's
measured matmul peaks. ``--sw_shape`` is the sliding-window volume (default 1x1x160x160x128).
"""

from __future__ import annotations

import json

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNETR

from tools.benchmarks._harness import (
    PEAK_GFLOPS,
    autocast,
    count_flops,
    median_seconds,
    print_table,
    run_phase_subprocess,
)

MODULE = "tools.benchmarks.unetr"


def build_unetr() -> UNETR:
    torch.manual_seed(0)
    return UNETR(1, 14, (96, 96, 96), feature_size=16, proj_type="perceptron", norm_name="instance", res_block=True)


def forward(dtype: str, repeats: int = 3) -> dict:
    net = build_unetr().eval()
    x = torch.rand(1, 1, 96, 96, 96)

    def step():
        with torch.no_grad(), autocast(dtype):
            net(x)

    flops = count_flops(step)
    seconds = median_seconds(step, repeats=repeats)
    return {"seconds": seconds, "gflops": flops / 1e9}


def train_step(dtype: str, repeats: int = 3) -> dict:
    net = build_unetr().train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    x, y = torch.rand(1, 1, 96, 96, 96), torch.randint(0, 14, (1, 1, 96, 96, 96))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(dtype):
            out = net(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        optimizer.step()

    flops = count_flops(step)
    return {"seconds": median_seconds(step, repeats=repeats), "gflops": flops / 1e9}


def sliding_window(dtype: str, sw_shape: tuple = (160, 160, 128), sw_batch_size: int = 4, repeats: int = 1) -> dict:
    net = build_unetr().eval()
    torch.manual_seed(1)
    x = torch.rand(1, 1, *sw_shape)
    result = {}

    def step():
        with torch.no_grad(), autocast(dtype):
            result["out"] = sliding_window_inference(x, (96, 96, 96), sw_batch_size, net, overlap=0.5)

    flops = count_flops(step)
    seconds = median_seconds(step, warmup=1, repeats=repeats)
    labels = result["out"].float().argmax(1)
    torch.save(labels.to(torch.uint8), f"/tmp/unetr_sw_{dtype}.pt")
    return {"seconds": seconds, "gflops": flops / 1e9}


def main(threads: int = 2, keep_heap: bool = True, sw_shape: str = "160,160,128", out: str | None = None) -> list[dict]:
    shape = tuple(int(s) for s in str(sw_shape).strip("()[]").split(","))
    rows = []
    for phase, label in (("forward", "forward 1x1x96^3"), ("train_step", "train step b1 96^3")):
        for dtype in ("float32", "bfloat16"):
            r = run_phase_subprocess(MODULE, phase, dtype=dtype, threads=threads, keep_heap=keep_heap)
            rows.append({"phase": label, "dtype": dtype, **r})
    for dtype in ("float32", "bfloat16"):
        r = run_phase_subprocess(
            MODULE, "sliding_window", dtype=dtype, sw_shape=shape, threads=threads, keep_heap=keep_heap
        )
        rows.append({"phase": f"sliding window {'x'.join(map(str, shape))}", "dtype": dtype, **r})
    fp32, bf16 = torch.load("/tmp/unetr_sw_float32.pt"), torch.load("/tmp/unetr_sw_bfloat16.pt")
    agreement = float((fp32 == bf16).float().mean())
    for r in rows:
        r["GFLOP/s"] = r["gflops"] / r["seconds"]
        r["% of peak"] = 100.0 * r["GFLOP/s"] / PEAK_GFLOPS[r["dtype"]]
    print_table(
        f"UNETR benchmark (keep_heap={keep_heap})",
        rows,
        ["phase", "dtype", "seconds", "gflops", "GFLOP/s", "% of peak", "peak_rss_gb"],
    )
    print(f"sliding window: bf16 argmax equals fp32 argmax on {100 * agreement:.2f}% of voxels (random weights)")
    if out:
        with open(out, "w") as f:
            json.dump({"rows": rows, "sw_argmax_agreement": agreement}, f, indent=2)
    return rows
