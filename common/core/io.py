"""Atomic file writing: a file that is being replaced is never left half-written."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["save_atomically"]


def save_atomically(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
