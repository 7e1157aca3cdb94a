"""Ignite wrappers so the parity metrics plug into MONAI evaluators like ``MeanDice``, and a named-column saver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler, MetricsSaver
from monai.handlers.utils import from_engine, write_metrics_reports
from monai.utils import string_list_all_gather

from .btcv import BTCVParityDice

# the evaluators' (prediction, label) pair; a module constant, not a call in each signature (flake8 B008)
PRED_AND_LABEL = from_engine(["pred", "label"])


class BTCVParityDiceHandler(IgniteMetricHandler):
    """Mean organ Dice with research-contributions' empty-organ rule; ``save_details`` keeps per-case rows."""

    def __init__(self, output_transform: Callable = PRED_AND_LABEL, save_details: bool = True) -> None:
        super().__init__(metric_fn=BTCVParityDice(), output_transform=output_transform, save_details=save_details)


class ClassNamedMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` with per-class CSV columns named ``class_labels`` instead of ``class0..classN``.

    ``class_labels`` is usually the bundle's ``channel_def`` without background (what ``MeanDice`` with
    ``include_background=False`` or a one-channel sigmoid output reports); a metric whose details have
    another number of columns is an error naming the metric, never a silently shifted header.
    """

    def __init__(self, *args: Any, class_labels: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.class_labels = [str(c) for c in class_labels]

    def __call__(self, engine: Engine) -> None:
        world = idist.get_world_size()
        if self.save_rank >= world:
            raise ValueError("target save rank is greater than the distributed group size.")
        images = string_list_all_gather(strings=self._filenames) if world > 1 else self._filenames
        if idist.get_rank() != self.save_rank:
            return
        metrics = {k: v for k, v in engine.state.metrics.items() if _selected(k, self.metrics)}
        details = getattr(engine.state, "metric_details", {})
        details = {k: v for k, v in details.items() if _selected(k, self.metric_details)}
        report = {"save_dir": self.save_dir, "images": images or None, "summary_ops": self.summary_ops}
        report |= {"deli": self.deli, "output_type": self.output_type}
        write_metrics_reports(metrics=metrics, metric_details={}, **report)
        for name, values in details.items():
            columns = 1 if values.ndim < 2 else values.shape[1]  # MONAI reports [N] details as one column
            if columns != len(self.class_labels):
                raise ValueError(
                    f"metric {name!r} reports {columns} classes per case, but class_labels names "
                    f"{len(self.class_labels)}: {self.class_labels}"
                )
            write_metrics_reports(metrics={}, metric_details={name: values}, class_labels=self.class_labels, **report)


def _selected(name: str, wanted: str | Sequence[str] | None) -> bool:
    return wanted is not None and (name in wanted or "*" in wanted)
