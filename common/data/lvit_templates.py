"""Coarse lung-zone masks from structured QaTa-COV19 text, for the LV loss templates and the demo data.

QaTa descriptions follow one grammar, e.g. "Bilateral pulmonary infection, two infected areas, upper left lung and
middle lower right lung." Each ``<zones> <side> lung`` phrase names a lung (the patient's left is on the image's
right, radiological convention) and any of its upper/middle/lower thirds ("all" = every third). A template is the
union of those zones drawn on an idealised frontal chest radiograph, so no template images need to be shipped.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["DEFAULT_TEMPLATE_TEXTS", "QATA_WORDS", "lung_ellipses", "parse_zones", "zone_mask", "describe"]

ZONES = ("upper", "middle", "lower")
_PHRASE = re.compile(r"((?:(?:all|upper|middle|lower)\s+)+)(left|right)\s+lung")
_COUNT = ("zero", "one", "two", "three", "four", "five")

#: every word the QaTa-style grammar uses (for tiny offline vocabularies)
QATA_WORDS = [
    *"unilateral bilateral pulmonary infection infected area areas and lung left right all".split(),
    *ZONES,
    *_COUNT,
    ",",
    ".",
    "eof",
    "xxx",
]

#: descriptions of the default LV templates (one per lung-zone pattern seen in QaTa text)
DEFAULT_TEMPLATE_TEXTS = [
    "Unilateral pulmonary infection, one infected area, all left lung.",
    "Unilateral pulmonary infection, one infected area, all right lung.",
    "Bilateral pulmonary infection, two infected areas, all left lung and all right lung.",
    "Unilateral pulmonary infection, one infected area, upper left lung.",
    "Unilateral pulmonary infection, one infected area, middle left lung.",
    "Unilateral pulmonary infection, one infected area, lower left lung.",
    "Unilateral pulmonary infection, one infected area, upper right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "Unilateral pulmonary infection, one infected area, lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle lower left lung.",
    "Unilateral pulmonary infection, one infected area, middle lower right lung.",
    "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.",
    "Bilateral pulmonary infection, two infected areas, middle lower left lung and middle lower right lung.",
    "Bilateral pulmonary infection, two infected areas, upper middle left lung and upper middle right lung.",
]


def lung_ellipses(size: int) -> dict[str, tuple[float, float, float, float]]:
    """``side -> (center_row, center_col, radius_rows, radius_cols)`` in pixels; patient-left is image-right."""
    return {
        "right": (0.5 * size, 0.3 * size, 0.32 * size, 0.15 * size),
        "left": (0.5 * size, 0.7 * size, 0.32 * size, 0.15 * size),
    }


def parse_zones(text: str) -> set[tuple[str, str]]:
    """``{(side, zone)}`` named by a QaTa description (empty if it names none)."""
    found = set()
    for zones, side in _PHRASE.findall(text.lower()):
        words = zones.split()
        for z in ZONES if "all" in words else [w for w in words if w in ZONES]:
            found.add((side, z))
    return found


def zone_mask(zones: set[tuple[str, str]], size: int = 224) -> np.ndarray:
    """Binary ``[size, size]`` float32 mask of the named lung thirds."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = np.zeros((size, size), dtype=bool)
    for side, (cr, cc, rr, rc) in lung_ellipses(size).items():
        inside = ((rows - cr) / rr) ** 2 + ((cols - cc) / rc) ** 2 <= 1.0
        third = (rows - (cr - rr)) / (2 * rr) * 3  # 0..3 from apex to base
        for i, z in enumerate(ZONES):
            if (side, z) in zones:
                mask |= inside & (third >= i) & (third < i + 1)
    return mask.astype(np.float32)


def describe(zones: set[tuple[str, str]]) -> str:
    """A QaTa-style sentence for ``zones`` (one infected area per lung)."""
    parts = []
    for side in ("left", "right"):
        named = [z for z in ZONES if (side, z) in zones]
        if named:
            parts.append(("all" if len(named) == 3 else " ".join(named)) + f" {side} lung")
    if not parts:
        raise ValueError("describe() needs at least one (side, zone)")
    lateral = "Bilateral" if len(parts) == 2 else "Unilateral"
    areas = f"{_COUNT[len(parts)]} infected area" + ("s" if len(parts) > 1 else "")
    return f"{lateral} pulmonary infection, {areas}, {' and '.join(parts)}."
