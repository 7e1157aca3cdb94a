"""``python -m tools verify|package|fetch|weights|demo|convert|prepare|benchmark|gpucheck``: the CLI."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import fire


def _plugin(package: str, name: str, attr: str):
    """``tools.<package>.<name>.<attr>``, with the available names listed when ``name`` is unknown."""
    modules = pkgutil.iter_modules(importlib.import_module(f"tools.{package}").__path__)
    available = sorted(m.name for m in modules if not m.name.startswith("_"))
    if name not in available:
        raise SystemExit(f"unknown {package[:-1]} {name!r}; available: {', '.join(available) or 'none'}")
    return getattr(importlib.import_module(f"tools.{package}.{name}"), attr)


def _run_plugin(package: str, name: str, attr: str, args: tuple, kwargs: dict) -> Any:
    """Call a plugin; ``--help`` prints its module docstring and signature instead (fire cannot see through
    the ``*args, **kwargs`` of the dispatching command)."""
    fn = _plugin(package, name, attr)
    if kwargs.pop("help", False) or "--help" in args:
        module = inspect.getmodule(fn)
        print(f"python -m tools {package.rstrip('s')} {name} ARGS\n\n{inspect.getdoc(module) or ''}\n")
        print(f"{attr}{inspect.signature(fn)}")
        return None
    return fn(*args, **kwargs)


class Tools:
    """Verify, package, fetch, demo, convert, prepare and benchmark the bundles under ``bundles/``."""

    def verify(self, bundle: str, schema: str | None = None, device: str = "cpu", skip_export: bool = False) -> None:
        """Offline model-zoo checks for one bundle (files, metadata schema, net in/out, TorchScript, ONNX)."""
        from tools.verify import verify_bundle

        verify_bundle(bundle, schema=schema, device=device, skip_export=skip_export)

    def package(
        self, bundle: str | None = None, out_dir: str = "dist", all: bool = False, url_template: str | None = None
    ):
        """Write release zip(s) ``<name>_v<version>.zip`` with ``common`` vendored (``--all`` adds an index)."""
        from tools.package import package_all, package_bundle

        if all:
            return package_all(out_dir=out_dir, url_template=url_template)
        if bundle is None:
            raise SystemExit("name a bundle folder or pass --all")
        return package_bundle(bundle, out_dir=out_dir)

    def fetch(self, name: str, index: str, bundle_dir: str = ".", version: str | None = None) -> str:
        """Download a bundle listed in a ``model_info.json`` index, check its sha256, then unzip it."""
        from tools.package import fetch_bundle

        return fetch_bundle(name, index, bundle_dir=bundle_dir, version=version)

    def weights(self, bundle: str, source: str = "official", progress: bool = True) -> None:
        """Download (resumable, hash-checked), convert and strictly load a bundle's released weights."""
        from tools.weights import fetch_weights

        fetch_weights(bundle, source=source, progress=progress)

    def demo(self, bundle: str, epochs: int | None = None, steps: str = "train,evaluate,infer,export") -> None:
        """Generate the bundle's demo data, then train, evaluate, infer and export through ``monai.bundle``."""
        from tools.demo import run_demo

        run_demo(bundle, epochs=epochs, steps=tuple(s.strip() for s in steps.split(",") if s.strip()))

    def convert(self, name: str, src: str, dst: str, **kwargs: Any) -> None:
        """Map an official checkpoint layout onto ours (``tools/converters/<name>.py``)."""
        _run_plugin("converters", name, "convert", (src, dst), kwargs)

    def prepare(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Turn an official raw download into the layout a bundle reads (``tools/preparers/<name>.py``)."""
        _run_plugin("preparers", name, "main", args, kwargs)

    def benchmark(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Print train-step and inference figures for one model (``tools/benchmarks/<name>.py``)."""
        _run_plugin("benchmarks", name, "main", args, kwargs)

    def gpucheck(
        self,
        smoke: bool = False,
        bundles: str | None = None,
        steps: str = "train,validate,infer,export,torchrun,tensorrt",
        iterations: int | None = None,
        out: str = "gpucheck.json",
    ) -> None:
        """Every bundle's train/validate/infer/export/torchrun on CUDA with AMP, timed (``--smoke``: CPU, tiny)."""
        from tools.gpucheck import main as gpucheck_main

        gpucheck_main(smoke=smoke, bundles=bundles, steps=steps, iterations=iterations, out=out)


def main() -> None:
    from common.weights.io import CheckpointError
    from tools.verify import VerificationError
    from tools.weights import WeightsError

    try:
        fire.Fire(Tools(), name="tools")  # an instance: --help then lists the commands
    except VerificationError as e:
        raise SystemExit(f"verification failed: {e}") from None
    except (CheckpointError, FileNotFoundError, WeightsError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
