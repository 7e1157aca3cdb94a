"""Atomic file writing: a file that is being replaced is never left half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

import torch

__all__ = ["save_atomically", "write_atomically"]


def write_atomically(path: str, write: Callable[[IO], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    A killed run leaves either the old file or the new one, never half of one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_atomically(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    write_atomically(path, lambda f: torch.save(obj, f))
