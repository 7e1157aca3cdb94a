"""Training shows the whole run's progress with an ETA (ignite's tqdm bar counting epochs)."""

from __future__ import annotations

import io
import json
import os

import pytest
from ignite.engine import Engine

from common.engines.handlers import TrainingProgressBar
from tests.conftest import BUNDLES

TRAINABLE = [b for b in BUNDLES if os.path.exists(os.path.join(b, "configs", "train.json"))]


def test_bar_counts_epochs_with_eta():
    out = io.StringIO()
    engine = Engine(lambda e, b: None)
    TrainingProgressBar(persist=True, file=out).attach(engine)  # the call MONAI's trainers make
    engine.run(range(5), max_epochs=3)
    text = out.getvalue()
    assert "[3/3]" in text and "100%" in text, text
    assert "<" in text, f"no remaining-time estimate in {text!r}"  # tqdm's [elapsed<remaining]
    assert "/5]" not in text, "the bar must count epochs, not the iterations of one epoch"


@pytest.mark.parametrize("bundle", TRAINABLE, ids=[os.path.basename(b) for b in TRAINABLE])
def test_train_configs_show_the_bar(bundle):
    with open(os.path.join(bundle, "configs", "train.json")) as f:
        handlers = json.load(f)["train"]["handlers"]
    assert any(h.get("_target_") == "common.engines.handlers.TrainingProgressBar" for h in handlers)
