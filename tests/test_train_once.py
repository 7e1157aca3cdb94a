"""Every training config runs its trainer exactly once, whatever ``run_id`` the caller sends.

MONAI Label's ``BundleTrainTask`` calls ``monai.bundle.run(run_id="", init_id=None, final_id=None, ...)``
for the run id its clients send (``""`` by default): an empty id resolves every top-level entry, so a
``training`` list that repeats ``run`` would train twice. The top-level entries are resolved here exactly
as ``ConfigWorkflow`` resolves them, with the trainer and evaluator replaced by counters (no data, no
network). ``tests_monailabel`` checks the same through the real ``monailabel`` package.
"""

from __future__ import annotations

import os

import pytest
from monai.bundle import ConfigParser

from tests.conftest import BUNDLES
from tools.bundle_io import config_paths

# every combination a user or MONAI Label trains with: train.json plus each overlay that keeps training
COMBOS = [
    (b, combo)
    for b in BUNDLES
    if os.path.exists(os.path.join(b, "configs", "train.json"))
    for combo in (
        ["train.json"],
        ["train.json", "multi_gpu_train.json"],
        *[["train.json", n] for n in sorted(os.listdir(os.path.join(b, "configs"))) if n.startswith("train_")],
    )
    if all(os.path.exists(os.path.join(b, "configs", n)) for n in combo)
]


class Counter:
    """Stands in for an ignite engine: counts ``run()`` calls."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self) -> None:
        self.runs += 1


@pytest.mark.parametrize("bundle, configs", COMBOS, ids=[f"{os.path.basename(b)}-{'+'.join(c)}" for b, c in COMBOS])
@pytest.mark.parametrize("run_id", ["", "run", "training"])
def test_trainer_runs_once(bundle, configs, run_id):
    merged = ConfigParser.load_config_files(config_paths(bundle, configs))
    runs_trainer = [k for k, v in merged.items() if "trainer.run(" in str(v)]
    assert set(runs_trainer) <= {"run", "training"}, f"only run/training may start the trainer: {runs_trainer}"
    trainer, evaluator = Counter(), Counter()
    # the executable entries only: the rest (data, network) is what the counters stand in for
    entries = {k: merged[k] for k in ("run", "training") if k in merged}
    parser = ConfigParser({**entries, "train": {"trainer": trainer}, "validate": {"evaluator": evaluator}})
    parser.get_parsed_content(run_id)
    assert trainer.runs == 1, f"{configs} with run_id {run_id!r} ran the trainer {trainer.runs} times"
    assert evaluator.runs == 0, "validation runs from the trainer's handlers, not from a top-level entry"
