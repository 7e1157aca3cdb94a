"""``python -m tools gpucheck [--smoke]``: every bundle's real train config on the target device, timed.

Per bundle, on a copy with its demo data: a few training iterations through ``train.json`` with AMP on
and off (s/iter, images/s, peak ``torch.cuda.max_memory_allocated``, last loss), the validation pass
its ``ValidationHandler`` runs with the real inferer, ``inference.json`` on one case, TorchScript and
ONNX export of the trained network (compared with eager on the device), a 1-process ``torchrun`` of
``multi_gpu_train.json`` (NCCL on CUDA) and, when ``tensorrt`` imports, ``monai.networks.trt_compile``
timing. Without ``--smoke`` the network and patch sizes of ``train.json`` replace the demo's shrunken
ones (paper size); ``--smoke`` keeps the demo sizes and runs every step on the CPU, so the test suite
exercises the same code. One table per bundle is printed and all of them are written as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.engines import IterationEvents

from tools.bundle_io import config_paths, copy_bundle, discover_bundles, load_metadata, on_sys_path, parse_bundle

STEPS = ("train", "validate", "infer", "export", "torchrun", "tensorrt")
# demo.json keys that shrink the paper setup; without --smoke they take train.json's value again
PAPER_KEYS = ("roi_size", "img_size", "image_size", "patch_size", "sw_batch_size", "num_samples", "batch_size")


def _paper_overrides(root: str) -> dict[str, Any]:
    """``train.json``'s values for the network and size keys ``demo.json`` changes."""
    with open(os.path.join(root, "configs", "demo.json")) as f:
        demo = json.load(f)
    train = ConfigParser()
    train.read_config(config_paths(root, ["train.json"]))
    out: dict[str, Any] = {}
    for key in demo:
        top = key.split("#")[0]
        if (top.startswith("network_def") or top in PAPER_KEYS) and top in train.config:
            out[top] = train.config[top]
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _loss_value(output: Any) -> float | None:
    items = output if isinstance(output, list) else [output]
    for item in items:
        if isinstance(item, dict) and "loss" in item:
            return float(item["loss"])
    return None


class _Probe:
    """Per-iteration times, batch sizes, last loss and one input batch of a trainer; validation time."""

    def __init__(self, trainer: Any, evaluator: Any) -> None:
        self.times: list[float] = []
        self.images: list[int] = []
        self.loss: float | None = None
        self.batch: Any = None
        self.validate_s = 0.0
        self._start = 0.0
        trainer.add_event_handler(Events.ITERATION_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._completed)
        trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._forward)
        if evaluator is not None:
            evaluator.add_event_handler(Events.STARTED, self._started)
            evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def _started(self, engine: Any) -> None:
        if engine.state.device.type == "cuda":
            torch.cuda.synchronize(engine.state.device)
        self._start = time.perf_counter()

    def _forward(self, engine: Any) -> None:
        if self.batch is None and isinstance(engine.state.output, dict):
            self.batch = engine.state.output.get("image")

    def _completed(self, engine: Any) -> None:
        if engine.state.device.type == "cuda":
            torch.cuda.synchronize(engine.state.device)
        self.times.append(time.perf_counter() - self._start)
        image = engine.state.batch.get("image") if isinstance(engine.state.batch, dict) else None
        self.images.append(int(image.shape[0]) if isinstance(image, torch.Tensor) else 1)
        self.loss = _loss_value(engine.state.output)

    def _validated(self, engine: Any) -> None:
        self.validate_s += time.perf_counter() - self._start


def _train(root: str, configs: list[str], overrides: dict, amp: bool, iterations: int) -> tuple[dict, Any, _Probe]:
    """Train ``iterations`` iterations (1 epoch, validation of one batch at its end); return figures + parser."""
    overrides = {**overrides, "train#trainer#max_epochs": 1, "train#trainer#epoch_length": iterations}
    overrides |= {"validate#evaluator#epoch_length": 1, "train#trainer#amp": amp, "validate#evaluator#amp": amp}
    workflow = ConfigWorkflow(
        config_file=config_paths(root, configs),
        meta_file=os.path.join(root, "configs", "metadata.json"),
        workflow_type="train",
        bundle_root=root,
        **overrides,
    )
    workflow.initialize()
    device = torch.device(workflow.parser.get_parsed_content("device"))
    probe = _Probe(workflow.parser.get_parsed_content("train#trainer"), _maybe(workflow.parser, "validate#evaluator"))
    _peak_reset(device)
    workflow.run()
    workflow.finalize()
    steady = probe.times[1:] or probe.times  # the first iteration pays for allocation and autotuning
    s_iter = sum(steady) / len(steady)
    figures = {
        "s_per_iter": round(s_iter, 4),
        "images_per_s": round(sum(probe.images[-len(steady) :]) / sum(steady), 2),
        "peak_mem_mib": _peak_mib(device),
        "loss": probe.loss,
    }
    return figures, workflow.parser, probe


