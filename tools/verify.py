"""Offline equivalent of the model-zoo CI for one bundle (``python -m tools verify BUNDLE``).

Checks, in order: required files and sizes, JSON formatting, the bundle name, metadata against MONAI's
schema 20240725, the changelog / ``common_version``, ``large_files.yml`` hashes, ``verify_net_in_out``,
TorchScript export through ``ckpt_export`` (reloaded, outputs compared with eager) and ONNX export run
with onnxruntime (outputs compared with eager). Tolerances come from ``metadata["verify"]["atol"]``
(default 1e-4 absolute, on outputs of randomly initialised weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import yaml
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

import common
from tools.bundle_io import copy_bundle, load_metadata, on_sys_path, parse_bundle

logger = logging.getLogger("tools.verify")

# a metadata spatial_shape item: an int, "*" or arithmetic in n and p ("32*n+32", "8*n", "2**p")
SHAPE_PATTERN = re.compile(r"[0-9np+\-*() ]+")
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
SCHEMA_ENV = "MONAI_BUNDLE_SCHEMA"
SCHEMA_SHA256 = "d95c74c2915faef04ff6a2d6bd865da922bc8cd5afb4a0719b2dc6e1220528e7"
# MONAI's schema, pinned in the repo (source URL and hashes in tools/schemas/README.md): verify works offline
PINNED_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas", "meta_schema_20240725.json")
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/demo.json",
    "docs/README.md",
    "docs/data_license.txt",
    "large_files.yml",
)
TRAINING_FILES = ("configs/train.json", "configs/evaluate.json", "configs/multi_gpu_train.json", "configs/logging.conf")
MAX_FILE_BYTES = 1024 * 1024


class VerificationError(AssertionError):
    """A bundle failed one of the checks; the message names the bundle, the check and the file."""


def _fail(bundle: str, message: str) -> None:
    raise VerificationError(f"[{os.path.basename(bundle)}] {message}")


def check_files(bundle: str) -> None:
    """Required files exist; every file is under 1 MB; JSON is 4-space indented."""
    required = REQUIRED_FILES + (
        TRAINING_FILES if os.path.exists(os.path.join(bundle, "configs", "train.json")) else ()
    )
    missing = [f for f in required if not os.path.isfile(os.path.join(bundle, f))]
    if missing:
        _fail(bundle, f"missing required files: {missing}")
    for folder, _, files in os.walk(bundle):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.getsize(path) > MAX_FILE_BYTES and "models" not in path and "demo_data" not in path:
                _fail(bundle, f"{path} is larger than 1 MB; ship it through large_files.yml")
            if name.endswith(".json") and "demo_data" not in path:
                with open(path) as f:
                    text = f.read()
                try:
                    content = json.loads(text)
                except json.JSONDecodeError as e:
                    _fail(bundle, f"{path} is not valid JSON: {e}")
                if text.strip() != json.dumps(content, indent=4, ensure_ascii=False).strip():
                    _fail(bundle, f"{path} is not formatted with 4-space indentation (json.dumps(indent=4))")


def check_name(bundle: str) -> None:
    """The zoo's release parser splits on ``_v\\d*.``: a bundle name must not contain ``_v``."""
    name = os.path.basename(os.path.normpath(bundle))
    if not re.fullmatch(r"[a-z0-9_]+", name) or "_v" in name:
        _fail(bundle, f"bundle name {name!r} must be lowercase snake_case without '_v'")


