"""Fixtures shared by the test suite: bundle discovery, demo data and copies of bundles."""

from __future__ import annotations

import os

import pytest

from tools.bundle_io import copy_bundle, discover_bundles, on_sys_path, parse_bundle

BUNDLES = discover_bundles()
BUNDLE_IDS = [os.path.basename(b) for b in BUNDLES]


@pytest.fixture(scope="session")
def demo_data_dirs(tmp_path_factory) -> dict[str, str]:
    """Per-bundle demo dataset folders, generated lazily once per test session."""
    return {}


def demo_dataset(bundle: str, cache: dict[str, str], tmp_path_factory) -> str:
    """Generate ``bundle``'s demo data (its ``configs/demo.json`` ``demo_data``) once per session."""
    name = os.path.basename(bundle)
    if name not in cache:
        target = str(tmp_path_factory.mktemp(f"demo_{name}") / "data")
        with on_sys_path(bundle):
            parser = parse_bundle(bundle, ["inference.json", "demo.json"], dataset_dir=target)
            cache[name] = parser.get_parsed_content("demo_data")
    return cache[name]


@pytest.fixture
def bundle_copy(tmp_path):
    """A function copying a bundle (without local outputs) into the test's temp folder."""

    def _copy(bundle: str) -> str:
        return copy_bundle(bundle, str(tmp_path / os.path.basename(bundle)))

    return _copy
