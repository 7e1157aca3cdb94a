"""Process-wide runtime settings: the CPU memory allocator and the device of a distributed run.

With glibc's defaults every large tensor is ``mmap``-ed and unmapped on each call, so a 3D forward
pass spends most of its time in page faults (see the performance notes in the docs). Keeping freed
memory in the heap removes that cost at the price of a higher resident peak: the heap never shrinks,
so the process keeps its largest working set (for a 3D bundle, the peak of one training step plus the
cached dataset) resident until it exits. It is applied only when the run's device is the CPU; GPU runs
keep glibc's defaults, since there host memory only holds data and the trade buys nothing. Set
``MONAI_BUNDLES_KEEP_HEAP=0`` to keep glibc's defaults on CPU too (or preload another allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.handlers import StatsHandler, TensorBoardStatsHandler

__all__ = ["distributed_device", "keep_freed_memory", "rank_handlers"]

_LOG_WRITERS = (StatsHandler, TensorBoardStatsHandler)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_HEAP_ENV = "MONAI_BUNDLES_KEEP_HEAP"
logger = logging.getLogger(__name__)


def keep_freed_memory(enabled: bool | None = None, device: torch.device | str | None = None) -> bool:
    """Ask glibc to serve large blocks from the heap and never trim it. Returns whether it was applied.

    ``enabled=None`` reads ``MONAI_BUNDLES_KEEP_HEAP`` (default on). ``device`` is the run's device
    (default: CUDA when available, as the bundles pick it); nothing is changed unless it is the CPU.
    It is a no-op on non-glibc systems.
    """
    if enabled is None:
        enabled = os.environ.get(_KEEP_HEAP_ENV, "1") != "0"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not enabled or torch.device(device).type != "cpu":
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))
    if applied:
        logger.info("glibc heap kept between allocations (%s=0 to disable)", _KEEP_HEAP_ENV)
    return applied


def distributed_device() -> torch.device:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on CPU) and return this rank's device.

    Ranks come from the environment ``torchrun`` / ``srun`` sets (``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``), so the same config runs on one node or many. Calling it again returns the same device.
    """
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("multi_gpu_train.json needs LOCAL_RANK: launch it with torchrun (or srun + torchrun).")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def rank_handlers(handlers: Sequence[Any]) -> list[Any]:
    """``handlers`` for this rank: all of them on rank 0, all but the log writers on the others.

    Every rank keeps the handlers that change training (LR schedules, early stopping, validation), so
    they decide the same from the all-reduced metrics; checkpoint savers write on rank 0 by themselves.
    """
    if not dist.is_initialized() or dist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if not isinstance(h, _LOG_WRITERS)]
