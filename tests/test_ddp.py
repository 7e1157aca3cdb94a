"""Multi-GPU correctness on 2 CPU processes (gloo): nothing hangs, nothing is done twice, ranks agree.

In-process pieces (EPI bank gather, LoVT ``no_sync``) run under ``torch.multiprocessing`` with a join
timeout, so a deadlock fails the test instead of blocking the suite. Bundle runs go through ``torchrun``
with a subprocess timeout. Samplers are checked with explicit ``num_replicas`` / ``rank``.
"""

from __future__ import annotations

import ctypes.util
import glob
import json
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from common.data.pumit import DABucketBatchSampler
from common.data.samplers import DistributedWeightedSampler
from common.engines.lovt import LoVTTrainStep
from common.engines.lvit_semi import EPIBank
from common.engines.runtime import keep_freed_memory
from tests.conftest import demo_dataset
from tests.test_amp import write_previous_stage
from tools.bundle_io import BUNDLES_DIR, REPO_ROOT, on_sys_path

WORLD = 2
JOIN_TIMEOUT = 300  # spawned ranks import torch + monai; a loaded 2-core CI machine needs minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path, *args) -> None:
    """Run ``fn(rank, out_dir, *args)`` on 2 gloo ranks; fail (and kill them) if they do not finish in time."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(rank, port, fn, str(tmp_path), args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} rank(s) still running after {JOIN_TIMEOUT} s: deadlock"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _entry(rank: int, port: int, fn, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        fn(rank, out_dir, *args)
    finally:
        dist.destroy_process_group()


# ---- EPI pseudo-label bank: unequal and empty unlabelled counts ----------------------------------------------------

# per step, the unlabelled indices each rank holds (rank 1 has none at step 0, rank 0 none at step 2)
EPI_STEPS = [([0, 1, 2], []), ([3], [4, 5]), ([], [0])]


def _epi_pred(index: torch.Tensor, step: int) -> torch.Tensor:
    """A distinct constant map per item and step, ``[len(index), 1, 2, 2]``."""
    return (0.1 * (index.float() + 1) + 0.05 * step).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


def _epi_rank(rank: int, out_dir: str) -> None:
    bank = EPIBank(num_items=6, spatial_size=(2, 2), beta=0.5)
    for step, per_rank in enumerate(EPI_STEPS):
        index = torch.tensor(per_rank[rank], dtype=torch.long)
        pseudo = bank.update(index, _epi_pred(index, step))
        assert pseudo.shape == (len(index), 1, 2, 2)
    torch.save(bank.state_dict(), os.path.join(out_dir, f"bank{rank}.pt"))


def _in_process_checks(rank: int, out_dir: str) -> None:
    _epi_rank(rank, out_dir)
    _lovt_rank(rank, out_dir)


def run_in_process_checks(out_dir: str) -> None:
    """Entry point of the helper process below: spawn the 2 ranks of the in-process checks."""
    _spawn(_in_process_checks, out_dir)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Output folder of one 2-rank run of the in-process checks (a spawn costs a full import per rank).

    The ranks are spawned from a fresh helper process, not from the pytest(-xdist) worker: a worker that has
    already loaded other tests' native libraries can die while spawning, which takes its other tests with it.
    """
    out = tmp_path_factory.mktemp("ddp")
    code = f"from tests.test_ddp import run_in_process_checks; run_in_process_checks({str(out)!r})"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=2 * JOIN_TIMEOUT + 60
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_epi_bank_gathers_unequal_and_empty_counts(spawned):
    banks = [torch.load(spawned / f"bank{r}.pt") for r in range(WORLD)]
    reference = EPIBank(num_items=6, spatial_size=(2, 2), beta=0.5)  # one process seeing every rank's items
    for step, per_rank in enumerate(EPI_STEPS):
        index = torch.tensor(per_rank[0] + per_rank[1], dtype=torch.long)
        reference.update(index, _epi_pred(index, step))
    for bank in banks:
        assert torch.equal(bank["seen"], reference.seen) and bool(bank["seen"].all())
        torch.testing.assert_close(bank["probs"], reference.probs)


# ---- LoVT: gradient all-reduce only on the micro-batch before the optimizer step -----------------------------------


class _TinyLoVT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, image, **kwargs):
        return {"total": self.linear(image.flatten(1)).pow(2).mean()}


class _Engine:
    """The attributes ``LoVTTrainStep`` reads from a ``SupervisedTrainer``."""

    def __init__(self, network, optimizer, epoch_length: int) -> None:
        self.network, self.optimizer, self.amp = network, optimizer, False
        self.loss_function = lambda terms: terms
        self.state = type("State", (), {"device": torch.device("cpu"), "iteration": 0, "epoch_length": epoch_length})()