def _maybe(parser: ConfigParser, key: str) -> Any:
    return parser.get_parsed_content(key) if key in parser else None


def _export(parser: ConfigParser, meta: dict, batch: torch.Tensor, device: torch.device, out_dir: str) -> dict:
    """TorchScript (script, or trace per metadata) and ONNX of the trained network, compared with eager."""
    settings = meta.get("verify", {})
    net = parser.get_parsed_content(settings.get("net_id", "network_def")).to(device).eval()
    extra = {k: torch.rand(*v, device=device) for k, v in settings.get("extra_inputs", {}).items()}
    inputs = (batch[:1].to(device).float(), *extra.values())
    with torch.no_grad():
        expected = net(*inputs)
    result: dict[str, Any] = {}
    ts = settings.get("torchscript", {})
    if ts is not False:
        with torch.no_grad():
            scripted, secs = _timed(
                lambda: torch.jit.trace(net, inputs) if ts.get("use_trace", False) or extra else torch.jit.script(net)
            )
            diff = (scripted(*inputs) - expected).abs().max().item() if isinstance(expected, torch.Tensor) else None
        result["torchscript"] = {"s": round(secs, 2), "max_abs_diff": diff}
    if settings.get("onnx", True):
        path = os.path.join(out_dir, "gpucheck.onnx")
        names = ["image", *extra]
        _, secs = _timed(
            lambda: torch.onnx.export(net, inputs, path, input_names=names, output_names=["pred"], dynamo=False)
        )
        result["onnx"] = {"s": round(secs, 2), "mib": round(os.path.getsize(path) / 2**20, 1)}
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
            session = onnxruntime.InferenceSession(path, providers=[*providers, "CPUExecutionProvider"])
            (out,) = session.run(["pred"], {n: t.cpu().numpy() for n, t in zip(names, inputs)})
            if isinstance(expected, torch.Tensor):
                result["onnx"]["max_abs_diff"] = float((torch.as_tensor(out) - expected.cpu()).abs().max())
    return result


def _tensorrt(parser: ConfigParser, meta: dict, batch: torch.Tensor, device: torch.device, out_dir: str) -> dict:
    """``monai.networks.trt_compile`` fp16 engine vs eager: forward seconds of each."""
    if device.type != "cuda" or importlib.util.find_spec("tensorrt") is None:
        return {"skipped": "needs CUDA and the tensorrt package"}
    from monai.networks import trt_compile

    settings = meta.get("verify", {})
    net = parser.get_parsed_content(settings.get("net_id", "network_def")).to(device).eval()
    extra = [torch.rand(*v, device=device) for v in settings.get("extra_inputs", {}).values()]
    inputs = (batch[:1].to(device).float(), *extra)

    def forward_s(model: torch.nn.Module) -> float:
        with torch.no_grad():
            model(*inputs)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(5):
                model(*inputs)
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / 5

    eager = forward_s(net)
    trt = trt_compile(net, os.path.join(out_dir, "gpucheck_trt"), args={"precision": "fp16"})
    return {"eager_s": round(eager, 4), "trt_s": round(forward_s(trt), 4)}


def _torchrun(root: str, configs: list[str], overrides: dict, timeout: int = 900) -> dict:
    """One ``torchrun`` process through ``multi_gpu_train.json`` (NCCL on CUDA, gloo on CPU), two iterations."""
    paths = "[" + ",".join(f"'{p}'" for p in config_paths(root, configs)) + "]"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1"]
    command += ["-m", "monai.bundle", "run", "--config_file", paths, "--bundle_root", root]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    command += ["--train#trainer#max_epochs", "1", "--train#trainer#epoch_length", "2"]
    command += ["--validate#evaluator#epoch_length", "1"]
    result, secs = _timed(lambda: subprocess.run(command, capture_output=True, text=True, timeout=timeout))
    if result.returncode != 0:
        raise RuntimeError(f"torchrun exited {result.returncode}: {(result.stdout + result.stderr)[-2000:]}")
    return {"s": round(secs, 1), "backend": "nccl" if torch.cuda.is_available() else "gloo"}


