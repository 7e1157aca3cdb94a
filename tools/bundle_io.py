"""Helpers shared by the tools: locating bundles, copying them, parsing their configs."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import contextmanager

from monai.bundle import ConfigParser

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
# run outputs that live inside a bundle folder while working, never in a release
LOCAL_OUTPUTS = ("demo_data", "eval", "dist", "__pycache__", "common", "*.ts", "*.onnx", "*.pt", "*.pth")


def discover_bundles() -> list[str]:
    """Absolute paths of every bundle folder under ``bundles/`` (a folder with ``configs/metadata.json``)."""
    if not os.path.isdir(BUNDLES_DIR):
        return []
    names = sorted(os.listdir(BUNDLES_DIR))
    return [
        os.path.join(BUNDLES_DIR, n)
        for n in names
        if os.path.isfile(os.path.join(BUNDLES_DIR, n, "configs", "metadata.json"))
    ]


def load_metadata(bundle_root: str) -> dict:
    with open(os.path.join(bundle_root, "configs", "metadata.json")) as f:
        return json.load(f)


def copy_bundle(bundle_root: str, dst: str) -> str:
    """Copy a bundle's tracked content (no demo data, weights or outputs) to ``dst``; return ``dst``."""
    shutil.copytree(bundle_root, dst, ignore=shutil.ignore_patterns(*LOCAL_OUTPUTS))
    os.makedirs(os.path.join(dst, "models"), exist_ok=True)
    return dst


def config_paths(bundle_root: str, names: Sequence[str]) -> list[str]:
    return [os.path.join(bundle_root, "configs", n) for n in names]


@contextmanager
def on_sys_path(path: str):
    """Put ``path`` first on ``sys.path`` for the duration (what ``PYTHONPATH=<bundle_root>`` does)."""
    sys.path.insert(0, path)
    try:
        yield
    finally:
        sys.path.remove(path)


def parse_bundle(bundle_root: str, configs: Sequence[str], **overrides) -> ConfigParser:
    """A ``ConfigParser`` over ``configs`` (names in ``configs/``) with ``bundle_root`` and overrides set."""
    parser = ConfigParser()
    parser.read_config(config_paths(bundle_root, configs))
    parser.read_meta(os.path.join(bundle_root, "configs", "metadata.json"))
    parser["bundle_root"] = bundle_root
    for key, value in overrides.items():
        parser[key] = value
    return parser