def _lovt_rank(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)
    network = torch.nn.parallel.DistributedDataParallel(_TinyLoVT())
    reduces = []

    def counting_hook(state, bucket):
        reduces.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    network.register_comm_hook(None, counting_hook)
    engine = _Engine(network, torch.optim.SGD(network.parameters(), lr=0.1), epoch_length=6)
    step = LoVTTrainStep(accumulation_steps=4)
    batch = {"input_ids": [0], "attention_mask": [1], "token_sentence": [0], "num_sentences": 1}
    for it in range(1, 7):
        engine.state.iteration = it
        step(engine, {**batch, "image": torch.full((2, 4), float(rank + it))})
    weights = [p.detach().clone() for p in network.parameters()]
    torch.save({"reduces": len(reduces), "weights": weights}, os.path.join(out_dir, f"lovt{rank}.pt"))


def test_lovt_accumulation_syncs_only_before_the_optimizer_step(spawned):
    results = [torch.load(spawned / f"lovt{r}.pt") for r in range(WORLD)]
    # 6 micro-batches, accumulation 4: steps after micro-batch 4 and at the epoch end (6) -> 2 all-reduces, not 6
    assert [r["reduces"] for r in results] == [2, 2]
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        torch.testing.assert_close(a, b)


# ---- samplers: rank-aware, disjoint, covering, reshuffled per epoch ------------------------------------------------


def test_pumit_bucket_sampler_shards_batches_by_rank():
    data = [{"aniso_d": i % 3, "weight": 1.0 + i % 2} for i in range(30)]
    make = lambda **kw: DABucketBatchSampler(data, batch_size=2, num_batches=8, seed=3, **kw)  # noqa: E731
    single, ranks = make(num_replicas=1, rank=0), [make(num_replicas=WORLD, rank=r) for r in range(WORLD)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        full = list(single)
        per_rank = [list(s) for s in ranks]
        assert [len(b) for b in per_rank] == [len(s) for s in ranks] == [4, 4]
        # the ranks together run the single-process epoch, each batch exactly once
        assert sorted(map(tuple, per_rank[0] + per_rank[1])) == sorted(map(tuple, full))
        assert per_rank[0] == full[0::2] and per_rank[1] == full[1::2]
        assert all(len({data[i]["aniso_d"] for i in batch}) == 1 for batch in full)
    single.set_epoch(0)
    epoch0 = list(single)
    single.set_epoch(1)
    assert list(single) != epoch0, "set_epoch must reshuffle"
    assert list(single) != list(single), "without set_epoch each pass moves on to the next epoch"


def test_distributed_weighted_sampler_keeps_uniform_over_datasets():
    # dataset A has 30 items, B has 10: uniform-over-datasets weights give each dataset half of the draws
    weights = torch.tensor([1 / 30] * 30 + [1 / 10] * 10, dtype=torch.double)
    samplers = [DistributedWeightedSampler(weights, num_samples=4000, num_replicas=WORLD, rank=r) for r in range(2)]
    single = DistributedWeightedSampler(weights, num_samples=4000, num_replicas=1, rank=0)
    assert isinstance(samplers[0], torch.utils.data.DistributedSampler)  # MONAI's engines call set_epoch on it
    for epoch in (0, 1):
        for s in (single, *samplers):
            s.set_epoch(epoch)
        draws = [list(s) for s in samplers]
        assert len(draws[0]) == len(draws[1]) == 2000
        assert sorted(draws[0] + draws[1]) == sorted(single), "ranks split one draw, they do not repeat it"
        counts = Counter(draws[0] + draws[1])
        from_b = sum(counts[i] for i in range(30, 40)) / 4000
        assert 0.45 < from_b < 0.55 and set(counts) == set(range(40))
    samplers[0].set_epoch(0)
    epoch0 = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != epoch0


def test_distributed_weighted_sampler_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        DistributedWeightedSampler([0.0, 0.0], num_replicas=1, rank=0)


# ---- bundle runs under torchrun: forced early stop, overlays composed with multi_gpu_train.json --------------------

SHORT = ["--train#trainer#epoch_length", "2", "--validate#evaluator#epoch_length", "1"]
# every rank writes its weights at the end, to compare them
SAVE_WEIGHTS = {
    "+finalize": [
        # only rank 0's checkpoint handlers create ckpt_dir, and rank 1 may get here first
        "$os.makedirs(@ckpt_dir, exist_ok=True)",
        "$torch.save(@network_def.state_dict(), os.path.join(@ckpt_dir, 'rank' + os.environ['RANK'] + '.pt'))",
    ]
}


def _torchrun(root: str, configs: list[str], args: list[str], timeout: int = 600) -> str:
    paths = "[" + ",".join(f"'{os.path.join(root, 'configs', c)}'" for c in configs) + "]"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={WORLD}"]
    command += ["-m", "monai.bundle", "run", "--config_file", paths, "--bundle_root", root, *args]
    # this checkout's ``common`` first, whatever else the environment has installed
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:], (e.stderr or b"")[-3000:]
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank hangs): {out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _same_weights_on_every_rank(root: str) -> None:
    paths = [glob.glob(os.path.join(root, "models", "**", f"rank{r}.pt"), recursive=True) for r in range(WORLD)]
    assert all(len(p) == 1 for p in paths), paths  # written to the stage's ckpt_dir
    states = [torch.load(p[0], weights_only=True) for p in paths]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], msg=f"ranks differ in {key}")


