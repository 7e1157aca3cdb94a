"""Timing harness shared by the benchmarks: each phase runs in a fresh process, medians after warm-up.

A phase is a function ``phase(**options) -> dict`` in a benchmark module; ``run_phase_subprocess`` runs it
with ``python -m tools.benchmarks._harness MODULE PHASE JSON`` so peak resident memory is per phase.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# measured on the reference machine (2 threads, AVX-512 BF16); see the performance notes
PEAK_GFLOPS = {"float32": 160.0, "bfloat16": 614.0}


def median_seconds(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs (matmul, conv, attention) of one call, counted by ``torch.utils.flop_counter``."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def autocast(dtype: str, device: str = "cpu"):
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_phase_subprocess(module: str, phase: str, **options: Any) -> dict:
    """Run ``module.phase(**options)`` in a fresh interpreter and return its result dict."""
    command = [sys.executable, "-m", "tools.benchmarks._harness", module, phase, json.dumps(options)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def _main() -> None:
    module, phase, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(int(options.pop("threads", torch.get_num_threads())))
    if options.pop("keep_heap", True):
        from common.engines.runtime import keep_freed_memory

        keep_freed_memory(True)
    result = getattr(importlib.import_module(module), phase)(**options)
    result["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
