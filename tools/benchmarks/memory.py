"""Peak resident memory of MONAI Label's 1-epoch training and of inference for a 3D bundle at its real config.

``python -m tools benchmark memory --bundle unetr_btcv_segmentation``: two CT-sized phantoms (512x512x100
voxels at 0.76x0.76x3 mm, int16, like a BTCV scan) are written to ``--data_dir``; training then runs as
MONAI Label's ``BundleTrainTask`` calls it (``monai.bundle.run`` with ``run_id=""`` and no init/final
ids, one training and one validation image, ``max_epochs`` 1, CPU) and inference runs ``inference.json``
on one image. Each phase is its own process; its peak RSS (largest process) and the peak of the summed
RSS of the process and its DataLoader workers (sampled every 0.2 s; pages shared after ``fork`` count once
per process, so this sum is an upper bound) are printed. ``--overrides '{"overlap": 0.25}'`` adds config ids to
both phases (fewer sliding windows: the same peak, a shorter run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from common.demo.btcv import write_btcv_demo
from tools.benchmarks._harness import print_table
from tools.bundle_io import BUNDLES_DIR

RUN = """
import json, os, sys
from monai.bundle import run
root, configs, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.path.insert(0, root)
meta = os.path.join(root, "configs", "metadata.json")
paths = [os.path.join(root, "configs", c) for c in configs]
model = overrides.pop("init_weights", None)
if model and not os.path.exists(model):  # inference without a trained checkpoint: random weights, same memory
    import torch
    from monai.bundle import ConfigParser
    parser = ConfigParser()
    parser.read_config(paths)
    parser.update({"bundle_root": root})
    os.makedirs(os.path.dirname(model), exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), model)
run(run_id=overrides.pop("run_id"), init_id=overrides.pop("init_id", "initialize"),
    final_id=overrides.pop("final_id", "finalize"), meta_file=meta,
    config_file=paths, **overrides)
"""


def _tree_rss_kb(pid: int) -> int:
    """Summed VmRSS of ``pid`` and its descendants (Linux ``/proc``)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _measure(root: str, configs: list[str], overrides: dict) -> dict:
    command = [sys.executable, "-c", RUN, root, json.dumps(configs), json.dumps(overrides)]
    env = {**os.environ, "PYTHONPATH": ""}
    start, peak_tree = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here: usage is this phase's alone
            if pid:
                break
            peak_tree = max(peak_tree, _tree_rss_kb(proc.pid))
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{configs} failed:\n{log.read()[-4000:]}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss / 1024**2, "tree_gb": peak_tree / 1024**2}


def _class_embedding_override(root: str, work_dir: str) -> dict:
    """The Universal Model's class-embedding file: random, of CLIP's shape [32, 512] (the same memory)."""
    with open(os.path.join(root, "configs", "train.json")) as f:
        if "embedding_file" not in json.load(f):
            return {}
    import torch

    path = os.path.join(work_dir, "random_txt_encoding.pth")
    os.makedirs(work_dir, exist_ok=True)
    torch.save(torch.randn(32, 512, dtype=torch.float16), path)
    return {"embedding_file": path}


def main(
    bundle: str = "unetr_btcv_segmentation",
    data_dir: str | None = None,
    phases: str | tuple[str, ...] = "train,infer",
    shape: str | tuple[int, ...] = "512,512,100",
    num_workers: int | None = None,
    overrides: dict | str | None = None,
) -> list[dict]:
    root = os.path.join(BUNDLES_DIR, bundle) if not os.path.isdir(bundle) else os.path.abspath(bundle)
    size = tuple(int(s) for s in (shape.split(",") if isinstance(shape, str) else shape))  # fire passes a tuple
    phases = phases.split(",") if isinstance(phases, str) else phases
    data_dir = data_dir or os.path.join(tempfile.gettempdir(), "ct_phantoms_" + "x".join(map(str, size)))
    write_btcv_demo(data_dir, num_training=1, num_validation=1, num_test=1, shape=size, spacing=(0.76, 0.76, 3.0))
    with open(os.path.join(data_dir, "dataset_0.json")) as f:
        split = json.load(f)
    records = [{k: os.path.join(data_dir, v) for k, v in r.items()} for r in split["training"] + split["validation"]]
    rows = []
    extra = {} if num_workers is None else {"num_workers": num_workers}
    extra |= json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    work_dir = os.path.join(data_dir, os.path.basename(root))  # checkpoints and outputs of this bundle only
    for phase in [p.strip() for p in phases if p.strip()]:
        if phase == "train":
            ids = {"run_id": "", "init_id": None, "final_id": None, "bundle_root": root, "device": "cpu"}
            ids |= {"train#trainer#max_epochs": 1, "train#dataset#data": records[:1]}
            ids |= {"validate#dataset#data": records[1:2], "ckpt_dir": os.path.join(work_dir, "models")}
            ids |= {"output_dir": os.path.join(work_dir, "eval"), "use_tensorboard": False}
            ids |= _class_embedding_override(root, work_dir)
            result = _measure(root, ["train.json"], ids | extra)
        elif phase == "infer":
            ids = {"run_id": "run", "bundle_root": root, "dataset_dir": data_dir, "device": "cpu"}
            ids |= {"input_dir": os.path.join(data_dir, "imagesTs")}  # the test image only
            ids |= {"output_dir": os.path.join(work_dir, "eval")}
            ids |= {"ckpt_dir": os.path.join(work_dir, "models")}  # the checkpoint training wrote, if any
            ids |= {"init_weights": os.path.join(work_dir, "models", "model.pt")}
            result = _measure(root, ["inference.json"], ids | extra)
        else:
            raise SystemExit(f"unknown phase {phase!r}; use train and/or infer")
        rows.append({"bundle": os.path.basename(root), "phase": phase, **result})
    print_table(
        f"peak memory, {'x'.join(map(str, size))} CT phantoms, CPU",
        rows,
        ["bundle", "phase", "seconds", "peak_rss_gb", "tree_gb"],
    )
    return rows
