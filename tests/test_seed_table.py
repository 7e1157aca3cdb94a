"""``tools.seed_table``: mean ± sd over seed folders of evaluation ``metrics.csv`` files."""

from __future__ import annotations

import os

import pytest

from tools.seed_table import read_metrics, seed_rows


def _write(folder: str, **metrics: float) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.csv"), "w") as f:
        f.writelines(f"{k}\t{v}\n" for k, v in metrics.items())


def test_rows_mean_sd_and_values(tmp_path):
    for seed, value in enumerate((0.1, 0.2, 0.3)):
        _write(str(tmp_path / f"pre_s{seed}"), val_global_dice=value, val_mean_dice=value / 2)
    _write(str(tmp_path / "rand_s0"), val_global_dice=0.05, val_mean_dice=0.04)
    assert read_metrics(str(tmp_path / "pre_s0" / "metrics.csv")) == {"val_global_dice": 0.1, "val_mean_dice": 0.05}
    rows = seed_rows([str(tmp_path / "pre_s*"), str(tmp_path / "rand_s*")], ["val_global_dice"])
    assert rows[0] == "| arm | seeds | val_global_dice |"
    assert rows[2].endswith("| 3 | 0.200 ± 0.100 (0.100, 0.200, 0.300) |")
    assert rows[3].endswith("| 1 | 0.050 ± 0.000 (0.050) |")


def test_missing_arm_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        seed_rows([str(tmp_path / "none_s*")])
