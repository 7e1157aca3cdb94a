"""Read released checkpoints safely, with one-line errors that name the file and the problem.

``torch.load(weights_only=True)`` never runs code from the file, but it refuses the non-tensor extras
that Lightning / Fabric checkpoints carry (``hyper_parameters`` with ``jsonargparse.Namespace``,
``pathlib`` paths, enums, ...). :func:`read_checkpoint` lists those globals first and lets each load as
an inert :class:`Opaque` placeholder, so the tensors come out and nothing of the file is executed.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CheckpointError", "Opaque", "read_checkpoint", "state_dict_of"]

#: containers under which released checkpoints keep their weights (Lightning, Fabric, DDP trainers, ours)
CONTAINER_KEYS = ("state_dict", "model", "net", "module")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint; the message is one line naming the file."""


class Opaque:
    """Stand-in for a non-tensor object of a checkpoint (never called, never executed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _placeholders(path: str) -> list[tuple[type, str]]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format: torch.load reports the problem below
        return []
    return [(type(name.rsplit(".", 1)[-1], (Opaque,), {}), name) for name in names]


def read_checkpoint(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; unsupported extras become :class:`Opaque`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: empty, truncated or not a PyTorch checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found.")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({size} bytes; its zip directory is missing).")
    try:
        with torch.serialization.safe_globals(_placeholders(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
        if not magic.startswith(b"PK"):
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (no zip archive; starts with {magic!r})."
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason[:200]}).") from None


def state_dict_of(obj: Any, name: str, keys: tuple[str, ...] = CONTAINER_KEYS) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: flat, or under the first of ``keys`` present (Lightning ``state_dict``).

    Non-tensor entries (Lightning's extras inside a state dict never exist, but placeholders may) are
    an error, so a wrong file is reported instead of half-loaded. ``name`` names the source in errors.
    """
    for key in keys:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{name}: no state dict found (looked under {list(keys)} and at the top level).")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{name}: not a state dict of tensors (e.g. {bad[0]!r} is {type(obj[bad[0]]).__name__}).")
    return dict(obj)