def check_bundle(bundle: str, smoke: bool, iterations: int, steps: Sequence[str], work: str) -> dict:
    """All ``steps`` for one bundle on a copy under ``work``; a failing step is recorded, the others still run."""
    name = os.path.basename(bundle)
    root = copy_bundle(bundle, os.path.join(work, name))
    report: dict[str, Any] = {}
    with on_sys_path(root):
        data = parse_bundle(root, ["inference.json", "demo.json"], dataset_dir=os.path.join(work, name + "_data"))
        overrides: dict[str, Any] = {"dataset_dir": data.get_parsed_content("demo_data")}
        if not smoke:
            overrides |= _paper_overrides(root)
        if smoke:
            overrides["device"] = "$torch.device('cpu')"
        meta = load_metadata(root)
        parser, probe = None, None

        def step(key: str, fn: Callable[[], Any]) -> None:
            if key not in steps:
                return
            try:
                report[key] = fn()
            except Exception as e:  # one broken step must not hide the others' figures
                report[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
                traceback.print_exc()

        has_train = os.path.exists(os.path.join(root, "configs", "train.json"))
        if has_train and "train" in steps:
            try:
                report["train_amp"], parser, probe = _train(
                    root, ["train.json", "demo.json"], overrides, True, iterations
                )
                report["train_fp32"], _, _ = _train(root, ["train.json", "demo.json"], overrides, False, iterations)
            except Exception as e:
                report["train_amp"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                traceback.print_exc()
        if probe is not None:
            step("validate", lambda: {"s": round(probe.validate_s, 3)})
            device = torch.device(parser.get_parsed_content("device"))
            step("export", lambda: _export(parser, meta, probe.batch, device, root))
            step("tensorrt", lambda: _tensorrt(parser, meta, probe.batch, device, root))

        def infer() -> dict:
            workflow = ConfigWorkflow(
                config_file=config_paths(root, ["inference.json", "demo.json"]),
                meta_file=os.path.join(root, "configs", "metadata.json"),
                workflow_type="infer",
                bundle_root=root,
                **{**overrides, "evaluator#epoch_length": 1},
            )
            workflow.initialize()
            _, secs = _timed(workflow.run)
            workflow.finalize()
            return {"s_per_case": round(secs, 3)}

        step("infer", infer)
        if has_train and os.path.exists(os.path.join(root, "configs", "multi_gpu_train.json")):
            ddp = {k: v for k, v in overrides.items() if k != "device"}
            step("torchrun", lambda: _torchrun(root, ["train.json", "multi_gpu_train.json", "demo.json"], ddp))
    return report


def _rows(report: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in report.items():
        text = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        rows.append((key, text))
    return rows


def print_table(name: str, report: dict) -> None:
    print(f"\n{name}")
    for key, text in _rows(report):
        print(f"  {key:<11} {text}")


def failures(results: dict) -> list[str]:
    """``bundle:step`` for every step that raised."""
    out = []
    for name, report in results["bundles"].items():
        out += [f"{name}:{k}" for k, v in report.items() if isinstance(v, dict) and "error" in v]
    return out


def main(
    smoke: bool = False,
    bundles: str | Sequence[str] | None = None,
    steps: str | Sequence[str] = STEPS,
    iterations: int | None = None,
    out: str = "gpucheck.json",
) -> dict:
    """Run the checks; ``bundles`` / ``steps`` narrow them (comma-separated names). Exit 1 if a step failed."""
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpucheck needs CUDA; use --smoke for the CPU run of the same code paths.")
    names = [bundles] if isinstance(bundles, str) else bundles
    names = [n for item in names for n in item.split(",") if n] if names else None
    steps = [s for item in ([steps] if isinstance(steps, str) else steps) for s in item.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown step(s) {sorted(unknown)}; choose from {', '.join(STEPS)}")
    chosen = [b for b in discover_bundles() if names is None or os.path.basename(b) in names]
    if names and len(chosen) != len(names):
        raise SystemExit(f"unknown bundle(s): {sorted(set(names) - {os.path.basename(b) for b in chosen})}")
    iterations = iterations or (2 if smoke else 5)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "cpu"
    results: dict[str, Any] = {"device": device, "smoke": smoke, "iterations": iterations, "bundles": {}}
    with tempfile.TemporaryDirectory() as work:
        for bundle in chosen:
            name = os.path.basename(bundle)
            results["bundles"][name] = check_bundle(bundle, smoke, iterations, steps, work)
            print_table(name, results["bundles"][name])
    with open(out, "w") as f:
        json.dump(results, f, indent=4)
    print(f"\nwritten {out}")
    failed = failures(results)
    if failed:
        raise SystemExit(f"gpucheck: failed steps: {', '.join(failed)}")
    return results
