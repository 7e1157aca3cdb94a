"""Release zips: ``<name>_v<version>.zip`` with one top-level folder and the part of ``common`` it uses inside.

Only the modules a bundle's configs reach are vendored: the import closure (``modulefinder``) of every
``common`` path named by a ``_target_`` or a ``$`` expression in ``configs/``.

Files under ``models/`` that exist locally (trained weights) go into the zip and into its
``large_files.yml`` with their sha256, so a user of the zip can check them with
``python -m monai.bundle download_large_files``; the git copy of the bundle is never modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from modulefinder import ModuleFinder

import yaml
from monai.apps.utils import download_url, extractall

import common
from tools.bundle_io import REPO_ROOT, copy_bundle, discover_bundles, load_metadata

COMMON_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(common.__file__)))  # the folder holding ``common``
COMMON_PATH = re.compile(r"\bcommon(?:\.\w+)+")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
DEFAULT_URL_TEMPLATE = "https://github.com/OWNER/REPO/releases/download/{name}_v{version}/{file}"
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_strings(node: object, key: str = "") -> Iterator[str]:
    """``_target_`` values and ``$`` expressions anywhere in a parsed config."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _config_strings(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _config_strings(v)
    elif isinstance(node, str) and (key == "_target_" or node.startswith("$")):
        yield node


def _module_of(dotted: str, root: str) -> str:
    """The longest prefix of ``dotted`` that is a module or package under ``root`` (at least ``common``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        base = os.path.join(root, *parts[:end])
        if os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py")):
            return ".".join(parts[:end])
    return parts[0]


def config_references(bundle: str) -> dict[str, set[str]]:
    """Dotted ``common`` paths each config file of ``bundle`` names in ``_target_`` values or ``$`` expressions."""
    folder = os.path.join(bundle, "configs")
    references = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(CONFIG_SUFFIXES):
            continue
        path = os.path.join(folder, name)
        with open(path) as f:
            config = json.load(f) if name.endswith(".json") else yaml.safe_load(f)
        references[path] = {d for text in _config_strings(config) for d in COMMON_PATH.findall(text)}
    return references


def vendored_files(bundle: str, root: str = COMMON_ROOT) -> list[str]:
    """Files of ``common`` (relative to ``root``) in the import closure of the modules ``bundle``'s configs name.

    A name its module does not define raises ``ValueError`` naming the config file.
    """
    finder = ModuleFinder(path=[root])  # only our tree: third-party imports are recorded, not followed
    for path, dotted_names in config_references(bundle).items():
        for dotted in sorted(dotted_names):
            module = _module_of(dotted, root)
            finder.import_hook(module)
            attribute = dotted[len(module) + 1 :].split(".")[0]
            if attribute and attribute not in finder.modules[module].globalnames:
                raise ValueError(f"{path}: {dotted!r} names nothing in {module}")
    files = {
        os.path.relpath(m.__file__, root)
        for n, m in finder.modules.items()
        if (n == "common" or n.startswith("common.")) and m.__file__
    }
    return sorted(files)


def _release_weights(bundle: str) -> list[str]:
    """Trained weights present in ``models/`` (relative paths), excluding resume state and exports for CI."""
    models = os.path.join(bundle, "models")
    if not os.path.isdir(models):
        return []
    names = sorted(
        n for n in os.listdir(models) if n.endswith(WEIGHT_SUFFIXES) and not n.startswith(("last", "verify"))
    )
    return [f"models/{n}" for n in names]


def _write_large_files(staged: str, weights: list[str], name: str, version: str, url_template: str) -> None:
    path = os.path.join(staged, "large_files.yml")
    with open(path) as f:
        spec = yaml.safe_load(f) or {}  # official_files / convert (tools weights) are kept as they are
    entries = spec.get("large_files") or []
    listed = {e["path"] for e in entries}
    for rel in weights:
        file_hash = sha256_of(os.path.join(staged, rel))
        url = url_template.format(name=name, version=version, file=os.path.basename(rel))
        if rel in listed:
            entry = next(e for e in entries if e["path"] == rel)
            if entry.get("hash_val") and entry["hash_val"] != file_hash:
                raise ValueError(
                    f"{rel}: local file sha256 {file_hash} differs from large_files.yml {entry['hash_val']}"
                )
            entry.update(hash_val=file_hash, hash_type="sha256")
        else:
            entries.append({"path": rel, "url": url, "hash_val": file_hash, "hash_type": "sha256"})
    with open(path, "w") as f:
        yaml.safe_dump({**spec, "large_files": entries}, f, sort_keys=False)


def package_bundle(bundle: str, out_dir: str = "dist", url_template: str | None = None) -> str:
    """Write ``<out_dir>/<name>_v<version>.zip`` and return its path; refuses to overwrite an existing zip."""
    bundle = os.path.abspath(bundle)
    name = os.path.basename(os.path.normpath(bundle))
    version = load_metadata(bundle)["version"]
    os.makedirs(out_dir, exist_ok=True)
    zip_path = os.path.abspath(os.path.join(out_dir, f"{name}_v{version}.zip"))
    if os.path.exists(zip_path):
        raise FileExistsError(f"{zip_path} exists; bump the bundle version or remove the old zip")
    with tempfile.TemporaryDirectory() as tmp:
        staged = copy_bundle(bundle, os.path.join(tmp, name))
        weights = _release_weights(bundle)
        for rel in weights:
            shutil.copy2(os.path.join(bundle, rel), os.path.join(staged, rel))
        _write_large_files(staged, weights, name, version, url_template or DEFAULT_URL_TEMPLATE)
        for rel in vendored_files(bundle):
            os.makedirs(os.path.dirname(os.path.join(staged, rel)), exist_ok=True)
            shutil.copy2(os.path.join(COMMON_ROOT, rel), os.path.join(staged, rel))
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for folder, _, files in os.walk(staged):
                for file in sorted(files):
                    full = os.path.join(folder, file)
                    zf.write(full, os.path.relpath(full, tmp))
    print(f"wrote {zip_path} ({os.path.getsize(zip_path) / 1e6:.2f} MB, sha256 {sha256_of(zip_path)})")
    return zip_path


def package_all(out_dir: str = "dist", url_template: str | None = None) -> str:
    """Package every bundle and write ``model_info.json`` (name, version, sha256, size, url) beside the zips.

    ``url_template`` (``{name}``, ``{version}``, ``{file}``) gives each zip's download address; a relative one
    such as ``"{file}"`` is resolved against the index's own address by :func:`fetch_bundle`.
    """
    template = url_template or DEFAULT_URL_TEMPLATE
    index = {}
    for bundle in discover_bundles():
        zip_path = package_bundle(bundle, out_dir=out_dir, url_template=template)
        name = os.path.basename(bundle)
        version = load_metadata(bundle)["version"]
        index[f"{name}_v{version}"] = {
            "name": name,
            "version": version,
            "sha256": sha256_of(zip_path),
            "size": os.path.getsize(zip_path),
            "source": template.format(name=name, version=version, file=os.path.basename(zip_path)),
        }
    index_path = os.path.join(out_dir, "model_info.json")
    with open(index_path, "w") as f:
        json.dump(index, f, indent=4)
    print(f"wrote {index_path} ({len(index)} bundles) from {REPO_ROOT}")
    return index_path


def _read_index(index: str) -> dict:
    """``model_info.json`` from a local path or an ``http(s)://`` / ``file://`` address."""
    if "://" not in index:
        with open(index) as f:
            return json.load(f)
    with urllib.request.urlopen(index, timeout=60) as response:
        return json.load(response)


