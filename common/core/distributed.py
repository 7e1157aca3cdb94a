"""Process-group queries that work with and without ``torch.distributed`` running."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["is_main_process", "unwrap_module"]


def is_main_process() -> bool:
    """True on rank 0, or when no process group is running."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def unwrap_module(obj: Any) -> Any:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` so saved keys match ``network_def``."""
    return obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel) else obj
