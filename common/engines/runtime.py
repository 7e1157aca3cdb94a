"""Process-wide runtime settings: the CPU memory allocator.

With glibc's defaults every large tensor is ``mmap``-ed and unmapped on each call, so a 3D forward
pass spends most of its time in page faults (see the performance notes in the docs). Keeping freed
memory in the heap removes that cost at the price of a higher resident peak. It is on by default for
bundles; set ``MONAI_BUNDLES_KEEP_HEAP=0`` to keep glibc's defaults (or preload another allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_HEAP_ENV = "MONAI_BUNDLES_KEEP_HEAP"
logger = logging.getLogger(__name__)


def keep_freed_memory(enabled: bool | None = None) -> bool:
    """Ask glibc to serve large blocks from the heap and never trim it. Returns whether it was applied.

    ``enabled=None`` reads ``MONAI_BUNDLES_KEEP_HEAP`` (default on). It is a no-op on non-glibc systems.
    """
    if enabled is None:
        enabled = os.environ.get(_KEEP_HEAP_ENV, "1") != "0"
    if not enabled:
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
