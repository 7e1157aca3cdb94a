"""Voxel-spacing maths: PUMIT's degree of anisotropy (DA) of a volume or a 2D image."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["ANISO_D_2D", "MAX_ANISO_D", "aniso_d_from_spacing"]

ANISO_D_2D = 5
"""DA of a 2D image: stored with depth 1 and a depth spacing of 1e8, so r clips to 32."""
MAX_ANISO_D = 5


def aniso_d_from_spacing(
    spacing: Sequence[float], scale: Sequence[float] = (1.0, 1.0, 1.0), validation: bool = False
) -> int:
    """Degree of anisotropy from a (depth, height, width) spacing.

    Training rule: ``r = clip(s_z * scale_z / (s_xy * scale_xy), 1, 32)``, ``DA = floor(log2 r)``, with
    ``s_xy`` the smaller in-plane spacing. ``validation=True`` uses the official unclipped validation
    rule ``max(bit_length(int(s_z / s_xy)) - 1, 0)``. 2D images (depth spacing >= 1e8) always give 5.
    """
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries (depth, height, width), got {tuple(spacing)}.")
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be finite and positive, got {tuple(spacing)}.")
    if spacing[0] >= 1e8:
        return ANISO_D_2D
    s_xy = min(spacing[1] * scale[1], spacing[2] * scale[2])
    if validation:
        return max(int(spacing[0] / min(spacing[1], spacing[2])).bit_length() - 1, 0)
    r = min(max(spacing[0] * scale[0] / s_xy, 1.0), 2.0**MAX_ANISO_D)
    return int(math.floor(math.log2(r) + 1e-9))