def resolve_schema(schema: str | None, scratch: str) -> str:
    """Copy the schema (option, $MONAI_BUNDLE_SCHEMA or the pinned copy; a path or a URL) into ``scratch``."""
    target = os.path.join(scratch, "schema.json")
    source = schema or os.environ.get(SCHEMA_ENV) or PINNED_SCHEMA
    if re.match(r"^https?://", source):
        urllib.request.urlretrieve(source, target)
    else:
        shutil.copyfile(source, target)
    with open(target, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    if digest != SCHEMA_MD5:
        raise VerificationError(f"schema {source} has md5 {digest}, expected {SCHEMA_MD5}")
    return target


def check_metadata(bundle: str, schema: str | None) -> dict:
    """``verify_metadata`` against schema 20240725, the changelog and ``common_version``."""
    meta_file = os.path.join(bundle, "configs", "metadata.json")
    with tempfile.TemporaryDirectory() as scratch:
        schema_file = resolve_schema(schema, scratch)
        verify_metadata(meta_file=meta_file, filepath=schema_file, hash_val=SCHEMA_MD5, hash_type="md5")
    meta = load_metadata(bundle)
    if meta["version"] not in meta.get("changelog", {}):
        _fail(bundle, f"version {meta['version']} is not listed in the changelog of {meta_file}")
    if meta.get("common_version") != common.__version__:
        _fail(bundle, f"{meta_file}: common_version {meta.get('common_version')} != common {common.__version__}")
    if "common" in meta.get("required_packages_version", {}):
        _fail(bundle, f"{meta_file}: 'common' must not be listed in required_packages_version")
    return meta


def check_large_files(bundle: str) -> None:
    """Every ``large_files.yml`` entry has a path, url, a non-empty sha256 hash (an empty one skips checks)."""
    path = os.path.join(bundle, "large_files.yml")
    with open(path) as f:
        entries = (yaml.safe_load(f) or {}).get("large_files", [])
    for entry in entries:
        for key in ("path", "url", "hash_val", "hash_type"):
            if not entry.get(key):
                _fail(bundle, f"{path}: entry {entry.get('path', entry)} has no {key}")
        if entry["hash_type"] != "sha256":
            _fail(bundle, f"{path}: {entry['path']} uses {entry['hash_type']}; use sha256")


def fake_spatial_shape(pattern: list[int | str]) -> list[int]:
    """The shape ``verify_net_in_out`` tests for a metadata ``spatial_shape`` (``n = p = 1``, ``"*"`` is 1)."""
    shape = []
    for item in pattern:
        if isinstance(item, int) or item == "*":
            shape.append(1 if item == "*" else item)
        elif isinstance(item, str) and SHAPE_PATTERN.fullmatch(item):
            shape.append(int(eval(item, {"__builtins__": {}}, {"n": 1, "p": 1})))  # digits, n, p and + - * only
        else:
            raise VerificationError(f"spatial_shape item {item!r} is not an int, '*' or arithmetic in n and p")
    return shape


def _example_inputs(meta: dict, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random inputs of the metadata's shape (patterns such as ``"32*n"`` at n = 1)."""
    image = meta["network_data_format"]["inputs"]["image"]
    shape = [1, image["num_channels"], *fake_spatial_shape(image["spatial_shape"])]
    extra = {k: torch.rand(*v, device=device) for k, v in meta.get("verify", {}).get("extra_inputs", {}).items()}
    return torch.rand(*shape, device=device), extra


def _max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs: tensors, or dicts / sequences of them (same structure)."""
    if isinstance(a, Mapping):
        if set(a) != set(b):
            raise VerificationError(f"exported output keys {sorted(b)} differ from eager {sorted(a)}")
        return max(_max_abs_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise VerificationError(f"exported output has {len(b)} items, eager {len(a)}")
        return max(_max_abs_diff(x, y) for x, y in zip(a, b))
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def check_net_in_out(bundle: str, meta: dict, device: str) -> None:
    """MONAI's ``verify_net_in_out`` (extra inputs such as LViT's text passed as tensors)."""
    settings = meta.get("verify", {})
    _, extra = _example_inputs(meta, device)
    verify_net_in_out(
        net_id=settings.get("net_id", "network_def"),
        meta_file=os.path.join(bundle, "configs", "metadata.json"),
        config_file=os.path.join(bundle, "configs", "inference.json"),
        device=device,
        extra_forward_args=extra or None,
        bundle_root=bundle,
    )


def check_exports(bundle: str, meta: dict) -> dict[str, float]:
    """TorchScript via ``ckpt_export`` and ONNX via onnxruntime, both against eager; returns max abs diffs."""
    settings = meta.get("verify", {})
    net_id, atol = settings.get("net_id", "network_def"), float(settings.get("atol", 1e-4))
    parser = parse_bundle(bundle, ["inference.json"])
    net = parser.get_parsed_content(net_id).eval()
    ckpt = os.path.join(bundle, "models", "model.pt")
    torch.save(net.state_dict(), ckpt)
    image, extra = _example_inputs(meta, "cpu")
    inputs = (image, *extra.values())
    with torch.no_grad():
        expected = net(*inputs)
    diffs: dict[str, float] = {}
    ts_settings = settings.get("torchscript", {})
    if ts_settings is not False:
        ts_path = os.path.join(bundle, "models", "verify_model.ts")
        if extra and ts_settings.get("use_trace", False):
            torch.jit.save(torch.jit.trace(net, inputs), ts_path)
        else:
            ckpt_export(
                net_id=net_id,
                filepath=ts_path,
                ckpt_file=ckpt,
                meta_file=os.path.join(bundle, "configs", "metadata.json"),
                config_file=os.path.join(bundle, "configs", "inference.json"),
                bundle_root=bundle,
                use_trace=bool(ts_settings.get("use_trace", False)),
                input_shape=list(image.shape) if ts_settings.get("use_trace", False) else None,
            )
        with torch.no_grad():
            scripted = torch.jit.load(ts_path)(*inputs)
        diffs["torchscript"] = _max_abs_diff(scripted, expected)
    if settings.get("onnx", True):
        import onnxruntime

        onnx_path = os.path.join(bundle, "models", "verify_model.onnx")
        names = ["image", *extra]
        torch.onnx.export(
            net, inputs, onnx_path, input_names=names, output_names=["pred"], dynamo=False, opset_version=17
        )
        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run(["pred"], {n: t.numpy() for n, t in zip(names, inputs)})
        diffs["onnx"] = _max_abs_diff(onnx_out, expected)
    for kind, diff in diffs.items():
        if diff > atol:
            _fail(bundle, f"{kind} output differs from eager by {diff:.3g} > atol {atol}")
    return diffs


def verify_bundle(bundle: str, schema: str | None = None, device: str = "cpu", skip_export: bool = False) -> dict:
    """Run every check on a temporary copy of ``bundle``; print one line per check; raise on failure."""
    bundle = os.path.abspath(bundle)
    report: dict[str, Any] = {}
    check_name(bundle)
    check_files(bundle)
    print(f"[ok] files, sizes, JSON format, name: {os.path.basename(bundle)}")
    meta = check_metadata(bundle, schema)
    print(f"[ok] metadata schema 20240725, changelog lists {meta['version']}, common_version {common.__version__}")
    check_large_files(bundle)
    print("[ok] large_files.yml entries carry sha256 hashes")
    settings = meta.get("verify", {})
    with tempfile.TemporaryDirectory() as tmp:
        work = copy_bundle(bundle, os.path.join(tmp, os.path.basename(bundle)))
        with on_sys_path(work):
            if settings.get("net_in_out", True):
                check_net_in_out(work, meta, device)
                print("[ok] verify_net_in_out")
            else:
                print(f"[skip] verify_net_in_out: {settings.get('skip_reason', 'disabled in metadata')}")
            if not skip_export:
                report["export_max_abs_diff"] = check_exports(work, meta)
                diffs = ", ".join(f"{k} max |diff| {v:.2e}" for k, v in report["export_max_abs_diff"].items())
                print(f"[ok] exports reload and match eager within atol {settings.get('atol', 1e-4)}: {diffs}")
    return report
