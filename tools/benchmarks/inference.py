"""``python -m tools benchmark inference BUNDLE --backends torch,onnxruntime,openvino``: inference engines side by side.

Per backend and precision, in a fresh process each (peak RSS per row): seconds per case (median after a
warm-up call, which also exports and compiles into an empty engine cache), the process's CPU seconds per
case (all threads; comparable on a shared machine where wall time is not), peak RSS, achieved GFLOP/s (the
torch fp32 FLOPs of the useful windows) and agreement with the torch fp32 outputs on the same inputs and
random weights: max abs difference of probabilities, share of equal labels and Dice of the label maps.
``--profile`` adds OpenVINO's per-layer profile (the op types that take the time, and which kernel ran
them: a ``ref`` kernel is a reference fallback).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch
from monai.inferers import SimpleInferer

from common.engines.backends import BackendInferer
from tools.benchmarks._harness import PEAK_GFLOPS, count_flops, print_table, run_phase_subprocess
from tools.bundle_io import BUNDLES_DIR, parse_bundle

MODULE = "tools.benchmarks.inference"


@dataclass(frozen=True)
class Case:
    """One bundle's benchmark input: shapes, how probabilities are read, and where the network comes from."""

    inputs: tuple[tuple[int, ...], ...]
    activation: str | None  # "softmax", "sigmoid", None (outputs are probabilities) or "features"
    sliding_window: bool = False
    network_key: str = "network_def"
    overrides: dict = field(default_factory=dict)
    configs: tuple[str, ...] = ("inference.json",)
    bundle: str | None = None  # take the network from another bundle's configs


_VIT_B = {"vit_def#pos_embed_shape": [5, 10, 10]}
CASES = {
    "unetr_btcv_segmentation": Case(((1, 1, 160, 160, 128),), "softmax", sliding_window=True),
    "clip_driven_universal_ct_segmentation": Case(((1, 1, 128, 128, 96),), "sigmoid", sliding_window=True),
    "lvit_qata_covid19_segmentation": Case(((1, 3, 224, 224), (1, 10, 768)), None),
    "lovt_cxr_segmentation": Case(((1, 3, 224, 224),), "sigmoid", overrides={"pretrained_encoder": None}),
    # the PUMIT ViT-B backbone (pretraining layout: 3 channels, 16^3 SAC patches -> 5x10x10 tokens)
    "pumit_btcv_segmentation": Case(
        ((1, 3, 80, 160, 160),),
        "features",
        network_key="vit_def",
        configs=("train.json", "train_mim.json"),
        bundle="pumit_pretraining",
    ),
}
CASES["pumit_pretraining"] = CASES["pumit_btcv_segmentation"]


def _build(bundle: str, case: Case):
    source = os.path.join(BUNDLES_DIR, case.bundle or bundle)
    parser = parse_bundle(source, list(case.configs), **case.overrides)
    torch.manual_seed(0)
    network = parser.get_parsed_content(case.network_key).eval()
    inputs = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(case.inputs)]
    if case.sliding_window:
        inner_config = parser.config["inferer"]["inferer"]
        inner = parser.get_parsed_content("inferer#inferer")
        batch = parser.get_parsed_content("sw_batch_size")
        if "sw_batch_size" not in json.dumps(inner_config):
            batch = None
    else:
        inner, batch = SimpleInferer(), None
    return network, inputs, inner, batch


