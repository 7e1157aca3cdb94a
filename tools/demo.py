"""``python -m tools demo BUNDLE``: demo data, then train / evaluate / infer / export via ``monai.bundle``.

Every step is a real ``python -m monai.bundle`` subprocess, exactly what a user types, run from the
bundle folder with the bundle's ``configs/demo.json`` overlay.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence

from tools.bundle_io import on_sys_path, parse_bundle

STEP_CONFIGS = {
    "train": ["train.json", "demo.json"],
    "evaluate": ["train.json", "evaluate.json", "demo.json"],
    "infer": ["inference.json", "demo.json"],
}


def _config_arg(bundle: str, names: Sequence[str]) -> str:
    return "[" + ",".join(f"'{os.path.join(bundle, 'configs', n)}'" for n in names) + "]"


def _monai_bundle(bundle: str, args: list[str], env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "monai.bundle", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=bundle, check=True, env=env)


def generate_demo_data(bundle: str) -> str:
    """Instantiate ``demo_data`` from ``configs/demo.json`` (idempotent) and return the dataset folder."""
    with on_sys_path(bundle):
        return parse_bundle(bundle, ["inference.json", "demo.json"]).get_parsed_content("demo_data")


def run_demo(bundle: str, epochs: int | None = None, steps: Sequence[str] = ("train", "evaluate", "infer", "export")):
    bundle = os.path.abspath(bundle)
    start = time.time()
    print(f"demo data: {generate_demo_data(bundle)} ({time.time() - start:.0f} s)", flush=True)
    logging_file = os.path.join(bundle, "configs", "logging.conf")
    for step in steps:
        step_start = time.time()
        if step == "export":
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [bundle, os.environ.get("PYTHONPATH")]))}
            args = ["ckpt_export", "network_def", "--filepath", os.path.join(bundle, "models", "model.ts")]
            args += ["--ckpt_file", os.path.join(bundle, "models", "model.pt")]
            args += ["--meta_file", os.path.join(bundle, "configs", "metadata.json")]
            args += ["--config_file", _config_arg(bundle, ["inference.json", "demo.json"]), "--bundle_root", bundle]
            _monai_bundle(bundle, args, env=env)
        elif step in STEP_CONFIGS:
            names = STEP_CONFIGS[step]
            if not all(os.path.exists(os.path.join(bundle, "configs", n)) for n in names):
                print(f"skip {step}: the bundle has no {names}")
                continue
            args = ["run", "--config_file", _config_arg(bundle, names), "--bundle_root", bundle]
            args += ["--logging_file", logging_file]
            if step == "train" and epochs is not None:
                args += ["--max_epochs", str(epochs)]
            _monai_bundle(bundle, args)
        else:
            raise SystemExit(f"unknown demo step {step!r}; choose from train, evaluate, infer, export")
        print(f"== {step} done in {time.time() - step_start:.0f} s", flush=True)
    print(f"demo finished in {time.time() - start:.0f} s; outputs in {bundle}/models and {bundle}/eval")
