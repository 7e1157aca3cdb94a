"""CUDA mixed precision checked on CPU: one AMP iteration of every bundle's every ``train*.json``.

CUDA autocast refuses ``binary_cross_entropy`` ("unsafe to autocast"); CPU autocast does not. The test
registers the same refusal for CPU autocast at the dispatcher (so ``F.binary_cross_entropy``,
``nn.BCELoss`` and any other route to the op raise), maps MONAI's ``torch.autocast("cuda")`` onto CPU
float16 autocast and turns the trainer's ``amp`` on. Each run trains one iteration, validates one batch,
and checks that the loss the engine reports is float32.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.engines import IterationEvents

from tests.conftest import BUNDLES
from tools.bundle_io import config_paths, on_sys_path, parse_bundle


def _train_runs() -> list[tuple[str, list[str]]]:
    """``(bundle, configs)`` for ``train.json`` and each ``train_<x>.json`` overlay, with its demo overlay."""
    runs = []
    for bundle in BUNDLES:
        configs = os.path.join(bundle, "configs")
        for path in sorted(glob.glob(os.path.join(configs, "train*.json"))):
            name = os.path.basename(path)
            suffix = name[len("train") : -len(".json")]  # "" or "_cls", "_semi", ...
            demo = f"demo{suffix}.json" if os.path.exists(os.path.join(configs, f"demo{suffix}.json")) else "demo.json"
            runs.append((bundle, ["train.json", demo] if name == "train.json" else ["train.json", name, demo]))
    return runs


RUNS = _train_runs()
IDS = [f"{os.path.basename(b)}:{c[-2] if len(c) == 3 else 'train.json'}" for b, c in RUNS]


@pytest.fixture
def cuda_autocast_on_cpu(monkeypatch):
    """CPU float16 autocast that refuses ``binary_cross_entropy`` the way CUDA autocast does."""

    def banned(*args, **kwargs):
        raise RuntimeError("binary_cross_entropy is unsafe to autocast (emulated CUDA autocast refusal)")

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("binary_cross_entropy", banned, "AutocastCPU")
    real = torch.autocast

    def autocast(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, cache_enabled=None):
        if device_type == "cuda":
            device_type, dtype = "cpu", torch.float16
        return real(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    monkeypatch.setattr(torch, "autocast", autocast)
    yield
    lib._destroy()


def test_emulated_refusal_raises_like_cuda(cuda_autocast_on_cpu):
    p, t = torch.rand(4), torch.rand(4)
    with torch.autocast("cuda"):
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            torch.nn.BCELoss()(p, t)
        with torch.autocast("cpu", enabled=False):
            torch.nn.functional.binary_cross_entropy(p, t)


def _loss_dtypes(output) -> list[torch.dtype]:
    """Dtypes of the loss tensors in an engine output (a dict, or a list of dicts once decollated)."""
    items = output if isinstance(output, list) else [output]
    return [d["loss"].dtype for d in items if isinstance(d, dict) and isinstance(d.get("loss"), torch.Tensor)]


@pytest.mark.slow
@pytest.mark.parametrize("bundle,configs", RUNS, ids=IDS)
def test_one_amp_iteration_per_train_config(bundle, configs, bundle_copy, tmp_path, cuda_autocast_on_cpu):
    root = bundle_copy(bundle)
    with on_sys_path(root):
        dataset_dir = parse_bundle(root, configs, dataset_dir=str(tmp_path / "data")).get_parsed_content("demo_data")
        overrides = {"dataset_dir": dataset_dir, "train#trainer#max_epochs": 1, "train#trainer#epoch_length": 1}
        # the evaluator's autocast only wraps its inferer (metrics run after it); on CPU a float16 sliding window
        # over a whole demo volume costs minutes, so validation runs in float32 here
        overrides |= {"validate#evaluator#epoch_length": 1, "train#trainer#amp": True}
        workflow = ConfigWorkflow(
            config_file=config_paths(root, configs),
            meta_file=os.path.join(root, "configs", "metadata.json"),
            workflow_type="train",
            bundle_root=root,
            **overrides,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        dtypes: list[torch.dtype] = []
        for event in (IterationEvents.LOSS_COMPLETED, Events.ITERATION_COMPLETED):  # before / after decollation
            trainer.add_event_handler(event, lambda e: dtypes.extend(_loss_dtypes(e.state.output)))
        workflow.run()
        workflow.finalize()
    assert trainer.amp and dtypes and set(dtypes) == {torch.float32}, dtypes