def _probabilities(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(out, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(out)
    return out


def _labels(prob: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "softmax":
        return torch.nn.functional.one_hot(prob.argmax(1), prob.shape[1]).movedim(-1, 1).bool()
    return prob > 0.5


def _agreement(prob: torch.Tensor, ref: torch.Tensor, activation: str | None) -> dict:
    diff = (prob - ref).abs().max().item()
    if activation == "features":
        return {"max_abs_diff": diff, "rel_l2": ((prob - ref).norm() / ref.norm()).item()}
    a, b = _labels(prob, activation), _labels(ref, activation)
    if activation == "softmax":
        equal = (prob.argmax(1) == ref.argmax(1)).float().mean().item()
    else:
        equal = (a == b).float().mean().item()
    dims = tuple(range(2, a.dim()))
    inter, total = (a & b).sum(dims).float(), (a.sum(dims) + b.sum(dims)).float()
    present = total > 0
    dice = (2 * inter[present] / total[present]).mean().item() if present.any() else 1.0
    return {"max_abs_diff": diff, "label_agreement": equal, "dice": dice}


def phase(bundle: str, backend: str, precision: str, reference: str, repeats: int = 2, profile: bool = False) -> dict:
    """Time ``repeats`` cases after one warm-up (cold export + compile) and compare with the fp32 torch output."""
    import time

    case = CASES[bundle]
    network, inputs, inner, batch = _build(bundle, case)
    with tempfile.TemporaryDirectory() as cache:
        config = {"PERF_COUNT": True} if profile and backend == "openvino" else None
        inferer = BackendInferer(inner, backend, precision, cache, batch, fallback=False, engine_config=config)
        with torch.no_grad():
            start = time.perf_counter()
            out = inferer(inputs[0], network, *inputs[1:])
            first = time.perf_counter() - start
            times, cpu = [], []
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                out = inferer(inputs[0], network, *inputs[1:])
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        engine = inferer._engine.engine if inferer._engine is not None else None
        top = engine.profile() if config and engine is not None else None
    prob = _probabilities(out.float(), case.activation)
    # CPU seconds (all threads) stay comparable on a shared machine, where wall time does not
    result = {"seconds": sorted(times)[len(times) // 2], "cpu_seconds": sorted(cpu)[len(cpu) // 2]}
    result["first_call_seconds"] = first
    if backend == "torch" and precision == "float32":
        torch.save(prob, reference)
    else:
        result.update(_agreement(prob, torch.load(reference, weights_only=True), case.activation))
    if top:
        result["profile"] = top
    return result


def flops(bundle: str) -> dict:
    """FLOPs of one case on torch fp32 (one network call per window, counted on one window and multiplied)."""
    case = CASES[bundle]
    network, inputs, inner, _ = _build(bundle, case)
    with torch.no_grad():
        if not case.sliding_window:
            return {"gflop": count_flops(lambda: network(*inputs)) / 1e9}
        calls = []
        inner(inputs[0], lambda x: calls.append(x.shape[0]) or torch.zeros(x.shape[0], 1, *x.shape[2:]))
        window = torch.rand(1, *inputs[0].shape[1:2], *inner.roi_size)
        return {"gflop": count_flops(lambda: network(window)) * sum(calls) / 1e9}


def main(
    bundle: str,
    backends: str | tuple = "torch,onnxruntime,openvino",
    precisions: str | tuple = "float32",
    repeats: int = 2,
    threads: int = 2,
    profile: bool = False,
    json_out: str | None = None,
) -> list[dict]:
    """Print one row per backend x precision; torch fp32 always runs first as the reference."""
    bundle = os.path.basename(os.path.normpath(bundle))
    if bundle not in CASES:
        raise SystemExit(f"no inference benchmark for {bundle!r}; available: {', '.join(sorted(CASES))}")
    names = [b for b in (backends.split(",") if isinstance(backends, str) else backends) if b]
    dtypes = [p for p in (precisions.split(",") if isinstance(precisions, str) else precisions) if p]
    runs = [("torch", "float32")] + [(b, p) for b in names for p in dtypes if (b, p) != ("torch", "float32")]
    gflop = run_phase_subprocess(MODULE, "flops", bundle=bundle, threads=threads)["gflop"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "reference.pt")
        for backend, precision in runs:
            options = {"bundle": bundle, "backend": backend, "precision": precision, "reference": reference}
            result = run_phase_subprocess(MODULE, "phase", **options, repeats=repeats, profile=profile, threads=threads)
            row = {"backend": backend, "precision": precision, **result}
            row["gflop_per_s"] = gflop / row["seconds"]
            rows.append(row)
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        row["cpu_speedup"] = rows[0]["cpu_seconds"] / row["cpu_seconds"]
    columns = ["backend", "precision", "seconds", "speedup", "cpu_seconds", "cpu_speedup", "first_call_seconds"]
    columns += ["peak_rss_gb", "gflop_per_s"]
    columns += ["max_abs_diff", "label_agreement", "dice", "rel_l2"]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in PEAK_GFLOPS.items())
    print_table(f"{bundle}: {gflop:.0f} GFLOP per case; peak GFLOP/s {peaks}; {threads} threads", rows, columns)
    for row in rows:
        for line in row.get("profile") or []:
            print(f"  {row['backend']} {row['precision']} profile: {line}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