def fetch_bundle(name: str, index: str, bundle_dir: str = ".", version: str | None = None) -> str:
    """Download ``name`` listed in the ``model_info.json`` at ``index``, check its sha256, then unzip it.

    ``python -m monai.bundle download --url`` checks no hash; this does (MONAI's ``download_url`` keeps the
    file in a temporary folder until the hash matches), so a corrupted or tampered zip raises
    ``HashCheckError`` and nothing is written to ``bundle_dir``. Returns the unpacked bundle folder.
    """
    entries = [e for e in _read_index(index).values() if e["name"] == name]
    if version is not None:
        entries = [e for e in entries if e["version"] == version]
    if not entries:
        raise KeyError(f"{index}: no bundle {name!r}" + (f" version {version}" if version else ""))
    entry = max(entries, key=lambda e: tuple(int(p) for p in e["version"].split(".") if p.isdigit()))
    url = urllib.parse.urljoin(index if "://" in index else f"file://{os.path.abspath(index)}", entry["source"])
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = os.path.join(tmp, os.path.basename(urllib.parse.urlparse(url).path))
        download_url(url, filepath=zip_path, hash_val=entry["sha256"], hash_type="sha256", progress=False)
        extractall(zip_path, output_dir=bundle_dir, has_base=True)
    return os.path.join(bundle_dir, name)
