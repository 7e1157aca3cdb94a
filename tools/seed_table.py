"""``python -m tools.seed_table GLOB [GLOB ...]``: mean ± sd over seeds of evaluation ``metrics.csv`` files.

Each GLOB names the evaluation output folders of one arm (one folder per seed, e.g. ``"eval/pre_s*"``), each
holding the ``metrics.csv`` that MONAI's ``MetricsSaver`` writes (``name<TAB>value`` lines). Prints one markdown
table row per arm: the number of seeds and, per metric, the mean ± sample standard deviation and the
per-seed values.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
from collections.abc import Sequence

__all__ = ["read_metrics", "seed_rows"]


def read_metrics(path: str) -> dict[str, float]:
    """``{name: value}`` from a ``metrics.csv`` (tab- or comma-separated ``name value`` lines)."""
    out: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            parts = line.replace(",", "\t").split()
            if len(parts) == 2:
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    continue
    return out


def seed_rows(patterns: Sequence[str], metrics: Sequence[str] | None = None) -> list[str]:
    """Markdown rows ``| arm | n | metric mean ± sd (values) | ...``, one per glob pattern, header first."""
    arms: list[tuple[str, list[dict[str, float]]]] = []
    for pattern in patterns:
        folders = sorted(d for d in glob.glob(pattern) if os.path.isfile(os.path.join(d, "metrics.csv")))
        if not folders:
            raise FileNotFoundError(f"{pattern}: no folder with a metrics.csv")
        arms.append((pattern, [read_metrics(os.path.join(d, "metrics.csv")) for d in folders]))
    names = list(metrics or sorted(set.intersection(*(set(r) for _, runs in arms for r in runs))))
    rows = ["| arm | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for pattern, runs in arms:
        cells = []
        for name in names:
            values = [r[name] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f} ({', '.join(f'{v:.3f}' for v in values)})")
        rows.append(f"| {pattern} | {len(runs)} | " + " | ".join(cells) + " |")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="+", help="one glob of evaluation folders per arm")
    parser.add_argument("--metrics", nargs="*", default=None, help="metric names (default: all shared ones)")
    args = parser.parse_args(argv)
    print("\n".join(seed_rows(args.patterns, args.metrics)))


if __name__ == "__main__":
    main()
