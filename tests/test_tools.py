"""The tools' own checks fail where the model-zoo CI would, with a message naming the problem."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tools.bundle_io import BUNDLES_DIR, copy_bundle
from tools.package import package_bundle
from tools.verify import (
    PINNED_SCHEMA,
    SCHEMA_SHA256,
    VerificationError,
    check_files,
    check_large_files,
    check_metadata,
    check_name,
    resolve_schema,
)

BUNDLE = os.path.join(BUNDLES_DIR, "unetr_btcv_segmentation")


@pytest.fixture
def broken(tmp_path):
    """A copy of the UNETR bundle's tracked files (no local weights or outputs), for tests to break."""
    return copy_bundle(BUNDLE, str(tmp_path / "unetr_btcv_segmentation"))


def _edit_metadata(bundle, **changes) -> None:
    path = os.path.join(bundle, "configs", "metadata.json")
    meta = json.load(open(path))
    meta.update(changes)
    with open(path, "w") as f:
        f.write(json.dumps(meta, indent=4) + "\n")


def test_missing_license_is_reported(broken):
    os.remove(os.path.join(broken, "LICENSE"))
    with pytest.raises(VerificationError, match="missing required files: \\['LICENSE'\\]"):
        check_files(str(broken))


def test_unformatted_json_is_reported(broken):
    path = os.path.join(broken, "configs", "demo.json")
    with open(path, "w") as f:
        json.dump(json.load(open(os.path.join(BUNDLE, "configs", "demo.json"))), f)
    with pytest.raises(VerificationError, match="demo.json is not formatted"):
        check_files(str(broken))


def test_release_parser_breaking_name_is_rejected(tmp_path):
    with pytest.raises(VerificationError, match="without '_v'"):
        check_name(str(tmp_path / "pumit_vit_mim"))


def test_version_missing_from_changelog_is_reported(broken):
    _edit_metadata(broken, version="0.2.0")
    with pytest.raises(VerificationError, match="version 0.2.0 is not listed in the changelog"):
        check_metadata(str(broken), schema=None)


def test_metadata_schema_violation_is_reported(broken):
    _edit_metadata(broken, authors=["not", "a", "string"])
    with pytest.raises(Exception, match="authors|schema"):
        check_metadata(str(broken), schema=None)


def test_schema_with_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / "schema.json"
    fake.write_text("{}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(VerificationError, match="md5"):
        resolve_schema(str(fake), str(scratch))


def test_metadata_check_is_offline(broken, monkeypatch):
    """A plain clone (no sibling ``shared/`` folder, no network) checks metadata against the pinned schema."""
    with open(PINNED_SCHEMA, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SCHEMA_SHA256

    def no_network(*args, **kwargs):
        raise AssertionError("tools verify must not download anything")

    monkeypatch.delenv("MONAI_BUNDLE_SCHEMA", raising=False)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setattr("urllib.request.urlretrieve", no_network)
    monkeypatch.setattr("monai.apps.utils.download_url", no_network)
    assert check_metadata(str(broken), schema=None)["name"]


def test_empty_large_file_hash_is_rejected(broken):
    with open(os.path.join(broken, "large_files.yml"), "w") as f:
        f.write("large_files:\n- path: models/model.pt\n  url: https://example.org/model.pt\n  hash_val: ''\n")
        f.write("  hash_type: sha256\n")
    with pytest.raises(VerificationError, match="has no hash_val"):
        check_large_files(str(broken))


def test_package_hashes_weights_and_never_overwrites(broken, tmp_path):
    import zipfile

    import torch
    import yaml

    torch.save({"w": torch.ones(2)}, os.path.join(broken, "models", "model.pt"))
    zip_path = package_bundle(str(broken), out_dir=str(tmp_path / "dist"))
    with zipfile.ZipFile(zip_path) as zf:
        entries = yaml.safe_load(zf.read("unetr_btcv_segmentation/large_files.yml"))["large_files"]
        assert "unetr_btcv_segmentation/models/model.pt" in zf.namelist()
    (entry,) = entries
    assert entry["path"] == "models/model.pt" and len(entry["hash_val"]) == 64
    assert "large_files: []" in open(os.path.join(broken, "large_files.yml")).read()
    with pytest.raises(FileExistsError):
        package_bundle(str(broken), out_dir=str(tmp_path / "dist"))


def test_cli_names_available_converters_for_unknown_name():
    result = subprocess.run(
        [sys.executable, "-m", "tools", "convert", "nope", "a", "b"], capture_output=True, text=True, cwd=BUNDLES_DIR
    )
    assert result.returncode != 0
    assert "unknown converter 'nope'" in result.stderr and "unetr" in result.stderr


def test_cli_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "tools", "--help"], capture_output=True, text=True, cwd=BUNDLES_DIR)
    assert result.returncode == 0
    for command in ("verify", "package", "fetch", "weights", "demo", "convert", "prepare", "benchmark"):
        # fire writes help to stderr when stdout is not a terminal
        assert f"\n     {command}\n" in result.stdout + result.stderr, (
            f"'python -m tools --help' does not list {command}"
        )


def test_cli_help_of_a_plugin_prints_its_docstring_and_signature():
    """``python -m tools benchmark memory --help`` documents the plugin instead of passing ``help`` to it."""
    command = [sys.executable, "-m", "tools", "benchmark", "memory", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=BUNDLES_DIR)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Peak resident memory" in result.stdout and "main(bundle: " in result.stdout