def _with_weight_saver(root: str) -> str:
    with open(os.path.join(root, "configs", "save_rank_weights.json"), "w") as f:
        json.dump(SAVE_WEIGHTS, f)
    return "save_rank_weights.json"


@pytest.mark.slow
def test_lvit_semi_ddp_early_stop_fires_on_every_rank(bundle_copy, demo_data_dirs, tmp_path_factory):
    """``train_semi.json`` + ``multi_gpu_train.json``: EPI bank gathers, early stop (patience 1) ends all ranks."""
    bundle = os.path.join(BUNDLES_DIR, "lvit_qata_covid19_segmentation")
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    root = bundle_copy(bundle)
    configs = ["train.json", "train_semi.json", "multi_gpu_train.json", "demo.json", _with_weight_saver(root)]
    with on_sys_path(root):
        write_previous_stage(root, ["train.json", "train_semi.json", "demo.json"], dataset_dir=data)
    # a constant score never improves: patience 1 stops training after epoch 2 of 5
    args = ["--dataset_dir", data, "--train#trainer#max_epochs", "5", "--early_stop_patience", "1", *SHORT]
    args += ["--validate#early_stop#score_function", "$lambda engine: 0.0"]
    log = _torchrun(root, configs, args)
    assert "Epoch: 3/5" not in log and "EarlyStopping: Stop training" in log
    state = torch.load(os.path.join(root, "models", "last.pt"), map_location="cpu", weights_only=True)
    assert int(state["epi_bank"]["seen"].sum()) > 0, "the EPI bank was never updated"
    _same_weights_on_every_rank(root)


@pytest.mark.slow
def test_pumit_mim_overlay_under_ddp(bundle_copy, demo_data_dirs, tmp_path_factory):
    """``train_mim.json`` + ``multi_gpu_train.json``: stage-specific initialize kept, ranks end with equal weights."""
    bundle = os.path.join(BUNDLES_DIR, "pumit_pretraining")
    data = demo_dataset(bundle, demo_data_dirs, tmp_path_factory)
    root = bundle_copy(bundle)
    configs = ["train.json", "train_mim.json", "multi_gpu_train.json", "demo.json", _with_weight_saver(root)]
    with on_sys_path(root):
        write_previous_stage(root, ["train.json", "train_mim.json", "demo.json"], dataset_dir=data)
    _torchrun(root, configs, ["--dataset_dir", data, "--train#trainer#max_epochs", "1", *SHORT])
    _same_weights_on_every_rank(root)


def test_multi_gpu_configs_add_to_initialize_and_pick_ranks_from_the_environment():
    for name in sorted(os.listdir(BUNDLES_DIR)):
        path = os.path.join(BUNDLES_DIR, name, "configs", "multi_gpu_train.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            text = f.read()
        config = json.loads(text)
        assert "initialize" not in config, f"{name}: multi_gpu_train.json must not replace initialize"
        assert "finalize" not in config and "+finalize" in config, f"{name}: finalize must be added to"
        assert "cuda:0" not in text and "LOCAL_RANK" not in text, f"{name}: device must come from the environment"
        assert config["device"]["_target_"] == "common.engines.runtime.distributed_device"


def test_keep_heap_only_on_cpu_runs():
    assert not keep_freed_memory(enabled=True, device="cuda:0")
    assert not keep_freed_memory(enabled=False, device="cpu")
    assert keep_freed_memory(enabled=True, device="cpu") == (ctypes.util.find_library("c") is not None)
