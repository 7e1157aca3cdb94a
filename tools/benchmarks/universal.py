"""``python -m tools benchmark universal``: Universal Model speed on CPU.

Phases (each in a fresh process, so peak RSS is per phase):
- ``head``: dynamic heads alone, 32 classes, batch 2, 96^3: batched (this repo) vs the official per-sample
  grouped-convolution loop; same outputs (max abs difference printed);
- ``forward``: full network forward, batch 1, 96^3, fp32 and bf16 autocast;
- ``train``: one training step (forward + partial-label loss + backward + AdamW), batch 1, 96^3, fp32 and bf16;
- ``sliding``: sliding-window inference (96^3, overlap 0.5, gaussian) over a ``volume`` fp32 vs bf16, with the
  fraction of voxels whose thresholded prediction is unchanged.
GFLOP/s are printed against the machine's measured peaks (fp32 160, bf16 614 GFLOP/s with 2 threads).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tools.benchmarks._harness import PEAK_GFLOPS, count_flops, median_seconds

PEAK = {"fp32": PEAK_GFLOPS["float32"], "bf16": PEAK_GFLOPS["bfloat16"]}
PHASES = ("head", "forward", "train", "sliding")


def _cpu_time(fn: Callable[[], object], repeats: int) -> float:
    """Median process CPU time: robust to other jobs on a shared machine (wall time is not)."""
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def _gflop(fn: Callable[[], object]) -> float:
    return count_flops(fn) / 1e9


def loop_head(features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The official head: per sample, tile features over classes, three grouped 1x1x1 convolutions."""
    from common.networks.universal import split_dynamic_params

    outs = []
    k = params.shape[1]
    for i in range(features.shape[0]):
        w1, w2, w3, b1, b2, b3 = split_dynamic_params(params[i])
        x = features[i : i + 1].repeat(1, k, 1, 1, 1)
        x = F.relu(F.conv3d(x, w1.reshape(k * 8, 8, 1, 1, 1), b1.reshape(-1), groups=k))
        x = F.relu(F.conv3d(x, w2.reshape(k * 8, 8, 1, 1, 1), b2.reshape(-1), groups=k))
        outs.append(F.conv3d(x, w3.reshape(k, 8, 1, 1, 1), b3.reshape(-1), groups=k))
    return torch.cat(outs)


def _row(name: str, seconds: float, gflop: float, dtype: str = "fp32", **extra: object) -> dict:
    return {
        "case": name,
        "dtype": dtype,
        "seconds": round(seconds, 3),
        "gflop": round(gflop, 1),
        "gflops_per_s": round(gflop / seconds, 1),
        "pct_of_peak": round(100 * gflop / seconds / PEAK[dtype], 1),
        **extra,
    }


def _phase(phase: str, size: int, repeats: int, volume: tuple[int, int, int], head_chunk: int) -> list[dict]:
    from common.losses.universal import PartialLabelLoss
    from common.networks.universal import UniversalModel, dynamic_head

    torch.manual_seed(0)
    rows = []
    if phase == "head":
        feats = torch.randn(2, 8, size, size, size)
        params = torch.randn(2, 32, 153) * 0.3
        with torch.no_grad():
            diff = (dynamic_head(feats, params, head_chunk) - loop_head(feats, params)).abs().max().item()
            gflop = _gflop(lambda: dynamic_head(feats, params, head_chunk))
            t_loop = median_seconds(lambda: loop_head(feats, params), repeats=repeats)
            t_batched = median_seconds(lambda: dynamic_head(feats, params, head_chunk), repeats=repeats)
            c_loop = _cpu_time(lambda: loop_head(feats, params), repeats)
            c_batched = _cpu_time(lambda: dynamic_head(feats, params, head_chunk), repeats)
        rows.append(_row("head loop (official), B2 K32", t_loop, gflop, cpu_seconds=round(c_loop, 2)))
        rows.append(
            _row(
                "head batched, B2 K32",
                t_batched,
                gflop,
                speedup=round(t_loop / t_batched, 2),
                cpu_speedup=round(c_loop / c_batched, 2),
                cpu_seconds=round(c_batched, 2),
                max_diff=diff,
            )
        )
        return rows
    net = UniversalModel(head_chunk_size=head_chunk)
    if phase == "train":
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
        loss_fn = PartialLabelLoss()
        x = torch.rand(1, 1, size, size, size)
        y = (torch.rand(1, 32, size, size, size) > 0.9).float()
        y[:, 16:] = -1  # half the classes not annotated
        for dtype in ("fp32", "bf16"):

            def step(dtype: str = dtype) -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()

            rows.append(_row("train step B1", median_seconds(step, repeats=repeats), _gflop(step), dtype))
        return rows
    net.eval()
    with torch.no_grad():
        if phase == "forward":
            x = torch.rand(1, 1, size, size, size)
            for dtype in ("fp32", "bf16"):

                def fwd(dtype: str = dtype) -> torch.Tensor:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                        return net(x)

                rows.append(_row("forward B1", median_seconds(fwd, repeats=repeats), _gflop(fwd), dtype))
        elif phase == "sliding":
            from monai.inferers import SlidingWindowInferer

            inferer = SlidingWindowInferer((size,) * 3, sw_batch_size=1, overlap=0.5, mode="gaussian")
            x = torch.rand(1, 1, *volume)
            outs = {}
            for dtype in ("fp32", "bf16"):

                def slide(dtype: str = dtype) -> torch.Tensor:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                        return inferer(x, net).float()

                gflop = _gflop(slide)
                t = time.perf_counter()
                outs[dtype] = slide()
                rows.append(_row(f"sliding window {'x'.join(map(str, volume))}", time.perf_counter() - t, gflop, dtype))
            same = ((outs["fp32"] > 0) == (outs["bf16"] > 0)).float().mean().item()
            rows[-1]["same_binary_voxels"] = round(same, 4)
    return rows


def main(
    phase: str | None = None,
    size: int = 96,
    repeats: int = 3,
    volume: tuple[int, int, int] = (128, 128, 96),
    head_chunk: int = 512,
    threads: int = 2,
    keep_heap: bool = True,
    json_out: str | None = None,
) -> list[dict]:
    """Print a table of the phases (or run one ``phase`` and print its JSON rows)."""
    if phase is not None:
        from common.engines.runtime import keep_freed_memory

        torch.set_num_threads(threads)
        heap = keep_freed_memory(keep_heap)
        rows = _phase(phase, size, repeats, tuple(volume), head_chunk)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for r in rows:
            r.update(peak_rss_gb=round(peak, 2), threads=threads, keep_heap=heap)
        print("ROWS " + json.dumps(rows))
        return rows
    rows = []
    for ph in PHASES:
        cmd = [sys.executable, "-m", "tools.benchmarks.universal", f"--phase={ph}", f"--size={size}"]
        cmd += [f"--repeats={repeats}", f"--volume={list(volume)}", f"--head_chunk={head_chunk}"]
        cmd += [f"--threads={threads}", f"--keep_heap={keep_heap}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows += json.loads(next(line for line in out.splitlines() if line.startswith("ROWS "))[5:])
    cols = ["case", "dtype", "seconds", "gflop", "gflops_per_s", "pct_of_peak", "peak_rss_gb"]
    print(f"threads={threads} keep_heap={keep_heap} peaks: fp32 {PEAK['fp32']}, bf16 {PEAK['bf16']} GFLOP/s")
    print(" | ".join(cols) + " | extra")
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in cols and k not in ("threads", "keep_heap")}
        print(" | ".join(str(r[c]) for c in cols) + f" | {extra or ''}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    import fire

    fire.Fire(main)
